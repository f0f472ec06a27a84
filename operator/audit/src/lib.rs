//! The tamper-evident audit log. Every component records decisions through [`AuditSink`].

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

pub mod hash;
pub mod keys;
pub mod roles;
mod sqlite_scan;
pub mod store;
pub mod verify;
pub mod writers;

pub use store::{Seq, Store, StoreOptions};

/// Was the action allowed?
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "outcome", content = "reason")]
pub enum Outcome {
    Allowed,
    /// Refused, with the reason shown to the auditor.
    Refused(String),
}

/// One thing to record. The store adds sequence number, time and hash chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    /// Person (`user:alice@example.org`), agent (`workspace:ward-7/alice`), or component.
    pub actor: String,
    /// Role the actor acted in, if any.
    pub role: Option<String>,
    /// What was attempted, dotted: `mirror.fetch`, `request.approve`, `agent.heartbeat`.
    pub action: String,
    /// What it was attempted on: `package:ggplot2@3.5.1`, `workspacerequest:ward-7/r-42`.
    pub object: String,
    pub outcome: Outcome,
    /// Where the request came from (address, certificate serial).
    pub source: Option<String>,
    /// Structured detail (kept small; no data content).
    pub detail: serde_json::Value,
}

/// Anything that durably records audit events.
pub trait AuditSink: Send + Sync {
    /// Record `event`; `Ok` means it is durable.
    fn record(&self, event: AuditEvent) -> futures::future::BoxFuture<'_, Result<(), AuditError>>;
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit store unavailable: {0}")]
    Unavailable(String),
    #[error("audit store refused the event: {0}")]
    Rejected(String),
    /// A stored row cannot even be read as an entry (wrong type or length): tampering or damage.
    #[error("audit log is damaged: {0}")]
    Corrupt(String),
}

impl AuditError {
    /// A fixed label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            AuditError::Unavailable(_) => "unavailable",
            AuditError::Rejected(_) => "rejected",
            AuditError::Corrupt(_) => "corrupt",
        }
    }
}

/// Records events in memory, for other components' tests.
#[derive(Debug, Default)]
pub struct MemorySink {
    events: Mutex<Vec<AuditEvent>>,
}

impl MemorySink {
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything recorded so far, in order.
    pub fn events(&self) -> Vec<AuditEvent> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Recorded events with this action.
    pub fn with_action(&self, action: &str) -> Vec<AuditEvent> {
        self.events().into_iter().filter(|e| e.action == action).collect()
    }
}

impl AuditSink for MemorySink {
    fn record(&self, event: AuditEvent) -> futures::future::BoxFuture<'_, Result<(), AuditError>> {
        let result = match self.events.lock() {
            Ok(mut events) => {
                events.push(event);
                Ok(())
            }
            Err(_) => Err(AuditError::Unavailable("memory sink poisoned".into())),
        };
        Box::pin(std::future::ready(result))
    }
}

impl AuditEvent {
    /// An allowed event with no role, source or detail; adjust the fields as needed.
    pub fn allowed(actor: impl Into<String>, action: impl Into<String>, object: impl Into<String>) -> Self {
        AuditEvent {
            actor: actor.into(),
            role: None,
            action: action.into(),
            object: object.into(),
            outcome: Outcome::Allowed,
            source: None,
            detail: serde_json::Value::Object(Default::default()),
        }
    }

    /// A refused event with the reason an auditor reads.
    pub fn refused(
        actor: impl Into<String>,
        action: impl Into<String>,
        object: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        AuditEvent { outcome: Outcome::Refused(reason.into()), ..Self::allowed(actor, action, object) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_sink_keeps_events_in_order() {
        let sink = MemorySink::new();
        sink.record(AuditEvent::allowed("user:a", "x.one", "o")).await.unwrap();
        sink.record(AuditEvent::refused("user:b", "x.two", "o", "no")).await.unwrap();
        let actions: Vec<_> = sink.events().into_iter().map(|e| e.action).collect();
        assert_eq!(actions, ["x.one", "x.two"]);
        assert_eq!(sink.with_action("x.two")[0].outcome, Outcome::Refused("no".into()));
    }
}
