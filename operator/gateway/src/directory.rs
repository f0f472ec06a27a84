//! Who may open which desktop, and where it is. The decision ([`decide`]) is pure; a
//! [`Directory`] only gathers its inputs: from the cluster ([`KubeDirectory`]: Project,
//! Workspace and the per-workspace VNC Secret) or from a file ([`FileDirectory`], read again on
//! every call so a test or a single host can change it while sessions run).

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub use noexit_crds::project::SecondConnect;

/// The desktop policy of a project, as the gateway applies it. Limits are in seconds here (the
/// Project says minutes; a directory file may say seconds, which is how tests use tiny limits).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DesktopPolicy {
    /// Paste into the desktop allowed.
    pub clipboard_in: bool,
    /// Largest paste, in bytes.
    pub paste_max_bytes: u32,
    /// Seconds without input before the session is closed.
    pub idle_timeout_seconds: u32,
    /// Longest session, in seconds.
    pub max_session_seconds: u32,
    /// What a second connect to a workspace with a live session does.
    pub second_connect: SecondConnect,
    /// A second factor (`amr`) is required.
    pub require_mfa: bool,
    /// A project admin may open a member's desktop (support); off by default.
    pub admin_support: bool,
}

impl Default for DesktopPolicy {
    fn default() -> Self {
        Self {
            clipboard_in: false,
            paste_max_bytes: 64 * 1024,
            idle_timeout_seconds: 30 * 60,
            max_session_seconds: 8 * 60 * 60,
            second_connect: SecondConnect::Takeover,
            require_mfa: true,
            admin_support: false,
        }
    }
}

/// What the decision needs to know about a project.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProjectAccess {
    pub name: String,
    /// Members (any role).
    pub members: Vec<String>,
    /// Members with the admin role.
    #[serde(default)]
    pub admins: Vec<String>,
    /// The project's approval is in force (Ready).
    #[serde(default = "yes")]
    pub approved: bool,
    /// End of the approval.
    #[serde(default)]
    pub expires: Option<DateTime<Utc>>,
    #[serde(default)]
    pub desktop: DesktopPolicy,
}

fn yes() -> bool {
    true
}

/// What the decision needs to know about a workspace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceAccess {
    pub project: String,
    pub name: String,
    pub owner: String,
    /// Spec says running and the workspace reports Running.
    pub running: bool,
    /// `host:port` of the desktop's VNC server.
    #[serde(default)]
    pub desktop: Option<String>,
    /// The VNC password (never shown to anyone).
    #[serde(default, skip_serializing)]
    pub vnc_password: Option<String>,
}

/// A granted connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub project: String,
    pub workspace: String,
    pub address: String,
    pub password: Vec<u8>,
    pub policy: DesktopPolicy,
    /// Connected as a project admin (support), not as the owner.
    pub as_admin: bool,
}

/// Why a person may not open a desktop. `code()` is stable (audit detail, page messages).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no workspace {project}/{workspace}")]
    UnknownWorkspace { project: String, workspace: String },
    #[error("{user} is not a member of project {project} (spec.members)")]
    NotMember { user: String, project: String },
    #[error("workspace {project}/{workspace} belongs to {owner} (spec.owner), not {user}")]
    NotOwner { user: String, project: String, workspace: String, owner: String },
    #[error("project {project} is not approved (spec.approval)")]
    NotApproved { project: String },
    #[error("project {project}'s approval expired at {expires} (spec.approval.expires)")]
    Expired { project: String, expires: DateTime<Utc> },
    #[error("workspace {project}/{workspace} is not running (spec.lifecycle.running / status.phase)")]
    Stopped { project: String, workspace: String },
    #[error("project {project} requires a second factor (spec.desktop.requireMfa); sign in again with MFA")]
    MfaRequired { project: String },
    #[error("workspace {project}/{workspace} has no desktop address or VNC credential yet")]
    NoDesktop { project: String, workspace: String },
    #[error("cannot look up workspace access: {0}")]
    Unavailable(String),
}

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::UnknownWorkspace { .. } => "unknownWorkspace",
            Refusal::NotMember { .. } => "notMember",
            Refusal::NotOwner { .. } => "notOwner",
            Refusal::NotApproved { .. } => "projectNotApproved",
            Refusal::Expired { .. } => "projectExpired",
            Refusal::Stopped { .. } => "workspaceStopped",
            Refusal::MfaRequired { .. } => "mfaRequired",
            Refusal::NoDesktop { .. } => "noDesktop",
            Refusal::Unavailable(_) => "unavailable",
        }
    }
}

/// The decision: the owner (or, where the project allows it, a project admin) of a running
/// workspace in an approved, unexpired project, with a second factor when required.
pub fn decide(
    user: &str,
    has_mfa: bool,
    project: &ProjectAccess,
    ws: &WorkspaceAccess,
    now: DateTime<Utc>,
) -> Result<Grant, Refusal> {
    let p = || project.name.clone();
    if !project.members.iter().any(|m| m == user) {
        return Err(Refusal::NotMember { user: user.into(), project: p() });
    }
    let as_admin = ws.owner != user;
    if as_admin && !(project.desktop.admin_support && project.admins.iter().any(|a| a == user)) {
        return Err(Refusal::NotOwner {
            user: user.into(),
            project: p(),
            workspace: ws.name.clone(),
            owner: ws.owner.clone(),
        });
    }
    if !project.approved {
        return Err(Refusal::NotApproved { project: p() });
    }
    if let Some(expires) = project.expires
        && expires <= now
    {
        return Err(Refusal::Expired { project: p(), expires });
    }
    if project.desktop.require_mfa && !has_mfa {
        return Err(Refusal::MfaRequired { project: p() });
    }
    if !ws.running {
        return Err(Refusal::Stopped { project: p(), workspace: ws.name.clone() });
    }
    let (Some(address), Some(password)) = (&ws.desktop, &ws.vnc_password) else {
        return Err(Refusal::NoDesktop { project: p(), workspace: ws.name.clone() });
    };
    Ok(Grant {
        project: p(),
        workspace: ws.name.clone(),
        address: address.clone(),
        password: password.as_bytes().to_vec(),
        policy: project.desktop.clone(),
        as_admin,
    })
}

/// A workspace as the picker shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listed {
    pub project: String,
    pub workspace: String,
    pub owner: String,
    pub available: bool,
    /// Why not, when not available.
    pub reason: Option<String>,
}

/// Where access facts come from.
pub trait Directory: Send + Sync {
    /// The project and workspace, or `None` when either does not exist.
    fn lookup<'a>(
        &'a self,
        project: &'a str,
        workspace: &'a str,
    ) -> BoxFuture<'a, Result<Option<(ProjectAccess, WorkspaceAccess)>, Refusal>>;

    /// Every workspace of every project `user` is a member of.
    fn workspaces_of<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(ProjectAccess, WorkspaceAccess)>, Refusal>>;
}

/// Decide for `user` on `project/workspace`, looking the facts up.
pub async fn resolve(
    dir: &dyn Directory,
    user: &str,
    has_mfa: bool,
    project: &str,
    workspace: &str,
) -> Result<Grant, Refusal> {
    match dir.lookup(project, workspace).await? {
        Some((p, w)) => decide(user, has_mfa, &p, &w, Utc::now()),
        None => Err(Refusal::UnknownWorkspace { project: project.into(), workspace: workspace.into() }),
    }
}

/// The picker's list for `user`.
pub async fn list(dir: &dyn Directory, user: &str, has_mfa: bool) -> Result<Vec<Listed>, Refusal> {
    let now = Utc::now();
    Ok(dir
        .workspaces_of(user)
        .await?
        .into_iter()
        .filter(|(p, w)| w.owner == user || (p.desktop.admin_support && p.admins.iter().any(|a| a == user)))
        .map(|(p, w)| {
            let verdict = decide(user, has_mfa, &p, &w, now);
            Listed {
                project: p.name.clone(),
                workspace: w.name.clone(),
                owner: w.owner.clone(),
                available: verdict.is_ok(),
                reason: verdict.err().map(|e| e.to_string()),
            }
        })
        .collect())
}

/// The file [`FileDirectory`] reads.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DirectoryFile {
    #[serde(default)]
    pub projects: Vec<ProjectAccess>,
    #[serde(default)]
    pub workspaces: Vec<WorkspaceAccessFile>,
}

/// A workspace in the file: the password may be given inline or as a file (a mounted Secret).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceAccessFile {
    #[serde(flatten)]
    pub access: WorkspaceAccess,
    #[serde(default)]
    pub vnc_password_file: Option<PathBuf>,
    #[serde(default, rename = "vncPassword")]
    pub vnc_password_inline: Option<String>,
}

/// Access facts from a YAML or JSON file, read on every call.
#[derive(Clone, Debug)]
pub struct FileDirectory {
    pub path: PathBuf,
}

impl FileDirectory {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    fn load(&self) -> Result<Vec<(ProjectAccess, WorkspaceAccess)>, Refusal> {
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| Refusal::Unavailable(format!("reading {}: {e}", self.path.display())))?;
        let file: DirectoryFile = serde_yaml::from_str(&text)
            .map_err(|e| Refusal::Unavailable(format!("parsing {}: {e}", self.path.display())))?;
        let mut out = Vec::new();
        for w in file.workspaces {
            let Some(p) = file.projects.iter().find(|p| p.name == w.access.project) else { continue };
            let mut access = w.access;
            access.vnc_password = match (&w.vnc_password_file, w.vnc_password_inline) {
                (Some(path), _) => std::fs::read_to_string(path).ok().map(|s| s.trim_end_matches('\n').to_owned()),
                (None, inline) => inline,
            };
            out.push((p.clone(), access));
        }
        Ok(out)
    }
}

impl Directory for FileDirectory {
    fn lookup<'a>(
        &'a self,
        project: &'a str,
        workspace: &'a str,
    ) -> BoxFuture<'a, Result<Option<(ProjectAccess, WorkspaceAccess)>, Refusal>> {
        Box::pin(async move { Ok(self.load()?.into_iter().find(|(p, w)| p.name == project && w.name == workspace)) })
    }

    fn workspaces_of<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(ProjectAccess, WorkspaceAccess)>, Refusal>> {
        Box::pin(
            async move { Ok(self.load()?.into_iter().filter(|(p, _)| p.members.iter().any(|m| m == user)).collect()) },
        )
    }
}

pub use kube_directory::{
    KubeDirectory, VNC_PASSWD_FILE_KEY, VNC_PASSWORD_KEY, policy_of, project_access, vnc_secret_name,
};

mod kube_directory {
    //! Access facts from the cluster: the Project (members, approval, desktop policy), the
    //! Workspace (owner, running, phase, `status.endpoint` = its desktop Service) and the VNC
    //! Secret in the project namespace (`ws-<workspace>-vnc`, key `password`).

    use futures::future::BoxFuture;
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, ListParams};
    use noexit_crds::common::Role;
    use noexit_crds::project::Project;
    use noexit_crds::workspace::{Phase, Workspace};

    use super::{DesktopPolicy, ProjectAccess, Refusal, WorkspaceAccess};

    /// The VNC Secret of a workspace (the operator renders it, see
    /// `operator/controller/src/workspace/build.rs`).
    pub fn vnc_secret_name(workspace: &str) -> String {
        format!("ws-{workspace}-vnc")
    }
    /// Key of the VNC password (for the gateway) in that Secret.
    pub const VNC_PASSWORD_KEY: &str = "password";
    /// Key of TigerVNC's obfuscated password file in that Secret (for the desktop).
    pub const VNC_PASSWD_FILE_KEY: &str = "passwd";

    /// The gateway's policy from a Project's `spec.desktop` and the site's settings: paste
    /// size from the site; the session length is the shorter of the project's and the site's;
    /// admin support only where both allow it.
    pub fn policy_of(p: &noexit_crds::project::DesktopPolicy, site: &DesktopPolicy) -> DesktopPolicy {
        DesktopPolicy {
            clipboard_in: p.clipboard_in,
            paste_max_bytes: site.paste_max_bytes,
            idle_timeout_seconds: p.idle_timeout_minutes.saturating_mul(60),
            max_session_seconds: p.max_session_minutes.saturating_mul(60).min(site.max_session_seconds),
            second_connect: p.second_connect,
            require_mfa: p.require_mfa,
            admin_support: p.admin_support && site.admin_support,
        }
    }

    /// What the gateway decides on for a Project: `ready` is whether its approval is in force
    /// (the Ready condition on Kubernetes; in single-host mode a project that passed the checks).
    /// Both modes use this, so they decide alike.
    pub fn project_access(p: &Project, ready: bool, site: &DesktopPolicy) -> ProjectAccess {
        let expires = chrono::DateTime::parse_from_rfc3339(&p.spec.approval.expires)
            .map(|t| t.with_timezone(&chrono::Utc))
            .ok()
            .or_else(|| {
                chrono::NaiveDate::parse_from_str(&p.spec.approval.expires, "%Y-%m-%d")
                    .ok()
                    .and_then(|d| d.and_hms_opt(0, 0, 0))
                    .map(|t| t.and_utc())
            });
        ProjectAccess {
            name: p.metadata.name.clone().unwrap_or_default(),
            members: p.spec.members.iter().map(|m| m.user.clone()).collect(),
            admins: p.spec.users_with(Role::Admin).into_iter().map(str::to_owned).collect(),
            approved: ready,
            // An unreadable date counts as expired (fail closed).
            expires: Some(expires.unwrap_or(chrono::DateTime::UNIX_EPOCH)),
            desktop: policy_of(&p.spec.desktop, site),
        }
    }

    #[derive(Clone)]
    pub struct KubeDirectory {
        client: kube::Client,
        /// Project-level desktop settings the CRD does not carry.
        pub defaults: DesktopPolicy,
    }

    impl KubeDirectory {
        pub fn new(client: kube::Client, defaults: DesktopPolicy) -> Self {
            Self { client, defaults }
        }

        fn project_access(&self, p: &Project) -> ProjectAccess {
            let ready = p
                .status
                .as_ref()
                .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            project_access(p, ready, &self.defaults)
        }

        async fn workspace_access(&self, namespace: &str, w: &Workspace) -> WorkspaceAccess {
            let name = w.metadata.name.clone().unwrap_or_default();
            let running = w.spec.lifecycle.running
                && w.status.as_ref().and_then(|s| s.phase.as_ref()).is_some_and(|p| *p == Phase::Running);
            let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
            let password = match secrets.get_opt(&vnc_secret_name(&name)).await {
                Ok(Some(s)) => {
                    s.data.and_then(|d| d.get(VNC_PASSWORD_KEY).map(|b| String::from_utf8_lossy(&b.0).into_owned()))
                }
                _ => None,
            };
            WorkspaceAccess {
                project: w.spec.project.clone(),
                desktop: w.status.as_ref().and_then(|s| s.endpoint.clone()),
                name,
                owner: w.spec.owner.clone(),
                running,
                vnc_password: password,
            }
        }

        async fn project(&self, name: &str) -> Result<Option<(ProjectAccess, String)>, Refusal> {
            let projects: Api<Project> = Api::all(self.client.clone());
            let p = projects.get_opt(name).await.map_err(|e| Refusal::Unavailable(e.to_string()))?;
            Ok(p.map(|p| {
                let ns =
                    p.status.as_ref().and_then(|s| s.namespace.clone()).unwrap_or_else(|| format!("noexit-{name}"));
                (self.project_access(&p), ns)
            }))
        }
    }

    impl super::Directory for KubeDirectory {
        fn lookup<'a>(
            &'a self,
            project: &'a str,
            workspace: &'a str,
        ) -> BoxFuture<'a, Result<Option<(ProjectAccess, WorkspaceAccess)>, Refusal>> {
            Box::pin(async move {
                let Some((p, ns)) = self.project(project).await? else { return Ok(None) };
                let workspaces: Api<Workspace> = Api::namespaced(self.client.clone(), &ns);
                let Some(w) = workspaces.get_opt(workspace).await.map_err(|e| Refusal::Unavailable(e.to_string()))?
                else {
                    return Ok(None);
                };
                if w.spec.project != project {
                    return Ok(None);
                }
                Ok(Some((p, self.workspace_access(&ns, &w).await)))
            })
        }

        fn workspaces_of<'a>(
            &'a self,
            user: &'a str,
        ) -> BoxFuture<'a, Result<Vec<(ProjectAccess, WorkspaceAccess)>, Refusal>> {
            Box::pin(async move {
                let projects: Api<Project> = Api::all(self.client.clone());
                let list =
                    projects.list(&ListParams::default()).await.map_err(|e| Refusal::Unavailable(e.to_string()))?;
                let mut out = Vec::new();
                for p in list.items.iter().filter(|p| p.spec.members.iter().any(|m| m.user == user)) {
                    let Some(name) = p.metadata.name.clone() else { continue };
                    let ns =
                        p.status.as_ref().and_then(|s| s.namespace.clone()).unwrap_or_else(|| format!("noexit-{name}"));
                    let access = self.project_access(p);
                    let workspaces: Api<Workspace> = Api::namespaced(self.client.clone(), &ns);
                    let ws = workspaces
                        .list(&ListParams::default())
                        .await
                        .map_err(|e| Refusal::Unavailable(e.to_string()))?;
                    for w in ws.items.iter().filter(|w| w.spec.project == name) {
                        out.push((access.clone(), self.workspace_access(&ns, w).await));
                    }
                }
                Ok(out)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project() -> ProjectAccess {
        ProjectAccess {
            name: "ward-7".into(),
            members: vec!["alice".into(), "bob".into(), "ada".into()],
            admins: vec!["ada".into()],
            approved: true,
            expires: Some(Utc::now() + chrono::Duration::days(30)),
            desktop: DesktopPolicy::default(),
        }
    }

    fn ws() -> WorkspaceAccess {
        WorkspaceAccess {
            project: "ward-7".into(),
            name: "alice".into(),
            owner: "alice".into(),
            running: true,
            desktop: Some("10.0.0.2:5901".into()),
            vnc_password: Some("pw".into()),
        }
    }

    #[test]
    fn only_the_owner_with_mfa_of_a_running_workspace_in_an_approved_project() {
        let now = Utc::now();
        let g = decide("alice", true, &project(), &ws(), now).unwrap();
        assert_eq!((g.address.as_str(), g.as_admin), ("10.0.0.2:5901", false));
        let code = |user: &str, mfa: bool, p: ProjectAccess, w: WorkspaceAccess| {
            decide(user, mfa, &p, &w, now).unwrap_err().code()
        };
        assert_eq!(code("bob", true, project(), ws()), "notOwner");
        assert_eq!(code("mallory", true, project(), ws()), "notMember");
        assert_eq!(code("ada", true, project(), ws()), "notOwner");
        assert_eq!(code("alice", false, project(), ws()), "mfaRequired");
        assert_eq!(code("alice", true, ProjectAccess { approved: false, ..project() }, ws()), "projectNotApproved");
        let expired = ProjectAccess { expires: Some(now - chrono::Duration::seconds(1)), ..project() };
        assert_eq!(code("alice", true, expired, ws()), "projectExpired");
        assert_eq!(code("alice", true, project(), WorkspaceAccess { running: false, ..ws() }), "workspaceStopped");
        assert_eq!(code("alice", true, project(), WorkspaceAccess { vnc_password: None, ..ws() }), "noDesktop");
        // Admin support is per project and off by default.
        let mut support = project();
        support.desktop.admin_support = true;
        assert!(decide("ada", true, &support, &ws(), now).unwrap().as_admin);
        assert_eq!(code("bob", true, support, ws()), "notOwner");
    }

    #[tokio::test]
    async fn file_directory_reads_the_file_each_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.yaml");
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let write = |members: &str| {
            std::fs::write(
                &path,
                format!(
                    "projects:\n- name: ward-7\n  members: [{members}]\nworkspaces:\n- project: ward-7\n  name: alice\n  owner: alice\n  running: true\n  desktop: 10.0.0.2:5901\n  vncPasswordFile: {}\n",
                    pw.display()
                ),
            )
            .unwrap()
        };
        write("alice");
        let d = FileDirectory::new(&path);
        let g = resolve(&d, "alice", true, "ward-7", "alice").await.unwrap();
        assert_eq!(g.password, b"s3cret");
        assert_eq!(list(&d, "alice", true).await.unwrap().len(), 1);
        write("bob");
        assert_eq!(resolve(&d, "alice", true, "ward-7", "alice").await.unwrap_err().code(), "notMember");
        assert_eq!(resolve(&d, "alice", true, "ward-7", "nope").await.unwrap_err().code(), "unknownWorkspace");
    }
}
