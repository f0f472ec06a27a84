//! Where the gateway's decisions go. The gateway does not know the audit store: the binary
//! that runs it hands in a [`Recorder`] (the operator's audit store and session table in
//! `noexit-operator gateway`, memory in tests).

use std::sync::Mutex;

use futures::future::BoxFuture;
use noexit_crds::agent::{SessionEvent, WorkspaceIdentity};

/// One audited decision.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayEvent {
    /// `user:alice@example.org`, or `anonymous`.
    pub actor: String,
    /// `gateway.signin`, `gateway.connect`, `gateway.disconnect`, `gateway.drop`, ...
    pub action: String,
    /// `workspace:ward-7/alice`, or `gateway`.
    pub object: String,
    /// `None` when allowed; the reason shown to the auditor when refused.
    pub refused: Option<String>,
    /// Browser address.
    pub source: Option<String>,
    pub detail: serde_json::Value,
}

/// Records the gateway's audit events and desktop sessions durably.
pub trait Recorder: Send + Sync {
    fn audit(&self, event: GatewayEvent) -> BoxFuture<'_, Result<(), String>>;
    /// A desktop connect or disconnect, for the session list the API serves.
    fn session(&self, workspace: WorkspaceIdentity, event: SessionEvent) -> BoxFuture<'_, Result<(), String>>;
}

/// Keeps everything in memory (tests, and a gateway run without a database).
#[derive(Debug, Default)]
pub struct MemoryRecorder {
    pub events: Mutex<Vec<GatewayEvent>>,
    pub sessions: Mutex<Vec<(WorkspaceIdentity, SessionEvent)>>,
}

impl Recorder for MemoryRecorder {
    fn audit(&self, event: GatewayEvent) -> BoxFuture<'_, Result<(), String>> {
        tracing::info!(target: "noexit_gateway::audit", actor = %event.actor, action = %event.action,
            object = %event.object, refused = ?event.refused, "audit");
        if let Ok(mut events) = self.events.lock() {
            events.push(event);
        }
        Box::pin(async { Ok(()) })
    }

    fn session(&self, workspace: WorkspaceIdentity, event: SessionEvent) -> BoxFuture<'_, Result<(), String>> {
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.push((workspace, event));
        }
        Box::pin(async { Ok(()) })
    }
}
