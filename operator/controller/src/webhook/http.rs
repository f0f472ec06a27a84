//! The webhook's HTTP surface: `POST /validate` (AdmissionReview), `GET /healthz`, `GET /readyz`
//! (caches synced), `GET /metrics`. Built by [`router`] so tests drive it with
//! `tower::ServiceExt::oneshot`, without TLS or a cluster.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::lookup::Lookup;
use super::review::{self, Outcome, Policy};
use super::rules::{Refusal, reason};
use crate::invalid::describe;
use noexit_audit::AuditSink;

/// Largest review accepted: an object may be 1.5 MiB in etcd and a review carries two.
pub const BODY_LIMIT: usize = 4 * 1024 * 1024;

type Labels = Vec<(String, String)>;

/// `noexit_admission_total{kind,operation,outcome}` and
/// `noexit_admission_refusals_total{kind,reason}`; every label value is from a fixed set.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reviews: Family<Labels, Counter>,
    refusals: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let reviews = Family::<Labels, Counter>::default();
        let refusals = Family::<Labels, Counter>::default();
        registry.register("noexit_admission", "Admission reviews by kind, operation and outcome", reviews.clone());
        registry.register("noexit_admission_refusals", "Admission refusals by kind and reason", refusals.clone());
        Self { registry, reviews, refusals }
    }
}

impl Metrics {
    fn record(&self, outcome: &Outcome) {
        let verdict = if outcome.verdict.allowed() { "allowed" } else { "refused" };
        self.reviews
            .get_or_create(&vec![
                ("kind".into(), outcome.kind.into()),
                ("operation".into(), outcome.operation.into()),
                ("outcome".into(), verdict.into()),
            ])
            .inc();
        for r in &outcome.verdict.refusals {
            self.refusals
                .get_or_create(&vec![("kind".into(), outcome.kind.into()), ("reason".into(), r.reason.into())])
                .inc();
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Everything a request handler needs.
#[derive(Clone)]
pub struct AppState {
    pub lookup: Arc<dyn Lookup>,
    pub policy: Arc<Policy>,
    pub metrics: Arc<Metrics>,
    /// The time rules compare expiry dates with; tests pin it.
    pub clock: fn() -> DateTime<Utc>,
    /// Every review of a noexit resource is recorded here (as writer `webhook`); without it
    /// reviews are only logged.
    pub audit: Option<Arc<dyn AuditSink>>,
}

impl AppState {
    pub fn new(lookup: Arc<dyn Lookup>, policy: Policy) -> Self {
        Self { lookup, policy: Arc::new(policy), metrics: Arc::new(Metrics::default()), clock: Utc::now, audit: None }
    }

    /// Records every review in `audit`.
    pub fn with_audit(mut self, audit: Arc<dyn AuditSink>) -> Self {
        self.audit = Some(audit);
        self
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/validate", post(validate))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// One error shape for everything that is not an AdmissionReview answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"code": self.code, "message": self.message});
        (self.status, axum::Json(body)).into_response()
    }
}

async fn validate(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let req = match review::parse(&body) {
        Ok(req) => req,
        Err((json, error)) => {
            tracing::warn!(error = %error, "admission review unreadable");
            if let Some(audit) = &state.audit {
                let event = super::audit::unreadable(json.as_ref(), &error);
                if let Err(e) = audit.record(event).await {
                    tracing::error!(error = %e, "unreadable admission review not recorded in the audit log");
                }
            }
            return match json.as_ref().and_then(|v| review::respond_unreadable(v, &error)) {
                Some(review) => Ok(axum::Json(review).into_response()),
                None => Err(ApiError { status: StatusCode::BAD_REQUEST, code: "bad_review", message: error }),
            };
        }
    };
    let mut outcome = if state.lookup.ready() {
        review::review(&req, state.lookup.as_ref(), &state.policy, (state.clock)())
    } else {
        // Judging against empty caches would refuse with misleading reasons (project not found).
        review::not_ready(&req)
    };
    if let Some(audit) = &state.audit
        && let Err(e) = audit.record(super::audit::event(&req, &outcome)).await
    {
        tracing::error!(error = %e, uid = %req.uid, "admission review not recorded in the audit log");
        // Nothing is admitted that the log does not show.
        if outcome.verdict.allowed() {
            let object = describe(outcome.kind, req.namespace.as_deref(), &req.name);
            outcome.verdict.refusals.push(Refusal::new(
                &object,
                "(webhook)",
                reason::AUDIT_UNAVAILABLE,
                format!("the noexit audit log is unavailable ({e}); retry later"),
            ));
        }
    }
    log(&req.uid, &outcome);
    state.metrics.record(&outcome);
    Ok(axum::Json(review::respond(&req, &outcome)).into_response())
}

fn log(uid: &str, outcome: &Outcome) {
    for r in &outcome.verdict.refusals {
        tracing::warn!(
            uid,
            kind = outcome.kind,
            operation = outcome.operation,
            user = %outcome.user,
            object = %r.object,
            field = %r.field,
            reason = r.reason,
            detail = %r.message,
            "admission refused"
        );
    }
    if outcome.verdict.allowed() {
        tracing::debug!(uid, kind = outcome.kind, operation = outcome.operation, user = %outcome.user, "admission allowed");
    }
}

async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    if state.lookup.ready() {
        Ok("ok")
    } else {
        Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "not_ready",
            message: "caches of projects, datasets and workspaces not yet synced".into(),
        })
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.encode())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::webhook::rules::{Refusal, Verdict};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn refusals_are_logged_as_json_with_object_field_and_reason() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt().json().with_writer(move || writer.clone()).finish();
        let outcome = Outcome {
            kind: "workspace",
            operation: "CREATE",
            user: "carol@ward7.example".into(),
            verdict: Verdict {
                refusals: vec![Refusal::new(
                    "workspace ward-7/alice",
                    "spec.datasets[1]",
                    "DatasetNotGranted",
                    r#"dataset "icu-2019" is not granted to project "ward-7""#,
                )],
                warnings: vec![],
            },
        };
        tracing::subscriber::with_default(subscriber, || log("uid-1", &outcome));
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        let fields = &line["fields"];
        assert_eq!(line["level"], "WARN");
        assert_eq!(fields["message"], "admission refused");
        assert_eq!(fields["object"], "workspace ward-7/alice");
        assert_eq!(fields["field"], "spec.datasets[1]");
        assert_eq!(fields["reason"], "DatasetNotGranted");
        assert_eq!(fields["user"], "carol@ward7.example");
        assert_eq!(fields["detail"], r#"dataset "icu-2019" is not granted to project "ward-7""#);
    }
}
