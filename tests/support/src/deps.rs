//! Missing system tools: a test skips with a message, except under `NOEXIT_CI=1`, where a
//! missing dependency is a failure (a skipped test proves nothing).

use std::process::Command;

/// Whether this is CI (`NOEXIT_CI=1`).
pub fn in_ci() -> bool {
    std::env::var("NOEXIT_CI").as_deref() == Ok("1")
}

/// Whether `tool` is on `PATH`.
pub fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

/// Whether the test runs as root (network namespaces, nftables, libvirt's system daemon).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// [`missing_tools`], and `root (network namespaces, nftables)` when not root.
pub fn missing_as_root(tools: &[&str]) -> Vec<String> {
    let mut missing = missing_tools(tools);
    if !is_root() {
        missing.push("root (network namespaces, nftables)".into());
    }
    missing
}

/// The tools of `tools` that are not on `PATH`.
pub fn missing_tools(tools: &[&str]) -> Vec<String> {
    tools.iter().filter(|t| !have(t)).map(|t| t.to_string()).collect()
}

/// `true` when nothing is `missing`; otherwise prints `SKIPPED: <test> needs …` and returns
/// `false`, or panics under `NOEXIT_CI=1`. `fix` says how to install what is missing.
pub fn ready(test: &str, missing: &[String], fix: &str) -> bool {
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{test} needs {}: {fix}", missing.join(", "));
    if in_ci() {
        panic!("{msg} (NOEXIT_CI=1: not skipping)");
    }
    eprintln!("SKIPPED: {msg}");
    false
}
