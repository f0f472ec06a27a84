//! Thin I/O over the `nft` program: apply or delete a host table in one transaction, list
//! which of our tables exist, read a table's counters.

use std::io::Write;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
#[error("nft: {action}: {message}")]
pub struct NftError {
    pub action: String,
    pub message: String,
}

pub struct Nft {
    program: String,
}

impl Default for Nft {
    fn default() -> Self {
        Self { program: "nft".into() }
    }
}

impl Nft {
    pub fn with_program(program: impl Into<String>) -> Self {
        Self { program: program.into() }
    }

    fn run(&self, action: &str, args: &[&str], input: Option<&str>) -> Result<String, NftError> {
        let fail = |message: String| NftError { action: action.to_owned(), message };
        let mut child = Command::new(&self.program)
            .args(args)
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("cannot run {}: {e}", self.program)))?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(text.as_bytes()).map_err(|e| fail(e.to_string()))?;
        }
        let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
        if !out.status.success() {
            return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Run a script (one transaction).
    pub fn apply(&self, what: &str, script: &str) -> Result<(), NftError> {
        self.run(what, &["-f", "-"], Some(script)).map(drop)
    }

    /// Names of the `inet` tables starting with `prefix`.
    pub fn tables(&self, prefix: &str) -> Result<Vec<String>, NftError> {
        let out = self.run("listing tables", &["list", "tables", "inet"], None)?;
        Ok(out
            .lines()
            .filter_map(|l| l.trim().strip_prefix("table inet "))
            .filter(|n| n.starts_with(prefix))
            .map(str::to_owned)
            .collect())
    }

    /// Packets counted by a named counter of an `inet` table.
    pub fn counter(&self, table: &str, counter: &str) -> Result<u64, NftError> {
        let out = self.run("reading a counter", &["-j", "list", "counter", "inet", table, counter], None)?;
        let v: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| NftError { action: "reading a counter".into(), message: e.to_string() })?;
        Ok(v["nftables"].as_array().into_iter().flatten().find_map(|o| o["counter"]["packets"].as_u64()).unwrap_or(0))
    }
}
