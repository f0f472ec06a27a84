//! `Project` (cluster-scoped): who may work on what, under which approval, with which limits.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, Role};

/// A research project: its members and roles, its ethics approval, the datasets it may use,
/// where its workspaces may connect, and its limits. Becomes the namespace `noexit-<name>`.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "noexit.io",
    version = "v1alpha1",
    kind = "Project",
    plural = "projects",
    shortname = "nxproj",
    category = "noexit",
    status = "ProjectStatus",
    cel,
    validation = Rule::new("size(self.metadata.name) <= 56").message("project names are at most 56 characters (the namespace is noexit-<name>)"),
    validation = Rule::new("self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("project names must be DNS-1123 labels"),
    validation = Rule::new("!(self.metadata.name in ['system', 'operator', 'control-plane', 'controller', 'default', 'kube', 'public', 'monitoring']) && !self.metadata.name.startsWith('kube-')").message("this project name is reserved (its namespace noexit-<name> is kept for noexit or the cluster)"),
    printcolumn = r#"{"name":"Members","type":"integer","jsonPath":".status.memberCount"}"#,
    printcolumn = r#"{"name":"Workspaces","type":"integer","jsonPath":".status.workspaceCount"}"#,
    printcolumn = r#"{"name":"Expires","type":"string","jsonPath":".spec.approval.expires"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ProjectSpec {
    /// Human-readable title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 200))]
    pub display_name: Option<String>,
    /// People and their roles. A user appears once; a user may hold several roles.
    // At most 300: with 500 the API server refuses the CRD (the duplicate rule's CEL cost
    // estimate is over its budget).
    #[schemars(length(min = 1, max = 300))]
    #[x_kube(validation = Rule::new("self.all(m, self.exists_one(n, n.user == m.user))").message("each user appears once in spec.members"))]
    pub members: Vec<Member>,
    /// The ethics / data-access approval this project works under.
    pub approval: Approval,
    /// Datasets this project attaches. A dataset is usable only when its own
    /// `spec.grantedTo` also names this project (two keys: admin and data steward).
    #[serde(default)]
    #[schemars(length(max = 100))]
    pub datasets: Vec<String>,
    /// Where workspaces may connect. Default: only the project's package mirror.
    #[serde(default)]
    pub egress: Egress,
    /// Remote desktop policy.
    #[serde(default)]
    pub desktop: DesktopPolicy,
    /// Resource limits for the whole project namespace.
    #[serde(default)]
    pub quota: Quota,
    /// Airlock rules for outputs.
    #[serde(default)]
    pub output: OutputPolicy,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    /// Identity as the OIDC issuer names it (`sub` or `email` claim, see operator config).
    #[schemars(length(min = 1, max = 254))]
    pub user: String,
    #[schemars(length(min = 1, max = 6))]
    pub roles: Vec<Role>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Approval {
    /// Ethics committee / data-access reference, e.g. `REC 23/LO/0042`.
    #[schemars(length(min = 1, max = 128))]
    pub reference: String,
    /// Date the data-sharing agreement ends (`YYYY-MM-DD`). After it, workspaces are stopped.
    #[schemars(regex(pattern = r"^\d{4}-\d{2}-\d{2}$"))]
    pub expires: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Egress {
    /// Package mirror the workspaces may use.
    #[serde(default)]
    pub mirror: MirrorPolicy,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MirrorPolicy {
    /// Off: no mirror at all (workspaces reach only the control plane and DNS).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Packages that may be installed. Empty: every package not denied.
    #[serde(default)]
    #[schemars(length(max = 5000))]
    pub allow: Vec<PackageRule>,
    /// Packages that may never be installed. Deny wins over allow.
    #[serde(default)]
    #[schemars(length(max = 5000))]
    pub deny: Vec<PackageRule>,
}

fn yes() -> bool {
    true
}

/// A CRAN package, optionally pinned to versions.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PackageRule {
    /// Package name as on CRAN (case-sensitive).
    #[schemars(regex(pattern = r"^[A-Za-z][A-Za-z0-9.]*[A-Za-z0-9]$"), length(max = 100))]
    pub name: String,
    /// Versions this rule applies to; empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DesktopPolicy {
    /// Let researchers paste text into the workspace. Copy *out* is never allowed.
    #[serde(default)]
    pub clipboard_in: bool,
    /// Minutes without input after which a desktop session is disconnected.
    #[serde(default = "default_idle")]
    #[schemars(range(min = 5, max = 1440))]
    pub idle_timeout_minutes: u32,
    /// Require a second factor (OIDC `amr`) to open a desktop.
    #[serde(default = "yes")]
    pub require_mfa: bool,
    /// Longest desktop session, in minutes; the gateway closes it then (the researcher may
    /// connect again).
    #[serde(default = "default_max_session")]
    #[schemars(range(min = 5, max = 1440))]
    pub max_session_minutes: u32,
    /// What a second connect to a workspace that has a live desktop session does: `takeover`
    /// (the new one replaces the old, which is closed) or `refuse`.
    #[serde(default)]
    pub second_connect: SecondConnect,
    /// Let the project's admins open members' desktops (support). Off by default.
    #[serde(default)]
    pub admin_support: bool,
}

/// One live desktop session per workspace: what a second connect does.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SecondConnect {
    /// The new connection takes over; the old one is closed.
    #[default]
    Takeover,
    /// The new connection is refused while the old one lives.
    Refuse,
}

fn default_idle() -> u32 {
    60
}

fn default_max_session() -> u32 {
    8 * 60
}

impl Default for DesktopPolicy {
    fn default() -> Self {
        Self {
            clipboard_in: false,
            idle_timeout_minutes: default_idle(),
            require_mfa: true,
            max_session_minutes: default_max_session(),
            second_connect: SecondConnect::default(),
            admin_support: false,
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Quota {
    /// Total CPU of all workspaces.
    #[serde(default = "default_cpu")]
    pub cpu: Quantity,
    /// Total memory of all workspaces.
    #[serde(default = "default_memory")]
    pub memory: Quantity,
    /// Total persistent storage (home volumes).
    #[serde(default = "default_storage")]
    pub storage: Quantity,
    /// Most workspaces the project may have.
    #[serde(default = "default_workspaces")]
    #[schemars(range(min = 0, max = 1000))]
    pub workspaces: u32,
}

fn default_cpu() -> Quantity {
    Quantity("16".into())
}
fn default_memory() -> Quantity {
    Quantity("64Gi".into())
}
fn default_storage() -> Quantity {
    Quantity("500Gi".into())
}
fn default_workspaces() -> u32 {
    10
}

impl Default for Quota {
    fn default() -> Self {
        Self {
            cpu: default_cpu(),
            memory: default_memory(),
            storage: default_storage(),
            workspaces: default_workspaces(),
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutputPolicy {
    /// Smallest count a released table cell may show (statistical disclosure control).
    #[serde(default = "default_min_cell")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_cell_count: u32,
    /// Independent output checkers who must approve a release.
    #[serde(default = "default_reviewers")]
    #[schemars(range(min = 1, max = 5))]
    pub reviewers: u32,
    /// Zero cells in a table are disclosive (they reveal that no one has the attribute).
    #[serde(default = "default_true")]
    pub zeros_disclosive: bool,
    /// Days the airlock keeps an output's sealed content after its final decision (release,
    /// rejection, withdrawal), and how long an undecided output waits before it expires.
    /// Metadata and receipts are kept for good.
    #[serde(default = "default_retention_days")]
    #[schemars(range(min = 1, max = 3650))]
    pub retention_days: u32,
}

fn default_min_cell() -> u32 {
    10
}
fn default_reviewers() -> u32 {
    2
}
fn default_true() -> bool {
    true
}
fn default_retention_days() -> u32 {
    30
}

impl Default for OutputPolicy {
    fn default() -> Self {
        Self {
            min_cell_count: default_min_cell(),
            reviewers: default_reviewers(),
            zeros_disclosive: default_true(),
            retention_days: default_retention_days(),
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProjectStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The namespace the project's workspaces live in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_count: Option<u32>,
    /// Datasets both listed here and granted by their steward.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub granted_datasets: Vec<String>,
}

impl ProjectSpec {
    /// Roles of `user` in this project (empty if not a member).
    pub fn roles_of(&self, user: &str) -> Vec<Role> {
        self.members.iter().filter(|m| m.user == user).flat_map(|m| m.roles.iter().copied()).collect()
    }

    pub fn has_role(&self, user: &str, role: Role) -> bool {
        self.roles_of(user).contains(&role)
    }

    /// Members holding `role`, sorted, for deterministic rendering.
    pub fn users_with(&self, role: Role) -> Vec<&str> {
        let mut users: Vec<&str> =
            self.members.iter().filter(|m| m.roles.contains(&role)).map(|m| m.user.as_str()).collect();
        users.sort_unstable();
        users.dedup();
        users
    }
}
