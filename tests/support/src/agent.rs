//! The workspace agent as the end-to-end tests run it: in pod mode for workspace
//! `ward-7/alice-r`, against a control-plane API on `https://localhost:<port>`, with every file
//! it uses in one directory.
//!
//! The directory holds `ca.crt`, the agent's client certificate and key (`tls.crt`/`tls.key`
//! unless [`PodConfig::client_cert`] says otherwise), `agent.yaml`, the outbox, inbox and
//! spool, a fake root, and the login records `wtmp` and `utmp`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What `noexit-agent run` expects to exist in `dir`: the outbox, spool and fake root, and
/// empty `wtmp` and `utmp`.
pub fn prepare(dir: &Path) {
    for d in ["outbox", "spool", "root"] {
        std::fs::create_dir_all(dir.join(d)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(d).display()));
    }
    for f in ["wtmp", "utmp"] {
        std::fs::write(dir.join(f), b"").unwrap();
    }
}

/// The agent's configuration file, built up and then written as `agent.yaml`.
pub struct PodConfig {
    dir: PathBuf,
    project: String,
    url: String,
    port: u16,
    cert: String,
    key: String,
    canary: Option<u16>,
    inbox: bool,
}

/// The pod-mode configuration for workspace `ward-7/alice-r`, files in `dir` and the API on
/// `https://localhost:<port>`: resolver 127.0.0.53, the control plane (127.0.0.1:`port`) as the
/// only endpoint, heartbeats every second, no desktop.
pub fn pod_config(dir: &Path, port: u16) -> PodConfig {
    PodConfig {
        dir: dir.to_owned(),
        project: "ward-7".into(),
        url: format!("https://localhost:{port}"),
        port,
        cert: "tls.crt".into(),
        key: "tls.key".into(),
        canary: None,
        inbox: true,
    }
}

impl PodConfig {
    /// The workspace's project (the workspace stays `alice-r`).
    pub fn project(mut self, project: &str) -> PodConfig {
        self.project = project.into();
        self
    }

    /// The control plane's URL, where it is not `https://localhost:<port>`.
    pub fn control_plane_url(mut self, url: &str) -> PodConfig {
        self.url = url.into();
        self
    }

    /// The client certificate and key, as file names in the directory.
    pub fn client_cert(mut self, cert: &str, key: &str) -> PodConfig {
        (self.cert, self.key) = (cert.into(), key.into());
        self
    }

    /// The egress probe's "outside" address: 127.0.0.1:`port` (nothing should listen there).
    pub fn canary(mut self, port: u16) -> PodConfig {
        self.canary = Some(port);
        self
    }

    /// No `inbox:` (the agent's default then applies).
    pub fn without_inbox(mut self) -> PodConfig {
        self.inbox = false;
        self
    }

    pub fn yaml(&self) -> String {
        let (p, port, url) = (self.dir.display(), self.port, &self.url);
        let canary = self
            .canary
            .map(|c| format!("  canary: {{ name: outside, address: 127.0.0.1, port: {c} }}\n"))
            .unwrap_or_default();
        let inbox = if self.inbox { format!("inbox: {p}/inbox\n") } else { String::new() };
        format!(
            "workspace: {{ project: {project}, name: alice-r }}
controlPlane:
  url: {url}
  caFile: {p}/ca.crt
  certFile: {p}/{cert}
  keyFile: {p}/{key}
egress:
  resolvers: [127.0.0.53]
  endpoints: [{{ name: controlPlane, address: 127.0.0.1, port: {port} }}]
  desktopPort: 5901
{canary}outbox: {p}/outbox
{inbox}spool: {p}/spool
mode: pod
desktop: none
heartbeatSeconds: 1
",
            project = self.project,
            cert = self.cert,
            key = self.key,
        )
    }

    /// Writes `agent.yaml` in the directory; its path.
    pub fn write(&self) -> PathBuf {
        let path = self.dir.join("agent.yaml");
        std::fs::write(&path, self.yaml()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        path
    }
}

/// `<agent> --config <dir>/agent.yaml run` with the login records and root in `dir`; intervals,
/// environment and output are the caller's.
pub fn run_command(agent: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new(agent);
    cmd.arg("--config").arg(dir.join("agent.yaml")).arg("run");
    for (flag, file) in [("--wtmp", "wtmp"), ("--utmp", "utmp"), ("--root", "root")] {
        cmd.arg(flag).arg(dir.join(file));
    }
    cmd
}

/// `<agent> session <action> --user <user>` as the desktop's session scripts call it (display
/// `:1`, from 10.9.8.7); fails the test if the hook fails.
pub fn session_hook(agent: &Path, dir: &Path, action: &str, user: &str) {
    let out = Command::new(agent)
        .arg("--config")
        .arg(dir.join("agent.yaml"))
        .args(["session", action, "--user", user, "--session", ":1", "--source", "10.9.8.7"])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", agent.display()));
    assert!(out.status.success(), "hook failed: {}", String::from_utf8_lossy(&out.stderr));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_options_change_only_their_lines() {
        let dir = Path::new("/d");
        let plain = pod_config(dir, 8443).yaml();
        assert!(plain.starts_with("workspace: { project: ward-7, name: alice-r }\n"), "{plain}");
        assert!(plain.contains("  url: https://localhost:8443\n  caFile: /d/ca.crt\n"), "{plain}");
        assert!(plain.contains("  certFile: /d/tls.crt\n") && plain.contains("inbox: /d/inbox\n"), "{plain}");
        assert!(!plain.contains("canary"), "{plain}");
        let all = pod_config(dir, 8443)
            .project("p-1")
            .control_plane_url("https://127.0.0.1:8443")
            .client_cert("agent.crt", "agent.key")
            .canary(9)
            .without_inbox()
            .yaml();
        assert!(all.starts_with("workspace: { project: p-1, name: alice-r }\n"), "{all}");
        assert!(all.contains("  url: https://127.0.0.1:8443\n") && all.contains("  keyFile: /d/agent.key\n"), "{all}");
        assert!(all.contains("  desktopPort: 5901\n  canary: { name: outside, address: 127.0.0.1, port: 9 }\noutbox: /d/outbox\nspool: /d/spool\n"), "{all}");
        assert_eq!(plain.lines().count(), all.lines().count(), "one line more (canary), one fewer (inbox)");
    }
}
