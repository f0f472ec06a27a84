//! The objects of `examples/ward-7.yaml`, for unit tests: the shipped example is the fixture,
//! so it cannot rot.

use noexit_crds::{Dataset, Project, Workspace, WorkspaceRequest};

use noexit_common::manifests::{Manifest, parse_documents};

fn example() -> Vec<Manifest> {
    parse_documents(include_str!("../../../examples/ward-7.yaml")).expect("examples/ward-7.yaml parses")
}

pub fn project() -> Project {
    example()
        .into_iter()
        .find_map(|m| match m {
            Manifest::Project(p) => Some(*p),
            _ => None,
        })
        .expect("example has a project")
}

pub fn datasets() -> Vec<Dataset> {
    example()
        .into_iter()
        .filter_map(|m| match m {
            Manifest::Dataset(d) => Some(*d),
            _ => None,
        })
        .collect()
}

/// `alice-r` (pod) and `alice-vm` (vm).
pub fn workspaces() -> Vec<Workspace> {
    example()
        .into_iter()
        .filter_map(|m| match m {
            Manifest::Workspace(w) => Some(*w),
            _ => None,
        })
        .collect()
}

pub fn request() -> WorkspaceRequest {
    parse_documents(include_str!("../../../examples/request.yaml"))
        .expect("examples/request.yaml parses")
        .into_iter()
        .find_map(|m| match m {
            Manifest::WorkspaceRequest(r) => Some(*r),
            _ => None,
        })
        .expect("example has a request")
}

/// `examples/site.yaml`.
pub fn site() -> crate::Site {
    serde_yaml::from_str(include_str!("../../../examples/site.yaml")).expect("examples/site.yaml parses")
}
