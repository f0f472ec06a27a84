//! The kubectl mirror of the airlock: after each change of an output request's state the API
//! writes an `OutputRequest` object (`out-<id>`) into the project namespace, so an SRE sees the
//! airlock with `kubectl get outputrequests`. The database stays the source of truth: the mirror
//! is never read back, and a failure to write it is logged and never fails the decision.
//! It carries metadata, state and who decided when — never content, never reasons.

use noexit_crds::OutputRequest;
use noexit_crds::output_request::{OutputDecision, OutputRequestSpec, OutputRequestStatus, mirror_name};

use super::AppState;
use super::output_store::{OutputRequestRow, ReviewRow};
use super::outputs::{OutputView, view};

/// Longest a mirror write may hold up the decision that caused it.
pub const MIRROR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Label naming the workspace a mirrored request came from.
pub const WORKSPACE_LABEL: &str = "noexit.io/workspace";

/// The object mirroring `v` (pure: what should exist).
pub fn render(v: &OutputView) -> OutputRequest {
    let spec = OutputRequestSpec {
        request_id: v.id.clone(),
        workspace: v.workspace.clone(),
        file_name: v.file_name.clone(),
        size: v.size,
        sha256: v.sha256.clone(),
        requester: v.requester.clone(),
    };
    let mut obj = OutputRequest::new(&mirror_name(&v.id), spec);
    obj.metadata.labels = Some(
        [
            (WORKSPACE_LABEL.to_owned(), v.workspace.clone()),
            ("app.kubernetes.io/managed-by".to_owned(), "noexit-api".to_owned()),
        ]
        .into_iter()
        .collect(),
    );
    let verdict = v
        .checks
        .as_ref()
        .and_then(|r| serde_json::to_value(r.verdict).ok())
        .and_then(|x| x.as_str().map(str::to_owned));
    obj.status = Some(OutputRequestStatus {
        state: v.state.clone(),
        verdict,
        approvals: format!("{}/{}", v.approvals, v.reviewers_required),
        reviewers_required: v.reviewers_required,
        decisions: v
            .reviews
            .iter()
            .map(|r| OutputDecision { reviewer: r.reviewer.clone(), decision: r.decision.clone(), at: r.at })
            .collect(),
        updated_at: v.updated_at,
    });
    obj
}

/// Mirror request `id` of `project` as it now stands in the database. Best effort: any failure
/// (database read, cluster write) is logged as a warning and swallowed.
pub async fn mirror(state: &AppState, project: &str, id: &str) {
    if let Err(e) = try_mirror(state, project, id).await {
        tracing::warn!(project, output = id, error = %e, "cannot mirror the output request to its OutputRequest object");
    }
}

/// Mirror a request whose row and reviews the caller already loaded.
pub async fn render_and_write(state: &AppState, row: &OutputRequestRow, reviews: Vec<ReviewRow>, required: u32) {
    let obj = render(&view(row, reviews, required));
    if let Err(e) = write(state, &row.project, obj).await {
        tracing::warn!(project = %row.project, output = %row.id, error = %e, "cannot mirror the output request to its OutputRequest object");
    }
}

async fn try_mirror(state: &AppState, project: &str, id: &str) -> Result<(), String> {
    let uuid = uuid::Uuid::parse_str(id).map_err(|e| e.to_string())?;
    let Some(row) = state.store.output_request(uuid).await.map_err(|e| e.to_string())? else {
        return Err("not in the database".into());
    };
    let reviews = state.store.reviews(&row.id).await.map_err(|e| e.to_string())?;
    let required = match state.cluster.project(project).await {
        Ok(p) => p.map(|p| p.spec.output.reviewers).unwrap_or(2).max(1),
        Err(e) => return Err(e.to_string()),
    };
    write(state, project, render(&view(&row, reviews, required))).await
}

/// The cluster write, bounded by [`MIRROR_TIMEOUT`].
async fn write(state: &AppState, project: &str, obj: noexit_crds::OutputRequest) -> Result<(), String> {
    match tokio::time::timeout(MIRROR_TIMEOUT, state.cluster.mirror_output(project, obj)).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer from the cluster within {MIRROR_TIMEOUT:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> OutputView {
        OutputView {
            id: "0f3a2b1c-0000-4000-8000-000000000001".into(),
            project: "ward-7".into(),
            workspace: "alice-r".into(),
            file_name: "table.csv".into(),
            size: 120,
            sha256: "ab".repeat(32),
            requester: "alice".into(),
            submitted_by: "researcher".into(),
            state: "in-review".into(),
            created_at: chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            updated_at: chrono::DateTime::from_timestamp(1_800_000_100, 0).unwrap(),
            checks: None,
            agent_scan: serde_json::Value::Null,
            reviews: vec![ReviewRow {
                request_id: String::new(),
                reviewer: "carol".into(),
                decision: "approve".into(),
                reason: "SECRET REASON".into(),
                at: chrono::DateTime::from_timestamp(1_800_000_100, 0).unwrap(),
            }],
            approvals: 1,
            reviewers_required: 2,
            companion_of: None,
            content_deleted: false,
        }
    }

    #[test]
    fn the_mirror_names_the_request_and_shows_state_and_approvals_without_reasons() {
        let obj = render(&sample());
        assert_eq!(obj.metadata.name.as_deref(), Some("out-0f3a2b1c-0000-4000-8000-000000000001"));
        assert_eq!(obj.spec.request_id, "0f3a2b1c-0000-4000-8000-000000000001");
        assert_eq!((obj.spec.workspace.as_str(), obj.spec.file_name.as_str()), ("alice-r", "table.csv"));
        let status = obj.status.as_ref().unwrap();
        assert_eq!((status.state.as_str(), status.approvals.as_str()), ("in-review", "1/2"));
        assert_eq!(status.verdict, None);
        assert_eq!(status.decisions.len(), 1);
        assert_eq!(
            (status.decisions[0].reviewer.as_str(), status.decisions[0].decision.as_str()),
            ("carol", "approve")
        );
        let json = serde_json::to_string(&obj).unwrap();
        assert!(!json.contains("SECRET REASON"), "reasons stay in the API: {json}");
    }
}
