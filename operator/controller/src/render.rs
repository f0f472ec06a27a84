//! `noexit-operator render`: the operator's dry run. Reads Project, Dataset, Workspace and
//! WorkspaceRequest manifests and prints every object the operator would apply, as
//! multi-document YAML, without a cluster. On any invalid object it prints nothing to stdout
//! (so `render | kubectl apply -f -` never applies half a set) and names file, object and field
//! on stderr.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use kube::ResourceExt;
use noexit_crds::agent::WorkspaceIdentity;
use noexit_crds::names::project_namespace;
use noexit_crds::{Dataset, Project, Workspace, WorkspaceRequest};

use crate::children::Child;
use crate::site::Site;
use crate::workspace::AgentCredentials;
use crate::workspace::build::VncCredential;
use crate::{dataset, project, workspace, workspace_request};
use noexit_common::manifests::{Manifest, parse_documents};
use noexit_common::pki::Ca;

/// Arguments of `noexit-operator render`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Manifest files (multi-document YAML) with Projects, Datasets, Workspaces, WorkspaceRequests.
    #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,
    /// Site configuration (addresses of the API, mirror, gateway; images). Defaults suit kind.
    #[arg(long)]
    pub site: Option<PathBuf>,
}

/// An object read from a file, remembered with where it came from.
#[derive(Clone, Debug)]
pub struct Sourced<T> {
    pub file: String,
    pub object: T,
}

/// Everything read from the input files, by kind.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    pub projects: Vec<Sourced<Project>>,
    pub datasets: Vec<Sourced<Dataset>>,
    pub workspaces: Vec<Sourced<Workspace>>,
    pub requests: Vec<Sourced<WorkspaceRequest>>,
}

impl Inputs {
    pub fn add(&mut self, file: &str, manifests: Vec<Manifest>) {
        let file = file.to_owned();
        for m in manifests {
            match m {
                Manifest::Project(p) => self.projects.push(Sourced { file: file.clone(), object: *p }),
                Manifest::Dataset(d) => self.datasets.push(Sourced { file: file.clone(), object: *d }),
                Manifest::Workspace(mut w) => {
                    // Like `kubectl apply` without -n: a workspace goes to its project's namespace.
                    if w.metadata.namespace.is_none() {
                        w.metadata.namespace = Some(project_namespace(&w.spec.project));
                    }
                    self.workspaces.push(Sourced { file: file.clone(), object: *w })
                }
                Manifest::WorkspaceRequest(mut r) => {
                    if r.metadata.namespace.is_none() {
                        r.metadata.namespace = Some(project_namespace(&r.spec.workspace.project));
                    }
                    self.requests.push(Sourced { file: file.clone(), object: *r })
                }
            }
        }
    }
}

/// A group of rendered objects and the input object they come from.
#[derive(Clone, Debug)]
pub struct Rendered {
    pub source: String,
    pub children: Vec<Child>,
}

/// Render everything, or return every problem found (`file: object: field: message`).
pub fn render(
    inputs: &Inputs,
    site: &Site,
    now: DateTime<Utc>,
    mut credentials: impl FnMut(&WorkspaceIdentity) -> Result<AgentCredentials, String>,
    mut vnc: impl FnMut(&WorkspaceIdentity) -> VncCredential,
) -> Result<Vec<Rendered>, Vec<String>> {
    let mut errors = Vec::new();
    let mut out = Vec::new();
    let datasets: Vec<Dataset> = inputs.datasets.iter().map(|d| d.object.clone()).collect();

    for d in &inputs.datasets {
        if let Err(e) = dataset::validate(&d.object) {
            errors.push(format!("{}: {e}", d.file));
        }
    }
    for p in &inputs.projects {
        let built = project::validate(&p.object, &datasets, &site.operator_namespace, now.date_naive())
            .map_err(|e| e.to_string())
            .and_then(|resolved| project::build(&p.object, &resolved, site).map_err(|e| e.to_string()));
        match built {
            Ok(children) => {
                out.push(Rendered { source: format!("{}: Project {}", p.file, p.object.name_any()), children })
            }
            Err(e) => errors.push(format!("{}: {e}", p.file)),
        }
    }
    let project_named = |name: &str| inputs.projects.iter().map(|p| &p.object).find(|p| p.name_any() == name);
    for w in &inputs.workspaces {
        let ws = &w.object;
        let resolved = workspace::validate(ws, project_named(&ws.spec.project), &datasets, &site.workspace_images, now);
        if !resolved.problems.is_empty() {
            errors.extend(resolved.problems.iter().map(|p| format!("{}: {p}", w.file)));
            continue;
        }
        let id = WorkspaceIdentity { project: ws.spec.project.clone(), name: ws.name_any() };
        let built = credentials(&id)
            .and_then(|c| workspace::build(ws, &resolved, site, &c, &vnc(&id)).map_err(|e| e.to_string()));
        match built {
            Ok(children) => out.push(Rendered {
                source: format!("{}: Workspace {}/{}", w.file, ws.spec.project, ws.name_any()),
                children,
            }),
            Err(e) => errors.push(format!("{}: workspace {}/{}: {e}", w.file, ws.spec.project, ws.name_any())),
        }
    }
    for r in &inputs.requests {
        let req = &r.object;
        let project = project_named(&req.spec.workspace.project);
        if let Err(e) = workspace_request::validate(req, project) {
            errors.push(format!("{}: {e}", r.file));
            continue;
        }
        if let Some(ws) = workspace_request::build(req, project) {
            match Child::from_typed(&ws) {
                Ok(child) => out.push(Rendered {
                    source: format!("{}: approved WorkspaceRequest {}", r.file, req.name_any()),
                    children: vec![child],
                }),
                Err(e) => errors.push(format!("{}: {e}", r.file)),
            }
        }
    }
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

/// Multi-document YAML of the rendered objects, each group headed by where it came from.
pub fn to_yaml(rendered: &[Rendered]) -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for group in rendered {
        for child in &group.children {
            out.push_str("---\n# Source: ");
            out.push_str(&group.source);
            out.push('\n');
            out.push_str(&serde_yaml::to_string(&child.object)?);
        }
    }
    Ok(out)
}

pub fn main(args: Args) -> ExitCode {
    match run(&args) {
        Ok(yaml) => {
            let mut stdout = std::io::stdout().lock();
            if stdout.write_all(yaml.as_bytes()).and_then(|()| stdout.flush()).is_err() {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            eprintln!("render: {} problem(s); nothing rendered", errors.len());
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<String, Vec<String>> {
    let site = match &args.site {
        Some(path) => Site::from_file(path).map_err(|e| vec![e.to_string()])?,
        None => Site::default(),
    };
    let mut inputs = Inputs::default();
    let mut errors = Vec::new();
    for path in &args.files {
        let file = path.display().to_string();
        match std::fs::read_to_string(path) {
            Err(e) => errors.push(format!("{file}: cannot read: {e}")),
            Ok(text) => match parse_documents(&text) {
                Ok(manifests) => inputs.add(&file, manifests),
                Err(e) => errors.push(format!("{file}: {e}")),
            },
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    // A dry run issues throwaway certificates from a throwaway CA; the operator issues real ones.
    let ca = Ca::generate("noexit render (dry run) CA").map_err(|e| vec![e.to_string()])?;
    let validity = chrono::Duration::days(site.agent_cert_days.into());
    let rendered = render(
        &inputs,
        &site,
        Utc::now(),
        |id| {
            let cert = ca.issue_workspace_client(id, validity).map_err(|e| e.to_string())?;
            Ok(AgentCredentials {
                cert_pem: cert.cert_pem,
                key_pem: cert.key_pem,
                ca_pem: ca.cert_pem().to_owned(),
                serial: cert.serial,
                not_after: cert.not_after.to_rfc3339(),
            })
        },
        |_| VncCredential::generate(),
    )?;
    to_yaml(&rendered).map_err(|e| vec![format!("cannot write YAML: {e}")])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed_creds(id: &WorkspaceIdentity) -> Result<AgentCredentials, String> {
        Ok(AgentCredentials {
            cert_pem: format!(
                "-----BEGIN CERTIFICATE-----\n(client certificate for {})\n-----END CERTIFICATE-----\n",
                id.uri()
            ),
            key_pem: "-----BEGIN PRIVATE KEY-----\n(key)\n-----END PRIVATE KEY-----\n".into(),
            ca_pem: "-----BEGIN CERTIFICATE-----\n(operator CA)\n-----END CERTIFICATE-----\n".into(),
            serial: "5e71a1".into(),
            not_after: "2026-12-22T10:00:00+00:00".into(),
        })
    }

    fn fixed_vnc(_: &WorkspaceIdentity) -> VncCredential {
        VncCredential { password: "Snap5hot".into() }
    }

    fn now() -> DateTime<Utc> {
        "2026-11-22T10:00:00Z".parse().expect("time")
    }

    fn example_inputs() -> Inputs {
        let mut inputs = Inputs::default();
        let parse = |t| parse_documents(t).expect("parses");
        inputs.add("examples/ward-7.yaml", parse(include_str!("../../../examples/ward-7.yaml")));
        inputs.add("examples/request.yaml", parse(include_str!("../../../examples/request.yaml")));
        inputs
    }

    /// One YAML snapshot per rendered child: a change to any rendered object shows up in review.
    #[test]
    fn every_rendered_child_matches_its_snapshot() {
        let rendered = render(&example_inputs(), &Site::default(), now(), fixed_creds, fixed_vnc).expect("renders");
        let mut count = 0;
        for group in &rendered {
            for child in &group.children {
                let name = format!(
                    "{}-{}-{}",
                    child.kind().to_lowercase(),
                    child.namespace().unwrap_or("cluster"),
                    child.name()
                );
                insta::assert_yaml_snapshot!(name, child.object);
                count += 1;
            }
        }
        // Project: ns, the controller's binding, the API's binding (airlock mirrors), sa, quota,
        // limits, 5 netpols, 3 roles + 3 bindings, 2 × (pv + pvc) = 21; pod workspace: agent
        // secret, VNC secret, the gateway's role + binding, pvc, svc, pod = 7; vm workspace: 7;
        // request (undecided): 0.
        assert_eq!(count, 35);
    }

    #[test]
    fn invalid_input_names_file_object_and_field_and_renders_nothing() {
        let mut inputs = example_inputs();
        inputs.datasets[0].object.spec.granted_to = vec!["ward-9".into()];
        inputs.workspaces[0].object.spec.datasets = vec!["cohort-2024".into(), "icu-2019".into()];
        let errors = render(&inputs, &Site::default(), now(), fixed_creds, fixed_vnc).expect_err("not granted");
        assert!(
            errors.contains(
                &r#"examples/ward-7.yaml: workspace ward-7/alice-r: spec.datasets[1]: dataset "icu-2019" is not granted to project "ward-7""#
                    .to_owned()
            ),
            "{errors:#?}"
        );
    }

    #[test]
    fn output_is_valid_multi_document_yaml() {
        let rendered = render(&example_inputs(), &Site::default(), now(), fixed_creds, fixed_vnc).expect("renders");
        let yaml = to_yaml(&rendered).expect("yaml");
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&yaml)
            .map(|d| serde::Deserialize::deserialize(d).expect("document"))
            .collect();
        assert_eq!(docs.len(), 35);
        assert!(docs.iter().all(|d| d.get("apiVersion").is_some() && d.get("kind").is_some()));
    }
}
