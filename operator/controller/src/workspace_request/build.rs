//! The Workspace an approved request creates. It is labelled with the request but not owned by
//! it: deleting a request must not delete a researcher's workspace.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use noexit_crds::workspace_request::Decision;
use noexit_crds::{Project, Workspace, WorkspaceRequest};

use super::validate::{decision, validate};
use crate::children::labels;

/// The Workspace to create, if the request is approved and its decision is valid.
pub fn build(req: &WorkspaceRequest, project: Option<&Project>) -> Option<Workspace> {
    if decision(req) != Some(Decision::Approved) || validate(req, project).is_err() {
        return None;
    }
    let metadata = ObjectMeta {
        name: Some(req.spec.workspace_name.clone()),
        namespace: req.namespace(),
        labels: Some(BTreeMap::from([
            (labels::MANAGED_BY.to_owned(), labels::MANAGER.to_owned()),
            (labels::PART_OF.to_owned(), "noexit".to_owned()),
            (labels::PROJECT.to_owned(), req.spec.workspace.project.clone()),
            (labels::REQUEST.to_owned(), req.name_any()),
        ])),
        ..ObjectMeta::default()
    };
    Some(Workspace { metadata, spec: req.spec.workspace.clone(), status: None })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata;
    use crate::workspace_request::validate::tests::decided;

    #[test]
    fn only_a_valid_approval_builds_a_workspace() {
        let p = testdata::project();
        let mut req = testdata::request();
        assert!(build(&req, Some(&p)).is_none(), "undecided");
        decided(&mut req, "Denied", "carol@ward7.example");
        assert!(build(&req, Some(&p)).is_none(), "denied");
        decided(&mut req, "Approved", "bob@ward7.example");
        assert!(build(&req, Some(&p)).is_none(), "self-approved");
        decided(&mut req, "Approved", "carol@ward7.example");
        let ws = build(&req, Some(&p)).expect("approved");
        assert_eq!(ws.name_any(), "alice-stats");
        assert_eq!(ws.namespace().as_deref(), Some("noexit-ward-7"));
        assert_eq!(ws.spec, req.spec.workspace);
        assert_eq!(ws.labels()[labels::REQUEST], "alice-stats");
    }
}
