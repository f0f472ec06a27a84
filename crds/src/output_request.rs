//! `OutputRequest` (namespaced): a read-only mirror, for `kubectl`, of one airlock output request.
//! The API's database is the source of truth; the API writes this object with server-side apply
//! after each change of state and never reads it back, so editing or deleting it changes nothing.
//! It carries metadata only: never file content, never reviewers' reasons.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What was submitted (set once, from the request the agent reported).
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "noexit.io",
    version = "v1alpha1",
    kind = "OutputRequest",
    plural = "outputrequests",
    shortname = "nxout",
    category = "noexit",
    namespaced,
    status = "OutputRequestStatus",
    printcolumn = r#"{"name":"Workspace","type":"string","jsonPath":".spec.workspace"}"#,
    printcolumn = r#"{"name":"File","type":"string","jsonPath":".spec.fileName"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Verdict","type":"string","jsonPath":".status.verdict"}"#,
    printcolumn = r#"{"name":"Approvals","type":"string","jsonPath":".status.approvals"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct OutputRequestSpec {
    /// The request's id in the API (`noexit outputs show <id>`).
    pub request_id: String,
    pub workspace: String,
    pub file_name: String,
    /// Bytes.
    pub size: i64,
    /// SHA-256 of the content, hex.
    pub sha256: String,
    /// The project person the request belongs to.
    pub requester: String,
}

/// One reviewer's decision (the reason stays in the API and the audit log).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutputDecision {
    pub reviewer: String,
    /// `approve`, `reject` or `requestChanges`.
    pub decision: String,
    pub at: chrono::DateTime<chrono::Utc>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutputRequestStatus {
    /// Life-cycle state as the API names it: submitted, checked, inReview, approved, rejected,
    /// changesRequested, released, withdrawn, expired.
    pub state: String,
    /// The control plane's checks: pass, review or fail (absent until the content arrived).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    /// `approvals/required`, for `kubectl get`.
    pub approvals: String,
    pub reviewers_required: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decisions: Vec<OutputDecision>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// Name of the mirror of request `id`: `out-<id>` (a UUID is already a DNS-1123 label).
pub fn mirror_name(id: &str) -> String {
    format!("out-{}", id.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    #[test]
    fn mirror_names_are_dns_labels() {
        let n = super::mirror_name("0F3A2B1C-0000-4000-8000-000000000001");
        assert_eq!(n, "out-0f3a2b1c-0000-4000-8000-000000000001");
        assert!(n.len() <= 63);
    }
}
