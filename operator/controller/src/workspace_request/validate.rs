//! Rules for requests and their decisions. The webhook enforces the same rules at admission
//! (with the authenticated user); the controller re-checks them before acting, so a request
//! that slipped past admission still creates nothing.

use kube::ResourceExt;
use noexit_crds::names::project_namespace;
use noexit_crds::workspace_request::Decision;
use noexit_crds::{Project, Role, WorkspaceRequest};

use crate::invalid::{Invalid, Reason, describe};

/// The decision the status records: `Denied` wins over `Approved`.
pub fn decision(req: &WorkspaceRequest) -> Option<Decision> {
    req.status.as_ref().and_then(|s| s.decision_from_conditions())
}

/// Check the request itself and, if decided, who decided it.
pub fn validate(req: &WorkspaceRequest, project: Option<&Project>) -> Result<(), Invalid> {
    let ns = req.namespace().unwrap_or_default();
    let object = describe("workspacerequest", Some(&ns), &req.name_any());
    let fail = |field: &str, reason: Reason, message: String| Err(Invalid::new(object.clone(), field, reason, message));
    let spec = &req.spec;
    let project_name = &spec.workspace.project;
    if ns != project_namespace(project_name) {
        return fail(
            "metadata.namespace",
            Reason::WrongNamespace,
            format!(
                "a request for project {project_name:?} must live in namespace {:?}",
                project_namespace(project_name)
            ),
        );
    }
    let Some(project) = project else {
        return fail(
            "spec.workspace.project",
            Reason::ProjectNotFound,
            format!("project {project_name:?} does not exist"),
        );
    };
    if !project.spec.has_role(&spec.requester, Role::DataAnalyst) {
        return fail(
            "spec.requester",
            Reason::RequesterNotAnalyst,
            format!("{:?} is not a data analyst of project {project_name:?}", spec.requester),
        );
    }
    if decision(req).is_some() {
        let decided_by = req.status.as_ref().and_then(|s| s.decided_by.clone()).unwrap_or_default();
        if decided_by == spec.requester {
            return fail(
                "status.decidedBy",
                Reason::SelfApproval,
                format!("{decided_by:?} requested this workspace and may not decide on it"),
            );
        }
        if !project.spec.has_role(&decided_by, Role::Admin) {
            return fail(
                "status.decidedBy",
                Reason::DecisionByNonAdmin,
                format!("{decided_by:?} is not an admin of project {project_name:?}"),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testdata;
    use noexit_crds::WorkspaceRequestStatus;
    use noexit_crds::common::Condition;

    pub(crate) fn decided(req: &mut WorkspaceRequest, kind: &str, by: &str) {
        req.status = Some(WorkspaceRequestStatus {
            conditions: vec![Condition {
                type_: kind.into(),
                status: "True".into(),
                reason: "AdminDecision".into(),
                message: String::new(),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    "2026-11-22T10:00:00Z".parse().expect("time"),
                ),
                observed_generation: None,
            }],
            decided_by: Some(by.into()),
            ..WorkspaceRequestStatus::default()
        });
    }

    #[test]
    fn undecided_request_from_an_analyst_is_valid() {
        let req = testdata::request();
        validate(&req, Some(&testdata::project())).expect("valid");
        assert_eq!(decision(&req), None);
    }

    #[test]
    fn approval_by_an_admin_is_accepted() {
        let mut req = testdata::request();
        decided(&mut req, "Approved", "carol@ward7.example");
        validate(&req, Some(&testdata::project())).expect("valid");
        assert_eq!(decision(&req), Some(Decision::Approved));
    }

    #[test]
    fn self_approval_is_refused_even_for_an_admin() {
        let mut project = testdata::project();
        project.spec.members[1].roles.push(Role::Admin);
        let mut req = testdata::request();
        decided(&mut req, "Approved", "bob@ward7.example");
        let err = validate(&req, Some(&project)).expect_err("self approval");
        assert_eq!(err.reason, Reason::SelfApproval);
    }

    #[test]
    fn other_refusals() {
        let p = testdata::project();
        let mut req = testdata::request();
        decided(&mut req, "Approved", "alice@ward7.example");
        assert_eq!(validate(&req, Some(&p)).map_err(|e| e.reason), Err(Reason::DecisionByNonAdmin));

        let mut req = testdata::request();
        req.spec.requester = "alice@ward7.example".into();
        assert_eq!(validate(&req, Some(&p)).map_err(|e| e.reason), Err(Reason::RequesterNotAnalyst));

        let mut req = testdata::request();
        req.metadata.namespace = Some("noexit-ward-9".into());
        assert_eq!(validate(&req, Some(&p)).map_err(|e| e.reason), Err(Reason::WrongNamespace));

        assert_eq!(validate(&testdata::request(), None).map_err(|e| e.reason), Err(Reason::ProjectNotFound));
    }

    #[test]
    fn denied_wins_over_approved() {
        let mut req = testdata::request();
        decided(&mut req, "Approved", "carol@ward7.example");
        let mut denied = req.status.clone().expect("status").conditions.remove(0);
        denied.type_ = "Denied".into();
        if let Some(s) = req.status.as_mut() {
            s.conditions.push(denied);
        }
        assert_eq!(decision(&req), Some(Decision::Denied));
    }
}
