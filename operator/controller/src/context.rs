//! What every reconciler shares: the client, the site, the CA, the revoker, Events, metrics,
//! and the per-object failure counts behind exponential backoff.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource};
use noexit_crds::Condition;
use noexit_crds::common::condition;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::ca::CaStore;
use crate::conditions::{Desired, merge};
use crate::error::Error;
use crate::revoke::Revoker;
use crate::site::Site;
use noexit_common::telemetry::Metrics;

/// Exponential backoff after failed reconciles: `base`, 2×, 4×, … up to `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { base: Duration::from_secs(1), max: Duration::from_secs(300) }
    }
}

impl Backoff {
    /// Delay before the retry that follows the `failures`-th consecutive failure (1-based).
    pub fn delay(&self, failures: u32) -> Duration {
        let factor = 1u32.checked_shl(failures.saturating_sub(1).min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }
}

/// How often a healthy object is looked at again without any change (certificate rotation,
/// agent heartbeat freshness).
pub const RESYNC: Duration = Duration::from_secs(300);

/// The reconcile result the wrapper records: the action and whether the object was invalid.
#[derive(Debug)]
pub struct Outcome {
    pub action: Action,
    pub invalid: bool,
}

impl Outcome {
    pub fn requeue(after: Duration) -> Self {
        Self { action: Action::requeue(after), invalid: false }
    }
    /// The object is wrong as written: wait for someone to change it, no retry loop.
    pub fn invalid() -> Self {
        Self { action: Action::await_change(), invalid: true }
    }
    pub fn await_change() -> Self {
        Self { action: Action::await_change(), invalid: false }
    }
}

pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// Called after every reconcile with `(kind, object key, duration, succeeded)`; benchmarks use it
/// for exact latency percentiles (the histogram's buckets are too coarse).
pub type ReconcileObserver = Arc<dyn Fn(&'static str, &str, Duration, bool) + Send + Sync>;

pub struct Context {
    pub client: Client,
    pub site: Site,
    pub operator_namespace: String,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub revoker: Arc<dyn Revoker>,
    pub ca: CaStore,
    pub backoff: Backoff,
    pub clock: Clock,
    pub observer: Option<ReconcileObserver>,
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        site: Site,
        operator_namespace: String,
        revoker: Arc<dyn Revoker>,
        metrics: Arc<Metrics>,
        instance: String,
    ) -> Self {
        let reporter = Reporter { controller: crate::FIELD_MANAGER.into(), instance: Some(instance) };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            ca: CaStore::new(client.clone(), operator_namespace.clone()),
            client,
            site,
            operator_namespace,
            metrics,
            revoker,
            backoff: Backoff::default(),
            clock: Arc::new(Utc::now),
            observer: None,
            failures: Mutex::new(HashMap::new()),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        (self.clock)()
    }

    /// Run one reconcile of `kind` for object `key`, recording metrics and resetting the
    /// object's backoff on success.
    pub async fn instrumented(
        &self,
        kind: &'static str,
        key: &str,
        reconcile: impl Future<Output = Result<Outcome, Error>>,
    ) -> Result<Action, Error> {
        let start = Instant::now();
        let result = reconcile.await;
        let elapsed = start.elapsed();
        let seconds = elapsed.as_secs_f64();
        if let Some(observe) = &self.observer {
            observe(kind, key, elapsed, result.is_ok());
        }
        match &result {
            Ok(o) => self.metrics.observe(kind, if o.invalid { "invalid" } else { "success" }, seconds),
            Err(e) => {
                self.metrics.observe(kind, "error", seconds);
                self.metrics.error(kind, e.category());
            }
        }
        if result.is_ok() {
            self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(key);
        }
        result.map(|o| o.action)
    }

    /// The retry after a failed reconcile of `key`: exponential in consecutive failures.
    pub fn retry_after_failure(&self, key: &str, error: &Error) -> Action {
        let mut failures = self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = failures.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        let delay = self.backoff.delay(*n);
        tracing::warn!(object = %key, category = error.category(), failures = *n, retry_in = ?delay, "reconcile failed: {error}");
        Action::requeue(delay)
    }

    /// Publish an Event; failures are logged, never fatal (Events are best effort).
    pub async fn event(&self, regarding: &ObjectReference, warning: bool, reason: &str, note: impl Into<String>) {
        let event = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.into(),
            note: Some(truncate(note.into(), 1000)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, regarding).await {
            tracing::debug!(reason, error = %e, "cannot publish event");
        }
    }

    /// After a failed reconcile: say why in `Degraded` (a merge patch of the conditions only, so
    /// the rest of the status stays) and in a Warning Event. Best effort.
    pub async fn report_failure<K>(&self, api: &Api<K>, obj: &K, live: &[Condition], error: &Error)
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    {
        let meta = obj.meta();
        let name = meta.name.clone().unwrap_or_default();
        let desired = [Desired::new(condition::DEGRADED, true, error.reason(), error.to_string())];
        let merged = merge(live, &desired, meta.generation, self.now());
        if merged.as_slice() != live {
            let patch = json!({ "status": { "conditions": merged } });
            let params =
                kube::api::PatchParams { field_manager: Some(crate::FIELD_MANAGER.into()), ..Default::default() };
            if let Err(e) = api.patch_status(&name, &params, &kube::api::Patch::Merge(&patch)).await {
                tracing::debug!(object = %name, error = %e, "cannot record the failure in status");
            }
        }
        self.event(&obj.object_ref(&()), true, error.reason(), error.to_string()).await;
    }
}

impl Context {
    /// Server-side apply of `status` (our fields only) on the status subresource.
    pub async fn apply_status<K>(&self, api: &Api<K>, obj: &K, status: serde_json::Value) -> Result<(), Error>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    {
        let name = obj.meta().name.clone().unwrap_or_default();
        let body = json!({ "apiVersion": K::api_version(&()), "kind": K::kind(&()), "status": status });
        let params = kube::api::PatchParams::apply(crate::FIELD_MANAGER).force();
        api.patch_status(&name, &params, &kube::api::Patch::Apply(&body))
            .await
            .map(|_| ())
            .map_err(|e| Error::kube("write status of", format!("{} {}", K::kind(&()), key_of(obj)), e))
    }

    /// An object that does not even parse as its kind (a watch must not break on it): say so
    /// once in an Event and wait for it to change.
    pub async fn malformed<K>(&self, kind: &'static str, bad: &kube::core::error_boundary::InvalidObject) -> Action
    where
        K: Resource<DynamicType = ()>,
    {
        let meta = &bad.metadata;
        tracing::warn!(
            kind,
            namespace = meta.namespace.as_deref().unwrap_or_default(),
            name = meta.name.as_deref().unwrap_or_default(),
            error = %bad.error,
            "cannot read object; waiting for it to change"
        );
        let regarding = ObjectReference {
            api_version: Some(K::api_version(&()).into_owned()),
            kind: Some(kind.into()),
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
            ..ObjectReference::default()
        };
        self.metrics.observe(kind, "invalid", 0.0);
        self.event(&regarding, true, "Malformed", format!("cannot read this {kind}: {}", bad.error)).await;
        Action::await_change()
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// `Kind ns/name` key for logs and backoff bookkeeping.
pub fn key_of<K: Resource>(obj: &K) -> String {
    let meta = obj.meta();
    match &meta.namespace {
        Some(ns) => format!("{ns}/{}", meta.name.as_deref().unwrap_or_default()),
        None => meta.name.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = Backoff { base: Duration::from_millis(100), max: Duration::from_secs(1) };
        let delays: Vec<u128> = (1..=6).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.delay(500), Duration::from_secs(1));
    }

    #[test]
    fn truncation_respects_characters() {
        assert_eq!(truncate("ééé".into(), 3), "é");
    }
}
