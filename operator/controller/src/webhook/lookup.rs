//! What the admission rules may know about other objects: a read-only snapshot of Projects,
//! Datasets and Workspaces. The rules take `&dyn Lookup`, so they stay pure; the server uses
//! reflector caches ([`KubeLookup`]), tests an in-memory [`Snapshot`].
//!
//! The caches may lag the API server by a watch event. That race is accepted: the controllers
//! re-check every rule before acting, so an object that slips past admission still gets nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kube::ResourceExt;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use noexit_crds::{Dataset, Project, Workspace};

/// Read-only view of the objects the rules look at.
pub trait Lookup: Send + Sync {
    fn project(&self, name: &str) -> Option<Arc<Project>>;
    fn dataset(&self, name: &str) -> Option<Arc<Dataset>>;
    /// Workspaces whose `spec.project` is `project`.
    fn workspaces_of(&self, project: &str) -> Vec<Arc<Workspace>>;
    /// The snapshot is complete (every cache listed once); the webhook is not ready before.
    fn ready(&self) -> bool {
        true
    }
}

/// An in-memory snapshot, for tests and for `render`-like offline checks.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    projects: BTreeMap<String, Arc<Project>>,
    datasets: BTreeMap<String, Arc<Dataset>>,
    workspaces: Vec<Arc<Workspace>>,
}

impl Snapshot {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_project(mut self, p: Project) -> Self {
        self.projects.insert(p.name_any(), Arc::new(p));
        self
    }

    pub fn with_dataset(mut self, d: Dataset) -> Self {
        self.datasets.insert(d.name_any(), Arc::new(d));
        self
    }

    pub fn with_workspace(mut self, w: Workspace) -> Self {
        self.workspaces.push(Arc::new(w));
        self
    }
}

impl Lookup for Snapshot {
    fn project(&self, name: &str) -> Option<Arc<Project>> {
        self.projects.get(name).cloned()
    }

    fn dataset(&self, name: &str) -> Option<Arc<Dataset>> {
        self.datasets.get(name).cloned()
    }

    fn workspaces_of(&self, project: &str) -> Vec<Arc<Workspace>> {
        self.workspaces.iter().filter(|w| w.spec.project == project).cloned().collect()
    }
}

/// Reflector caches of Projects, Datasets and Workspaces (cluster-wide), kept by background
/// watch tasks. Needs `get, list, watch` on the three resources. Objects are read through
/// `DeserializeGuard`, so one object that does not parse (written before a schema change) is
/// treated as absent instead of breaking the whole watch and with it every admission.
#[derive(Clone)]
pub struct KubeLookup {
    projects: Store<DeserializeGuard<Project>>,
    datasets: Store<DeserializeGuard<Dataset>>,
    workspaces: Store<DeserializeGuard<Workspace>>,
    synced: Arc<AtomicBool>,
}

impl KubeLookup {
    /// Start the watches. The returned lookup reports `ready()` once all three caches have
    /// listed their objects.
    pub fn start(client: kube::Client) -> Self {
        let projects = watch(kube::Api::<DeserializeGuard<Project>>::all(client.clone()));
        let datasets = watch(kube::Api::<DeserializeGuard<Dataset>>::all(client.clone()));
        let workspaces = watch(kube::Api::<DeserializeGuard<Workspace>>::all(client));
        let synced = Arc::new(AtomicBool::new(false));
        let lookup = Self { projects, datasets, workspaces, synced: synced.clone() };
        let stores = lookup.clone();
        tokio::spawn(async move {
            let all = futures::future::try_join3(
                stores.projects.wait_until_ready(),
                stores.datasets.wait_until_ready(),
                stores.workspaces.wait_until_ready(),
            )
            .await;
            if all.is_ok() {
                synced.store(true, Ordering::Release);
                tracing::info!("admission caches synced");
            }
        });
        lookup
    }
}

fn watch<K>(api: kube::Api<K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    use futures::StreamExt;
    let (reader, writer) = reflector::store();
    let kind = K::kind(&()).into_owned();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()).default_backoff())
        .applied_objects()
        .for_each(move |event| {
            if let Err(e) = event {
                tracing::warn!(kind = %kind, error = %e, "admission cache watch error; retrying with backoff");
            }
            futures::future::ready(())
        });
    tokio::spawn(stream);
    reader
}

/// The object, if it parsed.
fn valid<K: Clone>(guarded: &DeserializeGuard<K>) -> Option<Arc<K>> {
    guarded.0.as_ref().ok().map(|k| Arc::new(k.clone()))
}

impl Lookup for KubeLookup {
    fn project(&self, name: &str) -> Option<Arc<Project>> {
        self.projects.get(&ObjectRef::new(name)).and_then(|g| valid(&g))
    }

    fn dataset(&self, name: &str) -> Option<Arc<Dataset>> {
        self.datasets.get(&ObjectRef::new(name)).and_then(|g| valid(&g))
    }

    fn workspaces_of(&self, project: &str) -> Vec<Arc<Workspace>> {
        self.workspaces.state().iter().filter_map(|g| valid(g)).filter(|w| w.spec.project == project).collect()
    }

    fn ready(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }
}
