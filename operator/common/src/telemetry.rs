//! Logging set-up shared by every subcommand, and the controller's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `/healthz`, `/readyz` (503 until `ready`) and `/metrics` (OpenMetrics text from `encode`),
/// served by every subcommand with a plain-HTTP health port (controller, DNS server).
pub fn health_router<F>(encode: F, ready: std::sync::Arc<std::sync::atomic::AtomicBool>) -> axum::Router
where
    F: Fn() -> String + Clone + Send + Sync + 'static,
{
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(std::sync::atomic::Ordering::Relaxed);
                async move {
                    if ready { (StatusCode::OK, "ok") } else { (StatusCode::SERVICE_UNAVAILABLE, "starting") }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let body = encode();
                async move { ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body) }
            }),
        )
}

/// Install a tracing subscriber: human-readable by default, JSON lines when `json`.
pub fn init_logging(json: bool) {
    // The DNS library logs every query at info: keep that for RUST_LOG=hickory_server=info.
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,hickory_server=warn".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests) is harmless; ignore it.
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

/// Resolves on SIGTERM or Ctrl-C (shared with the gateway through `noexit-web`).
pub use noexit_web::serve::shutdown_signal;

/// `kind` is one of Project, Workspace, Dataset, WorkspaceRequest; `outcome` one of success,
/// error, invalid; `category` one of `controllers::error::CATEGORIES`. Never an object name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub kind: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: &'static str,
    pub category: &'static str,
}

/// The controller's metrics. Labels come from fixed sets only.
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Family<OutcomeLabels, Counter>,
    pub duration: Family<KindLabels, Histogram>,
    pub errors: Family<ErrorLabels, Counter>,
    /// 1 while this replica holds the leader Lease.
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("noexit");
        let reconciles = Family::<OutcomeLabels, Counter>::default();
        // 1 ms .. ~16 s.
        let duration = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 15))
        });
        let errors = Family::<ErrorLabels, Counter>::default();
        let leader = Gauge::default();
        registry.register("reconcile", "Reconciles by kind and outcome", reconciles.clone());
        registry.register("reconcile_duration_seconds", "Time spent in one reconcile", duration.clone());
        registry.register("reconcile_errors", "Failed reconciles by kind and error category", errors.clone());
        registry.register("leader", "1 while this replica holds the leader Lease", leader.clone());
        Self { registry, reconciles, duration, errors, leader }
    }
}

impl Metrics {
    pub fn observe(&self, kind: &'static str, outcome: &'static str, seconds: f64) {
        self.reconciles.get_or_create(&OutcomeLabels { kind, outcome }).inc();
        self.duration.get_or_create(&KindLabels { kind }).observe(seconds);
    }

    pub fn error(&self, kind: &'static str, category: &'static str) {
        self.errors.get_or_create(&ErrorLabels { kind, category }).inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_are_the_documented_ones() {
        let m = Metrics::default();
        m.observe("Workspace", "success", 0.004);
        m.error("Workspace", "conflict");
        let text = m.encode();
        for name in [
            r#"noexit_reconcile_total{kind="Workspace",outcome="success"} 1"#,
            r#"noexit_reconcile_duration_seconds_count{kind="Workspace"} 1"#,
            r#"noexit_reconcile_errors_total{kind="Workspace",category="conflict"} 1"#,
            "noexit_leader 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
