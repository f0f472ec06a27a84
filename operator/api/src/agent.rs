//! Agent endpoints (mTLS): events, heartbeats, outbox submissions. Wire types are in
//! `noexit_crds::agent`.

use std::path::{Path, PathBuf};

use axum::Json;
use axum::extract::{Extension, Path as UrlPath, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use http_body_util::BodyExt;
use noexit_airlock::lifecycle::State as Life;
use noexit_crds::agent::{
    AgentEvent, EventBatch, EventBatchAck, EventKind, Heartbeat, OutboxAck, OutboxManifest, WorkspaceIdentity,
};
use noexit_crds::workspace::AgentReport;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use super::AppState;
use super::body::{StrictJson, content_type_is, wrong_content_type};
use super::error::ApiError;
use super::guard::{PeerInfo, Principal, noted};
use super::output_store::{NewOutput, OutputRequestRow};
use super::store::StoreError;
use noexit_audit::{AuditEvent, Outcome};

/// Most events one batch may carry.
pub const MAX_BATCH: usize = 1000;

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

fn agent(principal: &Principal) -> Result<&WorkspaceIdentity, ApiError> {
    match principal {
        Principal::Agent { id, .. } => Ok(id),
        _ => Err(ApiError::forbidden("notAnAgent", "only workspace agents may call this endpoint")),
    }
}

fn object(id: &WorkspaceIdentity) -> String {
    format!("workspace:{}/{}", id.project, id.name)
}

fn name_of<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "unknown".into(),
    }
}

/// The audit entry for one agent event. Violations are recorded as refused: they are attempts the
/// workspace's walls stopped.
pub fn event_entry(id: &WorkspaceIdentity, source: Option<String>, ev: &AgentEvent) -> AuditEvent {
    let (action, outcome) = match &ev.kind {
        EventKind::Session(s) => (format!("agent.session.{}", name_of(&s.action)), Outcome::Allowed),
        EventKind::Violation(v) => {
            let kind = name_of(&v.kind);
            (format!("agent.violation.{kind}"), Outcome::Refused(format!("{kind}: {}", v.detail)))
        }
    };
    AuditEvent {
        actor: object(id),
        role: Some("agent".into()),
        action,
        object: object(id),
        outcome,
        source,
        detail: serde_json::to_value(ev).unwrap_or_default(),
    }
}

pub async fn events(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Extension(peer): Extension<PeerInfo>,
    StrictJson(batch): StrictJson<EventBatch>,
) -> Result<Json<EventBatchAck>, ApiError> {
    let id = agent(&principal)?;
    if batch.events.len() > MAX_BATCH {
        return Err(ApiError::bad(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batchTooLarge",
            format!("{} events in one batch; at most {MAX_BATCH}", batch.events.len()),
        ));
    }
    let (mut accepted, mut duplicates) = (0u32, 0u32);
    for ev in &batch.events {
        // Table and log are written side by side, both keyed by the event id: the event is
        // acknowledged only when both committed, and a retry after a failure of either completes
        // whichever is missing and duplicates nothing.
        let stored = async {
            match &ev.kind {
                EventKind::Session(s) => state.store.insert_session(ev.id, id, ev.at, s).await,
                EventKind::Violation(v) => state.store.insert_violation(ev.id, id, ev.at, v).await,
            }
        };
        let logged = state.audit.record_once(ev.id.to_string(), event_entry(id, peer.source(), ev));
        let (new, logged) = tokio::join!(stored, logged);
        let new = new?;
        logged?;
        if new {
            accepted += 1;
        } else {
            duplicates += 1;
        }
    }
    Ok(Json(EventBatchAck { accepted, duplicates }))
}

pub async fn heartbeat(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    StrictJson(hb): StrictJson<Heartbeat>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = agent(&principal)?;
    state.store.upsert_heartbeat(id, &hb).await?;
    let report = AgentReport {
        last_heartbeat: hb.at,
        version: hb.agent_version.clone(),
        egress_locked: hb.egress.locked,
        egress_detail: hb.egress.detail.clone(),
        active_sessions: hb.active_sessions,
        spool_depth: hb.spool_depth,
    };
    let key = (id.project.clone(), id.name.clone());
    let now = std::time::Instant::now();
    let due = {
        let reflected = state.reflected.lock().unwrap_or_else(|p| p.into_inner());
        should_reflect(reflected.get(&key), &report, now)
    };
    if due {
        // The heartbeat is stored; the status follows on the next one if the cluster is busy.
        match state.cluster.report_agent(id, report.clone()).await {
            Ok(()) => {
                let mut reflected = state.reflected.lock().unwrap_or_else(|p| p.into_inner());
                reflected.insert(key, Reflected { report, at: now });
            }
            Err(e) => {
                tracing::warn!(workspace = %object(id), error = %e, "cannot reflect the heartbeat into the Workspace status")
            }
        }
    }
    Ok(Json(serde_json::json!({})))
}

/// The last report written to a Workspace's status.
#[derive(Clone, Debug)]
pub struct Reflected {
    pub report: AgentReport,
    pub at: std::time::Instant,
}

/// Write the status again after this long even if nothing changed, so `lastHeartbeat` stays well
/// inside the controller's staleness window (60 s) while the cluster sees a third of the writes.
pub const REFLECT_EVERY: std::time::Duration = std::time::Duration::from_secs(15);

/// Whether a heartbeat must be written to the Workspace status: the first one, any change other
/// than the time, or when the last write is [`REFLECT_EVERY`] old.
pub fn should_reflect(last: Option<&Reflected>, report: &AgentReport, now: std::time::Instant) -> bool {
    let Some(last) = last else { return true };
    let same = AgentReport { last_heartbeat: report.last_heartbeat, ..last.report.clone() } == *report;
    !same || now.duration_since(last.at) >= REFLECT_EVERY
}

/// Problems with a manifest, or `None`.
pub fn check_manifest(m: &OutboxManifest, max_bytes: u64) -> Option<(&'static str, String)> {
    let name = &m.file_name;
    let bad_name = name.is_empty()
        || name.len() > 1024
        || name.starts_with('/')
        || name.contains('\0')
        || name.contains('\\')
        || name.split('/').any(|part| part.is_empty() || part == "." || part == "..");
    if bad_name {
        return Some(("invalidFileName", format!("fileName {name:?} must be a relative path without '..'")));
    }
    if m.sha256.len() != 64 || !m.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Some(("invalidHash", format!("sha256 {:?} must be 64 lower-case hex digits", m.sha256)));
    }
    if m.size > max_bytes {
        return Some(("fileTooLarge", format!("size {} exceeds the limit of {max_bytes} bytes", m.size)));
    }
    None
}

fn same_submission(row: &OutputRequestRow, m: &OutboxManifest) -> bool {
    row.file_name == m.file_name && row.sha256 == m.sha256 && u64::try_from(row.size).ok() == Some(m.size)
}

pub async fn outbox(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    StrictJson(m): StrictJson<OutboxManifest>,
) -> Result<Response, ApiError> {
    let id = agent(&principal)?;
    let object = format!("output:{}/{}/{}", id.project, id.name, m.id);
    if let Some((code, message)) = check_manifest(&m, state.config.max_upload_bytes) {
        return Err(ApiError::bad(StatusCode::UNPROCESSABLE_ENTITY, code, message));
    }
    // The request belongs to the workspace's owner (a project person); the manifest names only
    // the workspace's local user.
    let owner = match state.cluster.workspace(id).await {
        Ok(Some(ws)) => ws.spec.owner,
        _ => m.submitted_by.clone(),
    };
    let companion = super::airlock_checks::companion_of(&m.file_name);
    let new = NewOutput { ws: id, manifest: &m, requester: &owner, companion_of: companion.as_deref() };
    let row = state.store.insert_output_request(&new).await?;
    if row.project != id.project || row.workspace != id.name || !same_submission(&row, &m) {
        return Err(ApiError::conflict(
            "idempotencyConflict",
            format!("output request {} exists with a different file, size or hash", m.id),
        ));
    }
    let detail = serde_json::json!({
        "fileName": m.file_name, "size": m.size, "sha256": m.sha256,
        "submittedBy": m.submitted_by, "scan": m.scan,
    });
    super::output_mirror::mirror(&state, &row.project, &row.id).await;
    let ack = OutboxAck { id: m.id, state: row.state };
    Ok(noted((StatusCode::CREATED, Json(ack)), object, detail))
}

fn content_dir(data_dir: &Path, id: &WorkspaceIdentity) -> PathBuf {
    data_dir.join("outbox").join(&id.project).join(&id.name)
}

pub async fn outbox_content(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    UrlPath(request_id): UrlPath<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let id = agent(&principal)?.clone();
    let request_id = Uuid::parse_str(&request_id)
        .map_err(|_| ApiError::invalid("invalidId", format!("{request_id:?} is not an output request id (UUID)")))?;
    let object = format!("output:{}/{}/{}", id.project, id.name, request_id);
    if !content_type_is(&req, "application/octet-stream") {
        return Err(wrong_content_type(&req, "application/octet-stream"));
    }
    let row = match state.store.output_request(request_id).await? {
        Some(row) if row.project == id.project && row.workspace == id.name => row,
        _ => return Err(ApiError::not_found(format!("output request {request_id} not found for this workspace"))),
    };
    if row.life() != Life::Submitted {
        let ack = OutboxAck { id: request_id, state: row.state };
        return Ok(noted(Json(ack), object, serde_json::json!({"resent": true})));
    }
    let expected = u64::try_from(row.size).unwrap_or(0);
    let project = state.cluster.project(&id.project).await.ok().flatten();
    let policy = super::outputs::check_policy(project.as_ref());
    let dir = content_dir(&state.config.data_dir, &id);
    tokio::fs::create_dir_all(&dir).await.map_err(|e| ApiError::Internal(format!("{}: {e}", dir.display())))?;
    let tmp = dir.join(format!(".{request_id}.{}.part", Uuid::new_v4()));
    let keep = usize::try_from(policy.max_checked_bytes).unwrap_or(usize::MAX);
    let received = receive(req, &tmp, expected, &row.sha256, &state.airlock.seal, &row.id, keep).await;
    let plain = match received {
        Ok(plain) => plain,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
    };
    let dest = dir.join(request_id.to_string());
    tokio::fs::rename(&tmp, &dest).await.map_err(|e| ApiError::Internal(format!("{}: {e}", dest.display())))?;
    // The rename is durable only once the directory is synced.
    if let Ok(d) = tokio::fs::File::open(&dir).await {
        let _ = d.sync_all().await;
    }
    // The control plane's own checks, on the bytes it received (never the agent's scan).
    let report = super::airlock_checks::check_arrival(&state, &row, plain.as_deref(), &policy).await?;
    let report_json = serde_json::to_string(&report).map_err(|e| ApiError::Internal(e.to_string()))?;
    if !state.store.mark_checked(&row.id, row.version, &dest.display().to_string(), &report_json).await? {
        let now = state.store.output_request(request_id).await?.map(|r| r.state).unwrap_or_default();
        let ack = OutboxAck { id: request_id, state: now };
        return Ok(noted(Json(ack), object, serde_json::json!({"resent": true})));
    }
    if let Some(reason) = report.refusal() {
        // Never reviewed, never released: rejected now, content deleted, audited.
        let read = plain.as_ref().map_or(expected, |p| p.len() as u64);
        let now = if super::airlock_checks::refuse(&state, &row, row.version + 1, &dest, &reason, read).await? {
            Life::Rejected.as_str().to_owned()
        } else {
            state.store.output_request(request_id).await?.map(|r| r.state).unwrap_or_default()
        };
        let ack = OutboxAck { id: request_id, state: now };
        let detail =
            serde_json::json!({"size": expected, "sha256": row.sha256, "verdict": report.verdict, "refused": reason});
        return Ok(noted(Json(ack), object, detail));
    }
    if row.companion_of.is_some() {
        super::airlock_checks::recheck_described(&state, &row, &policy).await;
    }
    super::output_mirror::mirror(&state, &row.project, &row.id).await;
    let ack = OutboxAck { id: request_id, state: Life::Checked.as_str().into() };
    let detail = serde_json::json!({
        "size": expected, "sha256": row.sha256, "verdict": report.verdict,
        "checks": report.results.iter().map(|r| (r.check.clone(), r.verdict)).collect::<Vec<_>>(),
    });
    Ok(noted(Json(ack), object, detail))
}

/// Stream the body, sealed, to `tmp`, refusing more than `expected` bytes, then check size and
/// hash. Plaintext never touches the disk; it is kept in memory only up to `keep` bytes, for
/// the checks (`None` when the file is larger: "manual review").
async fn receive(
    req: Request,
    tmp: &Path,
    expected: u64,
    sha256: &str,
    key: &noexit_airlock::seal::SealKey,
    aad: &str,
    keep: usize,
) -> Result<Option<Vec<u8>>, ApiError> {
    let io = |e: std::io::Error| ApiError::Internal(format!("{}: {e}", tmp.display()));
    let sealing = |e: noexit_airlock::seal::SealError| ApiError::Internal(format!("{}: {e}", tmp.display()));
    let mut file = tokio::fs::File::create(tmp).await.map_err(io)?;
    let mut sealer = noexit_airlock::seal::Sealer::new(key, aad.as_bytes());
    let mut sealed = Vec::new();
    let mut plain = (expected <= keep as u64).then(|| Vec::with_capacity(expected as usize));
    let mut hasher = Sha256::new();
    let mut received: u64 = 0;
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::invalid("bodyError", format!("reading the upload failed: {e}")))?;
        let Some(chunk) = frame.data_ref() else { continue };
        received += chunk.len() as u64;
        if received > expected {
            return Err(ApiError::bad(
                StatusCode::PAYLOAD_TOO_LARGE,
                "sizeMismatch",
                format!("upload is larger than the {expected} bytes the manifest declared"),
            ));
        }
        hasher.update(chunk);
        if let Some(p) = plain.as_mut() {
            p.extend_from_slice(chunk);
        }
        sealer.push(chunk, &mut sealed).map_err(sealing)?;
        file.write_all(&sealed).await.map_err(io)?;
        sealed.clear();
    }
    if received != expected {
        return Err(ApiError::bad(
            StatusCode::UNPROCESSABLE_ENTITY,
            "sizeMismatch",
            format!("upload has {received} bytes; the manifest declared {expected}"),
        ));
    }
    let got = hex::encode(hasher.finalize());
    if got != sha256 {
        return Err(ApiError::bad(
            StatusCode::UNPROCESSABLE_ENTITY,
            "hashMismatch",
            format!("upload has SHA-256 {got}; the manifest declared {sha256}"),
        ));
    }
    sealer.finish(&mut sealed).map_err(sealing)?;
    file.write_all(&sealed).await.map_err(io)?;
    file.sync_all().await.map_err(io)?;
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use noexit_crds::agent::{ScanReport, ScanVerdict};

    fn manifest(name: &str, sha: &str, size: u64) -> OutboxManifest {
        OutboxManifest {
            id: Uuid::nil(),
            file_name: name.into(),
            size,
            sha256: sha.into(),
            submitted_by: "alice".into(),
            scan: ScanReport { verdict: ScanVerdict::Clean, findings: vec![], note: None },
        }
    }

    #[test]
    fn status_writes_are_throttled_unless_something_changed() {
        let t0 = std::time::Instant::now();
        let report = AgentReport { version: "1".into(), egress_locked: true, active_sessions: 1, ..Default::default() };
        assert!(should_reflect(None, &report, t0));
        let last = Reflected { report: report.clone(), at: t0 };
        let later = AgentReport { last_heartbeat: chrono::Utc::now(), ..report.clone() };
        assert!(!should_reflect(Some(&last), &later, t0 + std::time::Duration::from_secs(5)));
        assert!(should_reflect(Some(&last), &later, t0 + REFLECT_EVERY));
        let unlocked = AgentReport { egress_locked: false, ..later.clone() };
        assert!(should_reflect(Some(&last), &unlocked, t0 + std::time::Duration::from_secs(1)));
        let busier = AgentReport { active_sessions: 2, ..later };
        assert!(should_reflect(Some(&last), &busier, t0 + std::time::Duration::from_secs(1)));
    }

    #[test]
    fn manifests_with_escaping_names_bad_hashes_or_huge_sizes_are_refused() {
        let sha = "a".repeat(64);
        assert_eq!(check_manifest(&manifest("results/table.csv", &sha, 10), 100), None);
        for name in ["../etc/passwd", "/abs", "a//b", "a/./b", "", "a\\b"] {
            assert_eq!(check_manifest(&manifest(name, &sha, 10), 100).map(|p| p.0), Some("invalidFileName"), "{name}");
        }
        assert_eq!(check_manifest(&manifest("x", &"A".repeat(64), 1), 100).map(|p| p.0), Some("invalidHash"));
        assert_eq!(check_manifest(&manifest("x", "abc", 1), 100).map(|p| p.0), Some("invalidHash"));
        assert_eq!(check_manifest(&manifest("x", &sha, 101), 100).map(|p| p.0), Some("fileTooLarge"));
    }
}
