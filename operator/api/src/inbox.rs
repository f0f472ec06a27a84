//! Ingress, the door into a workspace: an analyst or admin submits a file (a script, a codebook,
//! a lookup table) for one workspace; an admin who is not the submitter approves or rejects it;
//! the workspace's agent fetches the approved file, checks its SHA-256 and places it read-only
//! in `/inbox`, then reports it delivered. Every step and every refusal is in the audit log (the
//! guard records each call with its outcome; handlers add the object and detail).

pub mod content;
pub mod policy;

use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, Path, RawQuery, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use noexit_crds::agent::{InboxDelivered, InboxItem, WorkspaceIdentity};
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub use content::{AirlockSealer, Sealer, Unsealed};
pub use policy::InboxPolicy;

use super::AppState;
use super::error::ApiError;
use super::guard::{Principal, noted};
use super::people::OptionalDecision;
use super::store::{INBOX_APPROVED, INBOX_DELIVERED, INBOX_PENDING, INBOX_REJECTED, InboxRow};

/// The inbox's settings: the rules for files and how content is sealed at rest.
#[derive(Clone, Debug)]
pub struct InboxConfig {
    pub policy: InboxPolicy,
    pub sealer: Arc<dyn Sealer>,
}

impl Default for InboxConfig {
    fn default() -> Self {
        Self { policy: InboxPolicy::default(), sealer: Arc::new(Unsealed) }
    }
}

/// Most items a list returns.
pub const MAX_LIST: i64 = 1000;
/// Most items one agent poll returns.
pub const MAX_AGENT_LIST: i64 = 100;
/// Longest reason kept with a decision.
pub const MAX_REASON: usize = 2000;

fn object(project: &str, workspace: &str, id: impl std::fmt::Display) -> String {
    format!("inbox:{project}/{workspace}/{id}")
}

fn person(principal: &Principal, project: &str) -> Result<String, ApiError> {
    match principal {
        Principal::Person { user, project: p, .. } if p == project => Ok(user.clone()),
        Principal::Person { .. } => {
            Err(ApiError::forbidden("wrongProject", format!("not authorised for project {project}")))
        }
        _ => Err(ApiError::forbidden("notAPerson", "this endpoint is for people with a bearer token")),
    }
}

fn agent(principal: &Principal) -> Result<&WorkspaceIdentity, ApiError> {
    match principal {
        Principal::Agent { id, .. } => Ok(id),
        _ => Err(ApiError::forbidden("notAnAgent", "only workspace agents may call this endpoint")),
    }
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::invalid("invalidId", format!("{id:?} is not an inbox item id (UUID)")))
}

fn refused(status: StatusCode, r: policy::Refused) -> ApiError {
    ApiError::bad(status, r.code, r.message)
}

fn too_large(name: &str, max: u64) -> ApiError {
    ApiError::bad(
        StatusCode::PAYLOAD_TOO_LARGE,
        "fileTooLarge",
        format!("{name:?} is larger than the inbox limit of {max} bytes"),
    )
}

/// `POST /v1/projects/{project}/workspaces/{name}/inbox?fileName=NAME`, the raw file as body.
pub async fn submit(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((project, workspace)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    req: Request,
) -> Result<Response, ApiError> {
    let user = person(&principal, &project)?;
    let cfg = &state.config.inbox;
    let file_name = match policy::query_value(query.as_deref(), "fileName") {
        Some(Some(n)) => n,
        Some(None) => {
            return Err(ApiError::bad(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalidFileName",
                "fileName is not valid percent-encoded UTF-8",
            ));
        }
        None => return Err(ApiError::invalid("fileNameRequired", "name the file (?fileName=<name>)")),
    };
    let ext = policy::check_name(&file_name, &cfg.policy).map_err(|r| refused(StatusCode::UNPROCESSABLE_ENTITY, r))?;
    let ws = WorkspaceIdentity { project: project.clone(), name: workspace.clone() };
    if state.cluster.workspace(&ws).await?.is_none() {
        return Err(ApiError::not_found(format!("workspace {project}/{workspace} not found")));
    }
    let max = cfg.policy.max_bytes;
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large(&file_name, max));
    }
    let mut body = req.into_body();
    let mut bytes = Vec::with_capacity(usize::try_from(declared.unwrap_or(0).min(max)).unwrap_or(0));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::invalid("bodyError", format!("reading the upload failed: {e}")))?;
        let Some(chunk) = frame.data_ref() else { continue };
        if bytes.len() as u64 + chunk.len() as u64 > max {
            return Err(too_large(&file_name, max));
        }
        bytes.extend_from_slice(chunk);
    }
    if bytes.is_empty() {
        return Err(ApiError::bad(StatusCode::UNPROCESSABLE_ENTITY, "emptyFile", format!("{file_name:?} is empty")));
    }
    let head = &bytes[..bytes.len().min(policy::SNIFF_BYTES)];
    let media =
        policy::sniff(&file_name, &ext, head, &cfg.policy).map_err(|r| refused(StatusCode::UNPROCESSABLE_ENTITY, r))?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let id = Uuid::now_v7();
    let path = content::store(cfg.sealer.as_ref(), &state.config.data_dir, &project, &workspace, id, &bytes)
        .await
        .map_err(ApiError::Internal)?;
    let row = InboxRow {
        id: id.to_string(),
        project: project.clone(),
        workspace: workspace.clone(),
        file_name: file_name.clone(),
        size: i64::try_from(bytes.len()).unwrap_or(i64::MAX),
        sha256: sha256.clone(),
        media: media.into(),
        submitted_by: user,
        submitted_at: chrono::Utc::now(),
        state: INBOX_PENDING.into(),
        decided_by: None,
        decided_at: None,
        reason: None,
        delivered_at: None,
        placed_as: None,
        sealed_path: path.display().to_string(),
    };
    if let Err(e) = state.store.insert_inbox(&row).await {
        let _ = tokio::fs::remove_file(&path).await;
        return Err(e.into());
    }
    let detail = serde_json::json!({
        "fileName": file_name, "size": bytes.len(), "sha256": sha256, "media": media,
        "sealing": cfg.sealer.scheme(),
    });
    Ok(noted((StatusCode::CREATED, Json(row)), object(&project, &workspace, id), detail))
}

/// Query of `GET /v1/projects/{project}/inbox`.
pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(project): Path<String>,
) -> Result<Json<Vec<InboxRow>>, ApiError> {
    person(&principal, &project)?;
    Ok(Json(state.store.inbox_items(&project, MAX_LIST).await?))
}

async fn decide(
    state: AppState,
    principal: Principal,
    project: String,
    id: String,
    body: OptionalDecision,
    decision: &'static str,
) -> Result<Response, ApiError> {
    let user = person(&principal, &project)?;
    let id = parse_id(&id)?;
    let reason = body.0.unwrap_or_default().reason;
    if decision == INBOX_REJECTED && reason.trim().is_empty() {
        return Err(ApiError::invalid("reasonRequired", "a rejection needs a reason ({\"reason\": \"...\"})"));
    }
    if reason.len() > MAX_REASON {
        return Err(ApiError::invalid("invalidReason", format!("reason is longer than {MAX_REASON} characters")));
    }
    let item = match state.store.inbox_item(id).await? {
        Some(item) if item.project == project => item,
        _ => return Err(ApiError::not_found(format!("inbox item {id} not found in project {project}"))),
    };
    let object = object(&project, &item.workspace, id);
    if item.submitted_by == user {
        return Err(ApiError::forbidden(
            "selfApproval",
            format!("{user} submitted inbox item {id} ({:?}) and may not decide on it", item.file_name),
        ));
    }
    if item.state != INBOX_PENDING {
        let same = item.state == decision || (decision == INBOX_APPROVED && item.state == INBOX_DELIVERED);
        if same {
            let detail = serde_json::json!({"alreadyDecided": true, "state": item.state});
            return Ok(noted(Json(item), object, detail));
        }
        return Err(ApiError::conflict("alreadyDecided", format!("inbox item {id} is already {}", item.state)));
    }
    if !state.store.decide_inbox(id, decision, &user, &reason).await? {
        return Err(ApiError::conflict("alreadyDecided", format!("inbox item {id} was decided meanwhile")));
    }
    let item =
        state.store.inbox_item(id).await?.ok_or_else(|| ApiError::Internal(format!("inbox item {id} vanished")))?;
    let detail = serde_json::json!({
        "fileName": item.file_name, "sha256": item.sha256, "submittedBy": item.submitted_by, "reason": reason,
    });
    Ok(noted(Json(item), object, detail))
}

pub async fn approve(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((project, id)): Path<(String, String)>,
    body: OptionalDecision,
) -> Result<Response, ApiError> {
    decide(state, principal, project, id, body, INBOX_APPROVED).await
}

pub async fn reject(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((project, id)): Path<(String, String)>,
    body: OptionalDecision,
) -> Result<Response, ApiError> {
    decide(state, principal, project, id, body, INBOX_REJECTED).await
}

pub async fn agent_list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Vec<InboxItem>>, ApiError> {
    let ws = agent(&principal)?;
    let rows = state.store.inbox_to_deliver(ws, MAX_AGENT_LIST).await?;
    let items = rows
        .into_iter()
        .filter_map(|r| {
            Some(InboxItem {
                id: Uuid::parse_str(&r.id).ok()?,
                file_name: r.file_name,
                size: u64::try_from(r.size).ok()?,
                sha256: r.sha256,
            })
        })
        .collect();
    Ok(Json(items))
}

/// The item of this agent's workspace with that id, in the state given.
async fn agent_item(state: &AppState, ws: &WorkspaceIdentity, id: Uuid) -> Result<InboxRow, ApiError> {
    match state.store.inbox_item(id).await? {
        Some(item) if item.project == ws.project && item.workspace == ws.name => Ok(item),
        _ => Err(ApiError::not_found(format!("inbox item {id} not found for this workspace"))),
    }
}

/// `GET /v1/agent/inbox/{id}/content`: the approved bytes, checked against the SHA-256 recorded
/// at submission before they are sent.
pub async fn agent_content(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let ws = agent(&principal)?.clone();
    let id = parse_id(&id)?;
    let item = agent_item(&state, &ws, id).await?;
    if item.state != INBOX_APPROVED {
        return Err(ApiError::conflict("notApproved", format!("inbox item {id} is {}, not approved", item.state)));
    }
    let sealer = state.config.inbox.sealer.clone();
    let bytes = content::load(sealer.as_ref(), std::path::Path::new(&item.sealed_path), &ws.project, &ws.name, id)
        .await
        .map_err(|e| ApiError::Internal(format!("inbox item {id}: {e}")))?;
    let got = hex::encode(Sha256::digest(&bytes));
    if got != item.sha256 {
        tracing::error!(%id, stored = %got, recorded = %item.sha256, "inbox content does not match its hash; not sent");
        return Err(ApiError::Internal(format!(
            "inbox item {id}: stored content has SHA-256 {got}, recorded {}",
            item.sha256
        )));
    }
    let mut response = (StatusCode::OK, bytes).into_response();
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/octet-stream"));
    if let Ok(v) = http::HeaderValue::from_str(&item.sha256) {
        headers.insert("x-noexit-sha256", v);
    }
    let detail = serde_json::json!({"fileName": item.file_name, "size": item.size, "sha256": item.sha256});
    Ok(noted(response, object(&ws.project, &ws.name, id), detail))
}

pub async fn agent_delivered(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    super::body::StrictJson(body): super::body::StrictJson<InboxDelivered>,
) -> Result<Response, ApiError> {
    let ws = agent(&principal)?.clone();
    let id = parse_id(&id)?;
    let item = agent_item(&state, &ws, id).await?;
    let object = object(&ws.project, &ws.name, id);
    if body.sha256 != item.sha256 {
        return Err(ApiError::bad(
            StatusCode::UNPROCESSABLE_ENTITY,
            "hashMismatch",
            format!("the agent placed SHA-256 {}; inbox item {id} has {}", body.sha256, item.sha256),
        ));
    }
    if body.placed_as.is_empty() || body.placed_as.len() > 1024 {
        return Err(ApiError::invalid("invalidPlacedAs", "placedAs must be 1 to 1024 bytes"));
    }
    match item.state.as_str() {
        INBOX_DELIVERED => {
            let detail = serde_json::json!({"alreadyDelivered": true, "placedAs": item.placed_as});
            return Ok(noted(Json(item), object, detail));
        }
        INBOX_APPROVED => {}
        other => return Err(ApiError::conflict("notApproved", format!("inbox item {id} is {other}, not approved"))),
    }
    if !state.store.mark_inbox_delivered(id, &body.placed_as).await? {
        return Err(ApiError::conflict("notApproved", format!("inbox item {id} changed meanwhile")));
    }
    let item = agent_item(&state, &ws, id).await?;
    let detail = serde_json::json!({"fileName": item.file_name, "placedAs": body.placed_as, "sha256": item.sha256});
    Ok(noted(Json(item), object, detail))
}
