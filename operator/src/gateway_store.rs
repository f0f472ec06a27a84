//! Where the gateway crate's records go: its decisions to the operator's audit store (the
//! hash-chained log every component writes) and its desktop sessions to the API's session
//! table, so `noexit sessions` shows them beside the agent's view. Used by
//! `noexit-operator gateway` and by single-host mode's in-process gateway.

use std::sync::Arc;

use crate::api::ApiStore;
use crate::audit::writers::{self, Writer};
use crate::audit::{AuditEvent, Outcome, Store, StoreOptions};
use futures::future::BoxFuture;
use noexit_crds::agent::{SessionEvent, WorkspaceIdentity};
use noexit_gateway::record::{GatewayEvent, Recorder};

/// Arguments of `noexit-operator gateway`.
#[derive(clap::Args, Debug, Clone)]
pub struct GatewayCommand {
    #[command(flatten)]
    pub gateway: Box<noexit_gateway::Args>,
    /// The shared database (`sqlite:/path/noexit.db` or `postgres://…`): audit log and sessions.
    #[arg(long, env = "NOEXIT_DATABASE_URL", default_value = "sqlite:/var/lib/noexit/noexit.db")]
    pub database_url: String,
    /// The gateway's audit key (ed25519 PKCS#8 PEM, `noexit-operator audit-keygen`): signs its
    /// `gateway.*` entries as the writer `gateway`. Without it they are unsigned and an
    /// authenticated `noexit audit verify` reports them.
    #[arg(long, env = "NOEXIT_AUDIT_KEY")]
    pub audit_key: Option<std::path::PathBuf>,
}

/// A [`Recorder`] writing into the shared database.
pub struct StoreRecorder {
    audit: Arc<Store>,
    sessions: ApiStore,
}

impl StoreRecorder {
    /// Sessions go to the same database as the audit log.
    pub fn new(audit: Arc<Store>) -> Self {
        let sessions = ApiStore::new(audit.pool().clone());
        Self { audit, sessions }
    }
}

impl Recorder for StoreRecorder {
    fn audit(&self, e: GatewayEvent) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let event = AuditEvent {
                actor: e.actor,
                role: None,
                action: e.action,
                object: e.object,
                outcome: match e.refused {
                    Some(reason) => Outcome::Refused(reason),
                    None => Outcome::Allowed,
                },
                source: e.source,
                detail: e.detail,
            };
            self.audit.append(event).await.map(|_| ()).map_err(|e| e.to_string())
        })
    }

    fn session(&self, ws: WorkspaceIdentity, ev: SessionEvent) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.sessions
                .insert_session(uuid::Uuid::now_v7(), &ws, chrono::Utc::now(), &ev)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }
}

pub async fn run(args: GatewayCommand) -> anyhow::Result<()> {
    use anyhow::Context;
    let writer = match &args.audit_key {
        Some(path) => {
            Some(Writer::load(writers::GATEWAY, path).with_context(|| format!("--audit-key {}", path.display()))?)
        }
        None => {
            tracing::warn!("no --audit-key: the gateway's audit entries are unsigned and verify will report them");
            None
        }
    };
    let options = StoreOptions { writer, ..Default::default() };
    let audit = Arc::new(
        Store::connect_with(&args.database_url, options)
            .await
            .with_context(|| format!("--database-url {}", crate::audit::store::redact(&args.database_url)))?,
    );
    let recorder = Arc::new(StoreRecorder::new(audit.clone()));
    let result = noexit_gateway::run(*args.gateway, recorder).await;
    audit.close().await;
    result
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        gateway: super::GatewayCommand,
    }

    #[test]
    fn the_gateway_takes_its_audit_key_like_the_other_writers() {
        Cli::command().debug_assert();
        let cmd = Cli::command();
        let key = cmd.get_arguments().find(|a| a.get_id() == "audit_key").expect("--audit-key");
        assert_eq!(key.get_long(), Some("audit-key"));
        assert_eq!(key.get_env().and_then(|e| e.to_str()), Some("NOEXIT_AUDIT_KEY"));
    }
}
