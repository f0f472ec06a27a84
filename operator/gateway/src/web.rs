//! The gateway's HTTP side: the page, noVNC's files, sign-in (OIDC code + PKCE), sign-out,
//! the workspace and session lists, and the WebSocket that carries RFB. Every refusal is
//! counted and audited.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Json, Router};
use chrono::Utc;
use serde::Deserialize;
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;

use crate::directory;
use crate::directory::SecondConnect;
use crate::oidc::random_token;
use crate::proxy::{self, Session};
use crate::record::GatewayEvent;
use crate::state::{Gateway, Live, SessionInfo, SignIn};

/// The session cookie. `__Host-` binds it to this origin: Secure, Path=/, no Domain.
pub const SESSION_COOKIE: &str = "__Host-noexit-gateway";
/// Ties the issuer's redirect back to the browser that started the sign-in. `Lax`, because
/// the redirect back from the issuer is a cross-site navigation.
pub const LOGIN_COOKIE: &str = "noexit-gateway-login";
/// A pending sign-in is forgotten after this long.
const LOGIN_TTL: Duration = Duration::from_secs(600);

/// The peer address, put into each request by the accept loop.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
    connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

pub fn router(gw: Arc<Gateway>) -> Router {
    let novnc = ServeDir::new(&gw.config.novnc_dir);
    Router::new()
        .route("/", get(|| async { html(INDEX) }))
        .route("/app.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript")], APP_JS) }))
        .route("/app.css", get(|| async { ([(header::CONTENT_TYPE, "text/css")], APP_CSS) }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/login", get(login))
        .route("/callback", get(callback))
        .route("/logout", post(logout))
        .route("/api/me", get(me))
        .route("/api/workspaces", get(workspaces))
        .route("/api/sessions", get(sessions))
        .route("/ws/{project}/{workspace}", get(connect))
        .nest_service("/novnc", novnc)
        .layer(SetResponseHeaderLayer::overriding(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)))
        .layer(SetResponseHeaderLayer::overriding(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")))
        .layer(SetResponseHeaderLayer::overriding(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")))
        .layer(SetResponseHeaderLayer::overriding(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")))
        .layer(SetResponseHeaderLayer::if_not_present(header::CACHE_CONTROL, HeaderValue::from_static("no-store")))
        .with_state(gw)
}

/// Prometheus metrics, served on their own plain-HTTP listener.
pub fn metrics_router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(gw): State<Arc<Gateway>>| async move {
                (
                    [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    gw.metrics.encode(),
                )
            }),
        )
        .with_state(gw)
}

fn html(body: impl Into<String>) -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body.into()).into_response()
}

/// A refusal as the browser sees it: JSON with a stable code and a human message.
fn refusal(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(serde_json::json!({"code": code, "message": message}))).into_response()
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The signed-in person behind a request, or why not (code, message).
pub(crate) fn signed_in(gw: &Gateway, headers: &HeaderMap) -> Result<(String, SignIn), (&'static str, String)> {
    let Some(id) = cookie(headers, SESSION_COOKIE) else {
        return Err(("noSession", "not signed in".into()));
    };
    let mut signins = gw.signins.lock().map_err(|_| ("unavailable", "session store poisoned".to_owned()))?;
    let Some(s) = signins.get(id).cloned() else {
        return Err(("unknownSession", "session cookie is not one this gateway issued, or it was signed out".into()));
    };
    if s.ends <= Utc::now() {
        signins.remove(id);
        return Err(("sessionExpired", format!("sign-in of {} expired at {}; sign in again", s.who.user, s.ends)));
    }
    Ok((id.to_owned(), s))
}

async fn refuse_unauthenticated(
    gw: &Gateway,
    action: &str,
    object: &str,
    code: &'static str,
    msg: &str,
    peer: &Peer,
) -> Response {
    gw.refuse("anonymous", action, object, code, msg, &peer.0.to_string()).await;
    refusal(StatusCode::UNAUTHORIZED, code, msg)
}

async fn login(State(gw): State<Arc<Gateway>>, Extension(peer): Extension<Peer>) -> Response {
    let state = random_token(24);
    let (url, pending) = match gw.oidc.begin(&state).await {
        Ok(found) => found,
        Err(e) => {
            gw.refuse("anonymous", "gateway.signin", "gateway", e.code(), &e.to_string(), &peer.0.to_string()).await;
            return refusal(StatusCode::BAD_GATEWAY, e.code(), &e.to_string());
        }
    };
    if let Ok(mut p) = gw.pending.lock() {
        p.retain(|_, v| v.created.elapsed() < LOGIN_TTL);
        p.insert(state.clone(), pending);
    }
    let cookie = format!("{LOGIN_COOKIE}={state}; HttpOnly; Secure; SameSite=Lax; Path=/callback; Max-Age=600");
    ([(header::SET_COOKIE, cookie)], Redirect::to(&url)).into_response()
}

#[derive(Deserialize)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

fn signin_failed(code: &str, message: &str) -> Response {
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Sign-in refused</title><link rel=\"stylesheet\" href=\"/app.css\"></head>\
         <body><main><h1>Sign-in refused</h1><p id=\"refusal\" data-code=\"{}\">{}</p><p><a href=\"/\">Back</a></p></main></body></html>",
        escape(code),
        escape(message)
    );
    (StatusCode::UNAUTHORIZED, html(body)).into_response()
}

async fn callback(
    State(gw): State<Arc<Gateway>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Query(q): Query<CallbackQuery>,
) -> Response {
    let source = peer.0.to_string();
    let fail = |code: &'static str, message: String, actor: String| {
        let gw = gw.clone();
        let source = source.clone();
        async move {
            gw.refuse(&actor, "gateway.signin", "gateway", code, &message, &source).await;
            signin_failed(code, &message)
        }
    };
    if let Some(error) = q.error {
        return fail("issuerError", format!("the issuer refused the sign-in: {error}"), "anonymous".into()).await;
    }
    let (Some(code), Some(state)) = (q.code, q.state) else {
        return fail("malformedCallback", "callback without code and state".into(), "anonymous".into()).await;
    };
    if cookie(&headers, LOGIN_COOKIE) != Some(state.as_str()) {
        return fail("stateMismatch", "sign-in was not started in this browser".into(), "anonymous".into()).await;
    }
    let pending = gw.pending.lock().ok().and_then(|mut p| p.remove(&state));
    let Some(pending) = pending.filter(|p| p.created.elapsed() < LOGIN_TTL) else {
        return fail("unknownState", "sign-in expired or was already used".into(), "anonymous".into()).await;
    };
    let who = match gw.oidc.finish(&code, &pending).await {
        Ok(who) => who,
        Err(e) => return fail(e.code(), e.to_string(), "anonymous".into()).await,
    };
    let actor = format!("user:{}", who.user);
    if gw.config.require_mfa && !who.has_mfa() {
        return fail(
            "mfaRequired",
            format!("{} signed in without a second factor (amr {:?})", who.user, who.amr),
            actor,
        )
        .await;
    }
    let id = random_token(32);
    let max_end = Utc::now() + chrono::Duration::from_std(gw.config.max_signin).unwrap_or(chrono::Duration::hours(8));
    let signin = SignIn { csrf: random_token(24), ends: who.expires.min(max_end), who: who.clone() };
    if let Ok(mut s) = gw.signins.lock() {
        let now = Utc::now();
        s.retain(|_, v| v.ends > now);
        s.insert(id.clone(), signin.clone());
    }
    gw.audit(GatewayEvent {
        actor,
        action: "gateway.signin".into(),
        object: "gateway".into(),
        refused: None,
        source: Some(source),
        detail: serde_json::json!({"amr": who.amr, "until": signin.ends}),
    })
    .await;
    let session = format!("{SESSION_COOKIE}={id}; HttpOnly; Secure; SameSite=Strict; Path=/");
    let clear = format!("{LOGIN_COOKIE}=; HttpOnly; Secure; SameSite=Lax; Path=/callback; Max-Age=0");
    // A page, not a redirect: the Strict cookie is only sent on a navigation that starts on
    // this site, and the redirect chain began at the issuer.
    let page = "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"0;url=/\">\
        <title>Signed in</title></head><body><a href=\"/\">Continue</a></body></html>";
    let mut response = html(page);
    for c in [session, clear] {
        if let Ok(v) = HeaderValue::from_str(&c) {
            response.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    response
}

#[derive(Deserialize)]
struct LogoutForm {
    csrf: String,
}

async fn logout(
    State(gw): State<Arc<Gateway>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(form): Form<LogoutForm>,
) -> Response {
    let (id, s) = match signed_in(&gw, &headers) {
        Ok(found) => found,
        Err((code, msg)) => return refuse_unauthenticated(&gw, "gateway.signout", "gateway", code, &msg, &peer).await,
    };
    let actor = format!("user:{}", s.who.user);
    if form.csrf != s.csrf {
        let msg = "sign-out without this session's CSRF token";
        gw.refuse(&actor, "gateway.signout", "gateway", "csrf", msg, &peer.0.to_string()).await;
        return refusal(StatusCode::FORBIDDEN, "csrf", msg);
    }
    if let Ok(mut signins) = gw.signins.lock() {
        signins.remove(&id);
    }
    gw.cancel_user(&s.who.user, "signed out");
    gw.audit(GatewayEvent {
        actor,
        action: "gateway.signout".into(),
        object: "gateway".into(),
        refused: None,
        source: Some(peer.0.to_string()),
        detail: serde_json::Value::Null,
    })
    .await;
    let clear = format!("{SESSION_COOKIE}=; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age=0");
    ([(header::SET_COOKIE, clear)], Redirect::to("/")).into_response()
}

async fn me(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    match signed_in(&gw, &headers) {
        Ok((_, s)) => Json(serde_json::json!({
            "user": s.who.user, "mfa": s.who.has_mfa(), "until": s.ends, "csrf": s.csrf,
        }))
        .into_response(),
        // Asking whether one is signed in is not a refusal worth auditing.
        Err((code, msg)) => refusal(StatusCode::UNAUTHORIZED, code, &msg),
    }
}

async fn workspaces(State(gw): State<Arc<Gateway>>, Extension(peer): Extension<Peer>, headers: HeaderMap) -> Response {
    let (_, s) = match signed_in(&gw, &headers) {
        Ok(found) => found,
        Err((code, msg)) => return refuse_unauthenticated(&gw, "gateway.list", "gateway", code, &msg, &peer).await,
    };
    match directory::list(gw.directory.as_ref(), &s.who.user, s.who.has_mfa()).await {
        Ok(list) => Json(list).into_response(),
        Err(e) => refusal(StatusCode::SERVICE_UNAVAILABLE, e.code(), &e.to_string()),
    }
}

async fn sessions(State(gw): State<Arc<Gateway>>, Extension(peer): Extension<Peer>, headers: HeaderMap) -> Response {
    let (_, s) = match signed_in(&gw, &headers) {
        Ok(found) => found,
        Err((code, msg)) => return refuse_unauthenticated(&gw, "gateway.sessions", "gateway", code, &msg, &peer).await,
    };
    let list: Vec<SessionInfo> =
        gw.sessions.lock().map(|l| l.iter().filter(|i| i.user == s.who.user).cloned().collect()).unwrap_or_default();
    Json(list).into_response()
}

async fn connect(
    State(gw): State<Arc<Gateway>>,
    Extension(peer): Extension<Peer>,
    Path((project, workspace)): Path<(String, String)>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let object = format!("workspace:{project}/{workspace}");
    let source = peer.0.to_string();
    let (_, s) = match signed_in(&gw, &headers) {
        Ok(found) => found,
        Err((code, msg)) => return refuse_unauthenticated(&gw, "gateway.connect", &object, code, &msg, &peer).await,
    };
    let user = s.who.user.clone();
    let actor = format!("user:{user}");
    let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
    if origin != Some(gw.config.public_origin.as_str()) {
        let msg = format!("WebSocket from origin {origin:?}, not {}", gw.config.public_origin);
        gw.refuse(&actor, "gateway.connect", &object, "wrongOrigin", &msg, &source).await;
        return refusal(StatusCode::FORBIDDEN, "wrongOrigin", &msg);
    }
    let grant = match directory::resolve(gw.directory.as_ref(), &user, s.who.has_mfa(), &project, &workspace).await {
        Ok(g) => g,
        Err(e) => {
            gw.refuse(&actor, "gateway.connect", &object, e.code(), &e.to_string(), &source).await;
            let status = if matches!(e, directory::Refusal::Unavailable(_)) {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::FORBIDDEN
            };
            return refusal(status, e.code(), &e.to_string());
        }
    };
    // One live session per workspace (spec.desktop.secondConnect): refused here, or taken over
    // when the new one starts.
    let busy = grant.policy.second_connect == SecondConnect::Refuse
        && gw.live.lock().map(|l| l.contains_key(&proxy::live_key(&grant))).unwrap_or(true);
    if busy {
        let msg = format!("workspace {project}/{workspace} already has a live desktop session");
        gw.refuse(&actor, "gateway.connect", &object, "sessionActive", &msg, &source).await;
        return refusal(StatusCode::CONFLICT, "sessionActive", &msg);
    }
    let session = (user.clone(), s.who.has_mfa(), source.clone(), grant);
    // noVNC 1.3 asks for no subprotocol; none is chosen.
    upgrade.max_message_size(4 << 20).on_upgrade(move |socket| serve_session(gw, socket, session, object))
}

async fn serve_session(
    gw: Arc<Gateway>,
    socket: axum::extract::ws::WebSocket,
    (user, has_mfa, source, grant): (String, bool, String, directory::Grant),
    object: String,
) {
    let id = uuid::Uuid::new_v4();
    let (cancel_tx, cancel) = tokio::sync::watch::channel(None);
    // Checked again here, under the lock: two connects may both have passed the check before
    // the upgrade.
    let claimed = gw.live.lock().map_err(|_| ()).and_then(|mut live| {
        let key = proxy::live_key(&grant);
        if grant.policy.second_connect == SecondConnect::Refuse && live.contains_key(&key) {
            return Err(());
        }
        let old = live.insert(key, Live { id, user: user.clone(), cancel: cancel_tx });
        Ok(old.map(|old| {
            let _ = old.cancel.send(Some(format!("taken over by a newer connection (session {id})")));
            old.id
        }))
    });
    let took_over = match claimed {
        Ok(old) => old,
        Err(()) => {
            let msg = format!("workspace {}/{} already has a live desktop session", grant.project, grant.workspace);
            gw.refuse(&format!("user:{user}"), "gateway.connect", &object, "sessionActive", &msg, &source).await;
            let mut socket = socket;
            let mut reason = msg;
            reason.truncate(120);
            let close = axum::extract::ws::CloseFrame { code: 4009, reason: reason.into() };
            let _ = socket.send(axum::extract::ws::Message::Close(Some(close))).await;
            return;
        }
    };
    let session = Session { id, user: user.clone(), has_mfa, source: source.clone(), grant: grant.clone(), cancel };
    let actor = format!("user:{user}");
    let ws_id = noexit_crds::agent::WorkspaceIdentity { project: grant.project.clone(), name: grant.workspace.clone() };
    gw.session_started(SessionInfo {
        id,
        user: user.clone(),
        project: grant.project.clone(),
        workspace: grant.workspace.clone(),
        source: source.clone(),
        started: Utc::now(),
        ended: None,
        end_reason: None,
        drops: Default::default(),
    });
    gw.metrics.sessions_active.inc();
    gw.audit(GatewayEvent {
        actor: actor.clone(),
        action: "gateway.connect".into(),
        object: object.clone(),
        refused: None,
        source: Some(source.clone()),
        detail: serde_json::json!({
            "session": id, "asAdmin": grant.as_admin, "pasteIn": grant.policy.clipboard_in, "tookOver": took_over,
        }),
    })
    .await;
    let from = source.clone();
    let event = |action| noexit_crds::agent::SessionEvent {
        action,
        user: user.clone(),
        session: Some(id.to_string()),
        source: Some(from.clone()),
        idle_seconds: None,
    };
    if let Err(e) = gw.recorder.session(ws_id.clone(), event(noexit_crds::agent::SessionAction::DesktopConnect)).await {
        tracing::error!(error = %e, "cannot record a desktop session");
    }

    let mut info = None;
    let end = proxy::run(gw.clone(), socket, session, |end| {
        if let Ok(mut live) = gw.live.lock() {
            let key = proxy::live_key(&grant);
            if live.get(&key).is_some_and(|l| l.id == id) {
                live.remove(&key);
            }
        }
        info = gw.session_ended(id, &end.message());
    })
    .await;
    gw.metrics.sessions_active.dec();
    gw.metrics.session_ends.get_or_create(&crate::metrics::ReasonLabels { reason: end.code() }).inc();
    let mut detail = serde_json::json!({
        "session": id, "end": end.code(), "drops": info.map(|i| i.drops).unwrap_or_default(),
    });
    let refused = match &end {
        proxy::End::Violation(e) => {
            gw.metrics.violations.get_or_create(&crate::metrics::ReasonLabels { reason: e.category() }).inc();
            detail["category"] = serde_json::json!(e.category());
            detail["direction"] = serde_json::json!(e.direction().map(|d| d.to_string()));
            Some(end.message())
        }
        proxy::End::AccessLost(_) | proxy::End::DesktopUnreachable(_) => Some(end.message()),
        _ => None,
    };
    gw.audit(GatewayEvent {
        actor,
        action: "gateway.disconnect".into(),
        object,
        refused,
        source: Some(source),
        detail,
    })
    .await;
    if let Err(e) = gw.recorder.session(ws_id, event(noexit_crds::agent::SessionAction::DesktopDisconnect)).await {
        tracing::error!(error = %e, "cannot record a desktop session");
    }
}
