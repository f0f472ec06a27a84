//! What the API needs from the audit log: plain appends (every decision), appends keyed by an
//! idempotency key (agent events, so a resent spool is recorded once), and queries for
//! auditors. Implemented by the audit store; [`MemoryLog`] serves unit tests.

use std::collections::HashSet;
use std::sync::Mutex;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use noexit_audit::{AuditError, AuditEvent};

/// A query from `GET /v1/audit`. Every field narrows the result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditQuery {
    /// Project whose entries to return (objects `…:<project>/…` or `project:<project>`).
    pub project: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Action, or a dotted prefix (`request.` matches `request.approve`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Only entries with a sequence number above this (for paging and `tail`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
}

pub const DEFAULT_QUERY_LIMIT: i64 = 100;
pub const MAX_QUERY_LIMIT: i64 = 1000;

impl AuditQuery {
    pub fn limit(&self) -> i64 {
        self.limit.unwrap_or(DEFAULT_QUERY_LIMIT).clamp(1, MAX_QUERY_LIMIT)
    }

    /// Whether an entry's object belongs to the queried project.
    pub fn object_in_project(&self, object: &str) -> bool {
        let p = &self.project;
        object == format!("project:{p}")
            || object.split_once(':').is_some_and(|(_, rest)| rest.starts_with(&format!("{p}/")))
    }

    /// Whether an entry belongs to the queried project: its object does, or its detail names
    /// the project (mirror fetches, admission reviews).
    pub fn in_project(&self, event: &AuditEvent) -> bool {
        self.object_in_project(&event.object)
            || event.detail.get("project").and_then(|p| p.as_str()) == Some(self.project.as_str())
    }

    /// Whether an event matches every filter of the query.
    pub fn matches(&self, event: &AuditEvent) -> bool {
        self.in_project(event)
            && self.actor.as_ref().is_none_or(|a| &event.actor == a)
            && self
                .action
                .as_ref()
                .is_none_or(|a| event.action == *a || (a.ends_with('.') && event.action.starts_with(a.as_str())))
    }
}

pub trait EventLog: Send + Sync {
    /// Append `event`; `Ok` means it is durable.
    fn record(&self, event: AuditEvent) -> BoxFuture<'_, Result<(), AuditError>>;
    /// Append `event` unless an entry with `key` exists; `Ok(true)` if it was appended now.
    fn record_once(&self, key: String, event: AuditEvent) -> BoxFuture<'_, Result<bool, AuditError>>;
    /// Entries matching `query`, oldest first, as JSON objects (with `seq` and `at`).
    fn query(&self, query: AuditQuery) -> BoxFuture<'_, Result<Vec<serde_json::Value>, AuditError>>;
}

/// Rows read per page when a project query filters in Rust (the store filters by exact object).
const QUERY_PAGE: i64 = 1000;

impl EventLog for noexit_audit::Store {
    fn record(&self, event: AuditEvent) -> BoxFuture<'_, Result<(), AuditError>> {
        Box::pin(async move { self.append(event).await.map(|_| ()) })
    }

    fn record_once(&self, key: String, event: AuditEvent) -> BoxFuture<'_, Result<bool, AuditError>> {
        Box::pin(async move { self.append_idempotent(&key, event).await.map(|(_, duplicate)| !duplicate) })
    }

    fn query(&self, query: AuditQuery) -> BoxFuture<'_, Result<Vec<serde_json::Value>, AuditError>> {
        Box::pin(async move {
            let want = query.limit() as usize;
            let mut out = Vec::new();
            let mut after = query.after.unwrap_or(0);
            loop {
                let filter = noexit_audit::store::Filter {
                    actor: query.actor.clone(),
                    action: query.action.as_ref().map(|a| if a.ends_with('.') { format!("{a}*") } else { a.clone() }),
                    after_seq: Some(after),
                    limit: Some(QUERY_PAGE),
                    ..Default::default()
                };
                let page = self.query(&filter).await?;
                let Some(last) = page.last() else { break };
                after = last.seq;
                let full = (page.len() as i64) < QUERY_PAGE;
                for entry in page.iter().filter(|e| query.in_project(&e.event)) {
                    out.push(entry.to_json());
                    if out.len() == want {
                        return Ok(out);
                    }
                }
                if full {
                    break;
                }
            }
            Ok(out)
        })
    }
}

/// The audit log in memory.
#[derive(Default)]
pub struct MemoryLog {
    inner: Mutex<(Vec<AuditEvent>, HashSet<String>)>,
    /// When set, every call fails as if the store were down.
    pub down: std::sync::atomic::AtomicBool,
}

impl MemoryLog {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn events(&self) -> Vec<AuditEvent> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).0.clone()
    }

    fn check_up(&self) -> Result<(), AuditError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(AuditError::Unavailable("memory log is down".into()));
        }
        Ok(())
    }
}

impl EventLog for MemoryLog {
    fn record(&self, event: AuditEvent) -> BoxFuture<'_, Result<(), AuditError>> {
        let result = self.check_up().map(|()| self.inner.lock().unwrap_or_else(|p| p.into_inner()).0.push(event));
        Box::pin(async move { result })
    }

    fn record_once(&self, key: String, event: AuditEvent) -> BoxFuture<'_, Result<bool, AuditError>> {
        let result = self.check_up().map(|()| {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            let new = inner.1.insert(key);
            if new {
                inner.0.push(event);
            }
            new
        });
        Box::pin(async move { result })
    }

    fn query(&self, query: AuditQuery) -> BoxFuture<'_, Result<Vec<serde_json::Value>, AuditError>> {
        let result = self.check_up().map(|()| {
            let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            let after = query.after.unwrap_or(0);
            inner
                .0
                .iter()
                .enumerate()
                .map(|(i, e)| (i as i64 + 1, e))
                .filter(|(seq, e)| *seq > after && query.matches(e))
                .take(query.limit() as usize)
                .map(|(seq, e)| {
                    let mut v = serde_json::to_value(e).unwrap_or_default();
                    v["seq"] = seq.into();
                    v
                })
                .collect()
        });
        Box::pin(async move { result })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use noexit_audit::Outcome;

    fn ev(object: &str, action: &str) -> AuditEvent {
        AuditEvent {
            actor: "user:a".into(),
            role: None,
            action: action.into(),
            object: object.into(),
            outcome: Outcome::Allowed,
            source: None,
            detail: serde_json::Value::Null,
        }
    }

    #[test]
    fn queries_stay_inside_their_project() {
        let q = AuditQuery { project: "ward-7".into(), action: Some("request.".into()), ..Default::default() };
        assert!(q.matches(&ev("workspacerequest:ward-7/r1", "request.approve")));
        assert!(!q.matches(&ev("workspacerequest:ward-70/r1", "request.approve")));
        assert!(!q.matches(&ev("workspacerequest:ward-7/r1", "requestx")));
        assert!(q.matches(&ev("project:ward-7", "request.list")));
        assert!(!q.matches(&ev("project:ward-77", "request.list")));
        let mut fetch = ev("package:ggplot2@3.5.1", "mirror.fetch");
        assert!(!q.matches(&fetch));
        fetch.detail = serde_json::json!({"project": "ward-7"});
        assert!(AuditQuery { project: "ward-7".into(), ..Default::default() }.matches(&fetch));
        fetch.detail = serde_json::json!({"project": "ward-70"});
        assert!(!AuditQuery { project: "ward-7".into(), ..Default::default() }.matches(&fetch));
    }

    #[tokio::test]
    async fn record_once_keeps_one_entry_per_key() {
        let log = MemoryLog::new();
        assert!(log.record_once("k".into(), ev("project:p", "a")).await.unwrap());
        assert!(!log.record_once("k".into(), ev("project:p", "a")).await.unwrap());
        assert_eq!(log.events().len(), 1);
    }
}
