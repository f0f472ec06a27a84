//! Output review in the browser: the gateway as a backend-for-frontend to the control-plane
//! API. A reviewer signs in (the gateway's OIDC sign-in); the ID token stays in the gateway's
//! session store and is the bearer of every API call made for them, so the API decides who
//! may see, read and decide, and audits it. The browser gets HTML only: no token, no script.
//!
//! - `GET /review`: the projects where the person is an output checker, and their outputs
//!   awaiting review.
//! - `GET /review/{project}/{id}`: metadata, the check results and the file rendered with the
//!   failing cells marked (the airlock renderer), ACRO's verdicts beside ours, the reviews so
//!   far, and the decision forms.
//! - `POST /review/{project}/{id}/{approve|reject|request-changes}`: relays the decision with
//!   its reason. Needs the session's CSRF token (and, when the browser sends one, the
//!   gateway's own `Origin`); the gateway audits that it relayed it, or why it refused.

pub mod api_client;
pub mod checkers;
pub mod pages;

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use serde::Deserialize;
use tower_http::set_header::SetResponseHeaderLayer;

use crate::record::GatewayEvent;
use crate::state::{Gateway, SignIn};
use crate::web::{Peer, signed_in};
use api_client::{ApiClient, ApiError, Decision};
use checkers::Checkers;
use pages::{ProjectOutputs, Viewer};

/// Longest reason accepted with a decision, in bytes (the API's
/// `noexit_airlock::lifecycle::MAX_REASON`).
pub const MAX_REASON: usize = 2000;

/// The review pages' policy: nothing but this origin's stylesheet and `data:` images; forms
/// post only here; no script at all.
pub const CSP: &str = "default-src 'none'; style-src 'self'; img-src data:; form-action 'self'; \
    frame-ancestors 'none'; base-uri 'none'";

/// What the review pages need besides the gateway.
pub struct Review {
    pub gw: Arc<Gateway>,
    pub api: ApiClient,
    pub checkers: Arc<dyn Checkers>,
}

/// The review pages when `--api-url` is given: projects' output checkers come from the
/// `--directory` file (`outputCheckers`) or the cluster's Projects.
pub async fn from_args(args: &crate::Args, gw: Arc<Gateway>) -> anyhow::Result<Option<Arc<Review>>> {
    use anyhow::Context as _;
    let Some(url) = &args.api_url else { return Ok(None) };
    let ca = match &args.api_ca {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?),
        None => None,
    };
    let api = ApiClient::new(url, ca.as_deref()).map_err(anyhow::Error::msg).context("--api-url")?;
    let checkers: Arc<dyn Checkers> = match &args.directory {
        Some(path) => Arc::new(checkers::FileCheckers { path: path.clone() }),
        None => Arc::new(checkers::KubeCheckers {
            client: kube::Client::try_default().await.context("connecting to Kubernetes")?,
        }),
    };
    tracing::info!(api = %url, "output review pages at /review");
    Ok(Some(Arc::new(Review { gw, api, checkers })))
}

pub fn router(review: Arc<Review>) -> Router {
    Router::new()
        .route("/review", get(list))
        .route(
            "/review/review.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], pages::stylesheet()) }),
        )
        .route("/review/{project}/{id}", get(show))
        .route("/review/{project}/{id}/{decision}", post(decide))
        .layer(SetResponseHeaderLayer::overriding(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)))
        .layer(SetResponseHeaderLayer::overriding(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")))
        // `same-origin`, not `no-referrer`: under `no-referrer` the browser sends `Origin: null`
        // with the page's own form posts, and the decision handler checks the origin.
        .layer(SetResponseHeaderLayer::overriding(header::REFERRER_POLICY, HeaderValue::from_static("same-origin")))
        .layer(SetResponseHeaderLayer::overriding(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")))
        .layer(SetResponseHeaderLayer::overriding(header::CACHE_CONTROL, HeaderValue::from_static("no-store")))
        .with_state(review)
}

fn page(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
}

fn source(peer: &Option<Extension<Peer>>) -> String {
    peer.as_ref().map(|Extension(p)| p.0.to_string()).unwrap_or_else(|| "-".into())
}

/// A project name (a DNS label) or an output id (letters, digits, `-`, `_`).
fn valid_segment(s: &str, label: bool) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|b| {
            if label {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'
            } else {
                b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
            }
        })
}

fn status_of(e: &ApiError) -> StatusCode {
    StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY)
}

/// The signed-in person, or the sign-in page (refusals of anonymous decisions are audited by
/// the caller; anonymous page views are not refusals worth an audit entry).
fn who(gw: &Gateway, headers: &HeaderMap) -> Result<SignIn, (&'static str, String)> {
    signed_in(gw, headers).map(|(_, s)| s)
}

async fn list(State(r): State<Arc<Review>>, headers: HeaderMap) -> Response {
    let s = match who(&r.gw, &headers) {
        Ok(s) => s,
        Err((_, msg)) => return page(StatusCode::UNAUTHORIZED, pages::sign_in_page(&msg)),
    };
    let viewer = Viewer { user: &s.who.user, csrf: &s.csrf };
    let projects = match r.checkers.projects_of(&s.who.user).await {
        Ok(p) => p,
        Err(e) => {
            let body = pages::error_page(Some(&viewer), "Cannot list your projects", "directoryUnavailable", &e, None);
            return page(StatusCode::SERVICE_UNAVAILABLE, body);
        }
    };
    let mut sections = Vec::with_capacity(projects.len());
    for project in projects {
        let mut outputs: Result<Vec<api_client::Output>, ApiError> = Ok(Vec::new());
        // Awaiting review: checked (no decision yet) and inReview (some approvals, not enough).
        for state in ["checked", "inReview"] {
            match (&mut outputs, r.api.list(&s.who.bearer, &project, Some(state)).await) {
                (Ok(acc), Ok(found)) => {
                    // An output that moved between the two calls is listed once.
                    for o in found {
                        if !acc.iter().any(|a| a.id == o.id) {
                            acc.push(o);
                        }
                    }
                }
                (Ok(_), Err(e)) => outputs = Err(e),
                (Err(_), _) => {}
            }
        }
        sections.push(ProjectOutputs { project, outputs });
    }
    page(StatusCode::OK, pages::list_page(&viewer, &sections))
}

#[derive(Deserialize)]
struct ShowQuery {
    decided: Option<String>,
}

async fn show(
    State(r): State<Arc<Review>>,
    headers: HeaderMap,
    Path((project, id)): Path<(String, String)>,
    Query(q): Query<ShowQuery>,
) -> Response {
    let s = match who(&r.gw, &headers) {
        Ok(s) => s,
        Err((_, msg)) => return page(StatusCode::UNAUTHORIZED, pages::sign_in_page(&msg)),
    };
    let viewer = Viewer { user: &s.who.user, csrf: &s.csrf };
    if !valid_segment(&project, true) || !valid_segment(&id, false) {
        let msg = "no such output: a project is a DNS label and an output id letters, digits, - and _";
        return page(StatusCode::NOT_FOUND, pages::error_page(Some(&viewer), "No such output", "badPath", msg, None));
    }
    let output = match r.api.get(&s.who.bearer, &project, &id).await {
        Ok(o) => o,
        Err(e) => {
            let body = pages::error_page(Some(&viewer), "Cannot show this output", e.code(), &e.to_string(), None);
            return page(status_of(&e), body);
        }
    };
    let content = r.api.content(&s.who.bearer, &project, &id).await;
    let notice = q.decided.as_deref().and_then(Decision::parse).map(pages::decided_notice);
    let body = pages::output_page(&viewer, &project, &output, content.as_deref(), notice.as_deref());
    page(StatusCode::OK, body)
}

#[derive(Deserialize)]
struct DecisionForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    reason: String,
}

/// Constant-time comparison of two tokens.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn decide(
    State(r): State<Arc<Review>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    Path((project, id, decision)): Path<(String, String, String)>,
    Form(form): Form<DecisionForm>,
) -> Response {
    let source = source(&peer);
    let object = format!("output:{project}/{id}");
    let action = format!("gateway.review.{decision}");
    let s = match who(&r.gw, &headers) {
        Ok(s) => s,
        Err((code, msg)) => {
            r.gw.refuse("anonymous", &action, &object, code, &msg, &source).await;
            return page(StatusCode::UNAUTHORIZED, pages::sign_in_page(&msg));
        }
    };
    let actor = format!("user:{}", s.who.user);
    let viewer = Viewer { user: &s.who.user, csrf: &s.csrf };
    let back = format!("/review/{}/{}", api_client::segment(&project), api_client::segment(&id));
    let refuse = |status: StatusCode, code: &'static str, msg: String| {
        let (r, actor, action, object, source, back) =
            (r.clone(), actor.clone(), action.clone(), object.clone(), source.clone(), back.clone());
        let viewer = Viewer { user: viewer.user, csrf: viewer.csrf };
        async move {
            r.gw.refuse(&actor, &action, &object, code, &msg, &source).await;
            page(status, pages::error_page(Some(&viewer), "Decision refused", code, &msg, Some(&back)))
        }
    };
    if !same_token(&form.csrf, &s.csrf) {
        return refuse(StatusCode::FORBIDDEN, "csrf", "a decision without this session's CSRF token".into()).await;
    }
    let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
    if let Some(origin) = origin.filter(|o| *o != r.gw.config.public_origin) {
        let msg = format!("a decision posted from origin {origin:?}, not {}", r.gw.config.public_origin);
        return refuse(StatusCode::FORBIDDEN, "wrongOrigin", msg).await;
    }
    let Some(d) = Decision::parse(&decision) else {
        let msg = format!("{decision:?} is not a decision (approve, reject or request-changes)");
        return refuse(StatusCode::NOT_FOUND, "unknownDecision", msg).await;
    };
    if !valid_segment(&project, true) || !valid_segment(&id, false) {
        return refuse(StatusCode::NOT_FOUND, "badPath", "no such output".into()).await;
    }
    let reason = form.reason.trim();
    if d.needs_reason() && reason.is_empty() {
        return refuse(StatusCode::BAD_REQUEST, "reasonRequired", format!("{} needs a reason", d.label())).await;
    }
    if reason.chars().count() > MAX_REASON {
        return refuse(
            StatusCode::BAD_REQUEST,
            "reasonTooLong",
            format!("a reason is at most {MAX_REASON} characters"),
        )
        .await;
    }
    match r.api.decide(&s.who.bearer, &project, &id, d, reason).await {
        Ok(()) => {
            r.gw.audit(GatewayEvent {
                actor,
                action,
                object,
                refused: None,
                source: Some(source),
                detail: serde_json::json!({"relayed": true, "reason": reason}),
            })
            .await;
            Redirect::to(&format!("{back}?decided={}", d.path())).into_response()
        }
        Err(e) => {
            // The API refused (and audited) it; the gateway records that it relayed a refusal.
            r.gw.audit(GatewayEvent {
                actor,
                action,
                object,
                refused: Some(e.to_string()),
                source: Some(source),
                detail: serde_json::json!({"code": e.code(), "status": e.status()}),
            })
            .await;
            let title = "The API refused this decision";
            page(status_of(&e), pages::error_page(Some(&viewer), title, e.code(), &e.to_string(), Some(&back)))
        }
    }
}

#[cfg(test)]
mod tests;
