//! The admission rules CEL cannot express because they look at other objects or at who asks.
//! Each is a pure function of the object (and its old version), the caller and a [`Lookup`]
//! snapshot. Where the controllers already have a rule (`controllers::<kind>::validate`), the
//! webhook calls it, so admission and reconciliation can never disagree.
//!
//! Updates are judged by what they change: an update may not introduce a problem the old
//! object did not have, but it may always leave an existing one alone. Stopping a workspace of
//! a project whose approval has expired must work, and so must removing a member.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use kube::ResourceExt;
use noexit_crds::workspace_request::Decision;
use noexit_crds::{Dataset, Project, Role, Workspace, WorkspaceRequest};

use crate::images::ImageAllowlist;
use crate::invalid::{Invalid, describe};
use crate::{dataset, project, workspace, workspace_request};

use super::lookup::Lookup;

/// Reasons only the webhook gives (the others come from [`crate::Reason`]).
pub mod reason {
    /// The object does not parse as its kind.
    pub const MALFORMED: &str = "Malformed";
    /// `status.decidedBy` names someone other than the authenticated user.
    pub const DECIDER_MISMATCH: &str = "DeciderMismatch";
    /// An approval or denial, once recorded, may not be changed or withdrawn.
    pub const DECISION_FINAL: &str = "DecisionFinal";
    /// The webhook's caches have not synced; it cannot judge yet.
    pub const NOT_READY: &str = "NotReady";
    /// A kind, operation or sub-resource this webhook does not judge.
    pub const UNSUPPORTED: &str = "Unsupported";
    /// The review could not be recorded in the audit log (fail closed).
    pub const AUDIT_UNAVAILABLE: &str = "AuditUnavailable";
    /// The caller's user name lacks the configured OIDC prefix where it must name a member.
    pub const USERNAME_PREFIX: &str = "UsernamePrefixMissing";
}

/// One refusal: which object, which field, why (a fixed `reason`, for logs and metrics), and a
/// message for the person who tried.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {field}: {message}")]
pub struct Refusal {
    pub object: String,
    pub field: String,
    pub reason: &'static str,
    pub message: String,
}

impl Refusal {
    pub fn new(object: &str, field: &str, reason: &'static str, message: impl Into<String>) -> Self {
        Self { object: object.to_owned(), field: field.to_owned(), reason, message: message.into() }
    }
}

impl From<Invalid> for Refusal {
    fn from(i: Invalid) -> Self {
        Self { object: i.object, field: i.field, reason: i.reason.as_str(), message: i.message }
    }
}

/// What the rules decided: allowed when `refusals` is empty; `warnings` are shown to the
/// client (`kubectl` prints them) either way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub refusals: Vec<Refusal>,
    pub warnings: Vec<String>,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.refusals.is_empty()
    }

    fn refuse(&mut self, r: impl Into<Refusal>) {
        self.refusals.push(r.into());
    }

    fn warn(&mut self, w: impl Into<String>) {
        self.warnings.push(w.into());
    }
}

/// Who is asking, as the API server authenticated them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// `userInfo.username` with the site's OIDC prefix removed: the name members are listed by.
    pub user: String,
    /// A service that acts for people it authenticated itself (the control-plane API): it may
    /// file requests for any analyst and record any admin's decision, and the rules then judge
    /// the person it names (`spec.requester`, `status.decidedBy`) instead of the caller.
    pub trusted: bool,
    /// The user name carried the site's OIDC prefix (or none is configured), so `user` may name
    /// a project member. A name without the prefix (a client certificate's CN, a static token)
    /// could otherwise pass for an OIDC member of the same name.
    pub member_name: bool,
}

impl Caller {
    /// The refusal for a caller whose name may not stand for a member, if it may not.
    fn unprefixed(&self, object: &str) -> Option<Refusal> {
        (!self.trusted && !self.member_name).then(|| {
            Refusal::new(
                object,
                "userInfo.username",
                reason::USERNAME_PREFIX,
                format!(
                    "{:?} is not an OIDC user name (it lacks the prefix the site configured), so it names no project member",
                    self.user
                ),
            )
        })
    }
}

/// What the rules need from the site file: the namespace a Project may not take, and the
/// workspace image allowlist. Same values the controller reads (`--site`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteRules {
    pub operator_namespace: String,
    pub images: ImageAllowlist,
}

impl Default for SiteRules {
    fn default() -> Self {
        Self::from(&crate::Site::default())
    }
}

impl From<&crate::Site> for SiteRules {
    fn from(site: &crate::Site) -> Self {
        Self { operator_namespace: site.operator_namespace.clone(), images: site.workspace_images.clone() }
    }
}

/// Project: the controller's checks (members, roles, an admin, approval date, quota), plus
/// warnings for what the change means for other objects.
pub fn check_project(
    new: &Project,
    old: Option<&Project>,
    lookup: &dyn Lookup,
    site: &SiteRules,
    now: DateTime<Utc>,
) -> Verdict {
    let mut v = Verdict::default();
    let name = new.name_any();
    let object = describe("project", None, &name);
    let datasets: Vec<Dataset> =
        new.spec.datasets.iter().filter_map(|d| lookup.dataset(d)).map(|d| d.as_ref().clone()).collect();
    let ns = site.operator_namespace.as_str();
    match project::validate(new, &datasets, ns, now.date_naive()) {
        Err(invalid)
            if old.is_some_and(|o| same_problem(&project::validate(o, &datasets, ns, now.date_naive()), &invalid)) =>
        {
            v.warn(format!("{invalid} (as before this change)"));
        }
        Err(invalid) => v.refuse(invalid),
        Ok(resolved) => {
            for missing in &resolved.ungranted {
                let i = new.spec.datasets.iter().position(|d| d == missing).unwrap_or_default();
                v.warn(format!(
                    "{object}: spec.datasets[{i}]: dataset {missing:?} does not exist or does not grant project {name:?} yet; it will not be mounted until its steward grants it"
                ));
            }
            if resolved.expired {
                v.warn(format!(
                    "{object}: spec.approval.expires: {} has passed; the project's workspaces will be stopped",
                    new.spec.approval.expires
                ));
            }
        }
    }
    if old.is_some() {
        for ws in lookup.workspaces_of(&name) {
            if !new.spec.has_role(&ws.spec.owner, Role::Researcher) {
                v.warn(format!(
                    "{object}: spec.members: {:?} is no longer a researcher; workspace {}/{} will be stopped",
                    ws.spec.owner,
                    ws.namespace().unwrap_or_default(),
                    ws.name_any()
                ));
            }
        }
    }
    v
}

/// Dataset: the controller's checks (one source, absolute paths, digest format, project names),
/// and a warning for each newly granted project that does not exist.
///
/// Warned, not refused: a grant is only one of two keys (the project must also list the
/// dataset), a steward may grant ahead of the project's creation, and GitOps tools apply
/// cluster-scoped objects in no fixed order (`examples/ward-7.yaml` grants `cohort-2024` to a
/// `ward-9` that is not part of it). The warning catches typos at the moment they are made.
pub fn check_dataset(new: &Dataset, old: Option<&Dataset>, lookup: &dyn Lookup) -> Verdict {
    let mut v = Verdict::default();
    let object = describe("dataset", None, &new.name_any());
    if let Err(invalid) = dataset::validate(new) {
        if old.is_some_and(|o| same_problem(&dataset::validate(o), &invalid)) {
            v.warn(format!("{invalid} (as before this change)"));
        } else {
            v.refuse(invalid);
        }
        return v;
    }
    let before: BTreeSet<&String> = old.map(|o| o.spec.granted_to.iter().collect()).unwrap_or_default();
    for (i, project) in new.spec.granted_to.iter().enumerate() {
        if !before.contains(project) && lookup.project(project).is_none() {
            v.warn(format!(
                "{object}: spec.grantedTo[{i}]: project {project:?} does not exist (yet); the grant takes effect when it exists and lists this dataset"
            ));
        }
    }
    if let Some(old) = old {
        for project in old.spec.granted_to.iter().filter(|p| !new.spec.granted_to.contains(p)) {
            let users: Vec<String> = lookup
                .workspaces_of(project)
                .iter()
                .filter(|w| w.spec.datasets.contains(&new.name_any()))
                .map(|w| w.name_any())
                .collect();
            if !users.is_empty() {
                v.warn(format!(
                    "{object}: spec.grantedTo: revoking project {project:?} stops its workspaces {}",
                    users.join(", ")
                ));
            }
        }
    }
    v
}

/// Workspace: the project exists and the namespace is its own, the owner is a researcher of
/// it, every dataset is granted to it (both keys), the approval has not expired. On update,
/// only problems the change introduces are refused.
pub fn check_workspace(
    new: &Workspace,
    old: Option<&Workspace>,
    lookup: &dyn Lookup,
    site: &SiteRules,
    now: DateTime<Utc>,
) -> Verdict {
    let mut v = Verdict::default();
    let before: BTreeSet<(String, &'static str)> = old
        .map(|o| workspace_problems(o, lookup, site, now).into_iter().map(|p| (p.field, p.reason.as_str())).collect())
        .unwrap_or_default();
    for p in workspace_problems(new, lookup, site, now) {
        if !before.contains(&(p.field.clone(), p.reason.as_str())) {
            v.refuse(p);
        }
    }
    v
}

/// The old object already had this problem: an object that predates the webhook (or a rule)
/// must stay editable, so the change is not refused for it.
fn same_problem<T>(old: &Result<T, Invalid>, new: &Invalid) -> bool {
    old.as_ref().err().is_some_and(|o| o.field == new.field && o.reason == new.reason)
}

fn workspace_problems(ws: &Workspace, lookup: &dyn Lookup, site: &SiteRules, now: DateTime<Utc>) -> Vec<Invalid> {
    let project = lookup.project(&ws.spec.project);
    let datasets: Vec<Dataset> =
        ws.spec.datasets.iter().filter_map(|d| lookup.dataset(d)).map(|d| d.as_ref().clone()).collect();
    workspace::validate(ws, project.as_deref(), &datasets, &site.images, now).problems
}

/// WorkspaceRequest, on create: the requester is the caller (unless a trusted service files it
/// for them) and a data analyst of the project; the requested workspace would itself be
/// admitted. On every write: a decision is recorded only by an admin who is not the requester,
/// under their own name, and is final.
pub fn check_request(
    new: &WorkspaceRequest,
    old: Option<&WorkspaceRequest>,
    caller: &Caller,
    lookup: &dyn Lookup,
    site: &SiteRules,
    now: DateTime<Utc>,
) -> Verdict {
    let mut v = Verdict::default();
    let ns = new.namespace().unwrap_or_default();
    let object = describe("workspacerequest", Some(&ns), &new.name_any());
    let project = lookup.project(&new.spec.workspace.project);
    if old.is_none() {
        if let Some(r) = caller.unprefixed(&object) {
            v.refuse(r);
        } else if !caller.trusted && new.spec.requester != caller.user {
            v.refuse(Refusal::new(
                &object,
                "spec.requester",
                crate::Reason::RequesterMismatch.as_str(),
                format!("{:?} may not file a request in the name of {:?}", caller.user, new.spec.requester),
            ));
        }
        // The decision is judged below, with the caller; judge the rest without it.
        let mut undecided = new.clone();
        undecided.status = None;
        if let Err(invalid) = workspace_request::validate(&undecided, project.as_deref()) {
            v.refuse(invalid);
        } else {
            let wanted = &new.spec.workspace_name;
            let exists = lookup
                .workspaces_of(&new.spec.workspace.project)
                .iter()
                .any(|w| w.name_any() == *wanted && w.namespace().as_deref() == new.namespace().as_deref());
            if exists {
                v.warn(format!(
                    "{object}: spec.workspaceName: workspace {wanted:?} already exists; approving this request will not replace it"
                ));
            }
            for p in workspace_problems(&requested_workspace(new), lookup, site, now) {
                v.refuse(Refusal {
                    object: object.clone(),
                    field: request_field(&p.field),
                    reason: p.reason.as_str(),
                    message: p.message,
                });
            }
        }
    }
    if let Some(r) = check_decision(new, old, caller, project.as_deref(), &object) {
        v.refuse(r);
    }
    v
}

/// The Workspace an approval of `req` would create.
fn requested_workspace(req: &WorkspaceRequest) -> Workspace {
    let mut ws = Workspace::new(&req.spec.workspace_name, req.spec.workspace.clone());
    ws.metadata.namespace = req.namespace();
    ws
}

/// A workspace field as it appears inside a request.
fn request_field(field: &str) -> String {
    match field {
        "metadata.name" => "spec.workspaceName".into(),
        "metadata.namespace" => "metadata.namespace".into(),
        f => f.strip_prefix("spec.").map(|rest| format!("spec.workspace.{rest}")).unwrap_or_else(|| f.to_owned()),
    }
}

fn recorded(req: Option<&WorkspaceRequest>) -> (Option<Decision>, Option<String>) {
    let status = req.and_then(|r| r.status.as_ref());
    (status.and_then(|s| s.decision_from_conditions()), status.and_then(|s| s.decided_by.clone()))
}

/// Judge a change of the decision (`Approved`/`Denied` conditions and `status.decidedBy`).
/// Writes that leave the decision as it was (the controller's `Fulfilled`, spec-only updates)
/// are not decisions and pass.
pub fn check_decision(
    new: &WorkspaceRequest,
    old: Option<&WorkspaceRequest>,
    caller: &Caller,
    project: Option<&Project>,
    object: &str,
) -> Option<Refusal> {
    let (before, before_by) = recorded(old);
    let (after, after_by) = recorded(Some(new));
    if (before, &before_by) == (after, &after_by) {
        return None;
    }
    let refuse =
        |field: &str, reason: &'static str, message: String| Some(Refusal::new(object, field, reason, message));
    if let Some(d) = before {
        return refuse(
            "status.conditions",
            reason::DECISION_FINAL,
            format!("the request was already {d:?} by {:?}; a decision is final", before_by.unwrap_or_default()),
        );
    }
    if let Some(r) = caller.unprefixed(object) {
        return Some(r);
    }
    if after.is_none() {
        // `decidedBy` changed without a decision: nothing to judge but the name.
        return refuse("status.decidedBy", reason::DECIDER_MISMATCH, "set only together with a decision".into());
    }
    let decider = match (caller.trusted, after_by) {
        (true, Some(by)) => by,
        (false, Some(by)) if by == caller.user => by,
        (true, None) | (false, None) => {
            return refuse(
                "status.decidedBy",
                reason::DECIDER_MISMATCH,
                "must name who decides (the authenticated user)".into(),
            );
        }
        (false, Some(by)) => {
            return refuse(
                "status.decidedBy",
                reason::DECIDER_MISMATCH,
                format!("{by:?} is not the authenticated user {:?}", caller.user),
            );
        }
    };
    let requester = &new.spec.requester;
    let project_name = &new.spec.workspace.project;
    if decider == *requester {
        return refuse(
            "status.decidedBy",
            crate::Reason::SelfApproval.as_str(),
            format!("{decider:?} requested this workspace and may not decide on it"),
        );
    }
    let Some(project) = project else {
        return refuse(
            "spec.workspace.project",
            crate::Reason::ProjectNotFound.as_str(),
            format!("project {project_name:?} does not exist"),
        );
    };
    if !project.spec.has_role(&decider, Role::Admin) {
        return refuse(
            "status.decidedBy",
            crate::Reason::DecisionByNonAdmin.as_str(),
            format!("{decider:?} is not an admin of project {project_name:?}"),
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata;
    use crate::webhook::lookup::Snapshot;
    use crate::workspace_request::validate::tests::decided;

    fn site() -> SiteRules {
        SiteRules::from(&testdata::site())
    }

    fn now() -> DateTime<Utc> {
        "2026-11-22T10:00:00Z".parse().expect("time")
    }

    /// The shipped example: project ward-7, datasets icu-2019 and cohort-2024, two workspaces.
    fn cluster() -> Snapshot {
        let mut s = Snapshot::new().with_project(testdata::project());
        for d in testdata::datasets() {
            s = s.with_dataset(d);
        }
        for w in testdata::workspaces() {
            s = s.with_workspace(w);
        }
        s
    }

    fn person(user: &str) -> Caller {
        Caller { user: user.into(), trusted: false, member_name: true }
    }

    fn service() -> Caller {
        Caller { user: "system:serviceaccount:noexit-system:noexit-api".into(), trusted: true, member_name: false }
    }

    fn reasons(v: &Verdict) -> Vec<&'static str> {
        v.refusals.iter().map(|r| r.reason).collect()
    }

    fn pod_workspace() -> Workspace {
        testdata::workspaces().remove(0)
    }

    // --- Workspace ---

    #[test]
    fn example_workspaces_are_admitted() {
        for ws in testdata::workspaces() {
            let v = check_workspace(&ws, None, &cluster(), &site(), now());
            assert!(v.allowed(), "{:?}", v.refusals);
        }
    }

    #[test]
    fn a_dataset_not_granted_is_refused_with_index_and_names() {
        let mut ws = pod_workspace();
        ws.metadata.name = Some("alice".into());
        ws.spec.datasets = vec!["cohort-2024".into(), "icu-2019".into()];
        let mut icu = testdata::datasets().remove(0);
        icu.spec.granted_to = vec!["ward-9".into()];
        let lookup = cluster().with_dataset(icu);
        let v = check_workspace(&ws, None, &lookup, &site(), now());
        assert_eq!(
            v.refusals.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [r#"workspace ward-7/alice: spec.datasets[1]: dataset "icu-2019" is not granted to project "ward-7""#]
        );
        assert_eq!(reasons(&v), ["DatasetNotGranted"]);
    }

    #[test]
    fn a_dataset_the_project_does_not_list_is_refused_even_if_the_steward_granted_it() {
        let mut p = testdata::project();
        p.spec.datasets = vec!["icu-2019".into()];
        let v = check_workspace(&pod_workspace(), None, &cluster().with_project(p), &site(), now());
        assert_eq!(reasons(&v), ["DatasetNotGranted"]);
        assert_eq!(v.refusals[0].field, "spec.datasets[1]");
    }

    #[test]
    fn a_dataset_that_does_not_exist_is_refused() {
        let mut ws = pod_workspace();
        ws.spec.datasets.push("icu-2020".into());
        let v = check_workspace(&ws, None, &cluster(), &site(), now());
        assert_eq!(reasons(&v), ["DatasetNotFound"]);
        assert_eq!(v.refusals[0].field, "spec.datasets[2]");
    }

    #[test]
    fn a_workspace_of_a_missing_project_is_refused() {
        let v = check_workspace(&pod_workspace(), None, &Snapshot::new(), &site(), now());
        assert_eq!(reasons(&v), ["ProjectNotFound"]);
        assert_eq!(
            v.refusals[0].to_string(),
            r#"workspace ward-7/alice-r: spec.project: project "ward-7" does not exist"#
        );
    }

    #[test]
    fn the_owner_must_be_a_researcher_member() {
        for owner in ["bob@ward7.example", "carol@ward7.example", "mallory@elsewhere.example"] {
            let mut ws = pod_workspace();
            ws.spec.owner = owner.into();
            let v = check_workspace(&ws, None, &cluster(), &site(), now());
            assert_eq!(reasons(&v), ["OwnerNotResearcher"], "{owner}");
            assert_eq!(v.refusals[0].field, "spec.owner");
        }
    }

    #[test]
    fn a_workspace_outside_its_project_namespace_is_refused() {
        let mut ws = pod_workspace();
        ws.metadata.namespace = Some("noexit-ward-9".into());
        assert_eq!(reasons(&check_workspace(&ws, None, &cluster(), &site(), now())), ["WrongNamespace"]);
    }

    #[test]
    fn a_new_workspace_in_an_expired_project_is_refused() {
        let mut p = testdata::project();
        p.spec.approval.expires = "2026-01-31".into();
        let v = check_workspace(&pod_workspace(), None, &cluster().with_project(p), &site(), now());
        assert_eq!(reasons(&v), ["ApprovalExpired"]);
    }

    #[test]
    fn every_problem_is_reported_not_only_the_first() {
        let mut ws = pod_workspace();
        ws.spec.owner = "bob@ward7.example".into();
        ws.spec.datasets.push("nope".into());
        let v = check_workspace(&ws, None, &cluster(), &site(), now());
        assert_eq!(reasons(&v), ["OwnerNotResearcher", "DatasetNotFound"]);
    }

    #[test]
    fn an_update_may_keep_an_old_problem_but_not_add_one() {
        let mut p = testdata::project();
        p.spec.approval.expires = "2026-01-31".into();
        let lookup = cluster().with_project(p);
        let old = pod_workspace();
        let mut stopped = old.clone();
        stopped.spec.lifecycle.running = false;
        assert!(check_workspace(&stopped, Some(&old), &lookup, &site(), now()).allowed(), "stopping must always work");

        let mut more = old.clone();
        more.spec.datasets.push("nope".into());
        assert_eq!(reasons(&check_workspace(&more, Some(&old), &lookup, &site(), now())), ["DatasetNotFound"]);
    }

    #[test]
    fn removing_a_dataset_from_a_workspace_is_admitted_after_the_grant_was_revoked() {
        let mut icu = testdata::datasets().remove(0);
        icu.spec.granted_to.clear();
        let lookup = cluster().with_dataset(icu);
        let old = pod_workspace();
        let mut new = old.clone();
        new.spec.datasets = vec!["cohort-2024".into()];
        assert!(check_workspace(&new, Some(&old), &lookup, &site(), now()).allowed());
    }

    // --- Project ---

    #[test]
    fn example_project_is_admitted_without_warnings() {
        let v = check_project(&testdata::project(), None, &cluster(), &site(), now());
        assert!(v.allowed() && v.warnings.is_empty(), "{v:?}");
    }

    #[test]
    fn project_refusals_name_the_field() {
        type Case = (fn(&mut Project), &'static str);
        let cases: Vec<Case> = vec![
            (|p| p.spec.members.clear(), "project ward-7: spec.members: a project needs at least one member"),
            (|p| p.spec.members[1].roles.clear(), "project ward-7: spec.members[1].roles"),
            (|p| p.spec.members[2].user = "alice@ward7.example".into(), "spec.members[2].user"),
            (|p| p.spec.members[2].roles = vec![Role::OutputChecker], "at least one member needs the admin role"),
            (|p| p.spec.members[0].user = " ".into(), "spec.members[0].user: must not be empty"),
            (|p| p.spec.approval.expires = "2027-02-30".into(), "spec.approval.expires"),
        ];
        for (mutate, expected) in cases {
            let mut p = testdata::project();
            mutate(&mut p);
            let v = check_project(&p, None, &cluster(), &site(), now());
            assert_eq!(v.refusals.len(), 1, "{expected}");
            let got = v.refusals[0].to_string();
            assert!(got.contains(expected), "{got:?} should contain {expected:?}");
        }
    }

    #[test]
    fn an_update_keeping_an_old_project_problem_is_admitted_with_a_warning() {
        let mut old = testdata::project();
        old.spec.members.retain(|m| !m.roles.contains(&Role::Admin));
        let mut new = old.clone();
        new.spec.display_name = Some("renamed".into());
        let v = check_project(&new, Some(&old), &cluster(), &site(), now());
        assert!(v.allowed(), "{v:?}");
        assert!(v.warnings[0].ends_with("(as before this change)"), "{:?}", v.warnings);

        let mut worse = testdata::project();
        worse.spec.members[0].roles.clear();
        let v = check_project(&worse, Some(&testdata::project()), &cluster(), &site(), now());
        assert_eq!(reasons(&v), ["InvalidField"]);
    }

    #[test]
    fn project_listing_an_ungranted_dataset_is_admitted_with_a_warning() {
        let mut p = testdata::project();
        p.spec.datasets.push("genomes-2025".into());
        let v = check_project(&p, None, &cluster(), &site(), now());
        assert!(v.allowed());
        assert_eq!(v.warnings.len(), 1);
        assert!(v.warnings[0].contains(r#"spec.datasets[2]: dataset "genomes-2025""#), "{:?}", v.warnings);
    }

    #[test]
    fn removing_a_workspace_owner_is_admitted_with_a_warning() {
        let old = testdata::project();
        let mut new = old.clone();
        new.spec.members.retain(|m| m.user != "alice@ward7.example");
        let v = check_project(&new, Some(&old), &cluster(), &site(), now());
        assert!(v.allowed());
        assert_eq!(v.warnings.len(), 2, "both of alice's workspaces: {:?}", v.warnings);
        assert!(v.warnings[0].contains("workspace noexit-ward-7/alice-r will be stopped"));
    }

    // --- Dataset ---

    #[test]
    fn example_datasets_are_admitted() {
        let lookup = cluster().with_project(ward_9());
        for d in testdata::datasets() {
            let v = check_dataset(&d, None, &lookup);
            assert!(v.allowed(), "{:?}", v.refusals);
        }
    }

    fn ward_9() -> Project {
        let mut p = testdata::project();
        p.metadata.name = Some("ward-9".into());
        p
    }

    #[test]
    fn a_grant_to_a_missing_project_is_admitted_with_a_warning() {
        let d = testdata::datasets().remove(1); // cohort-2024, granted to ward-7 and ward-9
        let v = check_dataset(&d, None, &cluster());
        assert!(v.allowed());
        assert_eq!(
            v.warnings,
            [
                r#"dataset cohort-2024: spec.grantedTo[1]: project "ward-9" does not exist (yet); the grant takes effect when it exists and lists this dataset"#
            ]
        );
        assert!(check_dataset(&d, None, &cluster().with_project(ward_9())).warnings.is_empty());
    }

    #[test]
    fn only_new_grants_to_missing_projects_warn() {
        let old = testdata::datasets().remove(1);
        let mut new = old.clone();
        new.spec.description = Some("cohort 2024, v2".into());
        let v = check_dataset(&new, Some(&old), &cluster());
        assert!(v.allowed() && v.warnings.is_empty(), "{v:?}");
        new.spec.granted_to.push("ward-11".into());
        let v = check_dataset(&new, Some(&old), &cluster());
        assert!(v.allowed());
        assert_eq!(v.warnings.len(), 1);
        assert!(v.warnings[0].contains(r#"spec.grantedTo[2]: project "ward-11""#));
    }

    #[test]
    fn a_grant_to_an_invalid_project_name_is_refused() {
        let mut d = testdata::datasets().remove(0);
        d.spec.granted_to.push("Ward 9".into());
        let v = check_dataset(&d, None, &cluster());
        assert_eq!(reasons(&v), ["DatasetInvalid"]);
        assert_eq!(v.refusals[0].field, "spec.grantedTo[1]");
    }

    #[test]
    fn an_invalid_dataset_is_refused_by_the_controller_rule() {
        let mut d = testdata::datasets().remove(0);
        d.spec.source.nfs = None;
        let v = check_dataset(&d, None, &cluster());
        assert_eq!(reasons(&v), ["DatasetInvalid"]);
        assert_eq!(v.refusals[0].field, "spec.source");
    }

    #[test]
    fn an_invalid_dataset_stays_editable_but_may_not_get_worse() {
        let mut old = testdata::datasets().remove(0);
        old.spec.digest = Some("md5:abc".into());
        let mut new = old.clone();
        new.spec.description = Some("v2".into());
        assert!(check_dataset(&new, Some(&old), &cluster()).allowed());
        new.spec.source.nfs = None;
        assert_eq!(reasons(&check_dataset(&new, Some(&old), &cluster())), ["DatasetInvalid"]);
    }

    #[test]
    fn revoking_a_grant_in_use_warns() {
        let old = testdata::datasets().remove(0);
        let mut new = old.clone();
        new.spec.granted_to.clear();
        let v = check_dataset(&new, Some(&old), &cluster());
        assert!(v.allowed());
        assert_eq!(v.warnings.len(), 1);
        assert!(v.warnings[0].contains("alice-r, alice-vm"), "{:?}", v.warnings);
    }

    // --- WorkspaceRequest ---

    fn request() -> WorkspaceRequest {
        testdata::request()
    }

    #[test]
    fn an_analyst_may_file_a_request_in_their_own_name() {
        let v = check_request(&request(), None, &person("bob@ward7.example"), &cluster(), &site(), now());
        assert!(v.allowed(), "{:?}", v.refusals);
    }

    #[test]
    fn nobody_files_in_someone_elses_name_but_the_trusted_api_may() {
        let v = check_request(&request(), None, &person("carol@ward7.example"), &cluster(), &site(), now());
        assert_eq!(reasons(&v), ["RequesterMismatch"]);
        assert_eq!(v.refusals[0].field, "spec.requester");
        assert!(check_request(&request(), None, &service(), &cluster(), &site(), now()).allowed());
    }

    #[test]
    fn the_requester_must_be_a_data_analyst() {
        let mut req = request();
        req.spec.requester = "alice@ward7.example".into();
        let v = check_request(&req, None, &person("alice@ward7.example"), &cluster(), &site(), now());
        assert_eq!(reasons(&v), ["RequesterNotAnalyst"]);
    }

    #[test]
    fn a_request_for_a_missing_project_is_refused() {
        let v = check_request(&request(), None, &person("bob@ward7.example"), &Snapshot::new(), &site(), now());
        assert_eq!(reasons(&v), ["ProjectNotFound"]);
    }

    #[test]
    fn the_requested_workspace_is_checked_with_request_field_paths() {
        let mut req = request();
        req.spec.workspace.datasets = vec!["cohort-2024".into(), "icu-2020".into()];
        req.spec.workspace.owner = "bob@ward7.example".into();
        let v = check_request(&req, None, &person("bob@ward7.example"), &cluster(), &site(), now());
        let fields: Vec<&str> = v.refusals.iter().map(|r| r.field.as_str()).collect();
        assert_eq!(fields, ["spec.workspace.owner", "spec.workspace.datasets[1]"]);
        assert!(v.refusals[0].to_string().starts_with("workspacerequest ward-7/alice-stats: spec.workspace.owner:"));
    }

    #[test]
    fn a_request_for_an_existing_workspace_name_warns() {
        let mut req = request();
        req.spec.workspace_name = "alice-r".into();
        let v = check_request(&req, None, &person("bob@ward7.example"), &cluster(), &site(), now());
        assert!(v.allowed());
        assert_eq!(v.warnings.len(), 1);
        assert!(v.warnings[0].contains(r#"workspace "alice-r" already exists"#), "{:?}", v.warnings);
        assert!(
            check_request(&request(), None, &person("bob@ward7.example"), &cluster(), &site(), now())
                .warnings
                .is_empty()
        );
    }

    #[test]
    fn approval_by_an_admin_is_admitted() {
        let old = request();
        let mut new = old.clone();
        decided(&mut new, "Approved", "carol@ward7.example");
        let v = check_request(&new, Some(&old), &person("carol@ward7.example"), &cluster(), &site(), now());
        assert!(v.allowed(), "{:?}", v.refusals);
    }

    #[test]
    fn self_approval_is_refused_even_when_the_requester_is_an_admin() {
        let mut p = testdata::project();
        p.spec.members[1].roles.push(Role::Admin);
        let lookup = cluster().with_project(p);
        let old = request();
        let mut new = old.clone();
        decided(&mut new, "Approved", "bob@ward7.example");
        let v = check_request(&new, Some(&old), &person("bob@ward7.example"), &lookup, &site(), now());
        assert_eq!(reasons(&v), ["SelfApproval"]);
        assert_eq!(
            v.refusals[0].to_string(),
            r#"workspacerequest ward-7/alice-stats: status.decidedBy: "bob@ward7.example" requested this workspace and may not decide on it"#
        );
    }

    #[test]
    fn self_approval_through_the_trusted_api_is_refused_too() {
        let old = request();
        let mut new = old.clone();
        decided(&mut new, "Approved", "bob@ward7.example");
        let v = check_request(&new, Some(&old), &service(), &cluster(), &site(), now());
        assert_eq!(reasons(&v), ["SelfApproval"]);
    }

    #[test]
    fn the_requester_cannot_pretend_to_be_the_admin() {
        let old = request();
        let mut new = old.clone();
        decided(&mut new, "Approved", "carol@ward7.example");
        let v = check_request(&new, Some(&old), &person("bob@ward7.example"), &cluster(), &site(), now());
        assert_eq!(reasons(&v), [reason::DECIDER_MISMATCH]);
        assert!(v.refusals[0].message.contains(r#"not the authenticated user "bob@ward7.example""#));
    }

    #[test]
    fn a_decision_without_a_name_is_refused() {
        let old = request();
        let mut new = old.clone();
        decided(&mut new, "Denied", "carol@ward7.example");
        if let Some(s) = new.status.as_mut() {
            s.decided_by = None;
        }
        let v = check_request(&new, Some(&old), &person("carol@ward7.example"), &cluster(), &site(), now());
        assert_eq!(reasons(&v), [reason::DECIDER_MISMATCH]);
    }

    #[test]
    fn a_non_admin_may_not_decide() {
        let old = request();
        let mut new = old.clone();
        decided(&mut new, "Denied", "alice@ward7.example");
        let v = check_request(&new, Some(&old), &person("alice@ward7.example"), &cluster(), &site(), now());
        assert_eq!(reasons(&v), ["DecisionByNonAdmin"]);
    }

    #[test]
    fn a_decision_is_final() {
        let mut old = request();
        decided(&mut old, "Approved", "carol@ward7.example");
        let mut new = request();
        decided(&mut new, "Denied", "carol@ward7.example");
        let v = check_request(&new, Some(&old), &person("carol@ward7.example"), &cluster(), &site(), now());
        assert_eq!(reasons(&v), [reason::DECISION_FINAL]);

        let mut withdrawn = old.clone();
        withdrawn.status = None;
        let v = check_request(&withdrawn, Some(&old), &person("carol@ward7.example"), &cluster(), &site(), now());
        assert_eq!(reasons(&v), [reason::DECISION_FINAL]);
    }

    #[test]
    fn status_writes_that_keep_the_decision_pass_for_anyone() {
        let mut old = request();
        decided(&mut old, "Approved", "carol@ward7.example");
        let mut new = old.clone();
        if let Some(s) = new.status.as_mut() {
            s.observed_generation = Some(1);
            s.decision = Some(Decision::Approved);
        }
        let operator = Caller {
            user: "system:serviceaccount:noexit-system:noexit-controller".into(),
            trusted: false,
            member_name: false,
        };
        assert!(check_request(&new, Some(&old), &operator, &cluster(), &site(), now()).allowed());
    }

    #[test]
    fn a_request_created_already_approved_by_its_requester_is_refused() {
        let mut req = request();
        decided(&mut req, "Approved", "bob@ward7.example");
        let v = check_request(&req, None, &person("bob@ward7.example"), &cluster(), &site(), now());
        assert_eq!(reasons(&v), ["SelfApproval"]);
    }

    #[test]
    fn a_user_name_without_the_oidc_prefix_names_no_member() {
        // `bob@ward7.example` from a client certificate, not from the OIDC issuer.
        let impostor = Caller { user: "bob@ward7.example".into(), trusted: false, member_name: false };
        let v = check_request(&request(), None, &impostor, &cluster(), &site(), now());
        assert_eq!(reasons(&v), [reason::USERNAME_PREFIX]);
        assert!(v.refusals[0].to_string().contains("userInfo.username"), "{v:?}");
        let carol = Caller { user: "carol@ward7.example".into(), trusted: false, member_name: false };
        let mut new = request();
        decided(&mut new, "Approved", "carol@ward7.example");
        let v = check_request(&new, Some(&request()), &carol, &cluster(), &site(), now());
        assert_eq!(reasons(&v), [reason::USERNAME_PREFIX]);
    }

    #[test]
    fn request_fields_map_to_the_embedded_workspace() {
        assert_eq!(request_field("spec.datasets[3]"), "spec.workspace.datasets[3]");
        assert_eq!(request_field("metadata.name"), "spec.workspaceName");
        assert_eq!(request_field("metadata.namespace"), "metadata.namespace");
    }

    // --- Site rules: reserved project names, workspace images ---

    #[test]
    fn a_project_taking_the_operator_namespace_is_refused() {
        let mut p = testdata::project();
        p.metadata.name = Some("system".into());
        let v = check_project(&p, None, &cluster(), &site(), now());
        assert_eq!(reasons(&v), ["InvalidField"]);
        assert!(v.refusals[0].to_string().starts_with("project system: metadata.name: \"system\" is reserved"));
        let mut p = testdata::project();
        p.metadata.name = Some("ops".into());
        let ops = SiteRules { operator_namespace: "noexit-ops".into(), ..site() };
        assert_eq!(reasons(&check_project(&p, None, &cluster(), &ops, now())), ["InvalidField"]);
        assert!(check_project(&p, None, &cluster(), &site(), now()).allowed());
    }

    #[test]
    fn a_workspace_or_request_with_an_image_off_the_allowlist_is_refused() {
        let mut ws = pod_workspace();
        ws.spec.image = "registry.ward7.example/noexit/r-desktop:4.4".into();
        let v = check_workspace(&ws, None, &cluster(), &site(), now());
        assert_eq!(reasons(&v), ["ImageNotAllowed"]);
        assert_eq!(v.refusals[0].field, "spec.image");
        // Without an allowlist, the tag passes (as before).
        assert!(check_workspace(&ws, None, &cluster(), &SiteRules::default(), now()).allowed());
        let mut req = request();
        req.spec.workspace.image = "ghcr.io/someone/anything:latest".into();
        let v = check_request(&req, None, &person("bob@ward7.example"), &cluster(), &site(), now());
        assert_eq!(reasons(&v), ["ImageNotAllowed"]);
        assert_eq!(v.refusals[0].field, "spec.workspace.image");
    }
}
