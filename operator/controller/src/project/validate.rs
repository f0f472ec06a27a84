//! What a Project must satisfy before the operator builds anything for it.

use chrono::NaiveDate;
use kube::ResourceExt;
use noexit_crds::names::{check_dns1123_label, check_project_name};
use noexit_crds::{Dataset, Project, Role};

use crate::invalid::{Invalid, Reason, describe};
use crate::quantity;

/// A valid Project with its datasets resolved against the stewards' grants.
#[derive(Clone, Debug)]
pub struct ResolvedProject {
    /// Datasets the project lists AND whose `spec.grantedTo` names the project, in the
    /// project's order.
    pub datasets: Vec<Dataset>,
    /// Datasets the project lists that are missing or not granted (shown in status).
    pub ungranted: Vec<String>,
    /// The approval has passed its expiry date: workspaces must stop.
    pub expired: bool,
}

/// Check a Project against the datasets that exist, the namespace the control plane runs in
/// (a project may not take it over) and today's date.
pub fn validate(
    project: &Project,
    datasets: &[Dataset],
    operator_namespace: &str,
    today: NaiveDate,
) -> Result<ResolvedProject, Invalid> {
    let name = project.name_any();
    let object = describe("project", None, &name);
    let bad = |field: String, message: String| Invalid::new(object.clone(), field, Reason::InvalidField, message);

    check_project_name(&name, operator_namespace).map_err(|m| bad("metadata.name".into(), m))?;

    let spec = &project.spec;
    if spec.members.is_empty() {
        return Err(bad("spec.members".into(), "a project needs at least one member".into()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, member) in spec.members.iter().enumerate() {
        if member.user.trim().is_empty() {
            return Err(bad(format!("spec.members[{i}].user"), "must not be empty".into()));
        }
        if !seen.insert(member.user.as_str()) {
            return Err(bad(format!("spec.members[{i}].user"), format!("user {:?} is listed twice", member.user)));
        }
        if member.roles.is_empty() {
            return Err(bad(format!("spec.members[{i}].roles"), "a member needs at least one role".into()));
        }
    }
    if !spec.members.iter().any(|m| m.roles.contains(&Role::Admin)) {
        return Err(bad(
            "spec.members".into(),
            "at least one member needs the admin role (to approve requests)".into(),
        ));
    }

    let expires = NaiveDate::parse_from_str(&spec.approval.expires, "%Y-%m-%d").map_err(|_| {
        bad("spec.approval.expires".into(), format!("{:?} is not a date (YYYY-MM-DD)", spec.approval.expires))
    })?;
    if spec.approval.reference.trim().is_empty() {
        return Err(bad("spec.approval.reference".into(), "must name the ethics / data-access approval".into()));
    }

    for (field, value) in [("cpu", &spec.quota.cpu), ("memory", &spec.quota.memory), ("storage", &spec.quota.storage)] {
        if !quantity::is_valid(&value.0) {
            return Err(bad(format!("spec.quota.{field}"), format!("{:?} is not a quantity", value.0)));
        }
    }

    let mut resolved = Vec::new();
    let mut ungranted = Vec::new();
    for (i, wanted) in spec.datasets.iter().enumerate() {
        check_dns1123_label(wanted, 40).map_err(|m| bad(format!("spec.datasets[{i}]"), m))?;
        match datasets.iter().find(|d| d.name_any() == *wanted) {
            Some(d) if d.spec.granted_to.contains(&name) => resolved.push(d.clone()),
            _ => ungranted.push(wanted.clone()),
        }
    }

    Ok(ResolvedProject { datasets: resolved, ungranted, expired: expires < today })
}

#[cfg(test)]
mod tests {
    use super::*;

    type Case = (fn(&mut Project), &'static str);
    use crate::testdata;

    fn today() -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 11, 22).expect("date")
    }

    #[test]
    fn example_project_is_valid_and_resolves_both_datasets() {
        let r = validate(&testdata::project(), &testdata::datasets(), "noexit-system", today()).expect("valid");
        let names: Vec<_> = r.datasets.iter().map(|d| d.name_any()).collect();
        assert_eq!(names, ["icu-2019", "cohort-2024"]);
        assert!(r.ungranted.is_empty());
        assert!(!r.expired);
    }

    #[test]
    fn a_dataset_needs_both_keys() {
        let mut datasets = testdata::datasets();
        datasets[0].spec.granted_to.clear();
        let r = validate(&testdata::project(), &datasets, "noexit-system", today()).expect("still valid");
        assert_eq!(r.ungranted, ["icu-2019"]);
        assert_eq!(r.datasets.len(), 1);
    }

    #[test]
    fn expiry_is_noticed() {
        let mut p = testdata::project();
        p.spec.approval.expires = "2026-11-21".into();
        assert!(validate(&p, &[], "noexit-system", today()).expect("valid").expired);
    }

    #[test]
    fn reserved_names_and_the_operator_namespace_are_refused() {
        for (name, operator_namespace) in [("system", "noexit-system"), ("kube-system", "x"), ("ops", "noexit-ops")] {
            let mut p = testdata::project();
            p.metadata.name = Some(name.into());
            let err = validate(&p, &[], operator_namespace, today()).expect_err(name);
            assert_eq!((err.field.as_str(), err.reason), ("metadata.name", Reason::InvalidField));
            assert!(err.to_string().starts_with(&format!("project {name}: metadata.name: ")), "{err}");
            assert!(err.message.contains("reserved"), "{err}");
        }
        let mut p = testdata::project();
        p.metadata.name = Some("ops".into());
        assert!(validate(&p, &[], "noexit-system", today()).is_ok());
    }

    #[test]
    fn refusals_name_the_field() {
        let cases: Vec<Case> = vec![
            (|p| p.spec.members.clear(), "project ward-7: spec.members: a project needs at least one member"),
            (
                |p| p.spec.members[1].user = "alice@ward7.example".into(),
                "spec.members[1].user: user \"alice@ward7.example\" is listed twice",
            ),
            (|p| p.spec.members[0].roles.clear(), "spec.members[0].roles"),
            (
                |p| p.spec.members.retain(|m| !m.roles.contains(&Role::Admin)),
                "at least one member needs the admin role",
            ),
            (|p| p.spec.approval.expires = "next year".into(), "spec.approval.expires: \"next year\" is not a date"),
            (|p| p.spec.quota.memory.0 = "64GB".into(), "spec.quota.memory"),
            (|p| p.spec.datasets.push("Bad_Name".into()), "spec.datasets[2]"),
        ];
        for (mutate, expected) in cases {
            let mut p = testdata::project();
            mutate(&mut p);
            let err = validate(&p, &testdata::datasets(), "noexit-system", today()).expect_err(expected).to_string();
            assert!(err.contains(expected), "{err:?} should contain {expected:?}");
        }
    }
}
