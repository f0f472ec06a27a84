//! Applying the plan with `nft`, checking it is still in force, restoring it when not.
//!
//! Fail closed: nothing here ever deletes the table or loosens a rule. An apply is one atomic
//! nft transaction, so when it fails the previous state (old table or none) stays as it was.

use std::ffi::OsString;
use std::io::Write;
use std::process::{Command, Stdio};

use noexit_crds::agent::{AgentConfig, AgentMode, EgressState};
use serde_json::Value;

use super::EgressError;
use super::live::{self, Canonical};
use super::plan::{self, BLOCKED_IN, BLOCKED_OUT, Ruleset, TABLE};

/// The agent's hold on the table `inet noexit`.
#[derive(Debug)]
pub struct EgressLock {
    plan: Ruleset,
    nft: OsString,
    /// What a healthy table looks like: the plan, and only the plan. The live table is never
    /// taken as the reference (it could have been changed before, or while, we applied ours).
    expected: Canonical,
}

/// Result of one check of the live table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckOutcome {
    /// The table is exactly as planned.
    Intact,
    /// Someone changed or removed it; it has been put back.
    Restored { tamper: String },
    /// The table could not be confirmed (listing or restore failed). The wall is not proven.
    Failed { tamper: Option<String>, error: String },
}

/// Packets the lock turned away since the table was (re)created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockedCounts {
    pub outbound: u64,
    pub inbound: u64,
}

impl EgressLock {
    /// Plans the table for `cfg` (no I/O). Config errors are returned here.
    pub fn new(cfg: &AgentConfig) -> Result<Self, EgressError> {
        let plan = plan::plan(cfg)?;
        let expected = live::planned(&plan);
        Ok(Self { plan, nft: "nft".into(), expected })
    }

    /// Use another `nft` executable (tests; sites with nft outside `PATH`).
    pub fn with_nft(mut self, program: impl Into<OsString>) -> Self {
        self.nft = program.into();
        self
    }

    pub fn plan(&self) -> &Ruleset {
        &self.plan
    }

    /// Replaces the table with the plan and confirms it by reading it back.
    pub fn apply(&self) -> Result<EgressState, EgressError> {
        self.replace()?;
        let listing = self.list()?;
        let diff = live::differences(&self.expected, &live::from_listing(&listing));
        if !diff.is_empty() {
            // Not what we asked for: changed between our transaction and the read-back, or
            // printed differently by this nft. Either way the wall is not proven; the caller
            // retries and reports not locked meanwhile.
            return Err(EgressError::Verify(diff.join("; ")));
        }
        Ok(locked_state(format!("nftables table inet {TABLE} applied ({} rules)", self.plan.rules.len())))
    }

    /// Compares the live table with the plan; restores it if it differs.
    pub fn check_and_restore(&self) -> CheckOutcome {
        let listing = match self.list() {
            Ok(l) => l,
            Err(e) => return CheckOutcome::Failed { tamper: None, error: e.to_string() },
        };
        let diff = live::differences(&self.expected, &live::from_listing(&listing));
        if diff.is_empty() {
            return CheckOutcome::Intact;
        }
        let tamper = diff.join("; ");
        match self.apply() {
            Ok(_) => CheckOutcome::Restored { tamper },
            Err(e) => CheckOutcome::Failed { tamper: Some(tamper), error: format!("restoring the egress table: {e}") },
        }
    }

    /// Current values of the `blocked_out` / `blocked_in` counters (zero when missing).
    pub fn blocked_counts(&self) -> Result<BlockedCounts, EgressError> {
        let listing = self.list()?;
        Ok(BlockedCounts {
            outbound: live::counter_packets(&listing, BLOCKED_OUT).unwrap_or(0),
            inbound: live::counter_packets(&listing, BLOCKED_IN).unwrap_or(0),
        })
    }

    fn replace(&self) -> Result<(), EgressError> {
        const ACTION: &str = "applying the egress table";
        let payload = serde_json::to_string(&self.plan.replace_batch())
            .map_err(|e| EgressError::Nft { action: ACTION, message: e.to_string() })?;
        self.nft(ACTION, &["-j", "-f", "-"], Some(&payload)).map(drop)
    }

    /// The whole ruleset: a missing table is then an empty result, not an error to interpret.
    fn list(&self) -> Result<Value, EgressError> {
        const ACTION: &str = "listing the ruleset";
        let raw = self.nft(ACTION, &["-j", "list", "ruleset"], None)?;
        serde_json::from_str(&raw)
            .map_err(|e| EgressError::Nft { action: ACTION, message: format!("unreadable JSON: {e}") })
    }

    /// Runs nft with stderr captured (the `nftables` crate's helper lets it through to ours, and
    /// the reason for a failure belongs in the reported state).
    fn nft(&self, action: &'static str, args: &[&str], input: Option<&str>) -> Result<String, EgressError> {
        let fail = |message: String| EgressError::Nft { action, message };
        let program = self.nft.to_string_lossy().into_owned();
        let mut child = Command::new(&self.nft)
            .args(args)
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("cannot run {program}: {e}")))?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take())
            && let Err(e) = stdin.write_all(input.as_bytes())
        {
            let _ = child.kill();
            let _ = child.wait();
            return Err(fail(format!("writing to {program}: {e}")));
        }
        let out = child.wait_with_output().map_err(|e| fail(format!("waiting for {program}: {e}")))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let reason = if stderr.trim().is_empty() { out.status.to_string() } else { stderr.trim().to_string() };
            return Err(fail(format!("nft failed: {reason}")));
        }
        String::from_utf8(out.stdout).map_err(|e| fail(format!("output is not UTF-8: {e}")))
    }
}

pub(crate) fn locked_state(detail: String) -> EgressState {
    EgressState { locked: true, mode: AgentMode::Vm, detail: Some(detail), blocked_since_last: 0 }
}

/// The state to report when the lock could not be confirmed.
pub fn not_locked(error: &impl std::fmt::Display) -> EgressState {
    EgressState {
        locked: false,
        mode: AgentMode::Vm,
        detail: Some(format!("egress lock not in force: {error}")),
        blocked_since_last: 0,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::egress::live::tests::listing_of;
    use crate::egress::plan::tests::config;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};

    /// A stand-in `nft`: `-j -f -` stores the batch and makes `after-apply.json` the live
    /// listing (or fails when `fail-apply` exists); `-j list ruleset` prints `listing.json`
    /// (or fails when `fail-list` exists).
    pub(crate) struct FakeNft {
        dir: tempfile::TempDir,
    }

    impl FakeNft {
        pub(crate) fn new(after_apply: &Value) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path().display();
            let script = format!(
                "#!/bin/sh\nif [ \"$2\" = \"-f\" ]; then\n  cat > {d}/applied.json\n  \
                 if [ -e {d}/fail-apply ]; then echo 'Error: Could not process rule: Operation not supported' >&2; exit 1; fi\n  \
                 cp {d}/after-apply.json {d}/listing.json; exit 0\nfi\n\
                 if [ -e {d}/fail-list ]; then echo 'netlink: Error: cache initialization failed' >&2; exit 1; fi\n\
                 cat {d}/listing.json\n"
            );
            fs::write(dir.path().join("nft"), script).unwrap();
            fs::set_permissions(dir.path().join("nft"), fs::Permissions::from_mode(0o755)).unwrap();
            let fake = Self { dir };
            fake.set("after-apply.json", after_apply);
            fake.set("listing.json", &serde_json::json!({"nftables": []}));
            fake
        }
        pub(crate) fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
        /// Atomically, so the watcher never reads half a file.
        pub(crate) fn set(&self, name: &str, v: &Value) {
            let tmp = self.path(&format!("{name}.tmp"));
            fs::write(&tmp, v.to_string()).unwrap();
            fs::rename(tmp, self.path(name)).unwrap();
        }
        pub(crate) fn lock(&self) -> EgressLock {
            EgressLock::new(&config()).unwrap().with_nft(self.path("nft"))
        }
    }

    fn applied(path: &Path) -> Value {
        serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn apply_confirms_then_check_finds_it_intact() {
        let plan = plan::plan(&config()).unwrap();
        let fake = FakeNft::new(&listing_of(&plan));
        let lock = fake.lock();
        let state = lock.apply().unwrap();
        assert!(state.locked);
        assert_eq!(state.detail.as_deref(), Some("nftables table inet noexit applied (18 rules)"));
        assert_eq!(applied(&fake.path("applied.json")), serde_json::to_value(plan.replace_batch()).unwrap());
        assert_eq!(lock.check_and_restore(), CheckOutcome::Intact);
        assert_eq!(lock.blocked_counts().unwrap(), BlockedCounts { outbound: 7, inbound: 7 });
    }

    #[test]
    fn a_flushed_table_is_restored_and_named() {
        let plan = plan::plan(&config()).unwrap();
        let fake = FakeNft::new(&listing_of(&plan));
        let lock = fake.lock();
        lock.apply().unwrap();
        fake.set("listing.json", &serde_json::json!({"nftables": [{"metainfo": {}}]}));
        assert_eq!(
            lock.check_and_restore(),
            CheckOutcome::Restored { tamper: "table inet noexit is gone (deleted or flushed)".into() }
        );
        assert_eq!(lock.check_and_restore(), CheckOutcome::Intact);
    }

    #[test]
    fn a_failed_restore_is_failed_with_the_tamper_and_nft_message() {
        let plan = plan::plan(&config()).unwrap();
        let fake = FakeNft::new(&listing_of(&plan));
        let lock = fake.lock();
        lock.apply().unwrap();
        fake.set("listing.json", &serde_json::json!({"nftables": []}));
        fs::write(fake.path("fail-apply"), "").unwrap();
        let CheckOutcome::Failed { tamper, error } = lock.check_and_restore() else { panic!("not failed") };
        assert!(tamper.unwrap().contains("is gone"));
        assert!(error.contains("Operation not supported"), "{error}");
        assert!(not_locked(&error).detail.unwrap().starts_with("egress lock not in force: restoring"));
    }

    #[test]
    fn an_apply_that_does_not_take_effect_is_an_error() {
        let plan = plan::plan(&config()).unwrap();
        let mut listing = listing_of(&plan);
        listing["nftables"].as_array_mut().unwrap().retain(|o| o.get("chain").is_none_or(|c| c["name"] != "forward"));
        let fake = FakeNft::new(&listing);
        let err = fake.lock().apply().unwrap_err();
        assert_eq!(err.category(), "verify");
        assert!(err.to_string().contains("missing or changed: {\"chain\""), "{err}");
    }

    #[test]
    fn the_live_table_is_never_adopted_as_the_reference() {
        // The read-back after our apply differs in one expression but keeps every comment (a
        // rule loosened between our transaction and the listing, or an nft printing it
        // differently): not locked, and later checks still compare against the plan.
        let plan = plan::plan(&config()).unwrap();
        let mut listing = listing_of(&plan);
        for o in listing["nftables"].as_array_mut().unwrap() {
            if o["rule"]["comment"] == "noexit: log blocked (rate-limited)" {
                o["rule"]["expr"][0]["limit"]["burst"] = serde_json::json!(6);
            }
        }
        let fake = FakeNft::new(&listing);
        let lock = fake.lock();
        let err = lock.apply().unwrap_err();
        assert_eq!(err.category(), "verify");
        assert!(err.to_string().contains("log blocked"), "{err}");
        let CheckOutcome::Failed { tamper, .. } = lock.check_and_restore() else { panic!("adopted") };
        assert!(tamper.unwrap().contains("first difference at rule"));
        // Once the kernel holds the plan, it is intact.
        fake.set("after-apply.json", &listing_of(&plan));
        assert!(lock.apply().unwrap().locked);
        assert_eq!(lock.check_and_restore(), CheckOutcome::Intact);
    }

    #[test]
    fn missing_nft_is_an_nft_error() {
        let lock = EgressLock::new(&config()).unwrap().with_nft("/nonexistent/nft");
        let err = lock.apply().unwrap_err();
        assert_eq!(err.category(), "nft");
        assert!(err.to_string().starts_with("applying the egress table: cannot run /nonexistent/nft"), "{err}");
    }
}
