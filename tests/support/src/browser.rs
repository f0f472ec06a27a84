//! Headless Chromium (Debian's), driven by the Playwright scripts in
//! `hack/test-support/browser`: what a browser test needs, and one scenario run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// `hack/test-support/browser`: the scripts, and playwright-core in `node_modules`.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../hack/test-support/browser")
}

/// What a browser test needs and this machine lacks: `chromium`, `node`, noVNC (the gateway
/// serves Debian's), playwright-core in [`dir`]. For [`crate::deps::ready`].
pub fn missing() -> Vec<String> {
    let mut missing = crate::deps::missing_tools(&["chromium", "node"]);
    if !Path::new("/usr/share/novnc/core/rfb.js").exists() {
        missing.push("novnc".into());
    }
    if !dir().join("node_modules/playwright-core").exists() {
        missing.push("playwright-core (npm ci in hack/test-support/browser)".into());
    }
    missing
}

/// Runs one scenario: `node <script> <opts as JSON>` in [`dir`]. The script prints JSON lines;
/// the one with `result` ends it, the others go to `on_line` (anything else is echoed). Fails
/// the test unless the result says `ok: true`; the result.
pub fn scenario(script: &str, opts: &Value, mut on_line: impl FnMut(&Value)) -> Value {
    let mut child = Command::new("node")
        .arg(dir().join(script))
        .arg(opts.to_string())
        .current_dir(dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("node {script}: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let mut result = Value::Null;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("the script's output");
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            eprintln!("browser: {line}");
            continue;
        };
        match v.get("result") {
            Some(r) => result = r.clone(),
            None => on_line(&v),
        }
    }
    let _ = child.wait();
    let name = &opts["scenario"];
    eprintln!("browser {name}: {result:#}");
    assert_eq!(result["ok"], Value::Bool(true), "browser scenario {name} failed: {result:#}");
    result
}
