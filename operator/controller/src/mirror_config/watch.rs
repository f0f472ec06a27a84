//! What wakes the mirror-config reconciler. Its one ConfigMap is the reconciled object (the
//! chart creates it; while it is absent, as with `mirror.enabled=false`, nothing is written),
//! so an edit by hand is also put back. Project spec changes and workspace pods' address,
//! phase and deletion changes map to it; status churn does not.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use noexit_crds::Project;

use super::render::workspace_pod_selector;
use crate::context::key_of;
use crate::mirror_config::deploy::CONFIG_MAP;

/// The controller for `CONFIG_MAP` in `namespace`. One object: run it with concurrency 1, so
/// a burst of events while a reconcile runs collapses into one more.
pub fn controller(client: &Client, namespace: &str, config: ControllerConfig) -> Controller<ConfigMap> {
    let only_ours = watcher::Config::default().fields(&format!("metadata.name={CONFIG_MAP}"));
    let ours = ObjectRef::<ConfigMap>::new(CONFIG_MAP).within(namespace);
    let ours_too = ours.clone();
    let projects = Changes::default();
    let pods = Changes::default();
    let pod_events =
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default().labels(&workspace_pod_selector()))
            .default_backoff()
            .try_filter_map(move |event| futures::future::ready(Ok(pods.relevant(event, pod_fingerprint))));
    Controller::new(Api::<ConfigMap>::namespaced(client.clone(), namespace), only_ours)
        .with_config(config)
        .watches(Api::<DeserializeGuard<Project>>::all(client.clone()), watcher::Config::default(), move |p| {
            projects.changed(&p, project_fingerprint).then(|| ours.clone())
        })
        .watches_stream(pod_events, move |_| Some(ours_too.clone()))
}

fn project_fingerprint(p: &DeserializeGuard<Project>) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let meta = p.meta();
    (meta.generation, meta.deletion_timestamp.is_some()).hash(&mut h);
    h.finish()
}

fn pod_fingerprint(pod: &Pod) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    if let Some(s) = &pod.status {
        (&s.pod_ip, &s.phase).hash(&mut h);
        s.pod_ips.iter().flatten().for_each(|ip| ip.ip.hash(&mut h));
    }
    pod.metadata.deletion_timestamp.is_some().hash(&mut h);
    pod.metadata.labels.hash(&mut h);
    h.finish()
}

/// The fingerprint last seen per object.
#[derive(Clone, Default)]
struct Changes(Arc<Mutex<HashMap<String, u64>>>);

impl Changes {
    fn changed<K: Resource>(&self, obj: &K, fingerprint: fn(&K) -> u64) -> bool {
        let print = fingerprint(obj);
        self.0.lock().unwrap_or_else(PoisonError::into_inner).insert(key_of(obj), print) != Some(print)
    }

    /// The pod to map for an event that can change the clients file: a changed fingerprint, a
    /// deletion, or the end of a relist (which can hide deletions).
    fn relevant(&self, event: watcher::Event<Pod>, fingerprint: fn(&Pod) -> u64) -> Option<Pod> {
        match event {
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                self.changed(&pod, fingerprint).then_some(pod)
            }
            watcher::Event::Delete(pod) => {
                self.0.lock().unwrap_or_else(PoisonError::into_inner).remove(&key_of(&pod));
                Some(pod)
            }
            // No pod to show for it; kube-runtime needs a named source object.
            watcher::Event::InitDone => Some(Pod {
                metadata: ObjectMeta { name: Some("relisted".into()), ..ObjectMeta::default() },
                ..Pod::default()
            }),
            watcher::Event::Init => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::PodStatus;

    use super::*;

    fn pod(ip: Option<&str>, ready: &str) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some("ws-a".into());
        p.metadata.namespace = Some("noexit-p".into());
        p.status = Some(PodStatus {
            pod_ip: ip.map(str::to_owned),
            phase: Some("Running".into()),
            message: Some(ready.into()),
            ..PodStatus::default()
        });
        p
    }

    #[test]
    fn only_address_phase_and_deletion_events_wake_it() {
        let c = Changes::default();
        let relevant = |e| c.relevant(e, pod_fingerprint).is_some();
        assert!(relevant(watcher::Event::Apply(pod(None, "starting"))), "first sight");
        assert!(!relevant(watcher::Event::Apply(pod(None, "still starting"))), "status churn");
        assert!(relevant(watcher::Event::Apply(pod(Some("10.0.0.1"), "up"))), "an address");
        assert!(!relevant(watcher::Event::InitApply(pod(Some("10.0.0.1"), "up"))), "relisted, unchanged");
        assert!(relevant(watcher::Event::InitDone), "a relist may hide deletions");
        assert!(relevant(watcher::Event::Delete(pod(Some("10.0.0.1"), "up"))), "deleted");
        assert!(relevant(watcher::Event::Apply(pod(Some("10.0.0.1"), "up"))), "back under the same name");
    }
}
