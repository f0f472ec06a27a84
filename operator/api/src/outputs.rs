//! The airlock's endpoints for people (review, decisions, withdrawal, download, receipts) and
//! for agents (the decisions on their workspace's outputs). Who may do what in which state is
//! [`noexit_airlock::lifecycle::transition`]; this module loads the facts, asks it, and stores
//! the answer with a compare-and-set (retrying when another reviewer came first).

use std::path::PathBuf;

use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use noexit_airlock::checks::{self, Report};
use noexit_airlock::lifecycle::{self, Actor, Decision, Event, Facts, Refusal};
use noexit_airlock::receipt::{self, RECEIPT_VERSION, Receipt, ReceiptReview, ReviewDecision, SignedReceipt};
use noexit_airlock::seal::{self, SealKey};
use noexit_crds::Role;
use noexit_crds::agent::WorkspaceIdentity;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::AppState;
use super::error::ApiError;
use super::guard::{AuditNote, Principal, noted};
use super::output_store::{OutputRequestRow, Redeemed, ReviewRow};
use super::people::OptionalDecision;

/// Keys and settings of the airlock.
#[derive(Clone, Debug)]
pub struct Airlock {
    /// Seals stored content (`noexit_airlock::seal`).
    pub seal: SealKey,
    /// Signs release receipts (the API's audit key).
    pub signer: ed25519_dalek::SigningKey,
    /// How long a download link lives.
    pub link_ttl: chrono::Duration,
}

impl Airlock {
    /// Fresh random keys (tests, and state built without `run`).
    pub fn ephemeral() -> Self {
        Self {
            seal: SealKey::generate(),
            signer: ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng),
            link_ttl: chrono::Duration::minutes(5),
        }
    }
}

/// Audit object of a request.
pub fn object_of(row: &OutputRequestRow) -> String {
    format!("output:{}/{}/{}", row.project, row.workspace, row.id)
}

/// An error response that still names the object for the audit entry.
fn refused(e: ApiError, object: String, detail: serde_json::Value) -> Response {
    let mut response = e.into_response();
    response.extensions_mut().insert(AuditNote { object: Some(object), detail });
    response
}

fn refusal_error(r: &Refusal) -> ApiError {
    let status = match r {
        Refusal::SelfReview { .. } | Refusal::NotAChecker { .. } | Refusal::NotTheRequester { .. } => {
            StatusCode::FORBIDDEN
        }
        Refusal::SystemOnly { .. } => StatusCode::FORBIDDEN,
        Refusal::ReasonRequired { .. } => StatusCode::BAD_REQUEST,
        Refusal::WrongState { .. } | Refusal::AlreadyReviewed { .. } => StatusCode::CONFLICT,
    };
    match status {
        StatusCode::FORBIDDEN => ApiError::forbidden(r.code(), r.to_string()),
        s => ApiError::bad(s, r.code(), r.to_string()),
    }
}

struct Caller {
    user: String,
    roles: Vec<Role>,
}

impl Caller {
    fn of(principal: &Principal, project: &str) -> Result<Self, ApiError> {
        match principal {
            Principal::Person { user, project: p, roles, .. } if p == project => {
                Ok(Self { user: user.clone(), roles: roles.clone() })
            }
            Principal::Person { .. } => {
                Err(ApiError::forbidden("wrongProject", format!("not authorised for project {project}")))
            }
            _ => Err(ApiError::forbidden("notAPerson", "this endpoint is for people with a bearer token")),
        }
    }

    fn checker(&self) -> bool {
        self.roles.contains(&Role::OutputChecker)
    }

    /// Output checkers, admins and auditors see every request of the project; others their own.
    fn sees_all(&self) -> bool {
        self.roles.iter().any(|r| matches!(r, Role::OutputChecker | Role::Admin | Role::Auditor))
    }
}

async fn load(state: &AppState, project: &str, id: &str) -> Result<OutputRequestRow, ApiError> {
    let uuid = Uuid::parse_str(id)
        .map_err(|_| ApiError::invalid("invalidId", format!("{id:?} is not an output request id")))?;
    match state.store.output_request(uuid).await? {
        Some(row) if row.project == project => Ok(row),
        _ => Err(ApiError::not_found(format!("output request {id} not found in project {project}"))),
    }
}

/// Approvals release needs, from the project (at least 1).
async fn required_reviewers(state: &AppState, project: &str) -> Result<u32, ApiError> {
    let p = state.cluster.project(project).await?;
    Ok(p.map(|p| p.spec.output.reviewers).unwrap_or(2).max(1))
}

/// The checks' settings from the project's `spec.output`.
pub fn check_policy(project: Option<&noexit_crds::Project>) -> checks::Policy {
    let mut policy = checks::Policy::default();
    if let Some(p) = project {
        policy.min_cell_count = p.spec.output.min_cell_count;
        policy.zeros_disclosive = p.spec.output.zeros_disclosive;
    }
    policy
}

/// A request as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutputView {
    pub id: String,
    pub project: String,
    pub workspace: String,
    pub file_name: String,
    pub size: i64,
    pub sha256: String,
    pub requester: String,
    /// The workspace's local user who owned the file.
    pub submitted_by: String,
    pub state: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The control plane's checks (absent until the content arrived).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks: Option<Report>,
    /// The agent's own scan, for reference only.
    pub agent_scan: serde_json::Value,
    pub reviews: Vec<ReviewRow>,
    pub approvals: u32,
    pub reviewers_required: u32,
    /// For a sidecar (`<file>.sdc.json`) or ACRO `results.json` (`*`): the file it describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub companion_of: Option<String>,
    pub content_deleted: bool,
}

fn approvals(reviews: &[ReviewRow]) -> u32 {
    reviews.iter().filter(|r| r.decision == Decision::Approve.as_str()).count() as u32
}

pub fn view(row: &OutputRequestRow, reviews: Vec<ReviewRow>, required: u32) -> OutputView {
    OutputView {
        id: row.id.clone(),
        project: row.project.clone(),
        workspace: row.workspace.clone(),
        file_name: row.file_name.clone(),
        size: row.size,
        sha256: row.sha256.clone(),
        requester: row.requester().to_owned(),
        submitted_by: row.submitted_by.clone(),
        state: row.state.clone(),
        created_at: row.created_at,
        updated_at: row.since(),
        checks: row.report.as_deref().and_then(|r| serde_json::from_str(r).ok()),
        agent_scan: serde_json::from_str(&row.scan).unwrap_or_default(),
        approvals: approvals(&reviews),
        reviews,
        reviewers_required: required,
        companion_of: row.companion_of.clone(),
        content_deleted: row.content_deleted_at.is_some(),
    }
}

/// `?state=` of a list: only requests in that state.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    pub state: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(project): Path<String>,
    axum::extract::Query(query): axum::extract::Query<ListQuery>,
) -> Result<Json<Vec<OutputView>>, ApiError> {
    let caller = Caller::of(&principal, &project)?;
    if let Some(s) = &query.state
        && lifecycle::State::parse(s).is_none()
    {
        let names: Vec<&str> = lifecycle::State::ALL.iter().map(|s| s.as_str()).collect();
        return Err(ApiError::invalid("invalidQuery", format!("state {s:?} is not one of {}", names.join(", "))));
    }
    let only = (!caller.sees_all()).then_some(caller.user.as_str());
    let required = required_reviewers(&state, &project).await?;
    let mut rows = state.store.output_requests(&project, only).await?;
    if let Some(s) = &query.state {
        rows.retain(|r| &r.state == s);
    }
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let reviews = state.store.reviews(&row.id).await?;
        out.push(view(&row, reviews, required));
    }
    Ok(Json(out))
}

/// The row, if the caller may see it (others get the same 404 as a missing request).
async fn visible(state: &AppState, caller: &Caller, project: &str, id: &str) -> Result<OutputRequestRow, ApiError> {
    let row = load(state, project, id).await?;
    if !caller.sees_all() && row.requester() != caller.user {
        return Err(ApiError::not_found(format!("output request {id} not found in project {project}")));
    }
    Ok(row)
}

pub async fn get(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((project, id)): Path<(String, String)>,
) -> Result<Json<OutputView>, ApiError> {
    let caller = Caller::of(&principal, &project)?;
    let row = visible(&state, &caller, &project, &id).await?;
    let required = required_reviewers(&state, &project).await?;
    let reviews = state.store.reviews(&row.id).await?;
    Ok(Json(view(&row, reviews, required)))
}

/// Open a request's sealed content and check it against the submitted size and SHA-256.
pub async fn open_verified(state: &AppState, row: &OutputRequestRow) -> Result<Vec<u8>, ApiError> {
    let object = object_of(row);
    if row.content_deleted_at.is_some() {
        return Err(ApiError::bad(
            StatusCode::GONE,
            "contentDeleted",
            format!("{object}: content deleted after retention"),
        ));
    }
    let Some(path) = row.content_path.clone() else {
        return Err(ApiError::conflict("noContent", format!("{object}: content not received yet")));
    };
    let key = state.airlock.seal.clone();
    let aad = row.id.clone();
    let opened = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, seal::SealError> {
        let file = std::fs::File::open(PathBuf::from(&path))?;
        let mut out = Vec::new();
        seal::open(&key, aad.as_bytes(), std::io::BufReader::new(file), &mut out)?;
        Ok(out)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("opening {object}: {e}")))?;
    let integrity = |why: String| {
        ApiError::bad(
            StatusCode::CONFLICT,
            "integrityCheckFailed",
            format!("{object}: stored content does not match what was submitted ({why}); it is not served"),
        )
    };
    let bytes = match opened {
        Ok(b) => b,
        Err(seal::SealError::Io(e)) => return Err(ApiError::Internal(format!("{object}: {e}"))),
        Err(e) => return Err(integrity(e.to_string())),
    };
    let got = hex::encode(Sha256::digest(&bytes));
    if got != row.sha256 || u64::try_from(row.size).ok() != Some(bytes.len() as u64) {
        return Err(integrity(format!("SHA-256 {got}, {} bytes", bytes.len())));
    }
    Ok(bytes)
}

fn content_type(file_name: &str) -> &'static str {
    let lower = file_name.to_ascii_lowercase();
    match lower.rsplit('.').next() {
        Some("csv") => "text/csv; charset=utf-8",
        Some("tsv") => "text/tab-separated-values; charset=utf-8",
        Some("txt" | "md" | "log") => "text/plain; charset=utf-8",
        Some("json") => "application/json",
        Some("png") => "image/png",
        // SVG is shown as text: served as an image it could run script in a reviewer's browser.
        Some("svg") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn attachment(file_name: &str) -> String {
    let base = file_name.rsplit('/').next().unwrap_or(file_name);
    let safe: String =
        base.chars().map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' { c } else { '_' }).collect();
    format!("attachment; filename=\"{safe}\"")
}

/// `GET …/outputs/{id}/content`: the file for a reviewer (checkers only, by the table).
pub async fn content(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((project, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let _caller = Caller::of(&principal, &project)?;
    let row = load(&state, &project, &id).await?;
    let object = object_of(&row);
    let bytes = match open_verified(&state, &row).await {
        Ok(b) => b,
        Err(e) => return Ok(refused(e, object, serde_json::json!({"sha256": row.sha256}))),
    };
    let mut response = bytes.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(&row.file_name)));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("default-src 'none'; sandbox"));
    if let Ok(v) = HeaderValue::from_str(&attachment(&row.file_name)) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(noted(response, object, serde_json::json!({"purpose": "review", "sha256": row.sha256})))
}

/// `GET …/outputs/{id}/review`: the review page (checkers): the checks, ACRO's verdicts and
/// the file (a CSV/TSV as a table with the failing cells marked), as self-contained HTML with
/// no script (`noexit_airlock::render::review_html`; everything from the file is escaped).
pub async fn review_page(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((project, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let _caller = Caller::of(&principal, &project)?;
    let row = load(&state, &project, &id).await?;
    let object = object_of(&row);
    let bytes = match open_verified(&state, &row).await {
        Ok(b) => b,
        Err(e) => return Ok(refused(e, object, serde_json::json!({"sha256": row.sha256}))),
    };
    let report: Report = row.report.as_deref().and_then(|r| serde_json::from_str(r).ok()).unwrap_or(Report {
        verdict: checks::Verdict::Review,
        results: vec![],
        acro: vec![],
    });
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>review</title></head><body>{}</body></html>",
        noexit_airlock::render::review_html(&row.file_name, &bytes, &report)
    );
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox"),
    );
    Ok(noted(response, object, serde_json::json!({"purpose": "review", "sha256": row.sha256})))
}

/// Most attempts at a compare-and-set before giving up (each loser re-reads the new state).
const CAS_ATTEMPTS: usize = 16;

/// Apply `event` by `actor` to the request, storing `review` with it. Returns the new row.
async fn apply(
    state: &AppState,
    project: &str,
    id: &str,
    actor: Actor<'_>,
    event: Event<'_>,
    review: Option<ReviewRow>,
) -> Result<(OutputRequestRow, Vec<ReviewRow>), (ApiError, Option<String>)> {
    let required = required_reviewers(state, project).await.map_err(|e| (e, None))?;
    for _ in 0..CAS_ATTEMPTS {
        let row = load(state, project, id).await.map_err(|e| (e, None))?;
        let reviews = state.store.reviews(&row.id).await.map_err(|e| (e.into(), Some(object_of(&row))))?;
        let reviewers: Vec<&str> = reviews.iter().map(|r| r.reviewer.as_str()).collect();
        let facts = Facts {
            state: row.life(),
            requester: row.requester(),
            reviewers: &reviewers,
            approvals: approvals(&reviews),
            required,
        };
        let next =
            lifecycle::transition(&facts, actor, event).map_err(|r| (refusal_error(&r), Some(object_of(&row))))?;
        if state
            .store
            .change_state(&row.id, row.version, next, review.as_ref(), None)
            .await
            .map_err(|e| (e.into(), Some(object_of(&row))))?
        {
            let row = load(state, project, id).await.map_err(|e| (e, None))?;
            let reviews = state.store.reviews(&row.id).await.map_err(|e| (e.into(), None))?;
            super::output_mirror::render_and_write(state, &row, reviews.clone(), required).await;
            return Ok((row, reviews));
        }
    }
    Err((ApiError::Unavailable(format!("output request {id}: too many concurrent changes")), None))
}

async fn review(
    state: AppState,
    principal: Principal,
    project: String,
    id: String,
    body: Option<super::people::DecisionBody>,
    decision: Decision,
) -> Result<Response, ApiError> {
    let caller = Caller::of(&principal, &project)?;
    let reason = body.unwrap_or_default().reason;
    let object_guess = format!("output:{project}/?/{id}");
    if reason.len() > lifecycle::MAX_REASON {
        let e =
            ApiError::invalid("invalidReason", format!("reason is longer than {} characters", lifecycle::MAX_REASON));
        return Ok(refused(e, object_guess, serde_json::json!({"decision": decision.as_str()})));
    }
    let actor = Actor::Person { user: &caller.user, checker: caller.checker() };
    let record = ReviewRow {
        request_id: id.clone(),
        reviewer: caller.user.clone(),
        decision: decision.as_str().into(),
        reason: reason.clone(),
        at: Utc::now(),
    };
    let detail = serde_json::json!({"decision": decision.as_str(), "reason": reason});
    match apply(&state, &project, &id, actor, Event::Review { decision, reason: &reason }, Some(record)).await {
        Ok((row, reviews)) => {
            let required = required_reviewers(&state, &project).await?;
            let object = object_of(&row);
            let mut detail = detail;
            detail["state"] = serde_json::json!(row.state);
            Ok(noted(Json(view(&row, reviews, required)), object, detail))
        }
        Err((e, object)) => Ok(refused(e, object.unwrap_or(object_guess), detail)),
    }
}

pub async fn approve(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((project, id)): Path<(String, String)>,
    OptionalDecision(body): OptionalDecision,
) -> Result<Response, ApiError> {
    review(state, principal, project, id, body, Decision::Approve).await
}

pub async fn reject(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((project, id)): Path<(String, String)>,
    OptionalDecision(body): OptionalDecision,
) -> Result<Response, ApiError> {
    review(state, principal, project, id, body, Decision::Reject).await
}

pub async fn request_changes(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((project, id)): Path<(String, String)>,
    OptionalDecision(body): OptionalDecision,
) -> Result<Response, ApiError> {
    review(state, principal, project, id, body, Decision::RequestChanges).await
}

pub async fn withdraw(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((project, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let caller = Caller::of(&principal, &project)?;
    let actor = Actor::Person { user: &caller.user, checker: caller.checker() };
    match apply(&state, &project, &id, actor, Event::Withdraw, None).await {
        Ok((row, reviews)) => {
            let required = required_reviewers(&state, &project).await?;
            Ok(noted(Json(view(&row, reviews, required)), object_of(&row), serde_json::json!({"state": row.state})))
        }
        Err((e, object)) => {
            Ok(refused(e, object.unwrap_or_else(|| format!("output:{project}/?/{id}")), serde_json::json!({})))
        }
    }
}

/// Body of a new download link.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DownloadLink {
    /// Path on this API (GET it with the same bearer token) — once.
    pub url: String,
    pub expires_at: DateTime<Utc>,
}

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// `POST …/outputs/{id}/download-link`: the requester, once approved.
pub async fn download_link(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((project, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let caller = Caller::of(&principal, &project)?;
    let row = load(&state, &project, &id).await?;
    let object = object_of(&row);
    if row.requester() != caller.user {
        let e = ApiError::forbidden("notTheRequester", format!("only {} may download {object}", row.requester()));
        return Ok(refused(e, object, serde_json::json!({})));
    }
    if row.life() != lifecycle::State::Approved {
        let e = ApiError::conflict("wrongState", format!("{object} is {}; only approved outputs download", row.state));
        return Ok(refused(e, object, serde_json::json!({"state": row.state})));
    }
    let mut raw = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let expires_at = Utc::now() + state.airlock.link_ttl;
    state.store.insert_download_token(&token_hash(&token), &row.id, &caller.user, expires_at).await?;
    let link = DownloadLink { url: format!("/v1/downloads/{token}?project={project}"), expires_at };
    // The token itself never reaches the log: its hash names it.
    let detail = serde_json::json!({"tokenSha256": token_hash(&token), "expiresAt": expires_at});
    Ok(noted((StatusCode::CREATED, Json(link)), object, detail))
}

/// Header carrying the signed receipt (base64 of its JSON) with the downloaded bytes.
pub const RECEIPT_HEADER: &str = "x-noexit-receipt";

fn build_receipt(row: &OutputRequestRow, reviews: &[ReviewRow], released_at: DateTime<Utc>) -> Receipt {
    Receipt {
        version: RECEIPT_VERSION,
        project: row.project.clone(),
        workspace: row.workspace.clone(),
        requester: row.requester().to_owned(),
        file_name: row.file_name.rsplit('/').next().unwrap_or(&row.file_name).to_owned(),
        size: u64::try_from(row.size).unwrap_or(0),
        sha256: row.sha256.clone(),
        checks: row.report.as_deref().and_then(|r| serde_json::from_str(r).ok()).unwrap_or(Report {
            verdict: checks::Verdict::Review,
            results: vec![],
            acro: vec![],
        }),
        reviews: reviews
            .iter()
            .map(|r| ReceiptReview {
                reviewer: r.reviewer.clone(),
                decision: match Decision::parse(&r.decision) {
                    Some(Decision::Approve) => ReviewDecision::Approved,
                    Some(Decision::Reject) => ReviewDecision::Rejected,
                    _ => ReviewDecision::ChangesRequested,
                },
                reason: (!r.reason.is_empty()).then(|| r.reason.clone()),
                at: r.at,
            })
            .collect(),
        released_at,
        // Set by `receipt::sign`.
        key_id: String::new(),
    }
}

/// `GET /v1/downloads/{token}?project=P`: the bytes, once, verified before the first byte.
pub async fn download(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(token): Path<String>,
) -> Result<Response, ApiError> {
    let project = match &principal {
        Principal::Person { project, .. } => project.clone(),
        _ => return Err(ApiError::forbidden("notAPerson", "this endpoint is for people with a bearer token")),
    };
    let caller = Caller::of(&principal, &project)?;
    let unknown = || ApiError::not_found(format!("no such download link in project {project}"));
    let Some(t) = state.store.download_token(&token_hash(&token)).await? else {
        return Ok(refused(
            unknown(),
            format!("project:{project}"),
            serde_json::json!({"tokenSha256": token_hash(&token)}),
        ));
    };
    let row = match load(&state, &project, &t.request_id).await {
        Ok(row) => row,
        Err(_) => {
            return Ok(refused(
                unknown(),
                format!("project:{project}"),
                serde_json::json!({"tokenSha256": t.token_hash}),
            ));
        }
    };
    let object = object_of(&row);
    let hash = token_hash(&token);
    let detail = serde_json::json!({"tokenSha256": hash});
    let fail = |e: ApiError| Ok(refused(e, object.clone(), detail.clone()));
    let now = Utc::now();
    match state.store.redeem_download_token(&hash, &row.id, &caller.user, now).await? {
        Redeemed::Fresh(_) => {}
        Redeemed::Unknown => {
            return fail(ApiError::not_found(format!("no such download link for {object}")));
        }
        Redeemed::Used(t) => {
            let used = t.used_at.map(|u| u.to_rfc3339()).unwrap_or_default();
            return fail(ApiError::bad(
                StatusCode::GONE,
                "linkUsed",
                format!("this link to {object} was used at {used}"),
            ));
        }
        Redeemed::Expired(t) => {
            return fail(ApiError::bad(
                StatusCode::GONE,
                "linkExpired",
                format!("this link to {object} expired at {}", t.expires_at.to_rfc3339()),
            ));
        }
    }
    let bytes = match open_verified(&state, &row).await {
        Ok(b) => b,
        Err(e) => return fail(e),
    };
    let reviews = state.store.reviews(&row.id).await?;
    let facts = Facts {
        state: row.life(),
        requester: row.requester(),
        reviewers: &[],
        approvals: approvals(&reviews),
        required: 1,
    };
    let actor = Actor::Person { user: &caller.user, checker: caller.checker() };
    if let Err(r) = lifecycle::transition(&facts, actor, Event::Release) {
        return fail(refusal_error(&r));
    }
    let signed = receipt::sign(&build_receipt(&row, &reviews, now), &state.airlock.signer);
    let receipt_json = serde_json::to_string(&signed).map_err(|e| ApiError::Internal(e.to_string()))?;
    if !state.store.change_state(&row.id, row.version, lifecycle::State::Released, None, Some(&receipt_json)).await? {
        return fail(ApiError::conflict("wrongState", format!("{object} changed while it was being released")));
    }
    super::output_mirror::mirror(&state, &row.project, &row.id).await;
    let mut response = bytes.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    if let Ok(v) = HeaderValue::from_str(&attachment(&row.file_name)) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(receipt_json.as_bytes());
    if let Ok(v) = HeaderValue::from_str(&encoded) {
        headers.insert(RECEIPT_HEADER, v);
    }
    let detail = serde_json::json!({
        "tokenSha256": hash, "sha256": row.sha256, "size": row.size, "signature": signed.signature,
    });
    Ok(noted(response, object, detail))
}

/// `GET …/outputs/{id}/receipt`.
pub async fn receipt(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((project, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let caller = Caller::of(&principal, &project)?;
    let row = visible(&state, &caller, &project, &id).await?;
    let object = object_of(&row);
    let Some(text) = state.store.receipt(&row.id).await? else {
        return Ok(refused(
            ApiError::not_found(format!("{object} has no receipt (not released)")),
            object,
            serde_json::json!({}),
        ));
    };
    let signed: SignedReceipt =
        serde_json::from_str(&text).map_err(|e| ApiError::Internal(format!("{object}: {e}")))?;
    Ok(noted(Json(signed), object, serde_json::json!({})))
}

/// One entry of `GET /v1/agent/outputs` (the agent writes it to `/outbox/.decisions/`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentOutput {
    pub id: String,
    pub file_name: String,
    pub state: String,
    pub reasons: Vec<AgentReason>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentReason {
    pub reviewer: String,
    pub decision: String,
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// The decisions on this workspace's outputs (pure).
pub fn agent_outputs(rows: &[OutputRequestRow], reviews: &[ReviewRow]) -> Vec<AgentOutput> {
    rows.iter()
        .map(|row| AgentOutput {
            id: row.id.clone(),
            file_name: row.file_name.clone(),
            state: row.state.clone(),
            reasons: reviews
                .iter()
                .filter(|r| r.request_id == row.id)
                .map(|r| AgentReason {
                    reviewer: r.reviewer.clone(),
                    decision: r.decision.clone(),
                    reason: r.reason.clone(),
                    at: r.at,
                })
                .collect(),
            updated_at: row.since(),
        })
        .collect()
}

pub async fn agent_list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Vec<AgentOutput>>, ApiError> {
    let Principal::Agent { id, .. } = &principal else {
        return Err(ApiError::forbidden("notAnAgent", "only workspace agents may call this endpoint"));
    };
    let ws: &WorkspaceIdentity = id;
    let rows = state.store.workspace_outputs(ws).await?;
    let reviews = state.store.workspace_reviews(ws).await?;
    Ok(Json(agent_outputs(&rows, &reviews)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, file: &str, state: &str) -> OutputRequestRow {
        let at = chrono::DateTime::parse_from_rfc3339("2026-12-07T10:00:00Z").unwrap().with_timezone(&Utc);
        OutputRequestRow {
            id: id.into(),
            project: "ward-7".into(),
            workspace: "alice-r".into(),
            file_name: file.into(),
            size: 10,
            sha256: "a".repeat(64),
            submitted_by: "alice".into(),
            scan: "{}".into(),
            state: state.into(),
            content_path: None,
            requester: Some("alice@x".into()),
            report: None,
            version: 0,
            state_since: Some(at),
            content_deleted_at: None,
            companion_of: None,
            created_at: at,
            uploaded_at: None,
        }
    }

    #[test]
    fn the_agent_gets_each_output_with_its_reviews_in_the_agreed_shape() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-12-07T11:00:00Z").unwrap().with_timezone(&Utc);
        let review = |id: &str, who: &str, decision: &str, reason: &str| ReviewRow {
            request_id: id.into(),
            reviewer: who.into(),
            decision: decision.into(),
            reason: reason.into(),
            at,
        };
        let rows = [row("1", "table.csv", "rejected"), row("2", "summary.csv", "checked")];
        let reviews = [review("1", "bob@x", "reject", "cell of 7"), review("3", "eve@x", "approve", "")];
        let got = serde_json::to_value(agent_outputs(&rows, &reviews)).unwrap();
        assert_eq!(
            got,
            serde_json::json!([
                {"id": "1", "fileName": "table.csv", "state": "rejected", "updatedAt": "2026-12-07T10:00:00Z",
                 "reasons": [{"reviewer": "bob@x", "decision": "reject", "reason": "cell of 7", "at": "2026-12-07T11:00:00Z"}]},
                {"id": "2", "fileName": "summary.csv", "state": "checked", "updatedAt": "2026-12-07T10:00:00Z", "reasons": []},
            ])
        );
    }

    #[test]
    fn refusals_map_to_statuses_and_codes() {
        let cases = [
            (Refusal::SelfReview { user: "a".into() }, StatusCode::FORBIDDEN, "selfReview"),
            (Refusal::NotAChecker { user: "a".into() }, StatusCode::FORBIDDEN, "notAChecker"),
            (Refusal::NotTheRequester { event: "withdraw" }, StatusCode::FORBIDDEN, "notTheRequester"),
            (Refusal::ReasonRequired { decision: "reject" }, StatusCode::BAD_REQUEST, "reasonRequired"),
            (Refusal::AlreadyReviewed { user: "a".into() }, StatusCode::CONFLICT, "alreadyReviewed"),
            (
                Refusal::WrongState { state: lifecycle::State::Released, event: "approve" },
                StatusCode::CONFLICT,
                "wrongState",
            ),
        ];
        for (r, status, code) in cases {
            let e = refusal_error(&r);
            assert_eq!((e.status(), e.code()), (status, code), "{r}");
        }
    }

    #[test]
    fn served_files_get_safe_types_and_plain_attachment_names() {
        assert_eq!(content_type("t.CSV"), "text/csv; charset=utf-8");
        assert_eq!(content_type("plot.svg"), "text/plain; charset=utf-8", "SVG never runs as an image");
        assert_eq!(content_type("x.html"), "application/octet-stream");
        assert_eq!(attachment("out/table.csv"), "attachment; filename=\"table.csv\"");
        assert_eq!(attachment("a\"b\\c\n.csv"), "attachment; filename=\"a_b_c_.csv\"");
    }
}
