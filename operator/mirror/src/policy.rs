//! Which packages each project may install. The policy file the mirror reads is rendered by
//! the operator from the Projects' `spec.egress.mirror` ([`policy_from_projects`]); the
//! decision ([`decide`]) is a pure function of that policy, a name and a version.

use std::collections::{BTreeMap, BTreeSet};

use kube::ResourceExt;
use noexit_crds::Project;
use noexit_crds::project::{MirrorPolicy, PackageRule};
use serde::{Deserialize, Serialize};

use super::index::Index;

/// One project's rules: exactly the Project's `spec.egress.mirror`.
pub type ProjectPolicy = MirrorPolicy;

/// The policy file (`--policy`): project name → rules. A project not listed may install
/// nothing.
///
/// ```yaml
/// projects:
///   ward-7:
///     enabled: true
///     allow: [{name: ggplot2}, {name: data.table, versions: ["1.15.4"]}]
///     deny: [{name: curl}]
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default)]
    pub projects: BTreeMap<String, ProjectPolicy>,
}

impl PolicyFile {
    pub fn project(&self, name: &str) -> Option<&ProjectPolicy> {
        self.projects.get(name)
    }

    pub fn from_yaml(text: &str) -> Result<Self, serde_yaml::Error> {
        serde_yaml::from_str(text)
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_default()
    }
}

/// The policy file for these Projects (pure; the operator renders it into the mirror's
/// ConfigMap).
pub fn policy_from_projects(projects: &[Project]) -> PolicyFile {
    PolicyFile { projects: projects.iter().map(|p| (p.name_any(), p.spec.egress.mirror.clone())).collect() }
}

/// Why a package was refused; shown to the auditor and in the 403 body.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the project has no mirror policy")]
    NoPolicy,
    #[error("the project's package mirror is disabled (spec.egress.mirror.enabled: false)")]
    Disabled,
    #[error("{0} is denied by spec.egress.mirror.deny")]
    Denied(String),
    #[error("{0} is not in spec.egress.mirror.allow")]
    NotAllowed(String),
    #[error("{name} {version} is not an allowed version (spec.egress.mirror.allow lists {allowed})")]
    VersionNotAllowed { name: String, version: String, allowed: String },
}

fn matches(rule: &PackageRule, name: &str, version: &str) -> bool {
    rule.name == name && (rule.versions.is_empty() || rule.versions.iter().any(|v| v == version))
}

/// May a project with `policy` install `name` at `version`? Deny wins over allow; an empty
/// allow list allows everything not denied; no policy allows nothing.
pub fn decide(policy: Option<&ProjectPolicy>, name: &str, version: &str) -> Result<(), Refusal> {
    let policy = policy.ok_or(Refusal::NoPolicy)?;
    if !policy.enabled {
        return Err(Refusal::Disabled);
    }
    if policy.deny.iter().any(|r| matches(r, name, version)) {
        return Err(Refusal::Denied(format!("{name} {version}")));
    }
    if policy.allow.is_empty() || policy.allow.iter().any(|r| matches(r, name, version)) {
        return Ok(());
    }
    let versions: Vec<&str> =
        policy.allow.iter().filter(|r| r.name == name).flat_map(|r| r.versions.iter().map(String::as_str)).collect();
    if versions.is_empty() {
        Err(Refusal::NotAllowed(name.to_owned()))
    } else {
        Err(Refusal::VersionNotAllowed { name: name.into(), version: version.into(), allowed: versions.join(", ") })
    }
}

/// Whether the project's allow list names exactly this version of `name` (an admin chose it,
/// so it may be fetched from upstream even when the index no longer lists it).
pub fn pins(policy: Option<&ProjectPolicy>, name: &str, version: &str) -> bool {
    policy.is_some_and(|p| p.allow.iter().any(|r| r.name == name && r.versions.iter().any(|v| v == version)))
}

/// Packages that ship with R itself; never fetched from a repository.
const BASE_PACKAGES: &[&str] = &[
    "base",
    "compiler",
    "datasets",
    "grDevices",
    "graphics",
    "grid",
    "methods",
    "parallel",
    "splines",
    "stats",
    "stats4",
    "tcltk",
    "tools",
    "utils",
];

/// An allowed package a project cannot actually install, because a package it needs is not
/// installable from the project's view of the index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DependencyProblem {
    pub project: String,
    pub package: String,
    pub version: String,
    pub missing: String,
    pub reason: String,
}

impl std::fmt::Display for DependencyProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "project {}: {} {} needs {}, which {}",
            self.project, self.package, self.version, self.missing, self.reason
        )
    }
}

/// For every project: allowed packages whose Depends/Imports/LinkingTo are not allowed (or not
/// in the index at all).
pub fn dependency_problems(policies: &PolicyFile, index: &Index) -> Vec<DependencyProblem> {
    let all: BTreeSet<&str> = index.entries.iter().map(|e| e.name.as_str()).collect();
    let mut out = Vec::new();
    for (project, policy) in &policies.projects {
        let view = index.filtered(Some(policy));
        let visible: BTreeSet<&str> = view.entries.iter().map(|e| e.name.as_str()).collect();
        for entry in &view.entries {
            for dep in entry.hard_dependencies() {
                if BASE_PACKAGES.contains(&dep.as_str()) || visible.contains(dep.as_str()) {
                    continue;
                }
                let reason = if all.contains(dep.as_str()) {
                    "the project's mirror policy does not allow"
                } else {
                    "is not in the mirror's index"
                };
                out.push(DependencyProblem {
                    project: project.clone(),
                    package: entry.name.clone(),
                    version: entry.version.clone(),
                    missing: dep,
                    reason: reason.into(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, versions: &[&str]) -> PackageRule {
        PackageRule { name: name.into(), versions: versions.iter().map(|v| v.to_string()).collect() }
    }

    fn policy(allow: Vec<PackageRule>, deny: Vec<PackageRule>) -> ProjectPolicy {
        MirrorPolicy { enabled: true, allow, deny }
    }

    #[test]
    fn empty_allow_list_allows_all_but_denied() {
        let p = policy(vec![], vec![rule("curl", &[])]);
        assert_eq!(decide(Some(&p), "ggplot2", "3.5.1"), Ok(()));
        assert_eq!(decide(Some(&p), "curl", "5.0"), Err(Refusal::Denied("curl 5.0".into())));
    }

    #[test]
    fn deny_wins_over_allow_and_versions_narrow_rules() {
        let p = policy(vec![rule("dplyr", &[]), rule("data.table", &["1.15.4"])], vec![rule("dplyr", &["0.1"])]);
        assert_eq!(decide(Some(&p), "dplyr", "1.1.4"), Ok(()));
        assert!(matches!(decide(Some(&p), "dplyr", "0.1"), Err(Refusal::Denied(_))));
        assert_eq!(decide(Some(&p), "data.table", "1.15.4"), Ok(()));
        let err = decide(Some(&p), "data.table", "1.14.0").unwrap_err();
        assert!(err.to_string().contains("1.15.4"), "{err}");
        assert_eq!(decide(Some(&p), "curl", "5.0"), Err(Refusal::NotAllowed("curl".into())));
    }

    #[test]
    fn no_policy_or_disabled_allows_nothing() {
        assert_eq!(decide(None, "x", "1"), Err(Refusal::NoPolicy));
        let mut p = policy(vec![], vec![]);
        p.enabled = false;
        assert_eq!(decide(Some(&p), "x", "1"), Err(Refusal::Disabled));
    }

    /// The Project of `examples/ward-7.yaml` (the controller's unit tests read the same file).
    fn example_project() -> Project {
        noexit_common::manifests::parse_documents(include_str!("../../../examples/ward-7.yaml"))
            .expect("examples/ward-7.yaml parses")
            .into_iter()
            .find_map(|m| match m {
                noexit_common::manifests::Manifest::Project(p) => Some(*p),
                _ => None,
            })
            .expect("example has a project")
    }

    #[test]
    fn policy_file_comes_from_projects_and_round_trips() {
        let project = example_project();
        let file = policy_from_projects(std::slice::from_ref(&project));
        assert_eq!(file.project(&project.name_any()), Some(&project.spec.egress.mirror));
        assert_eq!(PolicyFile::from_yaml(&file.to_yaml()).unwrap(), file);
        assert!(PolicyFile::from_yaml("project: {}\n").is_err(), "typos are refused");
        let parsed = PolicyFile::from_yaml("projects:\n  p:\n    allow: [{name: a, versions: ['1']}]\n").unwrap();
        assert!(parsed.projects["p"].enabled, "enabled defaults to true");
    }

    #[test]
    fn reports_allowed_packages_with_disallowed_dependencies() {
        let index = Index::parse(
            "Package: nxdep\nVersion: 0.1\n\nPackage: nxallowed\nVersion: 1.0\nImports: nxdep, methods, ghost (>= 1)\n",
        )
        .unwrap();
        let mut file = PolicyFile::default();
        file.projects.insert("p".into(), policy(vec![rule("nxallowed", &[])], vec![]));
        file.projects.insert("q".into(), policy(vec![], vec![]));
        let problems = dependency_problems(&file, &index);
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "project p: nxallowed 1.0 needs ghost, which is not in the mirror's index",
                "project p: nxallowed 1.0 needs nxdep, which the project's mirror policy does not allow",
                "project q: nxallowed 1.0 needs ghost, which is not in the mirror's index",
            ]
        );
    }
}
