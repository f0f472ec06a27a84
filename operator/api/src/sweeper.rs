//! The airlock's sweeper: expires outputs left undecided (or approved and never downloaded)
//! beyond their project's retention, and deletes sealed content that retention no longer
//! requires. What to do is [`noexit_airlock::lifecycle::sweep`] (pure); this is the I/O.
//! Metadata, reviews and receipts are never deleted.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use noexit_airlock::lifecycle::{self, Actor, Event, Facts, Held, Sweep};

use super::AppState;
use super::outputs::object_of;
use noexit_audit::{AuditEvent, Outcome};

/// What one sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub expired: Vec<String>,
    pub deleted: Vec<String>,
}

/// Retention of a project in seconds (the default 30 days when the project is gone).
async fn retention(state: &AppState, cache: &mut HashMap<String, i64>, project: &str) -> i64 {
    if let Some(r) = cache.get(project) {
        return *r;
    }
    let days = match state.cluster.project(project).await {
        Ok(Some(p)) => p.spec.output.retention_days,
        _ => noexit_crds::project::OutputPolicy::default().retention_days,
    };
    let secs = i64::from(days) * 86_400;
    cache.insert(project.to_owned(), secs);
    secs
}

async fn audit(state: &AppState, action: &str, object: String, detail: serde_json::Value) {
    let event = AuditEvent {
        actor: "system:airlock-sweeper".into(),
        role: None,
        action: action.into(),
        object,
        outcome: Outcome::Allowed,
        source: None,
        detail,
    };
    if let Err(e) = state.audit.record(event).await {
        tracing::error!(error = %e, action, "cannot record a sweep");
    }
}

/// One sweep at `now`.
pub async fn sweep_once(state: &AppState, now: DateTime<Utc>) -> anyhow::Result<Swept> {
    let rows = state.store.sweepable_outputs().await?;
    let mut cache = HashMap::new();
    let mut held = Vec::with_capacity(rows.len());
    for row in &rows {
        held.push(Held {
            id: &row.id,
            state: row.life(),
            since: row.since().timestamp(),
            has_content: row.content_path.is_some(),
            retention: retention(state, &mut cache, &row.project).await,
        });
    }
    let mut done = Swept::default();
    for action in lifecycle::sweep(&held, now.timestamp()) {
        match action {
            Sweep::Expire(id) => {
                let Some(row) = rows.iter().find(|r| r.id == id) else { continue };
                let facts =
                    Facts { state: row.life(), requester: row.requester(), reviewers: &[], approvals: 0, required: 1 };
                let Ok(next) = lifecycle::transition(&facts, Actor::System, Event::Expire) else { continue };
                if state.store.change_state(&row.id, row.version, next, None, None).await? {
                    audit(state, "output.expire", object_of(row), serde_json::json!({"from": row.state})).await;
                    crate::output_mirror::mirror(state, &row.project, &row.id).await;
                    done.expired.push(row.id.clone());
                }
            }
            Sweep::DeleteContent(id) => {
                let Some(row) = rows.iter().find(|r| r.id == id) else { continue };
                if let Some(path) = &row.content_path {
                    match tokio::fs::remove_file(path).await {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            tracing::warn!(output = %row.id, error = %e, "cannot delete sealed content");
                            continue;
                        }
                    }
                }
                state.store.mark_content_deleted(&row.id).await?;
                audit(state, "output.content.delete", object_of(row), serde_json::json!({"state": row.state})).await;
                done.deleted.push(row.id.clone());
            }
        }
    }
    Ok(done)
}

/// Sweep every `every` until the task is aborted.
pub fn spawn(state: AppState, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            match sweep_once(&state, Utc::now()).await {
                Ok(s) if s.expired.is_empty() && s.deleted.is_empty() => {}
                Ok(s) => tracing::info!(expired = s.expired.len(), deleted = s.deleted.len(), "airlock swept"),
                Err(e) => tracing::warn!(error = %e, "airlock sweep failed; next time"),
            }
        }
    })
}
