//! `Dataset` (cluster-scoped): a read-only volume a data steward registers and grants.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;

/// Data a steward has registered. It is attached read-only to workspaces of the projects it is
/// granted to; the operator makes one read-only PersistentVolume per granted project.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "noexit.io",
    version = "v1alpha1",
    kind = "Dataset",
    plural = "datasets",
    shortname = "nxds",
    category = "noexit",
    status = "DatasetStatus",
    cel,
    validation = Rule::new("self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 40").message("dataset names must be DNS-1123 labels of at most 40 characters"),
    printcolumn = r#"{"name":"Classification","type":"string","jsonPath":".spec.classification"}"#,
    printcolumn = r#"{"name":"Size","type":"string","jsonPath":".spec.size"}"#,
    printcolumn = r#"{"name":"Projects","type":"string","jsonPath":".spec.grantedTo"}"#,
    printcolumn = r#"{"name":"Valid","type":"string","jsonPath":".status.conditions[?(@.type==\"Valid\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DatasetSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 500))]
    pub description: Option<String>,
    pub classification: Classification,
    /// Where the data lives. Exactly one source kind is set.
    #[x_kube(validation = Rule::new("[has(self.nfs), has(self.csi), has(self.hostPath)].filter(x, x).size() == 1").message("spec.source must set exactly one of nfs, csi, hostPath"))]
    pub source: DatasetSource,
    /// Capacity to declare on the volumes (e.g. `200Gi`).
    pub size: k8s_openapi::apimachinery::pkg::api::resource::Quantity,
    /// `sha256:<hex>` Merkle root over the files, recorded by the steward at registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^sha256:[0-9a-f]{64}$"))]
    pub digest: Option<String>,
    /// Projects that may attach this dataset.
    #[serde(default)]
    #[schemars(length(max = 100))]
    pub granted_to: Vec<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Classification {
    /// Directly identifying (names, NHS numbers). Strictest handling.
    Identifiable,
    /// Identifiers replaced by study IDs.
    Pseudonymised,
    /// No reasonable means of re-identification.
    Anonymised,
    /// Generated data with no real subjects.
    Synthetic,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatasetSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nfs: Option<NfsSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csi: Option<CsiSource>,
    /// A directory on the node; for single-node development clusters (kind) only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathSource>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NfsSource {
    #[schemars(length(min = 1, max = 253))]
    pub server: String,
    #[schemars(length(min = 1, max = 4096))]
    pub path: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CsiSource {
    #[schemars(length(min = 1, max = 253))]
    pub driver: String,
    #[schemars(length(min = 1, max = 1024))]
    pub volume_handle: String,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub volume_attributes: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostPathSource {
    #[schemars(length(min = 1, max = 4096))]
    pub path: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatasetStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Projects that have attached the dataset (listed by the project and granted here).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attached_projects: Vec<String>,
}
