//! `noexit-operator gateway`: the gateway crate's decisions go to the operator's audit store
//! (the hash-chained log every component writes) and its desktop sessions to the API's
//! session table, so `noexit sessions` shows them beside the agent's view.

use std::sync::Arc;

use futures::future::BoxFuture;
use noexit_crds::agent::{SessionEvent, WorkspaceIdentity};
use noexit_gateway::record::{GatewayEvent, Recorder};
use noexit_operator::api::ApiStore;
use noexit_operator::audit::{AuditEvent, Outcome, Store};

/// Arguments of `noexit-operator gateway`.
#[derive(clap::Args, Debug, Clone)]
pub struct GatewayCommand {
    #[command(flatten)]
    pub gateway: Box<noexit_gateway::Args>,
    /// The shared database (`sqlite:/path/noexit.db` or `postgres://…`): audit log and sessions.
    #[arg(long, env = "NOEXIT_DATABASE_URL", default_value = "sqlite:/var/lib/noexit/noexit.db")]
    pub database_url: String,
}

struct StoreRecorder {
    audit: Arc<Store>,
    sessions: ApiStore,
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
    let audit = Arc::new(Store::connect(&args.database_url).await?);
    let sessions = ApiStore::new(audit.pool().clone());
    let recorder = Arc::new(StoreRecorder { audit: audit.clone(), sessions });
    let result = noexit_gateway::run(*args.gateway, recorder).await;
    audit.close().await;
    result
}
