//! What a Workspace must satisfy before it may run. Unlike other kinds, a problem does not stop
//! the build: the home volume and Secret are kept, only the pod/VM is withheld (fail closed
//! without losing the researcher's work).

use chrono::{DateTime, Utc};
use kube::ResourceExt;
use noexit_crds::names::{check_dns1123_label, project_namespace};
use noexit_crds::{Dataset, Project, Role, Workspace};

use crate::images::ImageAllowlist;
use crate::invalid::{Invalid, Reason, describe};
use crate::quantity;

/// A Workspace checked against its Project and the Datasets.
#[derive(Clone, Debug, Default)]
pub struct ResolvedWorkspace {
    /// Datasets to mount: listed by the workspace, granted to the project (in order).
    pub datasets: Vec<String>,
    /// Project allows pasting into the desktop.
    pub clipboard_in: bool,
    /// Project has a package mirror.
    pub mirror: bool,
    /// `spec.lifecycle.expires` has passed.
    pub expired: bool,
    /// Why the workspace may not run; empty when it may.
    pub problems: Vec<Invalid>,
}

impl ResolvedWorkspace {
    /// The first problem, which becomes the `Ready=False` reason.
    pub fn blocked(&self) -> Option<&Invalid> {
        self.problems.first()
    }
}

pub fn validate(
    ws: &Workspace,
    project: Option<&Project>,
    datasets: &[Dataset],
    images: &ImageAllowlist,
    now: DateTime<Utc>,
) -> ResolvedWorkspace {
    let name = ws.name_any();
    let ns = ws.namespace().unwrap_or_default();
    let object = describe("workspace", Some(&ns), &name);
    let spec = &ws.spec;
    let mut problems = Vec::new();
    let mut problem = |field: &str, reason: Reason, message: String| {
        problems.push(Invalid::new(object.clone(), field, reason, message));
    };

    if let Err(m) = check_dns1123_label(&name, 40) {
        problem("metadata.name", Reason::InvalidField, m);
    }
    if ns != project_namespace(&spec.project) {
        problem(
            "metadata.namespace",
            Reason::WrongNamespace,
            format!(
                "a workspace of project {:?} must live in namespace {:?}",
                spec.project,
                project_namespace(&spec.project)
            ),
        );
    }
    if spec.image.trim().is_empty() {
        problem("spec.image", Reason::InvalidField, "must name an image".into());
    } else if let Err(m) = images.check(spec.runtime, &spec.image) {
        problem("spec.image", Reason::ImageNotAllowed, m);
    }
    for (field, value) in [
        ("spec.resources.cpu", &spec.resources.cpu),
        ("spec.resources.memory", &spec.resources.memory),
        ("spec.resources.homeSize", &spec.resources.home_size),
    ] {
        if !quantity::is_valid(&value.0) {
            problem(field, Reason::InvalidField, format!("{:?} is not a quantity", value.0));
        }
    }

    let mut resolved =
        ResolvedWorkspace { expired: spec.lifecycle.expires.is_some_and(|t| t <= now), ..ResolvedWorkspace::default() };
    let Some(project) = project else {
        problem("spec.project", Reason::ProjectNotFound, format!("project {:?} does not exist", spec.project));
        resolved.problems = problems;
        return resolved;
    };
    resolved.clipboard_in = project.spec.desktop.clipboard_in;
    resolved.mirror = project.spec.egress.mirror.enabled;

    let expired = chrono::NaiveDate::parse_from_str(&project.spec.approval.expires, "%Y-%m-%d")
        .map(|d| d < now.date_naive())
        .unwrap_or(true);
    if expired {
        problem(
            "spec.project",
            Reason::ApprovalExpired,
            format!("the approval of project {:?} expired on {}", spec.project, project.spec.approval.expires),
        );
    }
    if !project.spec.has_role(&spec.owner, Role::Researcher) {
        problem(
            "spec.owner",
            Reason::OwnerNotResearcher,
            format!("{:?} is not a researcher of project {:?}", spec.owner, spec.project),
        );
    }

    for (i, wanted) in spec.datasets.iter().enumerate() {
        let field = format!("spec.datasets[{i}]");
        match datasets.iter().find(|d| d.name_any() == *wanted) {
            None => problem(&field, Reason::DatasetNotFound, format!("dataset {wanted:?} does not exist")),
            Some(d) if !(project.spec.datasets.contains(wanted) && d.spec.granted_to.contains(&spec.project)) => {
                problem(
                    &field,
                    Reason::DatasetNotGranted,
                    format!("dataset {wanted:?} is not granted to project {:?}", spec.project),
                )
            }
            Some(_) => resolved.datasets.push(wanted.clone()),
        }
    }
    resolved.problems = problems;
    resolved
}

#[cfg(test)]
mod tests {
    use super::*;

    type Case = (fn(&mut Workspace, &mut Project), Reason);
    use crate::testdata;

    fn now() -> DateTime<Utc> {
        "2026-11-22T10:00:00Z".parse().expect("time")
    }

    fn check(ws: &Workspace) -> ResolvedWorkspace {
        validate(ws, Some(&testdata::project()), &testdata::datasets(), &ImageAllowlist::default(), now())
    }

    #[test]
    fn examples_may_run_with_their_datasets() {
        let [pod, vm] = <[Workspace; 2]>::try_from(testdata::workspaces()).expect("two");
        let r = check(&pod);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.datasets, ["icu-2019", "cohort-2024"]);
        assert!(r.clipboard_in && r.mirror && !r.expired);
        assert_eq!(check(&vm).datasets, ["icu-2019"]);
    }

    #[test]
    fn a_dataset_not_granted_is_named_with_its_index() {
        let mut ds = testdata::datasets();
        ds[0].spec.granted_to = vec!["ward-9".into()];
        let mut ws = testdata::workspaces().remove(0);
        ws.spec.datasets = vec!["cohort-2024".into(), "icu-2019".into()];
        let r = validate(&ws, Some(&testdata::project()), &ds, &ImageAllowlist::default(), now());
        let p = r.blocked().expect("blocked");
        assert_eq!(p.reason, Reason::DatasetNotGranted);
        assert_eq!(
            p.to_string(),
            r#"workspace ward-7/alice-r: spec.datasets[1]: dataset "icu-2019" is not granted to project "ward-7""#
        );
        assert_eq!(r.datasets, ["cohort-2024"]);
    }

    #[test]
    fn project_must_also_list_the_dataset() {
        let mut p = testdata::project();
        p.spec.datasets.retain(|d| d != "cohort-2024");
        let ws = testdata::workspaces().remove(0);
        let r = validate(&ws, Some(&p), &testdata::datasets(), &ImageAllowlist::default(), now());
        assert_eq!(r.blocked().map(|p| p.reason), Some(Reason::DatasetNotGranted));
    }

    #[test]
    fn each_problem_has_its_reason() {
        let cases: Vec<Case> = vec![
            (|w, _| w.spec.datasets.push("nope".into()), Reason::DatasetNotFound),
            (|w, _| w.spec.owner = "bob@ward7.example".into(), Reason::OwnerNotResearcher),
            (|w, _| w.spec.owner = "mallory@evil.example".into(), Reason::OwnerNotResearcher),
            (|w, _| w.metadata.namespace = Some("default".into()), Reason::WrongNamespace),
            (|_, p| p.spec.approval.expires = "2026-01-01".into(), Reason::ApprovalExpired),
            (|w, _| w.spec.resources.memory.0 = "8GB".into(), Reason::InvalidField),
        ];
        for (mutate, reason) in cases {
            let mut ws = testdata::workspaces().remove(0);
            let mut p = testdata::project();
            mutate(&mut ws, &mut p);
            let r = validate(&ws, Some(&p), &testdata::datasets(), &ImageAllowlist::default(), now());
            assert_eq!(r.blocked().map(|i| i.reason), Some(reason), "{:?}", r.problems);
        }
        let ws = testdata::workspaces().remove(0);
        let r = validate(&ws, None, &[], &ImageAllowlist::default(), now());
        assert_eq!(r.blocked().map(|i| i.reason), Some(Reason::ProjectNotFound));
    }

    #[test]
    fn the_site_allowlist_admits_the_examples_and_refuses_tags_and_strangers() {
        let images = testdata::site().workspace_images;
        assert!(images.is_set(), "examples/site.yaml lists the example images");
        for ws in testdata::workspaces() {
            let r = validate(&ws, Some(&testdata::project()), &testdata::datasets(), &images, now());
            assert!(r.problems.is_empty(), "{}: {:?}", ws.name_any(), r.problems);
        }
        let mut ws = testdata::workspaces().remove(0);
        let pinned = ws.spec.image.clone();
        ws.spec.image = pinned.split('@').next().expect("name").to_owned();
        let r = validate(&ws, Some(&testdata::project()), &testdata::datasets(), &images, now());
        let p = r.blocked().expect("a tag is refused");
        assert_eq!((p.reason, p.field.as_str()), (Reason::ImageNotAllowed, "spec.image"));
        assert!(p.to_string().starts_with("workspace ward-7/alice-r: spec.image: "), "{p}");
        assert!(p.message.contains("workspaceImages.pod"), "{p}");
        // The researcher's own image, pinned by digest, is still not the site's.
        ws.spec.image = format!("evil.example/r@{}", pinned.split('@').nth(1).expect("digest"));
        let r = validate(&ws, Some(&testdata::project()), &testdata::datasets(), &images, now());
        assert_eq!(r.blocked().map(|p| p.reason), Some(Reason::ImageNotAllowed));
    }

    #[test]
    fn expiry_of_the_workspace_is_not_a_problem_but_stops_it() {
        let mut ws = testdata::workspaces().remove(0);
        ws.spec.lifecycle.expires = Some("2026-11-01T00:00:00Z".parse().expect("t"));
        let r = check(&ws);
        assert!(r.expired && r.problems.is_empty());
    }
}
