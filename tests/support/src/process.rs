//! Child processes a test starts (stopped when dropped, their logs at hand) and the
//! workspace's binaries, built once per test binary.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Runs `cmd` to its end; its output, whatever the exit status (panics if it cannot start).
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs `cmd` to its end, failing the test (with its output) unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// How a [`Proc`] is stopped when dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDrop {
    /// SIGKILL at once: the process gets no chance to tidy up.
    Kill,
    /// SIGTERM, then SIGKILL if it has not exited within 5 s: its orderly shutdown runs.
    Terminate,
}

/// A child process, stopped when dropped.
pub struct Proc {
    child: Child,
    log: Option<PathBuf>,
    on_drop: OnDrop,
}

impl Proc {
    /// Spawns `cmd` with stdout discarded and stderr appended to `log`; killed when dropped.
    pub fn spawn(cmd: &mut Command, log: impl Into<PathBuf>) -> Proc {
        let log = log.into();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let child = cmd.stdout(Stdio::null()).stderr(file).spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        Proc { child, log: Some(log), on_drop: OnDrop::Kill }
    }

    /// Wraps a child spawned elsewhere; killed when dropped.
    pub fn new(child: Child) -> Proc {
        Proc { child, log: None, on_drop: OnDrop::Kill }
    }

    /// How the process is stopped when dropped.
    pub fn on_drop(mut self, how: OnDrop) -> Proc {
        self.on_drop = how;
        self
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The log so far (empty when there is none).
    pub fn log(&self) -> String {
        self.log.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default()
    }

    /// The log's path, if stderr goes to one.
    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Panics, with the log (which says why), if the process has exited.
    pub fn check_alive(&mut self, what: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{what} exited with {status}:\n{}", self.log());
        }
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: signalling our own child by pid; it is not reaped before `wait`.
        unsafe { libc::kill(pid, signal) };
    }

    /// Waits for the exit, at most `bound`.
    pub fn wait_exit(&mut self, bound: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + bound;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ctrl-C (SIGINT), an orderly shutdown; panics with the log unless it exits within `bound`.
    pub fn interrupt(&mut self, bound: Duration) -> ExitStatus {
        self.signal(libc::SIGINT);
        self.wait_exit(bound).unwrap_or_else(|| panic!("no exit {bound:?} after SIGINT:\n{}", self.log()))
    }

    /// SIGTERM, as Kubernetes stops a pod; panics with the log unless it exits within `bound`.
    pub fn terminate_within(&mut self, bound: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(bound).unwrap_or_else(|| panic!("no exit {bound:?} after SIGTERM:\n{}", self.log()))
    }

    /// SIGTERM, then SIGKILL if it has not exited within 5 s.
    pub fn terminate(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        self.signal(libc::SIGTERM);
        if self.wait_exit(Duration::from_secs(5)).is_none() {
            self.kill9();
        }
    }

    /// `kill -9`: no chance to flush or say goodbye.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        match self.on_drop {
            OnDrop::Kill => self.kill9(),
            OnDrop::Terminate => self.terminate(),
        }
    }
}

/// The directory of the workspace's binaries after `cargo build <args> --profile <this test's
/// profile>`, run once per test binary for each `args` (a test only gets `CARGO_BIN_EXE_*`
/// paths for its own package). `args` picks them: `["-p", "noexit-agent", "--bins"]`.
pub fn workspace_bins(args: &[&str]) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<Vec<String>, PathBuf>>> = Mutex::new(None);
    let key: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = built.get_or_insert_default().get(&key) {
        return dir.clone();
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    // Without the variables `cargo test` sets for this test, the build reuses what a plain
    // `cargo build` made instead of rebuilding half the tree each time.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let keep = ["CARGO_HOME", "CARGO_TARGET_DIR"].contains(&name.as_ref());
        if (name.starts_with("CARGO_") && !keep) || name == "LD_LIBRARY_PATH" {
            cmd.env_remove(name.as_ref());
        }
    }
    // A test runs from <target>/<profile>/deps/; the binaries go to <target>/<profile>/.
    let exe = std::env::current_exe().expect("the test's path");
    let dir = exe.parent().and_then(Path::parent).expect("<target>/<profile>").to_path_buf();
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev",
        Some(other) => other,
    };
    let status = cmd
        .arg("build")
        .args(args)
        .args(["--profile", profile])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("running cargo build");
    assert!(status.success(), "cargo build {args:?} failed");
    built.get_or_insert_default().insert(key, dir.clone());
    dir
}

/// The path of binary `name` built by [`workspace_bins`]`(args)`.
pub fn workspace_bin(args: &[&str], name: &str) -> PathBuf {
    let path = workspace_bins(args).join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminate_stops_a_process_and_its_log_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut p =
            Proc::spawn(Command::new("sh").args(["-c", "echo started >&2; exec sleep 30"]), dir.path().join("log"));
        crate::poll::blocking("the log line", Duration::from_secs(10), || p.log().contains("started").then_some(()));
        p.check_alive("sleep");
        let status = p.terminate_within(Duration::from_secs(10));
        assert!(!status.success(), "killed by SIGTERM: {status:?}");
        assert_eq!(p.log_tail(1), "started");
    }

    #[test]
    #[should_panic(expected = "false exited with exit status: 1")]
    fn check_alive_fails_with_the_exit_status() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Proc::spawn(&mut Command::new("false"), dir.path().join("log"));
        p.wait_exit(Duration::from_secs(10)).expect("false exits");
        p.check_alive("false");
    }
}
