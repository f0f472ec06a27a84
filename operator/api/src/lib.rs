//! `noexit-operator api`: the control-plane API over HTTPS. Agents authenticate with the client
//! certificate the operator's CA issued for their workspace, the operator with its own client
//! certificate, people with OIDC bearer tokens. Every route sits behind [`guard::guard`], which
//! authenticates, authorises against [`authz`] (deny by default) and audits the decision.

pub mod agent;
pub mod airlock_checks;
pub mod auditlog;
pub mod authz;
pub mod body;
pub mod cluster;
pub mod error;
pub mod guard;
pub mod inbox;
pub mod oidc;
pub mod output_mirror;
pub mod output_store;
pub mod outputs;
pub mod people;
pub mod revocation;
pub mod server;
pub mod store;
pub mod sweeper;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::routing::{MethodRouter, get, post, put};

pub use auditlog::{AuditQuery, EventLog, MemoryLog};
pub use authz::Endpoint;
pub use cluster::{Cluster, KubeCluster, MemoryCluster};
pub use error::{ApiError, ErrorBody};
pub use revocation::RevocationSet;
pub use store::{ApiStore, Db};

/// Settings handlers need.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Outbox files are stored under `<data_dir>/outbox/<project>/<workspace>/<id>`.
    pub data_dir: PathBuf,
    /// Require a second factor (`amr`) from every person, whatever the project says.
    pub require_mfa: bool,
    /// Largest outbox file accepted.
    pub max_upload_bytes: u64,
    /// Ingress: rules for inbox files and their sealing at rest.
    pub inbox: inbox::InboxConfig,
}

pub struct Inner {
    pub store: ApiStore,
    pub audit: Arc<dyn EventLog>,
    pub cluster: Arc<dyn Cluster>,
    pub oidc: Option<Arc<oidc::Oidc>>,
    pub revoked: RevocationSet,
    pub config: ApiConfig,
    /// The airlock's keys (sealing, receipt signing) and link lifetime.
    pub airlock: outputs::Airlock,
    /// What each workspace's status last got from us, and when (see [`agent::should_reflect`]).
    pub reflected: std::sync::Mutex<std::collections::HashMap<(String, String), agent::Reflected>>,
}

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    /// State with revocations loaded from the store, and fresh airlock keys (tests).
    pub async fn new(
        store: ApiStore,
        audit: Arc<dyn EventLog>,
        cluster: Arc<dyn Cluster>,
        oidc: Option<Arc<oidc::Oidc>>,
        config: ApiConfig,
    ) -> Result<Self, store::StoreError> {
        Self::with_airlock(store, audit, cluster, oidc, config, outputs::Airlock::ephemeral()).await
    }

    /// State with the given airlock keys.
    pub async fn with_airlock(
        store: ApiStore,
        audit: Arc<dyn EventLog>,
        cluster: Arc<dyn Cluster>,
        oidc: Option<Arc<oidc::Oidc>>,
        config: ApiConfig,
        airlock: outputs::Airlock,
    ) -> Result<Self, store::StoreError> {
        let revoked = RevocationSet::new(store.revocations().await?.into_iter().map(|r| r.serial));
        let reflected = Default::default();
        Ok(Self(Arc::new(Inner { store, audit, cluster, oidc, revoked, config, airlock, reflected })))
    }

    /// Add revocations other replicas recorded in the shared database.
    pub async fn refresh_revocations(&self) -> Result<(), store::StoreError> {
        for row in self.store.revocations().await? {
            self.revoked.insert(&row.serial);
        }
        Ok(())
    }
}

fn handler_for(endpoint: Endpoint) -> MethodRouter<AppState> {
    match endpoint {
        Endpoint::Health => get(health),
        Endpoint::AgentEvents => post(agent::events),
        Endpoint::AgentHeartbeat => post(agent::heartbeat),
        Endpoint::AgentOutbox => post(agent::outbox),
        Endpoint::AgentOutboxContent => put(agent::outbox_content),
        Endpoint::OperatorRevoke => post(people::operator_revoke),
        Endpoint::WhoAmI => get(people::whoami),
        Endpoint::RequestCreate => post(people::create_request),
        Endpoint::RequestList => get(people::list_requests),
        Endpoint::RequestGet => get(people::get_request),
        Endpoint::RequestApprove => post(people::approve),
        Endpoint::RequestDeny => post(people::deny),
        Endpoint::SessionList => get(people::sessions),
        Endpoint::WorkspaceRevoke => post(people::workspace_revoke),
        Endpoint::AuditQuery => get(people::audit_query),
        Endpoint::AgentOutputs => get(outputs::agent_list),
        Endpoint::OutputList => get(outputs::list),
        Endpoint::OutputGet => get(outputs::get),
        Endpoint::OutputContent => get(outputs::content),
        Endpoint::OutputReview => get(outputs::review_page),
        Endpoint::OutputApprove => post(outputs::approve),
        Endpoint::OutputReject => post(outputs::reject),
        Endpoint::OutputRequestChanges => post(outputs::request_changes),
        Endpoint::OutputWithdraw => post(outputs::withdraw),
        Endpoint::OutputDownloadLink => post(outputs::download_link),
        Endpoint::OutputDownload => get(outputs::download),
        Endpoint::OutputReceipt => get(outputs::receipt),

        Endpoint::InboxSubmit => post(inbox::submit),
        Endpoint::InboxList => get(inbox::list),
        Endpoint::InboxApprove => post(inbox::approve),
        Endpoint::InboxReject => post(inbox::reject),
        Endpoint::AgentInbox => get(inbox::agent_list),
        Endpoint::AgentInboxContent => get(inbox::agent_content),
        Endpoint::AgentInboxDelivered => post(inbox::agent_delivered),
    }
}

async fn health() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({"status": "ok"}))
}

async fn not_found(req: axum::extract::Request) -> ApiError {
    ApiError::not_found(format!("no endpoint {} {}", req.method(), req.uri().path()))
}

/// Every endpoint of [`Endpoint::ALL`] behind the guard. Tests call this with `oneshot`; the
/// server wraps it in TLS.
pub fn router(state: AppState) -> Router {
    let mut router = Router::new();
    // Group the methods of each path into one MethodRouter.
    let mut paths: Vec<&'static str> = Endpoint::ALL.iter().map(|e| e.route().1).collect();
    paths.dedup();
    paths.sort();
    paths.dedup();
    for path in paths {
        let mut method_router: MethodRouter<AppState> = MethodRouter::new();
        for endpoint in Endpoint::ALL.into_iter().filter(|e| e.route().1 == path) {
            method_router = method_router.merge(handler_for(endpoint));
        }
        router = router.route(path, method_router);
    }
    router
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), guard::guard))
        .fallback(not_found)
        // Outermost: what the guard never saw (unknown paths, wrong methods) is audited too.
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard::unrouted))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

/// Arguments of `noexit-operator api` (boxed: the subcommand enum stays small).
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub options: Box<Options>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// Address to listen on.
    #[arg(long, env = "NOEXIT_API_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Server certificate (PEM, issued by the operator's CA); reloaded when it changes.
    #[arg(long, env = "NOEXIT_API_TLS_CERT", default_value = "/etc/noexit/api/tls.crt")]
    pub tls_cert: PathBuf,
    #[arg(long, env = "NOEXIT_API_TLS_KEY", default_value = "/etc/noexit/api/tls.key")]
    pub tls_key: PathBuf,
    /// CA that issues agent and operator client certificates (the operator's CA, `ca.crt`).
    #[arg(long, env = "NOEXIT_API_CLIENT_CA", default_value = "/etc/noexit/ca/ca.crt")]
    pub client_ca: PathBuf,
    /// `sqlite:/path/api.db` (embedded default) or `postgres://user@host/db`.
    #[arg(long, env = "NOEXIT_DATABASE_URL", default_value = "sqlite:/var/lib/noexit/noexit.db")]
    pub database_url: String,
    /// The API's audit key (ed25519 PKCS#8 PEM): signs each entry the API writes (as writer
    /// `api`) and the checkpoints; created if missing.
    #[arg(long, env = "NOEXIT_AUDIT_KEY", default_value = "/var/lib/noexit/audit-signing.pem")]
    pub audit_key: PathBuf,
    /// Also write every signed checkpoint to this directory (`checkpoint-<id>.json`), outside
    /// the database: auditors keep copies and pass them to `noexit audit verify --checkpoints`.
    #[arg(long, env = "NOEXIT_CHECKPOINT_EXPORT", value_name = "DIR")]
    pub checkpoint_export: Option<PathBuf>,
    /// Seconds between checkpoints when there are new entries.
    #[arg(long, default_value_t = 10)]
    pub checkpoint_interval_secs: u64,
    #[command(flatten)]
    pub connections: noexit_common::serving::ConnArgs,
    /// Where outbox files are stored.
    #[arg(long, env = "NOEXIT_API_DATA_DIR", default_value = "/var/lib/noexit/api")]
    pub data_dir: PathBuf,
    /// OIDC issuer URL (exactly as in the tokens' `iss`). Without it no person can log in.
    #[arg(long, env = "NOEXIT_OIDC_ISSUER")]
    pub oidc_issuer: Option<String>,
    /// Expected token audience.
    #[arg(long, env = "NOEXIT_OIDC_AUDIENCE", default_value = "noexit")]
    pub oidc_audience: String,
    /// Claim that names the user as Project members are written.
    #[arg(long, env = "NOEXIT_OIDC_USER_CLAIM", default_value = "email")]
    pub oidc_user_claim: String,
    /// CA bundle for the issuer's HTTPS (default: system roots).
    #[arg(long, env = "NOEXIT_OIDC_CA")]
    pub oidc_ca: Option<PathBuf>,
    /// Development only: accept an `http://` issuer (and JWKS) on a loopback address. Without
    /// it the issuer must be `https://`.
    #[arg(long, env = "NOEXIT_OIDC_ALLOW_HTTP_LOOPBACK")]
    pub oidc_allow_http_loopback: bool,
    /// Seconds between fetches of the issuer's keys (also fetched when a token names an
    /// unknown key id, at most every 10 s).
    #[arg(long, env = "NOEXIT_OIDC_REFRESH_SECONDS", default_value_t = 600)]
    pub oidc_refresh_seconds: u64,
    /// Require a second factor from every person, whatever the project says.
    #[arg(long, env = "NOEXIT_REQUIRE_MFA")]
    pub require_mfa: bool,
    /// Largest outbox file accepted, in bytes.
    #[arg(long, default_value_t = 1024 * 1024 * 1024)]
    pub max_upload_bytes: u64,
    /// Largest inbox (ingress) file accepted, in bytes.
    #[arg(long, env = "NOEXIT_INBOX_MAX_BYTES", default_value_t = inbox::policy::DEFAULT_MAX_BYTES)]
    pub inbox_max_bytes: u64,
    /// File extensions accepted into workspace inboxes (comma separated, without dots).
    /// Default: scripts, text, tables, codebooks, statistical program files and PDF.
    #[arg(long, env = "NOEXIT_INBOX_EXTENSIONS", value_delimiter = ',')]
    pub inbox_extensions: Vec<String>,
    /// Accept archives (zip, gzip, tar …) into inboxes when their extension is listed.
    #[arg(long, env = "NOEXIT_INBOX_ALLOW_ARCHIVES")]
    pub inbox_allow_archives: bool,
    /// Key that seals airlock files at rest (64 hex digits, or 32 raw bytes as a Secret mounts
    /// them); created if missing.
    #[arg(long, env = "NOEXIT_SEAL_KEY", default_value = "/var/lib/noexit/airlock-seal.key")]
    pub seal_key: PathBuf,
    /// Read Projects from this manifest file instead of a Kubernetes cluster (single-host mode
    /// and development; requests are then kept in memory).
    #[arg(long)]
    pub manifests: Option<PathBuf>,
    /// Seconds a download link of an approved output lives.
    #[arg(long, default_value_t = 300)]
    pub download_link_seconds: u64,
    /// Seconds between sweeps (expiry of undecided outputs, deletion of content after retention).
    #[arg(long, default_value_t = 3600)]
    pub sweep_interval_secs: u64,
    /// Seconds between checks of the server certificate files.
    #[arg(long, default_value_t = 30)]
    pub cert_reload_seconds: u64,
}

/// The in-memory cluster filled from a manifest file.
pub fn memory_cluster_from(text: &str) -> anyhow::Result<MemoryCluster> {
    let cluster = MemoryCluster::new();
    for m in noexit_common::manifests::parse_documents(text)? {
        match m {
            noexit_common::manifests::Manifest::Project(p) => cluster.put_project(*p),
            noexit_common::manifests::Manifest::Workspace(w) => cluster.put_workspace(*w),
            _ => {}
        }
    }
    Ok(cluster)
}

/// The inbox rules from the command line: extensions lower-cased, without dots, checked.
pub fn inbox_policy(extensions: &[String], max_bytes: u64, allow_archives: bool) -> anyhow::Result<inbox::InboxPolicy> {
    let mut policy = inbox::InboxPolicy { max_bytes, allow_archives, ..Default::default() };
    if max_bytes == 0 {
        anyhow::bail!("--inbox-max-bytes must be greater than 0");
    }
    if !extensions.is_empty() {
        policy.extensions = Vec::new();
        for e in extensions {
            let e = e.trim().trim_start_matches('.').to_ascii_lowercase();
            if e.is_empty() || !e.bytes().all(|b| b.is_ascii_alphanumeric()) {
                anyhow::bail!("--inbox-extensions: {e:?} is not an extension (letters and digits, e.g. csv,R,pdf)");
            }
            policy.extensions.push(e);
        }
    }
    Ok(policy)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    run_with_cluster(args, None).await
}

/// [`run`], reading Projects and Workspaces from `cluster` when given (single-host mode keeps
/// one in memory and refreshes it from the manifests it reconciles).
pub async fn run_with_cluster(args: Args, cluster: Option<Arc<dyn Cluster>>) -> anyhow::Result<()> {
    let args = *args.options;
    // First, so a misconfigured issuer is refused before anything else is touched.
    let oidc = match &args.oidc_issuer {
        Some(issuer) => {
            let ca_pem = match &args.oidc_ca {
                Some(p) => Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?),
                None => None,
            };
            let oidc = Arc::new(
                oidc::Oidc::new(oidc::OidcConfig {
                    audience: args.oidc_audience.clone(),
                    user_claim: args.oidc_user_claim.clone(),
                    ca_pem,
                    allow_http_loopback: args.oidc_allow_http_loopback,
                    refresh_every: Duration::from_secs(args.oidc_refresh_seconds.max(10)),
                    ..oidc::OidcConfig::new(issuer.clone())
                })
                .context("--oidc-issuer")?,
            );
            Some(oidc)
        }
        None => {
            tracing::warn!("no --oidc-issuer: people cannot log in; only agents and the operator are served");
            None
        }
    };
    let client_ca = std::fs::read(&args.client_ca).with_context(|| format!("reading {}", args.client_ca.display()))?;
    let cert = Arc::new(tls::ReloadingCert::load(&args.tls_cert, &args.tls_key)?);
    let tls_config = tls::server_config(cert.clone(), &client_ca)?;
    let (signing_key, created) = noexit_audit::keys::load_or_create_signing_key(&args.audit_key)?;
    if created {
        let public = args.audit_key.with_extension("pub.pem");
        tracing::info!(key = %args.audit_key.display(), public = %public.display(), "created the audit signing key");
    }
    let options = noexit_audit::StoreOptions {
        writer: Some(noexit_audit::writers::Writer::new(noexit_audit::writers::API, signing_key.clone())),
        signing_key: Some(signing_key),
        checkpoint_export: args.checkpoint_export.clone(),
        checkpoint_interval: Duration::from_secs(args.checkpoint_interval_secs.max(1)),
        ..Default::default()
    };
    let audit_store = Arc::new(noexit_audit::Store::connect_with(&args.database_url, options).await?);
    let db = audit_store.pool().clone();
    let audit: Arc<dyn EventLog> = audit_store.clone();
    let cluster: Arc<dyn Cluster> = match (cluster, &args.manifests) {
        (Some(cluster), _) => cluster,
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Arc::new(memory_cluster_from(&text)?)
        }
        (None, None) => {
            Arc::new(KubeCluster::new(kube::Client::try_default().await.context("connecting to Kubernetes")?))
        }
    };
    // One key seals both doors' files at rest (outputs and inbox).
    let seal = noexit_airlock::seal::SealKey::load_or_create(&args.seal_key).context("--seal-key")?;
    let config = ApiConfig {
        data_dir: args.data_dir.clone(),
        require_mfa: args.require_mfa,
        max_upload_bytes: args.max_upload_bytes,
        inbox: inbox::InboxConfig {
            policy: inbox_policy(&args.inbox_extensions, args.inbox_max_bytes, args.inbox_allow_archives)?,
            sealer: Arc::new(inbox::AirlockSealer::new(seal.clone())),
        },
    };
    let _key_refresh = oidc.as_ref().map(oidc::Oidc::spawn_refresh);
    let airlock = outputs::Airlock {
        seal,
        signer: noexit_audit::keys::load_signing_key(&args.audit_key)?,
        link_ttl: chrono::Duration::seconds(i64::try_from(args.download_link_seconds.max(1)).unwrap_or(300)),
    };
    let state = AppState::with_airlock(ApiStore::new(db), audit, cluster, oidc, config, airlock).await?;
    let sweeper = sweeper::spawn(state.clone(), Duration::from_secs(args.sweep_interval_secs.max(1)));
    let reload_every = Duration::from_secs(args.cert_reload_seconds.max(1));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(reload_every);
        loop {
            tick.tick().await;
            match cert.reload_if_changed() {
                Ok(true) => tracing::info!("server certificate reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "server certificate changed but cannot be loaded; keeping the old one")
                }
            }
        }
    });
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(listen = %args.listen, "control-plane API serving");
    let limits = args.connections.limits();
    server::serve_with(
        listener,
        tls_config,
        state.clone(),
        router(state),
        limits,
        noexit_common::telemetry::shutdown_signal(),
    )
    .await?;
    sweeper.abort();
    // Commit what is queued and seal the tail with a checkpoint (also published).
    audit_store.close().await;
    tracing::info!("audit log sealed; control-plane API stopped");
    Ok(())
}
