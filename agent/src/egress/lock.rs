//! Applying the plan with `nft`, checking it is still in force, restoring it when not.
//!
//! Fail closed: nothing here ever deletes the table or loosens a rule. An apply is one atomic
//! nft transaction, so when it fails the previous state (old table or none) stays as it was.

use std::ffi::OsString;
use std::sync::Mutex;

use nftables::helper::{self, NftablesError};
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
    /// What a healthy table looks like: the plan, or (if this nft prints some expression in a
    /// different but equivalent form) what the kernel listed right after our own apply.
    expected: Mutex<Canonical>,
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
        let expected = Mutex::new(live::planned(&plan));
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
        let live = live::from_listing(&listing);
        let planned = live::planned(&self.plan);
        let diff = live::differences(&planned, &live);
        if !diff.is_empty() {
            // Same chains and rule comments but differently printed expressions: accept the
            // kernel's rendering of *our* transaction as the reference. Anything structural
            // (a chain, a policy, a rule missing) means the apply did not do what we asked.
            if live.objects != planned.objects || !same_comments(&planned, &live) {
                return Err(EgressError::Verify(diff.join("; ")));
            }
            tracing::warn!(differences = %diff.join("; "), "nft prints the egress table differently from the plan; using its listing as reference");
        }
        *self.expected.lock().unwrap_or_else(|p| p.into_inner()) = if diff.is_empty() { planned } else { live };
        Ok(locked_state(format!("nftables table inet {TABLE} applied ({} rules)", self.plan.rules.len())))
    }

    /// Compares the live table with the plan; restores it if it differs.
    pub fn check_and_restore(&self) -> CheckOutcome {
        let listing = match self.list() {
            Ok(l) => l,
            Err(e) => return CheckOutcome::Failed { tamper: None, error: e.to_string() },
        };
        let expected = self.expected.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let diff = live::differences(&expected, &live::from_listing(&listing));
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
        let payload = serde_json::to_string(&self.plan.replace_batch())
            .map_err(|e| EgressError::Nft { action: "serialising the egress table", message: e.to_string() })?;
        helper::apply_ruleset_raw(&payload, Some(&self.nft), helper::DEFAULT_ARGS)
            .map(drop)
            .map_err(|e| nft_error("applying the egress table", e))
    }

    /// The whole ruleset: a missing table is then an empty result, not an error to interpret.
    fn list(&self) -> Result<Value, EgressError> {
        let raw = helper::get_current_ruleset_raw(Some(&self.nft), ["list", "ruleset"])
            .map_err(|e| nft_error("listing the ruleset", e))?;
        serde_json::from_str(&raw)
            .map_err(|e| EgressError::Nft { action: "listing the ruleset", message: format!("unreadable JSON: {e}") })
    }
}

fn same_comments(a: &Canonical, b: &Canonical) -> bool {
    let comments = |c: &Canonical| -> Vec<Vec<Option<String>>> {
        c.rules
            .values()
            .map(|rules| rules.iter().map(|r| r.get("comment").and_then(Value::as_str).map(String::from)).collect())
            .collect()
    };
    a.rules.keys().eq(b.rules.keys()) && comments(a) == comments(b)
}

fn nft_error(action: &'static str, e: NftablesError) -> EgressError {
    let message = match e {
        NftablesError::NftFailed { stderr, stdout, .. } => {
            let text = if stderr.trim().is_empty() { stdout } else { stderr };
            format!("nft failed: {}", text.trim())
        }
        other => other.to_string(),
    };
    EgressError::Nft { action, message }
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
