//! The researchers' door: a browser remote-desktop gateway. People sign in with the site's
//! OIDC issuer (authorization code + PKCE, MFA), pick one of their workspaces, and get the
//! upstream noVNC client talking through a WebSocket to an RFB proxy that authenticates to the
//! workspace desktop itself and filters every message both ways ([`rfb`]).
//!
//! The crate knows neither the audit store nor the API's tables: the binary that runs it
//! (`noexit-operator gateway`) passes a [`record::Recorder`].

pub mod directory;
pub mod metrics;
pub mod oidc;
pub mod proxy;
pub mod record;
pub mod review;
pub mod rfb;
pub mod serve;
pub mod state;
pub mod web;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

pub use directory::SecondConnect;
pub use state::Gateway;

/// Arguments of `noexit-operator gateway`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// HTTPS address to listen on.
    #[arg(long, env = "NOEXIT_GATEWAY_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Plain-HTTP address for `/metrics`.
    #[arg(long, env = "NOEXIT_GATEWAY_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: SocketAddr,
    /// Server certificate and key (PEM).
    #[arg(long, env = "NOEXIT_GATEWAY_TLS_CERT", default_value = "/etc/noexit/gateway/tls.crt")]
    pub tls_cert: PathBuf,
    #[arg(long, env = "NOEXIT_GATEWAY_TLS_KEY", default_value = "/etc/noexit/gateway/tls.key")]
    pub tls_key: PathBuf,
    /// Seconds between looks at the certificate files; a changed pair is served to new
    /// connections without a restart.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub tls_reload_seconds: u64,
    /// The URL people open, without a trailing slash (`https://desktop.example.org`). The OIDC
    /// redirect URI is `<public-url>/callback`; WebSocket `Origin` must equal it.
    #[arg(long, env = "NOEXIT_GATEWAY_PUBLIC_URL")]
    pub public_url: String,
    /// OIDC issuer URL (exactly as in the tokens' `iss`).
    #[arg(long, env = "NOEXIT_OIDC_ISSUER")]
    pub oidc_issuer: String,
    /// The gateway's OIDC client id (the ID token's audience).
    #[arg(long, env = "NOEXIT_GATEWAY_CLIENT_ID", default_value = "noexit-gateway")]
    pub oidc_client_id: String,
    /// File holding the client secret, for issuers that require one besides PKCE.
    #[arg(long, env = "NOEXIT_GATEWAY_CLIENT_SECRET_FILE")]
    pub oidc_client_secret_file: Option<PathBuf>,
    /// Claim that names the user as Project members are written.
    #[arg(long, env = "NOEXIT_OIDC_USER_CLAIM", default_value = "email")]
    pub oidc_user_claim: String,
    /// CA bundle for the issuer's HTTPS (default: none, so https issuers need it).
    #[arg(long, env = "NOEXIT_OIDC_CA")]
    pub oidc_ca: Option<PathBuf>,
    /// Allow sign-in without a second factor (projects may still require one).
    #[arg(long)]
    pub allow_single_factor: bool,
    /// Read projects and workspaces from this file instead of the cluster.
    #[arg(long, env = "NOEXIT_GATEWAY_DIRECTORY")]
    pub directory: Option<PathBuf>,
    /// Where noVNC is installed (Debian's `novnc` package).
    #[arg(long, env = "NOEXIT_GATEWAY_NOVNC_DIR", default_value = "/usr/share/novnc")]
    pub novnc_dir: PathBuf,
    /// Seconds between re-checks of a live session's access (at most 30).
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=30))]
    pub recheck_seconds: u64,
    /// Longest sign-in, in minutes (shorter when the ID token expires sooner).
    #[arg(long, default_value_t = 8 * 60)]
    pub max_signin_minutes: u64,
    /// Largest paste into a desktop, in bytes (when the project allows paste at all).
    #[arg(long, default_value_t = 64 * 1024)]
    pub paste_max_bytes: u32,
    /// Longest desktop session, in minutes, whatever a project allows (`spec.desktop.maxSessionMinutes`).
    #[arg(long, default_value_t = 8 * 60)]
    pub max_session_minutes: u32,
    /// Let a project admin open members' desktops where the project allows it
    /// (`spec.desktop.adminSupport`); without this flag no project can.
    #[arg(long)]
    pub admin_support: bool,
    /// The control-plane API (`https://api.example`): turns on the output review pages at
    /// `/review`, which call it with the signed-in person's ID token (see docs/admin.md).
    #[arg(long, env = "NOEXIT_GATEWAY_API_URL")]
    pub api_url: Option<String>,
    /// CA bundle for the API's HTTPS.
    #[arg(long, env = "NOEXIT_GATEWAY_API_CA")]
    pub api_ca: Option<PathBuf>,
}

impl Args {
    /// The site's limits a project's desktop policy is combined with
    /// ([`directory::policy_of`]); whoever writes a directory file uses them too.
    pub fn site_policy(&self) -> directory::DesktopPolicy {
        directory::DesktopPolicy {
            paste_max_bytes: self.paste_max_bytes,
            max_session_seconds: self.max_session_minutes.saturating_mul(60),
            admin_support: self.admin_support,
            ..Default::default()
        }
    }
}

/// Run the gateway until SIGTERM or Ctrl-C.
pub async fn run(args: Args, recorder: Arc<dyn record::Recorder>) -> anyhow::Result<()> {
    let public = args.public_url.trim_end_matches('/').to_owned();
    let ca_pem = match &args.oidc_ca {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?),
        None => None,
    };
    let client_secret = match &args.oidc_client_secret_file {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?.trim().to_owned())
        }
        None => None,
    };
    let oidc = oidc::OidcClient::new(oidc::OidcSettings {
        issuer: args.oidc_issuer.clone(),
        client_id: args.oidc_client_id.clone(),
        client_secret,
        redirect_uri: format!("{public}/callback"),
        user_claim: args.oidc_user_claim.clone(),
        ca_pem,
    })?;
    let defaults = args.site_policy();
    let dir: Arc<dyn directory::Directory> = match &args.directory {
        Some(path) => Arc::new(directory::FileDirectory::new(path)),
        None => Arc::new(directory::KubeDirectory::new(
            kube::Client::try_default().await.context("connecting to Kubernetes")?,
            defaults,
        )),
    };
    let config = state::Config {
        public_origin: public.clone(),
        recheck: Duration::from_secs(args.recheck_seconds),
        require_mfa: !args.allow_single_factor,
        max_signin: Duration::from_secs(args.max_signin_minutes * 60),
        novnc_dir: args.novnc_dir.clone(),
    };
    if !config.novnc_dir.join("core/rfb.js").exists() {
        anyhow::bail!(
            "{} has no core/rfb.js: install noVNC (Debian package novnc) or pass --novnc-dir",
            config.novnc_dir.display()
        );
    }
    let (tls, cert) = serve::tls_config(&args.tls_cert, &args.tls_key)?;
    let gw = Gateway::new(dir, recorder, oidc, config);
    let reloads = gw.metrics.tls_reloads.clone();
    noexit_web::tls::watch(cert, Duration::from_secs(args.tls_reload_seconds), move |outcome| {
        let outcome = match outcome {
            Ok(true) => "reloaded",
            Ok(false) => return,
            Err(_) => "failed",
        };
        reloads.get_or_create(&metrics::OutcomeLabels { outcome }).inc();
    });
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let metrics = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("binding {}", args.metrics_listen))?;
    let metrics_router = web::metrics_router(gw.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(metrics, metrics_router).await {
            tracing::error!(error = %e, "metrics listener stopped");
        }
    });
    tracing::info!(listen = %args.listen, public = %public, "remote-desktop gateway serving");
    let mut app = web::router(gw.clone());
    if let Some(review) = review::from_args(&args, gw.clone()).await? {
        app = app.merge(review::router(review));
    }
    serve::serve_tls(listener, tls, app, noexit_web::serve::shutdown_signal()).await;
    // Close live sessions so their ends are audited.
    if let Ok(live) = gw.live.lock() {
        for l in live.values() {
            let _ = l.cancel.send(Some("gateway shutting down".into()));
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}
