//! The CEL rules in the CRDs (`x-kubernetes-validations`), evaluated locally as the API server
//! would: creation rules with `validate_cel`, transition rules with `validate_cel_update`.

use noexit_crds::{Dataset, Project, Workspace, WorkspaceRequest};

fn docs() -> Vec<serde_yaml::Value> {
    let text = include_str!("../../examples/ward-7.yaml");
    serde_yaml::Deserializer::from_str(text).map(|d| serde::Deserialize::deserialize(d).expect("document")).collect()
}

fn of_kind<T: serde::de::DeserializeOwned>(kind: &str) -> Vec<T> {
    docs().into_iter().filter(|d| d["kind"] == kind).map(|d| serde_yaml::from_value(d).expect(kind)).collect()
}

fn workspace() -> Workspace {
    of_kind::<Workspace>("Workspace").remove(0)
}

#[test]
fn examples_pass_every_creation_rule() {
    for p in of_kind::<Project>("Project") {
        p.validate_cel().expect("project");
    }
    for d in of_kind::<Dataset>("Dataset") {
        d.validate_cel().expect("dataset");
    }
    for w in of_kind::<Workspace>("Workspace") {
        w.validate_cel().expect("workspace");
    }
}

#[test]
fn runtime_owner_and_project_are_immutable() {
    let old = workspace();
    let mut changed = old.clone();
    changed.spec.runtime = noexit_crds::workspace::Runtime::Vm;
    let err = changed.validate_cel_update(&old).expect_err("runtime changed").to_string();
    assert!(err.contains("spec.runtime is immutable"), "{err}");

    let mut changed = old.clone();
    changed.spec.owner = "mallory@evil.example".into();
    let err = changed.validate_cel_update(&old).expect_err("owner changed").to_string();
    assert!(err.contains("spec.owner is immutable"), "{err}");

    let mut changed = old.clone();
    changed.spec.project = "ward-9".into();
    assert!(changed.validate_cel_update(&old).is_err());

    // Mutable fields may change.
    let mut changed = old.clone();
    changed.spec.lifecycle.running = false;
    changed.spec.datasets.pop();
    changed.validate_cel_update(&old).expect("running and datasets may change");
}

#[test]
fn names_must_be_dns_labels_of_bounded_size() {
    let mut w = workspace();
    w.metadata.name = Some("Alice_R".into());
    assert!(w.validate_cel().is_err());
    w.metadata.name = Some("a".repeat(41));
    assert!(w.validate_cel().is_err());

    let mut p = of_kind::<Project>("Project").remove(0);
    p.metadata.name = Some("p".repeat(57));
    let err = p.validate_cel().expect_err("too long").to_string();
    assert!(err.contains("at most 56 characters"), "{err}");
}

#[test]
fn duplicates_are_refused() {
    let mut w = workspace();
    w.spec.datasets = vec!["icu-2019".into(), "icu-2019".into()];
    assert!(w.validate_cel().expect_err("dup").to_string().contains("lists a dataset twice"));

    let mut p = of_kind::<Project>("Project").remove(0);
    let first = p.spec.members[0].clone();
    p.spec.members.push(first);
    assert!(p.validate_cel().expect_err("dup member").to_string().contains("each user appears once"));
}

#[test]
fn dataset_source_is_exactly_one_kind() {
    let mut d = of_kind::<Dataset>("Dataset").remove(0);
    d.spec.source.host_path = Some(noexit_crds::dataset::HostPathSource { path: "/srv/data".into() });
    assert!(d.validate_cel().expect_err("two sources").to_string().contains("exactly one of nfs, csi, hostPath"));
    d.spec.source = Default::default();
    assert!(d.validate_cel().is_err());
}

#[test]
fn a_request_cannot_be_edited_after_filing() {
    let text = include_str!("../../examples/request.yaml");
    let old: WorkspaceRequest = serde_yaml::from_str(text).expect("request");
    let mut edited = old.clone();
    edited.spec.workspace.owner = "someone-else@ward7.example".into();
    let err = edited.validate_cel_update(&old).expect_err("spec edited").to_string();
    assert!(err.contains("spec is immutable"), "{err}");
    let mut bad_name = old.clone();
    bad_name.spec.workspace_name = "No Spaces".into();
    assert!(bad_name.validate_cel().is_err());
}

#[test]
fn reserved_project_names_are_refused() {
    for name in ["system", "operator", "kube-system", "kube-x", "default"] {
        let mut p = of_kind::<Project>("Project").remove(0);
        p.metadata.name = Some(name.into());
        let err = p.validate_cel().expect_err(name).to_string();
        assert!(err.contains("reserved"), "{name}: {err}");
    }
    // The CEL list is the Rust list.
    for name in noexit_crds::names::RESERVED_PROJECT_NAMES {
        assert!(noexit_crds::names::RESERVED_PROJECT_CEL.contains(&format!("'{name}'")), "{name}");
    }
    assert!(include_str!("../src/project.rs").contains(noexit_crds::names::RESERVED_PROJECT_CEL));
}
