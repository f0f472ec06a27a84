//! Endpoints for people (OIDC bearer tokens): workspace requests, decisions, sessions,
//! certificate revocation, audit queries; and the operator's revocation endpoint.

use axum::Json;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use kube::ResourceExt;
use kube::api::ObjectMeta;
use noexit_crds::agent::WorkspaceIdentity;
use noexit_crds::names::{check_dns1123_label, project_namespace};
use noexit_crds::workspace::{Lifecycle, Runtime, WorkspaceResources};
use noexit_crds::workspace_request::Decision;
use noexit_crds::{Role, WorkspaceRequest, WorkspaceRequestSpec, WorkspaceSpec};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::auditlog::AuditQuery;
use super::body::{StrictJson, parse_json};
use super::cluster::{ClusterError, DecisionRecord};
use super::error::ApiError;
use super::guard::{Principal, noted};

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::NotFound(what) => ApiError::not_found(format!("{what} not found")),
            ClusterError::AlreadyExists(what) => ApiError::conflict("alreadyExists", format!("{what} already exists")),
            ClusterError::Unavailable(m) => ApiError::Unavailable(m),
        }
    }
}

struct Person<'a> {
    user: &'a str,
    project: &'a str,
}

fn person(principal: &Principal) -> Result<Person<'_>, ApiError> {
    match principal {
        Principal::Person { user, project, .. } => Ok(Person { user, project }),
        _ => Err(ApiError::forbidden("notAPerson", "this endpoint is for people with a bearer token")),
    }
}

fn path_project(principal: &Principal, project: &str) -> Result<(), ApiError> {
    match principal {
        Principal::Person { project: p, .. } if p == project => Ok(()),
        _ => Err(ApiError::forbidden("wrongProject", format!("not authorised for project {project}"))),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WhoAmI {
    pub user: String,
    pub project: String,
    pub roles: Vec<Role>,
    pub mfa: bool,
}

pub async fn whoami(Extension(principal): Extension<Principal>) -> Result<Json<WhoAmI>, ApiError> {
    match principal {
        Principal::Person { user, project, roles, mfa, .. } => Ok(Json(WhoAmI { user, project, roles, mfa })),
        _ => Err(ApiError::forbidden("notAPerson", "this endpoint is for people with a bearer token")),
    }
}

/// Body of `POST /v1/projects/{project}/workspacerequests`. The requester is the caller.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewRequest {
    /// Name of the WorkspaceRequest; default `<workspaceName>-<random>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub workspace_name: String,
    pub owner: String,
    pub runtime: Runtime,
    pub image: String,
    pub justification: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    #[serde(default)]
    pub datasets: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home_size: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_minutes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<chrono::DateTime<chrono::Utc>>,
}

fn unprocessable(code: &'static str, message: String) -> ApiError {
    ApiError::bad(StatusCode::UNPROCESSABLE_ENTITY, code, message)
}

/// Check a new request against its project and build the object (pure).
pub fn build_request(
    body: &NewRequest,
    project: &noexit_crds::Project,
    requester: &str,
    suffix: &str,
) -> Result<WorkspaceRequest, ApiError> {
    let project_name = project.name_any();
    let name = body.name.clone().unwrap_or_else(|| format!("{}-{suffix}", body.workspace_name));
    check_dns1123_label(&name, 63).map_err(|e| unprocessable("invalidName", format!("name {name:?}: {e}")))?;
    check_dns1123_label(&body.workspace_name, 40)
        .map_err(|e| unprocessable("invalidName", format!("workspaceName {:?}: {e}", body.workspace_name)))?;
    if body.justification.trim().is_empty() || body.justification.len() > 2000 {
        return Err(unprocessable("invalidJustification", "justification must be 1 to 2000 characters".into()));
    }
    if body.image.trim().is_empty() || body.image.len() > 512 {
        return Err(unprocessable("invalidImage", "image must be 1 to 512 characters".into()));
    }
    if !project.spec.has_role(&body.owner, Role::Researcher) {
        return Err(unprocessable(
            "ownerNotResearcher",
            format!("owner {:?} is not a researcher of project {project_name}", body.owner),
        ));
    }
    if let Some(d) = body.datasets.iter().find(|d| !project.spec.datasets.contains(d)) {
        return Err(unprocessable(
            "datasetNotInProject",
            format!("dataset {d:?} is not used by project {project_name}"),
        ));
    }
    let mut resources = WorkspaceResources::default();
    let quantity = k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    if let Some(cpu) = &body.cpu {
        resources.cpu = quantity(cpu.clone());
    }
    if let Some(memory) = &body.memory {
        resources.memory = quantity(memory.clone());
    }
    if let Some(home) = &body.home_size {
        resources.home_size = quantity(home.clone());
    }
    let lifecycle = Lifecycle {
        idle_timeout_minutes: body.idle_timeout_minutes.unwrap_or_default(),
        expires: body.expires,
        ..Lifecycle::default()
    };
    Ok(WorkspaceRequest {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(project_namespace(&project_name)),
            ..ObjectMeta::default()
        },
        spec: WorkspaceRequestSpec {
            requester: requester.to_owned(),
            justification: body.justification.clone(),
            workspace_name: body.workspace_name.clone(),
            workspace: WorkspaceSpec {
                project: project_name,
                owner: body.owner.clone(),
                runtime: body.runtime,
                image: body.image.clone(),
                profile: body.profile.clone(),
                resources,
                datasets: body.datasets.clone(),
                lifecycle,
            },
        },
        status: None,
    })
}

fn request_object(project: &str, name: &str) -> String {
    format!("workspacerequest:{project}/{name}")
}

pub async fn create_request(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(project): Path<String>,
    StrictJson(body): StrictJson<NewRequest>,
) -> Result<Response, ApiError> {
    path_project(&principal, &project)?;
    let who = person(&principal)?;
    let loaded =
        state.cluster.project(who.project).await?.ok_or_else(|| ApiError::not_found(format!("project {project}")))?;
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
    let req = build_request(&body, &loaded, who.user, suffix)?;
    let created = state.cluster.create_request(req).await?;
    let object = request_object(&project, &created.name_any());
    let detail = serde_json::json!({
        "workspaceName": body.workspace_name, "owner": body.owner,
        "runtime": body.runtime, "justification": body.justification,
    });
    Ok(noted((StatusCode::CREATED, Json(created)), object, detail))
}

/// A request as `requests list` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RequestSummary {
    pub name: String,
    pub workspace_name: String,
    pub requester: String,
    pub owner: String,
    pub runtime: Runtime,
    pub decision: Option<Decision>,
    pub decided_by: Option<String>,
    pub created: Option<String>,
}

pub fn summary(req: &WorkspaceRequest) -> RequestSummary {
    let status = req.status.clone().unwrap_or_default();
    RequestSummary {
        name: req.name_any(),
        workspace_name: req.spec.workspace_name.clone(),
        requester: req.spec.requester.clone(),
        owner: req.spec.workspace.owner.clone(),
        runtime: req.spec.workspace.runtime,
        decision: status.decision_from_conditions(),
        decided_by: status.decided_by,
        created: req.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()),
    }
}

pub async fn list_requests(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(project): Path<String>,
) -> Result<Json<Vec<RequestSummary>>, ApiError> {
    path_project(&principal, &project)?;
    let mut list: Vec<_> = state.cluster.list_requests(&project).await?.iter().map(summary).collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(list))
}

pub async fn get_request(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((project, name)): Path<(String, String)>,
) -> Result<Json<WorkspaceRequest>, ApiError> {
    path_project(&principal, &project)?;
    let req = state
        .cluster
        .get_request(&project, &name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("workspacerequest {project}/{name}")))?;
    Ok(Json(req))
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DecisionBody {
    #[serde(default)]
    pub reason: String,
}

/// Approve and deny share everything but the decision. An empty body is allowed for approvals.
async fn decide(
    state: AppState,
    principal: Principal,
    project: String,
    name: String,
    body: Option<DecisionBody>,
    decision: Decision,
) -> Result<Response, ApiError> {
    path_project(&principal, &project)?;
    let who = person(&principal)?;
    let reason = body.unwrap_or_default().reason;
    if decision == Decision::Denied && reason.trim().is_empty() {
        return Err(ApiError::invalid("reasonRequired", "a denial needs a reason"));
    }
    if reason.len() > 2000 {
        return Err(ApiError::invalid("invalidReason", "reason is longer than 2000 characters"));
    }
    let req = state
        .cluster
        .get_request(&project, &name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("workspacerequest {project}/{name}")))?;
    if req.spec.requester == who.user {
        return Err(ApiError::forbidden(
            "selfDecision",
            format!("{} requested workspacerequest {project}/{name} and may not decide on it", who.user),
        ));
    }
    let object = request_object(&project, &name);
    let current = req.status.as_ref().and_then(|s| s.decision_from_conditions());
    match current {
        Some(d) if d == decision => {
            let detail = serde_json::json!({"reason": reason, "alreadyDecided": true});
            return Ok(noted(Json(summary(&req)), object, detail));
        }
        Some(d) => {
            return Err(ApiError::conflict(
                "alreadyDecided",
                format!("workspacerequest {project}/{name} is already {d:?}"),
            ));
        }
        None => {}
    }
    let record = DecisionRecord { decision, by: who.user.to_owned(), reason: reason.clone() };
    let updated = state.cluster.decide_request(&project, &name, record).await?;
    Ok(noted(Json(summary(&updated)), object, serde_json::json!({"reason": reason})))
}

/// Decision bodies are optional for approvals; when present they must be JSON.
pub struct OptionalDecision(pub Option<DecisionBody>);

impl<S: Send + Sync> axum::extract::FromRequest<S> for OptionalDecision {
    type Rejection = ApiError;
    async fn from_request(req: axum::extract::Request, _: &S) -> Result<Self, ApiError> {
        let wrong_type = (!super::body::content_type_is(&req, "application/json"))
            .then(|| super::body::wrong_content_type(&req, "application/json"));
        let bytes = axum::body::to_bytes(req.into_body(), super::body::MAX_JSON_BYTES).await.map_err(|_| {
            let limit = super::body::MAX_JSON_BYTES;
            ApiError::bad(StatusCode::PAYLOAD_TOO_LARGE, "bodyTooLarge", format!("body is larger than {limit} bytes"))
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(None));
        }
        if let Some(e) = wrong_type {
            return Err(e);
        }
        parse_json(&bytes).map(|b| Self(Some(b)))
    }
}

pub async fn approve(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((project, name)): Path<(String, String)>,
    OptionalDecision(body): OptionalDecision,
) -> Result<Response, ApiError> {
    decide(state, principal, project, name, body, Decision::Approved).await
}

pub async fn deny(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((project, name)): Path<(String, String)>,
    OptionalDecision(body): OptionalDecision,
) -> Result<Response, ApiError> {
    decide(state, principal, project, name, body, Decision::Denied).await
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sessions {
    pub workspaces: Vec<super::store::HeartbeatRow>,
    pub events: Vec<super::store::SessionRow>,
}

fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?.split('&').find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v.to_owned()))
}

pub async fn sessions(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(project): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Sessions>, ApiError> {
    path_project(&principal, &project)?;
    let limit = match query_param(query.as_deref(), "limit") {
        Some(l) => {
            l.parse::<i64>().map_err(|_| ApiError::invalid("invalidQuery", format!("limit {l:?} is not a number")))?
        }
        None => 100,
    }
    .clamp(1, 1000);
    let workspaces = state.store.heartbeats(&project).await?;
    let events = state.store.sessions(&project, limit).await?;
    Ok(Json(Sessions { workspaces, events }))
}

/// Body of `POST /v1/operator/revocations`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OperatorRevocation {
    /// `<project>/<name>`
    pub workspace: String,
    /// Lower-case hex serial.
    pub serial: String,
    pub reason: String,
}

/// Body of `POST /v1/projects/{project}/workspaces/{name}/revoke`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminRevocation {
    /// Serial to revoke; default the workspace's current agent certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    pub reason: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RevocationAck {
    pub serial: String,
    pub workspace: String,
    /// False when the serial was already revoked (the call is idempotent).
    pub new: bool,
}

fn check_serial(serial: &str) -> Result<String, ApiError> {
    let s = noexit_common::pki::normalize_serial(serial);
    if s.is_empty() || s.len() > 64 || !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::invalid(
            "invalidSerial",
            format!("serial {serial:?} is not an even number of hex digits"),
        ));
    }
    Ok(s)
}

/// Record and apply a revocation: database first (the record), then the in-memory set, both
/// before the caller hears back.
async fn revoke(
    state: &AppState,
    ws: &WorkspaceIdentity,
    serial: &str,
    reason: &str,
    by: &str,
) -> Result<Response, ApiError> {
    if reason.trim().is_empty() || reason.len() > 2000 {
        return Err(ApiError::invalid("reasonRequired", "a revocation needs a reason (at most 2000 characters)"));
    }
    let serial = check_serial(serial)?;
    let new = state.store.insert_revocation(&serial, ws, reason, by).await?;
    state.revoked.insert(&serial);
    let workspace = format!("{}/{}", ws.project, ws.name);
    let object = format!("workspace:{workspace}");
    let detail = serde_json::json!({"serial": serial, "reason": reason, "new": new});
    Ok(noted(Json(RevocationAck { serial, workspace, new }), object, detail))
}

pub async fn operator_revoke(
    State(state): State<AppState>,
    StrictJson(body): StrictJson<OperatorRevocation>,
) -> Result<Response, ApiError> {
    let ws = body
        .workspace
        .split_once('/')
        .map(|(project, name)| WorkspaceIdentity { project: project.into(), name: name.into() })
        .and_then(|id| WorkspaceIdentity::from_uri(&id.uri()))
        .ok_or_else(|| {
            ApiError::invalid("invalidWorkspace", format!("workspace {:?} is not <project>/<name>", body.workspace))
        })?;
    revoke(&state, &ws, &body.serial, &body.reason, "operator").await
}

pub async fn workspace_revoke(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((project, name)): Path<(String, String)>,
    StrictJson(body): StrictJson<AdminRevocation>,
) -> Result<Response, ApiError> {
    path_project(&principal, &project)?;
    let who = person(&principal)?;
    let ws = WorkspaceIdentity { project: project.clone(), name: name.clone() };
    let current = state
        .cluster
        .workspace(&ws)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("workspace {project}/{name}")))?
        .status
        .and_then(|s| s.agent_certificate_serial);
    let serial = match body.serial {
        Some(s) => {
            let s = check_serial(&s)?;
            let seen = state.revoked.agent_of(&s);
            if !super::revocation::belongs_to(&s, &ws, current.as_deref(), seen.as_ref()) {
                return Err(ApiError::forbidden(
                    "serialNotOfWorkspace",
                    format!(
                        "certificate {s} is not known as an agent certificate of workspace {project}/{name}; a project admin may revoke only their own workspaces' certificates"
                    ),
                ));
            }
            s
        }
        None => current.ok_or_else(|| {
            ApiError::conflict("noCertificate", format!("workspace {project}/{name} has no agent certificate yet"))
        })?,
    };
    revoke(&state, &ws, &serial, &body.reason, &format!("user:{}", who.user)).await
}

pub async fn audit_query(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    let raw = query.unwrap_or_default();
    let mut q = AuditQuery::default();
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        let number = |v: &str| {
            v.parse::<i64>().map_err(|_| ApiError::invalid("invalidQuery", format!("{k}={v:?} is not a number")))
        };
        match k {
            "project" => q.project = v,
            "actor" => q.actor = Some(v),
            "action" => q.action = Some(v),
            "after" => q.after = Some(number(&v)?),
            "limit" => q.limit = Some(number(&v)?),
            other => {
                return Err(ApiError::invalid(
                    "unknownParameter",
                    format!("unknown query parameter {other:?} (project, actor, action, after, limit)"),
                ));
            }
        }
    }
    path_project(&principal, &q.project)?;
    Ok(Json(state.audit.query(q).await?))
}

/// Decode `%XX` and `+` in a query value (actors contain `:` and `@`).
pub fn percent_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_handles_escapes_and_junk() {
        assert_eq!(percent_decode("user%3Aalice%40x.org"), "user:alice@x.org");
        assert_eq!(percent_decode("a+b"), "a b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn serials_are_checked_and_normalised() {
        assert_eq!(check_serial("00AB").unwrap(), "ab");
        assert!(check_serial("xyz").is_err());
        assert!(check_serial("").is_err());
    }
}
