//! `noexit-operator controller`: leader election, then the four controllers, plus `/healthz`,
//! `/readyz` and `/metrics`; SIGTERM stops the controllers and releases the Lease.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    LimitRange, Namespace, PersistentVolume, PersistentVolumeClaim, Pod, ResourceQuota, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::core::{DeserializeGuard, DynamicObject};
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use noexit_crds::{Dataset, Project, Workspace, WorkspaceRequest};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::children::labels;
use crate::context::Context;
use crate::leader::LeaderElector;
use crate::revoke::HttpRevoker;
use crate::site::Site;
use crate::workspace::build::virtual_machine_resource;
use crate::{ca::CaStore, dataset, project, workspace, workspace_request};
use noexit_common::telemetry::Metrics;

/// Arguments of `noexit-operator controller`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Site configuration (addresses of the API, mirror, gateway; images). Defaults suit kind.
    #[arg(long)]
    pub site: Option<PathBuf>,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,
    /// Base URL of the control-plane API (certificate revocations). Default: from the site.
    #[arg(long)]
    pub api_url: Option<String>,
    /// Namespace the operator runs in (CA Secret, leader Lease).
    #[arg(long, env = "POD_NAMESPACE", default_value = "noexit-system")]
    pub namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "noexit-controller-leader")]
    pub lease_name: String,
    /// This replica's identity in the Lease. Default: `$POD_NAME`, else the host name.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Seconds a leader's Lease stays valid without renewal.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// Reconciles running at once, per controller.
    #[arg(long, default_value_t = 16)]
    pub concurrency: u16,
    /// Issue the admission webhook's serving certificate from the operator's CA into this
    /// `kubernetes.io/tls` Secret (in --namespace) and renew it; the webhook mounts it. The
    /// webhook itself never reads the CA.
    #[arg(long)]
    pub webhook_secret: Option<String>,
    /// DNS names of the webhook's certificate (its Service).
    #[arg(long = "webhook-dns-name", default_values_t = ["noexit-webhook.noexit-system.svc".to_owned()])]
    pub webhook_dns_names: Vec<String>,
    /// ValidatingWebhookConfiguration whose `caBundle` the controller keeps set to the CA.
    #[arg(long)]
    pub webhook_configuration: Option<String>,
}

/// How often the webhook's certificate and `caBundle` are checked.
const WEBHOOK_CERT_CHECK_EVERY: Duration = Duration::from_secs(300);

/// Label selector of every object the operator creates.
pub const MANAGED: &str = "app.kubernetes.io/managed-by=noexit-operator";

pub async fn run(args: Args) -> anyhow::Result<()> {
    let site = match &args.site {
        Some(path) => Site::from_file(path)?,
        None => Site::default(),
    };
    if site.operator_namespace != args.namespace {
        tracing::warn!(
            site = %site.operator_namespace,
            namespace = %args.namespace,
            "the site's operatorNamespace differs from --namespace: network policies name the site's"
        );
    }
    let client = Client::try_default().await.context("cannot configure a Kubernetes client")?;
    let metrics = Arc::new(Metrics::default());
    let identity = args.identity.clone().unwrap_or_else(default_identity);

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(stop_on_signal(stop_tx.clone()));
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on --metrics-addr {}", args.metrics_addr))?;
    let server = tokio::spawn(serve_health(listener, metrics.clone(), ready.clone(), stop_rx.clone()));

    let elector = LeaderElector::new(
        Api::<Lease>::namespaced(client.clone(), &args.namespace),
        &args.lease_name,
        &identity,
        Duration::from_secs(args.lease_duration_seconds.max(1)),
    );
    let (lead_tx, mut lead_rx) = watch::channel(false);
    let elector = tokio::spawn(elector.run(lead_tx, stop_rx.clone()));
    // Ready once the process is up and taking part in the election.
    ready.store(true, Ordering::Relaxed);
    tracing::info!(identity = %identity, lease = %args.lease_name, namespace = %args.namespace, "waiting for leadership");

    let mut stop = stop_rx.clone();
    tokio::select! {
        _ = lead_rx.wait_for(|leading| *leading) => {}
        _ = stop.wait_for(|s| *s) => {
            let _ = elector.await;
            let _ = server.await;
            return Ok(());
        }
    }
    metrics.leader.set(1);

    let api_url = args.api_url.clone().unwrap_or_else(|| site.control_plane_url());
    let authority = CaStore::new(client.clone(), args.namespace.clone()).get().await?;
    if let Some(secret) = &args.webhook_secret {
        let issuer = crate::webhook::certs::ServingIssuer {
            client: client.clone(),
            namespace: args.namespace.clone(),
            secret: secret.clone(),
            dns_names: args.webhook_dns_names.clone(),
            ca: authority.clone(),
        };
        tokio::spawn(issuer.run(args.webhook_configuration.clone(), WEBHOOK_CERT_CHECK_EVERY));
    }
    let revoker = Arc::new(HttpRevoker::new(&api_url, authority).map_err(anyhow::Error::msg)?);
    let ctx = Arc::new(Context::new(client, site, args.namespace.clone(), revoker, metrics.clone(), identity));
    let (controllers_stop, controllers_stop_rx) = watch::channel(false);
    let controllers = tokio::spawn(run_controllers(ctx, controllers_stop_rx, args.concurrency));

    let lost = tokio::select! {
        _ = stop.wait_for(|s| *s) => false,
        _ = lead_rx.wait_for(|leading| !*leading) => true,
    };
    tracing::info!(lost_leadership = lost, "stopping the controllers");
    controllers_stop.send_replace(true);
    if tokio::time::timeout(Duration::from_secs(30), controllers).await.is_err() {
        tracing::warn!("controllers did not stop within 30 s");
    }
    metrics.leader.set(0);
    stop_tx.send_replace(true);
    let _ = elector.await;
    let _ = server.await;
    if lost {
        anyhow::bail!("lost the leader lease {}; exiting so a fresh start can rejoin the election", args.lease_name);
    }
    Ok(())
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "noexit-operator".into());
    format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

async fn stop_on_signal(stop: watch::Sender<bool>) {
    noexit_common::telemetry::shutdown_signal().await;
    stop.send_replace(true);
}

/// The router of the health and metrics server.
pub fn health_router(metrics: Arc<Metrics>, ready: Arc<AtomicBool>) -> axum::Router {
    noexit_common::telemetry::health_router(move || metrics.encode(), ready)
}

async fn serve_health(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, health_router(metrics, ready)).with_graceful_shutdown(shutdown).await {
        tracing::error!(error = %e, "health server failed");
    }
}

/// A future that completes when `stop` turns true; `Sync`, as kube's graceful shutdown needs.
fn stopped(stop: &watch::Receiver<bool>) -> impl Future<Output = ()> + Send + Sync + 'static {
    let (tx, rx) = futures::channel::oneshot::channel::<()>();
    let mut stop = stop.clone();
    tokio::spawn(async move {
        let _ = stop.wait_for(|s| *s).await;
        let _ = tx.send(());
    });
    async move {
        let _ = rx.await;
    }
}

/// Remembers the generation (and deletion mark) last seen per object, so that a watch mapper
/// fires on spec changes only: a Project's status write must not re-reconcile every workspace
/// of the project.
#[derive(Clone, Default)]
struct SpecChanges(Arc<std::sync::Mutex<std::collections::HashMap<String, (i64, bool)>>>);

impl SpecChanges {
    fn changed<K: Resource>(&self, obj: &K) -> bool {
        let meta = obj.meta();
        let key =
            format!("{}/{}", meta.namespace.as_deref().unwrap_or_default(), meta.name.as_deref().unwrap_or_default());
        let seen = (meta.generation.unwrap_or(0), meta.deletion_timestamp.is_some());
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(key, seen) != Some(seen)
    }
}

fn managed_by(owner_kind: &str) -> watcher::Config {
    watcher::Config::default().labels(&format!("{MANAGED},{}={owner_kind}", labels::OWNER_KIND))
}

/// Map a Project's child to the Project named in its labels (cluster-scoped owner of
/// namespaced children: owner references cannot name the right object reference).
fn project_of<C: Resource>(child: C) -> Option<ObjectRef<DeserializeGuard<Project>>> {
    let labels = child.meta().labels.as_ref()?;
    (labels.get(labels::OWNER_KIND).map(String::as_str) == Some("Project"))
        .then(|| labels.get(labels::OWNER_NAME))
        .flatten()
        .map(|name| ObjectRef::new(name))
}

fn project_controller(client: &Client, config: ControllerConfig) -> Controller<DeserializeGuard<Project>> {
    fn child<C>(c: Controller<DeserializeGuard<Project>>, client: &Client) -> Controller<DeserializeGuard<Project>>
    where
        C: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        c.watches(Api::<C>::all(client.clone()), managed_by("Project"), project_of)
    }
    let projects = Api::<DeserializeGuard<Project>>::all(client.clone());
    let c = Controller::new(projects, watcher::Config::default()).with_config(config);
    let datasets_of = c.store();
    let c = child::<Namespace>(c, client);
    let c = child::<PersistentVolume>(c, client);
    let c = child::<ServiceAccount>(c, client);
    let c = child::<ResourceQuota>(c, client);
    let c = child::<LimitRange>(c, client);
    let c = child::<NetworkPolicy>(c, client);
    let c = child::<Role>(c, client);
    let c = child::<RoleBinding>(c, client);
    let c = child::<PersistentVolumeClaim>(c, client);
    // Workspaces coming and going change the project's workspace count.
    let workspace_gate = SpecChanges::default();
    let c = c.watches(Api::<DeserializeGuard<Workspace>>::all(client.clone()), watcher::Config::default(), move |w| {
        if !workspace_gate.changed(&w) {
            return None;
        }
        w.0.ok().map(|w| ObjectRef::new(&w.spec.project))
    });
    // A dataset's grant changes which volumes its projects get.
    let gate = SpecChanges::default();
    c.watches(Api::<DeserializeGuard<Dataset>>::all(client.clone()), watcher::Config::default(), move |d| {
        if !gate.changed(&d) {
            return Vec::new();
        }
        let name = d.name_any();
        datasets_of
            .state()
            .into_iter()
            .filter(|p| p.0.as_ref().is_ok_and(|p| p.spec.datasets.contains(&name)))
            .map(|p| ObjectRef::from_obj(&*p))
            .collect::<Vec<_>>()
    })
}

/// What in a Workspace should wake its reconciler: not the agent's heartbeat time, session count
/// or spool depth, which the API rewrites every few seconds. Staleness of the heartbeat is
/// caught by the periodic requeue instead.
pub fn workspace_trigger(ws: &DeserializeGuard<Workspace>) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let meta = ws.meta();
    meta.generation.hash(&mut h);
    meta.deletion_timestamp.is_some().hash(&mut h);
    meta.finalizers.hash(&mut h);
    meta.labels.hash(&mut h);
    if let Ok(ws) = &ws.0
        && let Some(agent) = ws.status.as_ref().and_then(|s| s.agent.as_ref())
    {
        (&agent.version, agent.egress_locked, &agent.egress_detail).hash(&mut h);
    }
    Some(h.finish())
}

fn workspace_controller(client: &Client, config: ControllerConfig) -> Controller<DeserializeGuard<Workspace>> {
    let vm = virtual_machine_resource();
    let (reader, writer) = reflector::store();
    let main = watcher(Api::<DeserializeGuard<Workspace>>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(workspace_trigger, Default::default());
    let c = Controller::for_stream(main, reader).with_config(config);
    let by_project = c.store();
    let by_dataset = c.store();
    let (project_gate, dataset_gate) = (SpecChanges::default(), SpecChanges::default());
    // No watch of Secrets: the controller may not list Secrets cluster-wide (only in project
    // namespaces it made); the agent Secret is read on every pass and repaired on the next.
    c.owns(Api::<PersistentVolumeClaim>::all(client.clone()), managed_by("Workspace"))
        .owns(Api::<Service>::all(client.clone()), managed_by("Workspace"))
        .owns(Api::<Pod>::all(client.clone()), managed_by("Workspace"))
        .owns_with(Api::<DynamicObject>::all_with(client.clone(), &vm), vm, managed_by("Workspace"))
        // Project and dataset changes can block or unblock workspaces.
        .watches(Api::<DeserializeGuard<Project>>::all(client.clone()), watcher::Config::default(), move |p| {
            if !project_gate.changed(&p) {
                return Vec::new();
            }
            let name = p.name_any();
            by_project
                .state()
                .into_iter()
                .filter(|w| w.0.as_ref().is_ok_and(|w| w.spec.project == name))
                .map(|w| ObjectRef::from_obj(&*w))
                .collect::<Vec<_>>()
        })
        .watches(Api::<DeserializeGuard<Dataset>>::all(client.clone()), watcher::Config::default(), move |d| {
            if !dataset_gate.changed(&d) {
                return Vec::new();
            }
            let name = d.name_any();
            by_dataset
                .state()
                .into_iter()
                .filter(|w| w.0.as_ref().is_ok_and(|w| w.spec.datasets.contains(&name)))
                .map(|w| ObjectRef::from_obj(&*w))
                .collect::<Vec<_>>()
        })
}

fn dataset_controller(client: &Client, config: ControllerConfig) -> Controller<DeserializeGuard<Dataset>> {
    let gate = SpecChanges::default();
    Controller::new(Api::<DeserializeGuard<Dataset>>::all(client.clone()), watcher::Config::default())
        .with_config(config)
        .watches(Api::<DeserializeGuard<Project>>::all(client.clone()), watcher::Config::default(), move |p| {
            if !gate.changed(&p) {
                return Vec::new();
            }
            p.0.map(|p| p.spec.datasets.iter().map(|d| ObjectRef::new(d)).collect::<Vec<_>>()).unwrap_or_default()
        })
}

fn request_controller(client: &Client, config: ControllerConfig) -> Controller<DeserializeGuard<WorkspaceRequest>> {
    Controller::new(Api::<DeserializeGuard<WorkspaceRequest>>::all(client.clone()), watcher::Config::default())
        .with_config(config)
}

/// Run the four controllers until `stop` turns true. Used by `run` and by the tests and the
/// benchmark against the fake API.
pub async fn run_controllers(ctx: Arc<Context>, stop: watch::Receiver<bool>, concurrency: u16) {
    let config = ControllerConfig::default().concurrency(concurrency);
    let client = ctx.client.clone();
    fn drain<T, E: std::fmt::Display>(kind: &'static str) -> impl FnMut(Result<T, E>) -> futures::future::Ready<()> {
        move |r| {
            if let Err(e) = r {
                tracing::debug!(kind, error = %e, "controller stream");
            }
            futures::future::ready(())
        }
    }
    let projects = project_controller(&client, config.clone())
        .graceful_shutdown_on(stopped(&stop))
        .run(project::reconcile::reconcile, project::reconcile::error_policy, ctx.clone())
        .for_each(drain("Project"));
    let workspaces = workspace_controller(&client, config.clone())
        .graceful_shutdown_on(stopped(&stop))
        .run(workspace::reconcile::reconcile, workspace::reconcile::error_policy, ctx.clone())
        .for_each(drain("Workspace"));
    let datasets = dataset_controller(&client, config.clone())
        .graceful_shutdown_on(stopped(&stop))
        .run(dataset::reconcile::reconcile, dataset::reconcile::error_policy, ctx.clone())
        .for_each(drain("Dataset"));
    let mirror_config =
        crate::mirror_config::watch::controller(&client, &ctx.operator_namespace, config.clone().concurrency(1))
            .graceful_shutdown_on(stopped(&stop))
            .run(crate::mirror_config::reconcile::reconcile, crate::mirror_config::reconcile::error_policy, ctx.clone())
            .for_each(drain("mirror-config"));
    let requests = request_controller(&client, config)
        .graceful_shutdown_on(stopped(&stop))
        .run(workspace_request::reconcile::reconcile, workspace_request::reconcile::error_policy, ctx.clone())
        .for_each(drain("WorkspaceRequest"));
    tokio::join!(projects, workspaces, datasets, requests, mirror_config);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata;
    use noexit_crds::WorkspaceStatus;
    use noexit_crds::workspace::AgentReport;

    #[test]
    fn heartbeats_do_not_wake_the_workspace_reconciler_but_spec_and_agent_state_do() {
        let mut ws = testdata::workspaces().remove(0);
        let report = |at: &str, locked: bool| AgentReport {
            last_heartbeat: at.parse().expect("time"),
            version: "0.1.0".into(),
            egress_locked: locked,
            active_sessions: 1,
            ..AgentReport::default()
        };
        let hash = |ws: &Workspace| workspace_trigger(&DeserializeGuard(Ok(ws.clone())));
        ws.status =
            Some(WorkspaceStatus { agent: Some(report("2026-12-01T08:00:00Z", true)), ..WorkspaceStatus::default() });
        let first = hash(&ws);
        ws.status =
            Some(WorkspaceStatus { agent: Some(report("2026-12-01T08:00:05Z", true)), ..WorkspaceStatus::default() });
        assert_eq!(hash(&ws), first, "a heartbeat alone");
        ws.status =
            Some(WorkspaceStatus { agent: Some(report("2026-12-01T08:00:10Z", false)), ..WorkspaceStatus::default() });
        assert_ne!(hash(&ws), first, "the egress lock changed");
        let before = hash(&ws);
        ws.metadata.generation = Some(2);
        assert_ne!(hash(&ws), before, "the spec changed");
    }
}
