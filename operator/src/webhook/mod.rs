//! `noexit-operator webhook`: the validating admission webhook for Projects, Datasets,
//! Workspaces and WorkspaceRequests. It enforces the rules CEL cannot, because they look at
//! other objects or at who asks: datasets granted to the project (both keys), the project and
//! its members exist with the right roles, requester ≠ approver.
//!
//! - [`rules`]: the pure rules (object + old object + caller + [`Lookup`] snapshot → verdict)
//! - [`review`]: AdmissionReview in, AdmissionReview out (typed objects, malformed → refused)
//! - [`http`]: the axum [`router`] (`/validate`, `/healthz`, `/readyz`, `/metrics`)
//! - [`tls`]: rustls with a certificate re-read when its files change
//! - [`certs`]: serving certificate from the operator's CA and the `caBundle` of the
//!   ValidatingWebhookConfiguration
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

/// How often the certificate files are checked for changes (and renewal).
const RELOAD_EVERY: Duration = Duration::from_secs(30);
/// How often the webhook configuration's `caBundle` is checked once set.
const CA_BUNDLE_CHECK_EVERY: Duration = Duration::from_secs(300);

/// Arguments of `noexit-operator webhook`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Address to serve HTTPS on.
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Serving certificate (PEM), issued by the operator's CA; re-read when it changes.
    #[arg(long)]
    pub tls_cert: PathBuf,
    /// Private key of the serving certificate (PEM).
    #[arg(long)]
    pub tls_key: PathBuf,
    /// Issue the serving certificate from the operator's CA in this Secret (keys `ca.crt`,
    /// `ca.key`; created if missing) and write it to --tls-cert/--tls-key before serving, and
    /// again before it expires. Without it the files must be provided (e.g. by cert-manager).
    #[arg(long)]
    pub ca_secret: Option<String>,
    /// Namespace of --ca-secret (the operator's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "noexit-system")]
    pub namespace: String,
    /// DNS names for the issued certificate (the webhook Service).
    #[arg(long = "dns-name", default_values_t = ["noexit-webhook.noexit-system.svc".to_owned()])]
    pub dns_names: Vec<String>,
    /// ValidatingWebhookConfiguration whose `caBundle` is set to the CA certificate (from
    /// --ca-secret, or from --ca-bundle).
    #[arg(long)]
    pub webhook_configuration: Option<String>,
    /// CA certificate file (PEM) for the `caBundle`, when --ca-secret is not used.
    #[arg(long)]
    pub ca_bundle: Option<PathBuf>,
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
    pub connections: crate::serving::ConnArgs,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    if let Some(secret) = &args.ca_secret {
        let issuer = certs::Issuer {
            client: client.clone(),
            namespace: args.namespace.clone(),
            ca_secret: secret.clone(),
            dns_names: args.dns_names.clone(),
            cert_path: args.tls_cert.clone(),
            key_path: args.tls_key.clone(),
        };
        let ca = issuer.ensure().await.context("issuing the serving certificate from the operator's CA")?;
        if let Some(name) = &args.webhook_configuration {
            tokio::spawn(certs::keep_ca_bundle(client.clone(), name.clone(), ca, CA_BUNDLE_CHECK_EVERY));
        }
        tokio::spawn(issuer.renew_forever(RELOAD_EVERY));
    } else if let (Some(name), Some(path)) = (&args.webhook_configuration, &args.ca_bundle) {
        let ca = std::fs::read_to_string(path).with_context(|| format!("reading --ca-bundle {}", path.display()))?;
        tokio::spawn(certs::keep_ca_bundle(client.clone(), name.clone(), ca, CA_BUNDLE_CHECK_EVERY));
    }

    let cert = tls::ReloadingCert::load(&args.tls_cert, &args.tls_key)?;
    cert.watch(RELOAD_EVERY);
    let acceptor = tls::acceptor(cert)?;
    let lookup: Arc<dyn Lookup> = Arc::new(KubeLookup::start(client));
    let policy = Policy { trusted_users: args.trusted_users.clone(), username_prefix: args.username_prefix.clone() };
    let mut state = AppState::new(lookup, policy);
    let mut store = None;
    if let Some(url) = &args.database_url {
        let writer = match &args.audit_key {
            Some(path) => Some(crate::audit::writers::Writer::load(crate::audit::writers::WEBHOOK, path)?),
            None => {
                tracing::warn!("no --audit-key: the webhook's audit entries are unsigned and verify will report them");
                None
            }
        };
        let options = crate::audit::StoreOptions { writer, ..Default::default() };
        let s = Arc::new(
            crate::audit::Store::connect_with(url, options)
                .await
                .with_context(|| format!("--database-url {}", crate::audit::store::redact(url)))?,
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
    tls::serve(listener, acceptor, app, args.connections.limits(), crate::telemetry::shutdown_signal()).await;
    if let Some(store) = store {
        store.close().await;
    }
    tracing::info!("admission webhook stopped");
    Ok(())
}
