//! `Workspace` (namespaced, in `noexit-<project>`): one researcher's pod or VM.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;

/// A researcher's workspace: a pod or a virtual machine with a home volume, the project's
/// datasets mounted read-only, a remote desktop, and no way out but the airlock.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "noexit.io",
    version = "v1alpha1",
    kind = "Workspace",
    plural = "workspaces",
    shortname = "nxws",
    shortname = "ws",
    category = "noexit",
    namespaced,
    status = "WorkspaceStatus",
    cel,
    validation = Rule::new("self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 40").message("workspace names must be DNS-1123 labels of at most 40 characters"),
    printcolumn = r#"{"name":"Project","type":"string","jsonPath":".spec.project"}"#,
    printcolumn = r#"{"name":"Owner","type":"string","jsonPath":".spec.owner"}"#,
    printcolumn = r#"{"name":"Runtime","type":"string","jsonPath":".spec.runtime"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Sessions","type":"integer","jsonPath":".status.agent.activeSessions","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceSpec {
    /// Project this workspace belongs to; must match the namespace `noexit-<project>`.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.project is immutable"))]
    #[schemars(length(min = 1, max = 56))]
    pub project: String,
    /// The researcher who works here. Must be a project member with the researcher role.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.owner is immutable"))]
    #[schemars(length(min = 1, max = 254))]
    pub owner: String,
    /// `pod` (container) or `vm` (KubeVirt / libvirt virtual machine).
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.runtime is immutable"))]
    pub runtime: Runtime,
    /// Workspace image: a container image for `pod`, a containerDisk image for `vm`.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// Named profile of the site (e.g. `r-desktop`), recorded for reporting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub profile: Option<String>,
    #[serde(default)]
    pub resources: WorkspaceResources,
    /// Datasets to attach read-only; each must be granted to the project.
    // Items are bounded like Dataset names, so that the API server's CEL cost estimate of the
    // duplicate rule stays within its budget (unbounded, it refuses the CRD).
    #[serde(default)]
    #[schemars(length(max = 20), inner(length(max = 40)))]
    #[x_kube(validation = Rule::new("self.all(d, self.exists_one(e, e == d))").message("spec.datasets lists a dataset twice"))]
    pub datasets: Vec<String>,
    #[serde(default)]
    pub lifecycle: Lifecycle,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Pod,
    Vm,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Pod => "pod",
            Runtime::Vm => "vm",
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceResources {
    #[serde(default = "default_cpu")]
    pub cpu: Quantity,
    #[serde(default = "default_memory")]
    pub memory: Quantity,
    /// Size of the read-write home volume.
    #[serde(default = "default_home")]
    pub home_size: Quantity,
}

fn default_cpu() -> Quantity {
    Quantity("2".into())
}
fn default_memory() -> Quantity {
    Quantity("4Gi".into())
}
fn default_home() -> Quantity {
    Quantity("20Gi".into())
}

impl Default for WorkspaceResources {
    fn default() -> Self {
        Self { cpu: default_cpu(), memory: default_memory(), home_size: default_home() }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Lifecycle {
    /// `false` stops the pod/VM and keeps the home volume.
    #[serde(default = "yes")]
    pub running: bool,
    /// Stop the workspace after this many minutes with no session (0: never).
    #[serde(default)]
    #[schemars(range(max = 43200))]
    pub idle_timeout_minutes: u32,
    /// Stop the workspace for good after this instant (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<chrono::DateTime<chrono::Utc>>,
}

fn yes() -> bool {
    true
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self { running: true, idle_timeout_minutes: 0, expires: None }
    }
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum Phase {
    #[default]
    Pending,
    Provisioning,
    Running,
    Stopped,
    Expired,
    Failed,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// In-cluster address of the desktop service (`host:port`), for the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// What the agent last reported. Written by the control-plane API (field manager
    /// `noexit-api`); the controller derives `AgentConnected`/`EgressLocked`/`Ready` from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentReport>,
    /// Serial number of the agent certificate in the workspace Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_certificate_serial: Option<String>,
}

/// The agent's last heartbeat, as the control-plane API reflected it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentReport {
    pub last_heartbeat: chrono::DateTime<chrono::Utc>,
    pub version: String,
    /// The agent confirmed the egress wall (nftables in a VM, probes in a pod).
    pub egress_locked: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_detail: Option<String>,
    pub active_sessions: u32,
    pub spool_depth: u64,
}
