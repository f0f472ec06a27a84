//! The tamper-evident audit log. Every component records decisions through [`AuditSink`].

use serde::{Deserialize, Serialize};

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
}
