//! Helpers that keep each end-to-end test a few lines: connect (or skip), apply, wait with a
//! bound, act as a project member, expect the webhook to refuse, and clean up.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use noexit_operator::manifests::{Manifest, parse_documents};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Field manager of everything the suite applies.
pub const MANAGER: &str = "noexit-e2e";

/// What a skipped test prints.
pub const SKIPPED: &str =
    "SKIPPED: KUBECONFIG not set (start a control plane with noexit on it: hack/dev-cluster.sh up)";

/// Whether this is CI (`NOEXIT_CI=1`), where a missing or unreachable cluster is a failure.
pub fn in_ci() -> bool {
    std::env::var("NOEXIT_CI").is_ok_and(|v| v == "1")
}

/// A client for the cluster in `KUBECONFIG`, or `None` (after printing why) when it is unset.
/// Under `NOEXIT_CI=1` an unset `KUBECONFIG` or an API server that does not answer is an error.
pub async fn cluster() -> anyhow::Result<Option<Client>> {
    if std::env::var_os("KUBECONFIG").is_none() {
        if in_ci() {
            bail!(
                "NOEXIT_CI=1 but KUBECONFIG is not set: hack/test.sh starts the control plane (hack/dev-cluster.sh up)"
            );
        }
        println!("{SKIPPED}");
        return Ok(None);
    }
    let client = Client::try_default().await.context("connecting to the cluster in KUBECONFIG")?;
    client.apiserver_version().await.context("the API server in KUBECONFIG does not answer")?;
    Ok(Some(client))
}

/// Output of a command-line tool run by the suite.
#[derive(Debug)]
pub struct Run {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// stdout, or an error with both streams when the command failed.
    pub fn ok(self) -> anyhow::Result<String> {
        if self.success { Ok(self.stdout) } else { bail!("failed: {}{}", self.stdout, self.stderr) }
    }
}

/// Run `program args...` (found on `PATH`; `hack/dev-cluster.sh`'s env file puts the control
/// plane's `kubectl` and `helm` there) with `stdin`, bounded to two minutes.
pub async fn run(program: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<Run> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() { std::process::Stdio::piped() } else { std::process::Stdio::null() })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| format!("starting {program} (is it on PATH?)"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).await?;
    }
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .with_context(|| format!("{program} {args:?} ran for more than 2 minutes"))??;
    Ok(Run {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// `kubectl args...` against the cluster in `KUBECONFIG`.
pub async fn kubectl(args: &[&str]) -> anyhow::Result<Run> {
    run("kubectl", args, None).await
}

/// `kubectl args...` with `stdin` (for `apply -f -`).
pub async fn kubectl_stdin(args: &[&str], stdin: &str) -> anyhow::Result<Run> {
    run("kubectl", args, Some(stdin)).await
}

/// A value `hack/dev-cluster.sh` writes into its env file (`NOEXIT_DEV_*`), or an error naming it.
pub fn dev_env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set: source the env file of hack/dev-cluster.sh up"))
}

/// The repository root.
pub fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A client that acts as `user` (impersonation; the kubeconfig's user needs `impersonate`,
/// which kind's admin has).
pub async fn as_user(user: &str) -> anyhow::Result<Client> {
    let mut config = kube::Config::infer().await.context("reading KUBECONFIG")?;
    config.auth_info.impersonate = Some(user.to_owned());
    config.auth_info.impersonate_groups = Some(vec!["system:authenticated".to_owned()]);
    Ok(Client::try_from(config)?)
}

/// Poll `check` every 500 ms until it yields `Some`, for at most `bound`.
pub async fn wait_for<T, F, Fut>(what: &str, bound: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + bound;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() > deadline {
            match last_error {
                Some(e) => bail!("timed out after {bound:?} waiting for {what}; last error: {e:#}"),
                None => bail!("timed out after {bound:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Server-side apply `obj` with the suite's field manager.
pub async fn apply<K>(api: &Api<K>, obj: &K) -> Result<K, kube::Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let mut obj = obj.clone();
    obj.meta_mut().managed_fields = None;
    obj.meta_mut().resource_version = None;
    api.patch(&obj.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&obj)).await
}

/// [`apply`], retried for up to 180 s while the webhook refuses because its caches have not
/// seen an object created a moment ago (a Project, a Dataset); any other refusal is returned.
pub async fn apply_admitted<K>(api: &Api<K>, obj: &K) -> anyhow::Result<K>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        match apply(api, obj).await {
            Ok(applied) => return Ok(applied),
            // ...or while the quota controller has not yet counted the kind in a new namespace.
            Err(kube::Error::Api(e))
                if Instant::now() < deadline
                    && (e.message.contains("does not exist")
                        || e.message.contains("has not loaded")
                        || e.message.contains("status unknown for quota")) =>
            {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("applying {}", obj.name_any())),
        }
    }
}

/// The API server's refusal message, or an error if the call succeeded or failed otherwise.
pub fn refusal<T>(result: Result<T, kube::Error>) -> anyhow::Result<String> {
    match result {
        Ok(_) => bail!("the call was admitted but should have been refused"),
        Err(kube::Error::Api(e)) if e.code == 403 || e.code == 400 || e.code == 422 => Ok(e.message),
        Err(e) => bail!("the call failed, but not with a refusal: {e}"),
    }
}

/// The shipped example (`examples/ward-7.yaml` + `examples/request.yaml`) renamed for one test,
/// so tests can run side by side: project `<name>`, datasets `<name>-icu` and `<name>-cohort`.
#[derive(Clone, Debug)]
pub struct Example {
    pub project: noexit_crds::Project,
    pub datasets: Vec<noexit_crds::Dataset>,
    pub workspaces: Vec<noexit_crds::Workspace>,
    pub request: noexit_crds::WorkspaceRequest,
}

impl Example {
    pub fn named(project: &str) -> anyhow::Result<Self> {
        let text = [include_str!("../../examples/ward-7.yaml"), include_str!("../../examples/request.yaml")]
            .join("\n---\n")
            .replace("grantedTo: [ward-7, ward-9]", "grantedTo: [ward-7]")
            .replace("icu-2019", &format!("{project}-icu"))
            .replace("cohort-2024", &format!("{project}-cohort"))
            .replace("ward-7", project);
        let (mut project, mut request) = (None, None);
        let (mut datasets, mut workspaces) = (vec![], vec![]);
        for m in parse_documents(&text)? {
            match m {
                Manifest::Project(p) => project = Some(*p),
                Manifest::Dataset(d) => datasets.push(*d),
                Manifest::Workspace(w) => workspaces.push(*w),
                Manifest::WorkspaceRequest(r) => request = Some(*r),
            }
        }
        Ok(Self {
            project: project.context("examples/ward-7.yaml has a Project")?,
            datasets,
            workspaces,
            request: request.context("examples/request.yaml has a WorkspaceRequest")?,
        })
    }

    pub fn namespace(&self) -> String {
        noexit_crds::names::project_namespace(&self.project.name_any())
    }
}

/// A unique project name for one test (`e2e-<tag>-<6 hex>`).
pub fn unique(tag: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("e2e-{tag}-{}", &id[..6])
}

/// Run `test` with a fresh project name, then delete what it may have created (the Project
/// owns its namespace and everything in it; Datasets are cluster-scoped), even when it failed.
pub async fn with_project<F, Fut>(client: &Client, tag: &str, test: F) -> anyhow::Result<()>
where
    F: FnOnce(Client, Example) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let example = Example::named(&unique(tag))?;
    let result = test(client.clone(), example.clone()).await;
    let dp = DeleteParams::background();
    let projects: Api<noexit_crds::Project> = Api::all(client.clone());
    let datasets: Api<noexit_crds::Dataset> = Api::all(client.clone());
    let _ = projects.delete(&example.project.name_any(), &dp).await;
    for d in &example.datasets {
        let _ = datasets.delete(&d.name_any(), &dp).await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use noexit_operator::webhook::Snapshot;
    use noexit_operator::webhook::rules::{
        Caller, SiteRules, check_dataset, check_project, check_request, check_workspace,
    };

    /// The renamed example is what the cluster will see: the webhook's rules must admit it.
    #[test]
    fn the_renamed_example_is_admitted() {
        let ex = Example::named("e2e-t-abc123").unwrap();
        assert_eq!(ex.namespace(), "noexit-e2e-t-abc123");
        assert_eq!(ex.datasets.len(), 2);
        assert_eq!(ex.workspaces.len(), 2);
        let now = "2026-11-22T10:00:00Z".parse().unwrap();
        // The chart's site (values.yaml `site:` equals examples/site.yaml), image allowlist included.
        let site: noexit_operator::controllers::Site =
            serde_yaml::from_str(include_str!("../../examples/site.yaml")).unwrap();
        let site = SiteRules::from(&site);
        let mut lookup = Snapshot::new().with_project(ex.project.clone());
        assert!(check_project(&ex.project, None, &lookup, &site, now).allowed());
        for d in &ex.datasets {
            let v = check_dataset(d, None, &lookup);
            assert!(v.allowed(), "{:?}", v.refusals);
            lookup = lookup.with_dataset(d.clone());
        }
        for w in &ex.workspaces {
            let v = check_workspace(w, None, &lookup, &site, now);
            assert!(v.allowed(), "{:?}", v.refusals);
        }
        let bob = Caller { user: "bob@ward7.example".into(), trusted: false, member_name: true };
        let v = check_request(&ex.request, None, &bob, &lookup, &site, now);
        assert!(v.allowed(), "{:?}", v.refusals);
    }

    #[tokio::test]
    async fn wait_for_returns_the_value_or_times_out_with_the_last_error() {
        let mut calls = 0;
        let v = wait_for("third call", Duration::from_secs(5), || {
            calls += 1;
            let n = calls;
            async move { Ok((n >= 3).then_some(n)) }
        })
        .await
        .unwrap();
        assert_eq!(v, 3);
        let err =
            wait_for("never", Duration::from_millis(100), || async { Err::<Option<()>, _>(anyhow::anyhow!("boom")) })
                .await
                .unwrap_err()
                .to_string();
        assert!(err.contains("waiting for never") && err.contains("boom"), "{err}");
    }

    #[test]
    fn refusals_are_told_apart_from_other_failures() {
        let api = |code: u16, message: &str| {
            Err::<(), _>(kube::Error::Api(kube::core::Status::failure(message, "Forbidden").with_code(code).boxed()))
        };
        assert_eq!(refusal(api(403, "denied the request: x")).unwrap(), "denied the request: x");
        assert!(refusal(api(500, "oops")).is_err());
        assert!(refusal(Ok::<(), kube::Error>(())).is_err());
    }

    #[test]
    fn unique_names_fit_a_project_name() {
        let a = unique("grant");
        assert_ne!(a, unique("grant"));
        assert!(noexit_crds::names::check_dns1123_label(&a, noexit_crds::names::MAX_PROJECT_NAME).is_ok());
    }
}
