//! The gateway's directory in single-host mode: who may open which workspace's console and
//! where it is. Pure: from the checked manifests, the stored allocations and what libvirt
//! reports about each domain to the file the gateway's `FileDirectory` reads on every call.
//!
//! Projects are decided exactly as on Kubernetes ([`project_access`]); a project that passed
//! the checks counts as approved (the checks refuse an expired one, and the approval date is
//! carried so one that expires while `up` runs is refused at once). A workspace's desktop is
//! its domain's VNC console, as the live domain XML says: `unix:<socket>` (libvirt's private
//! directory for the domain; the default) or `<vnc-listen>:<port>` (autoport), with the
//! password stored for it; only a running domain has one.

use std::collections::BTreeMap;
use std::path::PathBuf;

use noexit_gateway::directory::{DesktopPolicy, DirectoryFile, WorkspaceAccess, WorkspaceAccessFile, project_access};
use noexit_host::model::domain_name;

use super::check::Checked;
use super::world::Allocations;

/// Longest password VNC authentication uses (QEMU ignores the rest); the stored passwords are
/// this long (see `reconcile::vnc_password`).
pub const VNC_PASSWORD_MAX: usize = 8;

/// A domain as libvirt reports it now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LiveConsole {
    pub active: bool,
    /// Where the running domain's VNC console is, from its live XML: `unix:<socket>` (the
    /// default) or `<address>:<port>` (`--vnc-listen`).
    pub address: Option<String>,
}

/// Where the reconcile loop writes the directory, and the site's desktop limits.
#[derive(Clone, Debug)]
pub struct Publish {
    pub path: PathBuf,
    pub site: DesktopPolicy,
}

/// The directory file's content. `live` is keyed by domain name; a workspace without an
/// allocation (not yet made) is left out, as is one whose project is not in the manifests.
pub fn directory(
    checked: &Checked,
    alloc: &Allocations,
    live: &BTreeMap<String, LiveConsole>,
    site: &DesktopPolicy,
) -> DirectoryFile {
    let projects: Vec<_> = checked.projects.iter().map(|p| project_access(p, true, site)).collect();
    let mut workspaces = Vec::new();
    for w in &checked.workspaces {
        let Some((_, password)) = alloc.workspaces.get(&(w.project.clone(), w.name.clone())) else { continue };
        if !projects.iter().any(|p| p.name == w.project) {
            continue;
        }
        let console = live.get(&domain_name(&w.project, &w.name)).cloned().unwrap_or_default();
        let running = w.running && console.active;
        workspaces.push(WorkspaceAccessFile {
            access: WorkspaceAccess {
                project: w.project.clone(),
                name: w.name.clone(),
                owner: w.workspace.spec.owner.clone(),
                running,
                desktop: console.address.filter(|_| running),
                vnc_password: None,
            },
            vnc_password_file: None,
            vnc_password_inline: Some(password.clone()),
        });
    }
    DirectoryFile { projects, workspaces }
}

/// The file's text (YAML, as `FileDirectory` reads it).
pub fn render(file: &DirectoryFile) -> String {
    serde_yaml::to_string(file).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use noexit_gateway::directory::{FileDirectory, resolve};

    use super::*;
    use crate::manifests::parse_documents;
    use crate::single_host::check::check;
    use crate::single_host::check::tests::{MANIFESTS, files};
    use crate::single_host::reconcile::vnc_password;

    fn alloc(password: &str) -> Allocations {
        let key = ("ward-7".to_owned(), "alice-vm".to_owned());
        Allocations {
            projects: [("ward-7".to_owned(), 0)].into(),
            workspaces: [(key, (0, password.to_owned()))].into(),
            ..Default::default()
        }
    }

    fn checked() -> Checked {
        check(&parse_documents(MANIFESTS).unwrap(), &files(), Utc::now()).unwrap()
    }

    const DOMAIN: &str = "noexit-ward-7-alice-vm";
    const SOCKET: &str = "unix:/var/lib/libvirt/qemu/domain-3-noexit-ward-7-alice-vm/vnc.sock";

    #[tokio::test]
    async fn the_gateway_reads_the_owner_console_and_password_of_a_running_domain() {
        let live = [(DOMAIN.to_owned(), LiveConsole { active: true, address: Some(SOCKET.into()) })].into();
        let file = directory(&checked(), &alloc("pw123456"), &live, &DesktopPolicy::default());
        let text = render(&file);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway-directory.yaml");
        std::fs::write(&path, &text).unwrap();
        let owner = &file.workspaces[0].access.owner;
        let grant = resolve(&FileDirectory::new(&path), owner, true, "ward-7", "alice-vm").await.unwrap();
        assert_eq!(grant.address, SOCKET);
        assert_eq!(grant.password, b"pw123456");
        // The same project facts as the Kubernetes directory, approval date included.
        let p = &file.projects[0];
        assert!(p.approved && p.expires.is_some_and(|e| e > Utc::now()), "{p:?}");
        assert_eq!(
            resolve(&FileDirectory::new(&path), "mallory@x", true, "ward-7", "alice-vm").await.unwrap_err().code(),
            "notMember"
        );
    }

    #[test]
    fn a_stopped_domain_has_no_console_and_an_unmade_workspace_is_not_listed() {
        let c = checked();
        let stopped = [(DOMAIN.to_owned(), LiveConsole { active: false, address: None })].into();
        let file = directory(&c, &alloc("pw"), &stopped, &DesktopPolicy::default());
        let w = &file.workspaces[0].access;
        assert!(!w.running && w.desktop.is_none(), "{w:?}");
        // A domain libvirt still runs while the manifest says stopped: not offered.
        let mut c2 = c.clone();
        c2.workspaces[0].running = false;
        let running =
            [(DOMAIN.to_owned(), LiveConsole { active: true, address: Some("127.0.0.1:5900".into()) })].into();
        let file = directory(&c2, &alloc("pw"), &running, &DesktopPolicy::default());
        assert!(file.workspaces[0].access.desktop.is_none());
        let file = directory(&c, &Allocations::default(), &running, &DesktopPolicy::default());
        assert!(file.workspaces.is_empty() && file.projects.len() == 1);
    }

    #[test]
    fn stored_vnc_passwords_fit_vnc_authentication() {
        // VNC authentication (DES) uses the first 8 characters only: a longer password would
        // be weaker than it looks, a shorter one weaker than it needs to be.
        for _ in 0..32 {
            assert_eq!(vnc_password().len(), VNC_PASSWORD_MAX);
        }
    }
}
