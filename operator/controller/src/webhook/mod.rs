//! `noexit-operator webhook`: the validating admission webhook for Projects, Datasets,
//! Workspaces and WorkspaceRequests. It enforces the rules CEL cannot, because they look at
//! other objects or at who asks: datasets granted to the project (both keys), the project and
//! its members exist with the right roles, requester ≠ approver.
//!
//! - [`rules`]: the pure rules (object + old object + caller + [`Lookup`] snapshot → verdict)
//! - [`review`]: AdmissionReview in, AdmissionReview out (typed objects, malformed → refused)
//! - [`http`]: the axum [`router`] (`/validate`, `/healthz`, `/readyz`, `/metrics`)
//! - [`tls`]: rustls with a certificate re-read when its files change
//! - [`certs`]: the serving certificate the controller issues into a Secret the webhook mounts,
//!   and the `caBundle` of the ValidatingWebhookConfiguration (also set by the controller)
//! - [`lookup`]: the snapshot trait, with reflector caches and an in-memory implementation

pub mod audit;
pub mod certs;
pub mod http;
pub mod lookup;
pub mod review;
pub mod rules;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

pub use http::{AppState, router};
pub use lookup::{KubeLookup, Lookup, Snapshot};
pub use review::Policy;

/// How often the certificate files are checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(30);

/// Arguments of `noexit-operator webhook`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Address to serve HTTPS on.
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Serving certificate (PEM), re-read when it changes. In the chart: the Secret the
    /// controller issues (`controller --webhook-secret`), mounted read-only.
    #[arg(long)]
    pub tls_cert: PathBuf,
    /// Private key of the serving certificate (PEM).
    #[arg(long)]
    pub tls_key: PathBuf,
    /// Site file (the controller's `--site`): the operator namespace no Project may take, and
    /// the workspace image allowlist. Default: the built-in site.
    #[arg(long)]
    pub site: Option<PathBuf>,
    /// User names (as the API server reports them) trusted to act for people they
    /// authenticated: they may file requests for analysts and record admins' decisions.
    #[arg(long = "trusted-user", value_delimiter = ',', env = "NOEXIT_WEBHOOK_TRUSTED_USERS")]
    pub trusted_users: Vec<String>,
    /// Prefix the API server puts before OIDC user names (its --oidc-username-prefix).
    #[arg(long, default_value = "")]
    pub username_prefix: String,
    /// Record every review of a noexit resource in the audit log (the API's database, as the
    /// webhook's own role): kubectl changes then appear with the Kubernetes user name.
    #[arg(long, env = "NOEXIT_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// The webhook's audit key (ed25519 PKCS#8 PEM): signs its entries as writer `webhook`.
    #[arg(long, env = "NOEXIT_AUDIT_KEY", requires = "database_url")]
    pub audit_key: Option<PathBuf>,
    #[command(flatten)]
    pub connections: noexit_common::serving::ConnArgs,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let site = match &args.site {
        Some(path) => crate::Site::from_file(path)?,
        None => crate::Site::default(),
    };
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    let cert = tls::ReloadingCert::load(&args.tls_cert, &args.tls_key)?;
    cert.watch(RELOAD_EVERY);
    let acceptor = tls::acceptor(cert)?;
    let lookup: Arc<dyn Lookup> = Arc::new(KubeLookup::start(client));
    let policy = Policy {
        site: (&site).into(),
        trusted_users: args.trusted_users.clone(),
        username_prefix: args.username_prefix.clone(),
    };
    let mut state = AppState::new(lookup, policy);
    let mut store = None;
    if let Some(url) = &args.database_url {
        let writer = match &args.audit_key {
            Some(path) => Some(noexit_audit::writers::Writer::load(noexit_audit::writers::WEBHOOK, path)?),
            None => {
                tracing::warn!("no --audit-key: the webhook's audit entries are unsigned and verify will report them");
                None
            }
        };
        let options = noexit_audit::StoreOptions { writer, ..Default::default() };
        let s = Arc::new(
            noexit_audit::Store::connect_with(url, options)
                .await
                .with_context(|| format!("--database-url {}", noexit_audit::store::redact(url)))?,
        );
        state = state.with_audit(s.clone());
        store = Some(s);
    } else {
        tracing::warn!("no --database-url: admission reviews are not recorded in the audit log");
    }
    let app = router(state);
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(listen = %args.listen, "admission webhook serving");
    tls::serve(listener, acceptor, app, args.connections.limits(), noexit_common::telemetry::shutdown_signal()).await;
    if let Some(store) = store {
        store.close().await;
    }
    tracing::info!("admission webhook stopped");
    Ok(())
}
