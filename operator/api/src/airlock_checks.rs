//! The control plane's checks when an output's content arrives, and how companions travel.
//!
//! Companions are ordinary outbox files (the agent is unchanged: it uploads every file):
//! - `<file>.sdc.json` is an [`OutputMetadata`] sidecar describing `<file>` (residual degrees of
//!   freedom, cell contributions for dominance and p-ratio);
//! - `results.json` (at any depth) is an ACRO results file describing every output of the same
//!   workspace, shown beside our verdicts.
//!
//! Each is itself an output request (checked, reviewed and releasable like any file) whose
//! `companion_of` names what it describes (`*` for ACRO). The checks of a file use the latest
//! companions of its workspace that arrived before it; a companion arriving later re-runs the
//! checks of the files it describes that no one has reviewed yet.

use noexit_airlock::checks::{self, CheckResult, OutputMetadata, Policy, Report, Submission, Verdict};
use noexit_airlock::lifecycle::{self, Actor, Decision, Event, Facts, State};
use noexit_crds::agent::WorkspaceIdentity;

use super::AppState;
use super::error::ApiError;
use super::output_store::{OutputRequestRow, ReviewRow};
use noexit_audit::{AuditEvent, Outcome};

/// Who decides a refusal by the checks (the review's `reviewer`, the audit entry's actor).
pub const DECIDER: &str = "noexit-airlock";

/// Suffix of a metadata sidecar.
pub const SIDECAR_SUFFIX: &str = ".sdc.json";
/// Name of an ACRO results file.
pub const ACRO_RESULTS: &str = "results.json";
/// `companion_of` of an ACRO results file: every output of the workspace.
pub const ALL_OUTPUTS: &str = "*";

/// What a file describes, if it is a companion (pure).
pub fn companion_of(file_name: &str) -> Option<String> {
    if let Some(target) = file_name.strip_suffix(SIDECAR_SUFFIX)
        && !target.is_empty()
        && !target.ends_with('/')
    {
        return Some(target.to_owned());
    }
    let base = file_name.rsplit('/').next().unwrap_or(file_name);
    (base == ACRO_RESULTS).then(|| ALL_OUTPUTS.to_owned())
}

/// Whether companion `c` (with `companion_of = of`) describes the file `name`.
pub fn describes(of: &str, name: &str) -> bool {
    of == name || (of == ALL_OUTPUTS && companion_of(name).is_none())
}

fn manual(file_name: &str, why: &str) -> Report {
    Report {
        verdict: Verdict::Review,
        results: vec![CheckResult {
            check: "format".into(),
            verdict: Verdict::Review,
            message: format!("{file_name}: {why}; manual review"),
            cells: vec![],
        }],
        acro: vec![],
    }
}

/// The latest verified content of the companions of `row` in its workspace.
async fn companions(state: &AppState, row: &OutputRequestRow) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    let ws = WorkspaceIdentity { project: row.project.clone(), name: row.workspace.clone() };
    let Ok(rows) = state.store.workspace_outputs(&ws).await else { return (None, None) };
    let latest = |of: &str| {
        rows.iter()
            .filter(|r| {
                r.companion_of.as_deref() == Some(of) && r.content_path.is_some() && r.life() != State::Submitted
            })
            .max_by_key(|r| r.created_at)
            .cloned()
    };
    let mut out = (None, None);
    if let Some(c) = latest(&row.file_name) {
        out.0 = super::outputs::open_verified(state, &c).await.ok();
    }
    if let Some(c) = latest(ALL_OUTPUTS) {
        out.1 = super::outputs::open_verified(state, &c).await.ok();
    }
    out
}

/// Run the checks on an arrived file (`plain` is `None` when it is too large to check).
pub async fn check_arrival(
    state: &AppState,
    row: &OutputRequestRow,
    plain: Option<&[u8]>,
    policy: &Policy,
) -> Result<Report, ApiError> {
    let Some(plain) = plain else {
        return Ok(manual(&row.file_name, &format!("larger than {} bytes, not checked", policy.max_checked_bytes)));
    };
    let (sidecar, acro) = if row.companion_of.is_none() { companions(state, row).await } else { (None, None) };
    let mut notes = Vec::new();
    let metadata: Option<OutputMetadata> = match &sidecar {
        Some(bytes) => match serde_json::from_slice(bytes) {
            Ok(m) => Some(m),
            Err(e) => {
                notes.push(CheckResult {
                    check: "format".into(),
                    verdict: Verdict::Review,
                    message: format!("{}{SIDECAR_SUFFIX} is not valid output metadata ({e}); ignored", row.file_name),
                    cells: vec![],
                });
                None
            }
        },
        None => None,
    };
    let file_name = row.file_name.clone();
    let plain = plain.to_vec();
    let policy = policy.clone();
    let mut report = tokio::task::spawn_blocking(move || {
        let sub = Submission {
            file_name: &file_name,
            bytes: &plain,
            metadata: metadata.as_ref(),
            acro_results: acro.as_deref(),
        };
        checks::run(&sub, &policy)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("checks of output {}: {e}", row.id)))?;
    for n in notes {
        report.verdict = report.verdict.max(n.verdict);
        report.results.push(n);
    }
    Ok(report)
}

/// The checks refuse `row` (an archive, an executable): `checked` → `rejected` at once, with
/// the reason as the decision of [`DECIDER`] (the researcher reads it in `/outbox/.decisions`),
/// the sealed content deleted (it was never expanded), and an `output.refuse` audit entry that
/// records how many bytes were read. `version` is the row's version after it was marked
/// checked. `false` if another change came first (a withdrawal): nothing is done then.
pub async fn refuse(
    state: &AppState,
    row: &OutputRequestRow,
    version: i64,
    content: &std::path::Path,
    reason: &str,
    bytes_read: u64,
) -> Result<bool, ApiError> {
    let facts = Facts { state: State::Checked, requester: row.requester(), reviewers: &[], approvals: 0, required: 1 };
    let next = lifecycle::transition(&facts, Actor::System, Event::Refuse)
        .map_err(|e| ApiError::Internal(format!("refusing output {}: {e}", row.id)))?;
    let review = ReviewRow {
        request_id: row.id.clone(),
        reviewer: DECIDER.into(),
        decision: Decision::Reject.as_str().into(),
        reason: reason.into(),
        at: chrono::Utc::now(),
    };
    if !state.store.change_state(&row.id, version, next, Some(&review), None).await? {
        return Ok(false);
    }
    let mut deleted = true;
    match tokio::fs::remove_file(content).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            // The sweeper deletes it after retention, as for any rejected request.
            tracing::warn!(output = %row.id, error = %e, "cannot delete refused content now");
            deleted = false;
        }
    }
    if deleted {
        state.store.mark_content_deleted(&row.id).await?;
    }
    let event = AuditEvent {
        actor: format!("system:{DECIDER}"),
        role: None,
        action: "output.refuse".into(),
        object: super::outputs::object_of(row),
        outcome: Outcome::Refused(reason.to_owned()),
        source: None,
        detail: serde_json::json!({
            "fileName": row.file_name, "size": row.size, "sha256": row.sha256,
            "bytesRead": bytes_read, "expanded": false, "contentDeleted": deleted,
        }),
    };
    if let Err(e) = state.audit.record(event).await {
        tracing::error!(error = %e, output = %row.id, "cannot record a refused output");
    }
    Ok(true)
}

/// A companion arrived: re-run the checks of the files it describes that are still waiting
/// for their first review. Failures are logged (the old report stays).
pub async fn recheck_described(state: &AppState, companion: &OutputRequestRow, policy: &Policy) {
    let Some(of) = companion.companion_of.as_deref() else { return };
    let ws = WorkspaceIdentity { project: companion.project.clone(), name: companion.workspace.clone() };
    let Ok(rows) = state.store.workspace_outputs(&ws).await else { return };
    for row in rows.iter().filter(|r| r.life() == State::Checked && describes(of, &r.file_name)) {
        let Ok(reviews) = state.store.reviews(&row.id).await else { continue };
        if !reviews.is_empty() {
            continue;
        }
        let plain = match super::outputs::open_verified(state, row).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(output = %row.id, error = %e, "cannot re-check an output after its companion arrived");
                continue;
            }
        };
        let limit = usize::try_from(policy.max_checked_bytes).unwrap_or(usize::MAX);
        let plain = (plain.len() <= limit).then_some(plain);
        match check_arrival(state, row, plain.as_deref(), policy).await {
            Ok(report) => {
                let json = serde_json::to_string(&report).unwrap_or_default();
                match state.store.replace_report(&row.id, row.version, &json).await {
                    Ok(true) => super::output_mirror::mirror(state, &row.project, &row.id).await,
                    Ok(false) => {}
                    Err(e) => tracing::warn!(output = %row.id, error = %e, "cannot store the re-checked report"),
                }
            }
            Err(e) => tracing::warn!(output = %row.id, error = %e, "re-check failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecars_and_acro_results_name_what_they_describe() {
        assert_eq!(companion_of("table.csv.sdc.json").as_deref(), Some("table.csv"));
        assert_eq!(companion_of("out/table.csv.sdc.json").as_deref(), Some("out/table.csv"));
        assert_eq!(companion_of(".sdc.json"), None);
        assert_eq!(companion_of("results.json").as_deref(), Some(ALL_OUTPUTS));
        assert_eq!(companion_of("acro/results.json").as_deref(), Some(ALL_OUTPUTS));
        assert_eq!(companion_of("my_results.json"), None);
        assert_eq!(companion_of("table.csv"), None);
        assert!(describes("table.csv", "table.csv"));
        assert!(!describes("table.csv", "summary.csv"));
        assert!(describes(ALL_OUTPUTS, "summary.csv"));
        assert!(!describes(ALL_OUTPUTS, "table.csv.sdc.json"));
    }
}
