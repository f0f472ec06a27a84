//! `WorkspaceRequest` (namespaced): an analyst asks, an admin approves or denies, the
//! operator creates the Workspace — the CertificateSigningRequest pattern.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;
use crate::workspace::WorkspaceSpec;

/// A data analyst's request for a workspace. Approval is a status condition (`Approved` or
/// `Denied`) set by an admin who is not the requester; on approval the operator creates the
/// Workspace named in `spec.workspaceName`.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "noexit.io",
    version = "v1alpha1",
    kind = "WorkspaceRequest",
    plural = "workspacerequests",
    shortname = "nxwr",
    shortname = "wsreq",
    category = "noexit",
    namespaced,
    status = "WorkspaceRequestStatus",
    cel,
    validation = Rule::new("self.spec == oldSelf.spec").message("a WorkspaceRequest's spec is immutable; create a new request"),
    printcolumn = r#"{"name":"Workspace","type":"string","jsonPath":".spec.workspaceName"}"#,
    printcolumn = r#"{"name":"Requester","type":"string","jsonPath":".spec.requester"}"#,
    printcolumn = r#"{"name":"Owner","type":"string","jsonPath":".spec.workspace.owner"}"#,
    printcolumn = r#"{"name":"Decision","type":"string","jsonPath":".status.decision"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceRequestSpec {
    /// Who asks. The admission webhook checks it equals the authenticated creator.
    #[schemars(length(min = 1, max = 254))]
    pub requester: String,
    /// Why the workspace is needed (shown to the approving admin, kept in the audit log).
    #[schemars(length(min = 1, max = 2000))]
    pub justification: String,
    /// Name of the Workspace to create.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && size(self) <= 40").message("spec.workspaceName must be a DNS-1123 label of at most 40 characters"))]
    pub workspace_name: String,
    /// The Workspace to create.
    pub workspace: WorkspaceSpec,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Decision {
    Approved,
    Denied,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceRequestStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Approved`, `Denied`, and `Fulfilled` once the Workspace exists.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Summary of the approval conditions for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// Who decided (copied from the approval condition by the webhook-validated writer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
}

impl WorkspaceRequestStatus {
    /// The decision as the conditions state it: `Denied` wins over `Approved` if both are set.
    pub fn decision_from_conditions(&self) -> Option<Decision> {
        let is_true = |t: &str| self.conditions.iter().any(|c| c.type_ == t && c.status == "True");
        if is_true(crate::common::condition::DENIED) {
            Some(Decision::Denied)
        } else if is_true(crate::common::condition::APPROVED) {
            Some(Decision::Approved)
        } else {
            None
        }
    }
}
