//! The middleware in front of every route: find the endpoint, authenticate the caller the way
//! the endpoint demands, authorise it against the table in [`super::authz`], run the handler,
//! and record the decision (allowed or refused, and why) in the audit log.

use std::net::SocketAddr;

use axum::extract::{MatchedPath, RawPathParams, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use noexit_crds::Role;
use noexit_crds::agent::WorkspaceIdentity;

use super::AppState;
use super::authz::{Authn, Endpoint, acting_role};
use super::error::{ApiError, ErrorBody};
use noexit_audit::{AuditEvent, Outcome};
use noexit_common::pki::{CertInfo, OPERATOR_URI};

/// What the TLS layer learnt about the connection (inserted by the accept loop).
#[derive(Clone, Debug, Default)]
pub struct PeerInfo {
    pub addr: Option<SocketAddr>,
    /// The client certificate, if one was presented (its holder proved the key).
    pub cert: Option<CertInfo>,
    /// Why that certificate is not acceptable (expired, not from our CA, …): code and message.
    pub cert_error: Option<(&'static str, String)>,
}

impl PeerInfo {
    /// `addr` and certificate serial, for the audit entry's `source`.
    pub fn source(&self) -> Option<String> {
        match (&self.addr, &self.cert) {
            (Some(a), Some(c)) => Some(format!("{a} cert:{}", c.serial)),
            (Some(a), None) => Some(a.to_string()),
            (None, Some(c)) => Some(format!("cert:{}", c.serial)),
            (None, None) => None,
        }
    }
}

/// Who is calling, after authentication and authorisation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    Anonymous,
    Agent {
        id: WorkspaceIdentity,
        serial: String,
    },
    Operator {
        serial: String,
    },
    /// `role` is the role acted in (`None` when refused before one was found).
    Person {
        user: String,
        project: String,
        role: Option<Role>,
        roles: Vec<Role>,
        mfa: bool,
    },
}

impl Principal {
    pub fn actor(&self) -> String {
        match self {
            Principal::Anonymous => "anonymous".into(),
            Principal::Agent { id, .. } => format!("workspace:{}/{}", id.project, id.name),
            Principal::Operator { .. } => "operator".into(),
            Principal::Person { user, .. } => format!("user:{user}"),
        }
    }

    pub fn role(&self) -> Option<String> {
        match self {
            Principal::Anonymous => None,
            Principal::Agent { .. } => Some("agent".into()),
            Principal::Operator { .. } => Some("operator".into()),
            Principal::Person { role, .. } => role.map(|r| r.as_str().into()),
        }
    }
}

/// Set by a handler on its response to name the object acted on and add detail.
#[derive(Clone, Debug, Default)]
pub struct AuditNote {
    pub object: Option<String>,
    pub detail: serde_json::Value,
}

/// Response with an audit note attached.
pub fn noted(response: impl IntoResponse, object: impl Into<String>, detail: serde_json::Value) -> Response {
    let mut response = response.into_response();
    response.extensions_mut().insert(AuditNote { object: Some(object.into()), detail });
    response
}

pub fn endpoint_for(method: &Method, path: &str) -> Option<Endpoint> {
    Endpoint::ALL.into_iter().find(|e| {
        let (m, p) = e.route();
        m == method.as_str() && p == path
    })
}

fn project_of(params: &RawPathParams, query: Option<&str>) -> Option<String> {
    params
        .iter()
        .find(|(k, _)| *k == "project")
        .map(|(_, v)| v.to_owned())
        .or_else(|| query?.split('&').find_map(|kv| kv.strip_prefix("project=")).map(|v| v.to_owned()))
}

/// The default object of an entry when the handler did not name one.
fn default_object(principal: &Principal, project: Option<&str>, path: &str) -> String {
    match (principal, project) {
        (Principal::Agent { id, .. }, _) => format!("workspace:{}/{}", id.project, id.name),
        (_, Some(p)) => format!("project:{p}"),
        _ => format!("path:{path}"),
    }
}

pub async fn guard(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    params: RawPathParams,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_owned();
    let Some(endpoint) = matched.as_ref().and_then(|m| endpoint_for(req.method(), m.as_str())) else {
        // A known path asked with another method: 405, recorded by [`unrouted`].
        let allowed: Vec<&str> = Endpoint::ALL
            .iter()
            .filter(|e| matched.as_ref().is_some_and(|m| e.route().1 == m.as_str()))
            .map(|e| e.route().0)
            .collect();
        if !allowed.is_empty() {
            let mut response = ApiError::bad(
                http::StatusCode::METHOD_NOT_ALLOWED,
                "methodNotAllowed",
                format!(
                    "{} is not allowed on {}; use {}",
                    truncate(req.method().as_str(), 16),
                    truncate(&path, 256),
                    allowed.join(", ")
                ),
            )
            .into_response();
            if let Ok(v) = http::HeaderValue::from_str(&allowed.join(", ")) {
                response.headers_mut().insert(http::header::ALLOW, v);
            }
            return response;
        }
        // A route registered without a row in the table: refuse rather than serve unguarded.
        return ApiError::forbidden("noPolicy", format!("{} {path} has no authorisation rule", req.method()))
            .into_response();
    };
    let peer = req.extensions().get::<PeerInfo>().cloned().unwrap_or_default();
    let project = project_of(&params, req.uri().query());
    let (principal, refusal) = match authenticate(&state, endpoint, req.headers(), &peer, project.as_deref()).await {
        Ok(p) => (p, None),
        Err((p, e)) => (p, Some(e)),
    };
    let response = match refusal {
        Some(e) => e.into_response(),
        None => {
            req.extensions_mut().insert(principal.clone());
            next.run(req).await
        }
    };
    record(&state, endpoint, &principal, project.as_deref(), &path, &peer, response).await
}

/// Marks a response whose request the guard already recorded.
#[derive(Clone, Copy, Debug)]
struct Recorded;

/// The outermost layer: a request no route took (unknown path: 404; known path, wrong
/// method: 405) never reached [`guard`]; it is refused with a JSON error and recorded here.
pub async fn unrouted(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let peer = req.extensions().get::<PeerInfo>().cloned().unwrap_or_default();
    let mut response = next.run(req).await;
    if response.extensions().get::<Recorded>().is_some() {
        return response;
    }
    let status = response.status();
    if status == http::StatusCode::METHOD_NOT_ALLOWED && response.extensions().get::<ErrorBody>().is_none() {
        let allow = response.headers().get(http::header::ALLOW).cloned();
        response =
            ApiError::bad(status, "methodNotAllowed", format!("{method} is not allowed on {}", truncate(&path, 256)))
                .into_response();
        if let Some(allow) = allow {
            response.headers_mut().insert(http::header::ALLOW, allow);
        }
    }
    if status.is_success() || status.is_redirection() || status.is_informational() {
        return response;
    }
    let error = response.extensions().get::<ErrorBody>().cloned();
    let reason = match error {
        Some(e) => format!("{}: {}", e.code, e.message),
        None => format!("HTTP {status}"),
    };
    let event = AuditEvent {
        actor: Principal::Anonymous.actor(),
        role: None,
        action: "api.request".into(),
        object: format!("path:{}", truncate(&path, 256)),
        outcome: Outcome::Refused(reason),
        source: peer.source(),
        detail: serde_json::json!({ "method": truncate(method.as_str(), 16), "status": status.as_u16() }),
    };
    if let Err(e) = state.audit.record(event).await {
        tracing::error!(error = %e, "cannot record a refused request");
    }
    response
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}

/// Write the audit entry for this request. A successful action whose entry cannot be written is
/// turned into a 503: nothing is acknowledged that the log does not show.
async fn record(
    state: &AppState,
    endpoint: Endpoint,
    principal: &Principal,
    project: Option<&str>,
    path: &str,
    peer: &PeerInfo,
    response: Response,
) -> Response {
    let mut response = response;
    response.extensions_mut().insert(Recorded);
    let status = response.status();
    let error = response.extensions().get::<ErrorBody>().cloned();
    let success = status.is_success() || status.is_redirection();
    if success && !endpoint.audit_success() {
        return response;
    }
    let note = response.extensions().get::<AuditNote>().cloned().unwrap_or_default();
    let outcome = match (&error, success) {
        (_, true) => Outcome::Allowed,
        (Some(e), false) => Outcome::Refused(format!("{}: {}", e.code, e.message)),
        (None, false) => Outcome::Refused(format!("HTTP {status}")),
    };
    let event = AuditEvent {
        actor: principal.actor(),
        role: principal.role(),
        action: endpoint.action().into(),
        object: note.object.unwrap_or_else(|| default_object(principal, project, path)),
        outcome,
        source: peer.source(),
        detail: note.detail,
    };
    match state.audit.record(event).await {
        Ok(()) => response,
        Err(e) if success => {
            tracing::error!(error = %e, action = endpoint.action(), "audit log unavailable; refusing the acknowledgement");
            ApiError::Unavailable(format!("audit log unavailable: {e}")).into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, action = endpoint.action(), "cannot record a refusal in the audit log");
            response
        }
    }
}

/// A refusal carries the actor as far as it is known, for the audit entry.
type Refusal = (Principal, ApiError);

async fn authenticate(
    state: &AppState,
    endpoint: Endpoint,
    headers: &http::HeaderMap,
    peer: &PeerInfo,
    project: Option<&str>,
) -> Result<Principal, Refusal> {
    match endpoint.authn() {
        Authn::None => Ok(Principal::Anonymous),
        Authn::AgentCert => {
            let cert = client_cert(state, peer)?;
            let id = cert.uris.iter().find_map(|u| WorkspaceIdentity::from_uri(u)).ok_or_else(|| {
                (
                    Principal::Anonymous,
                    ApiError::forbidden(
                        "notAnAgent",
                        format!("client certificate {} carries no workspace identity", cert.serial),
                    ),
                )
            })?;
            state.revoked.record_agent(&cert.serial, &id);
            Ok(Principal::Agent { id, serial: cert.serial.clone() })
        }
        Authn::OperatorCert => {
            let cert = client_cert(state, peer)?;
            if !cert.uris.iter().any(|u| u == OPERATOR_URI) {
                let who = cert.uris.first().cloned().unwrap_or_else(|| format!("cert:{}", cert.serial));
                return Err((
                    Principal::Anonymous,
                    ApiError::forbidden("notTheOperator", format!("{who} may not call operator endpoints")),
                ));
            }
            Ok(Principal::Operator { serial: cert.serial.clone() })
        }
        Authn::Bearer => person(state, endpoint, headers, project).await,
    }
}

#[allow(clippy::result_large_err)] // refusals are rare; the actor rides along for the audit entry
fn client_cert<'a>(state: &AppState, peer: &'a PeerInfo) -> Result<&'a CertInfo, Refusal> {
    let cert = peer.cert.as_ref().ok_or_else(|| {
        (
            Principal::Anonymous,
            ApiError::unauthenticated("clientCertificateRequired", "this endpoint needs a client certificate"),
        )
    })?;
    if let Some((code, message)) = &peer.cert_error {
        return Err((Principal::Anonymous, ApiError::unauthenticated(code, message.clone())));
    }
    if state.revoked.contains(&cert.serial) {
        let who = cert.uris.first().cloned().unwrap_or_default();
        // The certificate verified, it is only withdrawn: the entry names whose it was, so an
        // auditor finds the attempts under the workspace (or the operator).
        let owner = match cert.uris.iter().find_map(|u| WorkspaceIdentity::from_uri(u)) {
            Some(id) => Principal::Agent { id, serial: cert.serial.clone() },
            None if cert.uris.iter().any(|u| u == OPERATOR_URI) => Principal::Operator { serial: cert.serial.clone() },
            None => Principal::Anonymous,
        };
        return Err((
            owner,
            ApiError::unauthenticated("certificateRevoked", format!("certificate {} ({who}) is revoked", cert.serial)),
        ));
    }
    Ok(cert)
}

async fn person(
    state: &AppState,
    endpoint: Endpoint,
    headers: &http::HeaderMap,
    project: Option<&str>,
) -> Result<Principal, Refusal> {
    let anon = |e: ApiError| (Principal::Anonymous, e);
    let token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .ok_or_else(|| anon(ApiError::unauthenticated("tokenRequired", "Authorization: Bearer <token> is required")))?;
    let oidc = state
        .oidc
        .as_ref()
        .ok_or_else(|| anon(ApiError::unauthenticated("oidcNotConfigured", "this API accepts no bearer tokens")))?;
    let identity = oidc.verify(token).await.map_err(anon)?;
    // The actor is known from here on; refusals name them.
    let refuse = |role: Option<Role>, e: ApiError| {
        let principal = Principal::Person {
            user: identity.user.clone(),
            project: project.unwrap_or_default().to_owned(),
            role,
            roles: vec![],
            mfa: identity.has_mfa(),
        };
        (principal, e)
    };
    let Some(project_name) = project else {
        return Err(refuse(None, ApiError::invalid("projectRequired", "name the project (?project=<name>)")));
    };
    let loaded =
        state.cluster.project(project_name).await.map_err(|e| refuse(None, ApiError::Unavailable(e.to_string())))?;
    let roles = loaded.as_ref().map(|p| p.spec.roles_of(&identity.user)).unwrap_or_default();
    let Some(role) = acting_role(endpoint, &roles) else {
        let allowed: Vec<&str> = endpoint.allowed_roles().iter().map(|r| r.as_str()).collect();
        let held: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        return Err(refuse(
            None,
            ApiError::forbidden(
                "forbidden",
                format!(
                    "{} (roles in project {project_name}: [{}]) may not {}; it needs one of [{}]",
                    identity.user,
                    held.join(", "),
                    endpoint.action(),
                    allowed.join(", ")
                ),
            ),
        ));
    };
    let mfa_required = state.config.require_mfa || loaded.as_ref().is_some_and(|p| p.spec.desktop.require_mfa);
    if mfa_required && !identity.has_mfa() {
        return Err(refuse(
            Some(role),
            ApiError::forbidden(
                "mfaRequired",
                format!("project {project_name} requires a second factor; the token's amr is {:?}", identity.amr),
            ),
        ));
    }
    Ok(Principal::Person {
        user: identity.user.clone(),
        project: project_name.to_owned(),
        role: Some(role),
        roles,
        mfa: identity.has_mfa(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_maps_back_to_its_endpoint() {
        for e in Endpoint::ALL {
            let (m, p) = e.route();
            assert_eq!(endpoint_for(&m.parse().unwrap(), p), Some(e));
        }
        assert_eq!(endpoint_for(&Method::DELETE, "/v1/agent/events"), None);
    }
}
