//! `noexit-operator mirror`: the CRAN-only package mirror, the one egress target a workspace
//! has. Serves the CRAN source layout (`src/contrib/PACKAGES{,.gz,.rds}`, tarballs,
//! `Archive/`) to known workspaces, filtered by their project's policy, every package fetch
//! audited. Files come from an offline snapshot and/or a verified read-through cache of an
//! upstream CRAN repository.
//!
//! Pieces: [`dcf`] + [`index`] + [`rds`] (the index and its three renderings), [`policy`]
//! (who may install what), [`clients`] (who is asking), [`store`] (sources, verification,
//! single-flight), [`conditional`] (ETag/Range rules), [`conn`] (slow-client protection),
//! [`serve`] (HTTP), [`audit_file`] (JSON-lines audit sink), [`reload`]. The mirror's
//! Kubernetes objects are the controller's (`noexit_controller::mirror_config::deploy`).

pub mod audit_file;
pub mod clients;
pub mod conditional;
pub mod conn;
pub mod dcf;
pub mod index;
pub mod policy;
pub mod rds;
pub mod reload;
pub mod serve;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

pub use policy::policy_from_projects;

/// Arguments of `noexit-operator mirror`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8080", env = "NOEXIT_MIRROR_LISTEN")]
    pub listen: std::net::SocketAddr,
    /// Upstream CRAN repository (a CRAN mirror or a Posit Package Manager snapshot URL),
    /// read through into --cache-dir.
    /// Must be `https://`.
    #[arg(long, env = "NOEXIT_MIRROR_UPSTREAM")]
    pub upstream: Option<String>,
    /// CA bundle (PEM) for the upstream's HTTPS instead of the system roots (a site's own
    /// CRAN mirror behind a private CA).
    #[arg(long, env = "NOEXIT_MIRROR_UPSTREAM_CA", requires = "upstream")]
    pub upstream_ca: Option<PathBuf>,
    /// Development and tests only: accept an `http://` upstream on a loopback address.
    #[arg(long, requires = "upstream")]
    pub allow_http_upstream: bool,
    /// Directory for verified downloads and the last upstream index.
    #[arg(long, env = "NOEXIT_MIRROR_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Offline repository (a directory with src/contrib/PACKAGES and the tarballs).
    #[arg(long, env = "NOEXIT_MIRROR_SNAPSHOT")]
    pub snapshot: Option<PathBuf>,
    /// Policy file: per project, the `spec.egress.mirror` rules (reloaded on change).
    #[arg(long, env = "NOEXIT_MIRROR_POLICY")]
    pub policy: PathBuf,
    /// Clients file: source address → <project>/<workspace> (reloaded on change).
    #[arg(long, env = "NOEXIT_MIRROR_CLIENTS")]
    pub clients: Option<PathBuf>,
    /// Append audit events to this file as JSON lines (fsync'd before a package is served).
    #[arg(long, env = "NOEXIT_MIRROR_AUDIT_FILE", conflicts_with = "database_url")]
    pub audit_file: Option<PathBuf>,
    /// Append audit events to the shared tamper-evident log (the API's database:
    /// `sqlite:///path/noexit.db` or `postgres://…`, as the mirror's own role). The API signs
    /// the checkpoints.
    #[arg(long, env = "NOEXIT_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// The mirror's audit key (ed25519 PKCS#8 PEM, `noexit-operator audit-keygen`): signs each
    /// entry as writer `mirror`. Without it the entries are unsigned and `verify` says so.
    #[arg(long, env = "NOEXIT_AUDIT_KEY", requires = "database_url")]
    pub audit_key: Option<PathBuf>,
    #[command(flatten)]
    pub tls: Box<TlsArgs>,
    #[command(flatten)]
    pub tuning: Box<Tuning>,
    /// Print allowed packages whose dependencies their project may not install, then exit
    /// (status 1 if there are any).
    #[arg(long)]
    pub check_policy: bool,
}

/// HTTPS and client certificates (optional).
#[derive(clap::Args, Debug, Clone)]
pub struct TlsArgs {
    /// Serve HTTPS with this certificate chain (PEM) ...
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// ... and this private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Accept client certificates issued by this CA (PEM); their URI SAN
    /// noexit://workspace/<project>/<name> names the workspace. Clients without one are
    /// attributed by address.
    #[arg(long, requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
}

/// Timeouts and limits.
#[derive(clap::Args, Debug, Clone)]
pub struct Tuning {
    /// Seconds between upstream index refreshes.
    #[arg(long, default_value_t = 600)]
    pub index_refresh_secs: u64,
    /// Seconds to wait for upstream to connect, answer, or send the next chunk.
    #[arg(long, default_value_t = 30)]
    pub upstream_timeout_secs: u64,
    /// Seconds a connection may make no progress (idle keep-alive, stalled reader).
    #[arg(long, default_value_t = 60)]
    pub idle_timeout_secs: u64,
    /// Most open connections in total.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// Most open connections per client address.
    #[arg(long, default_value_t = 64)]
    pub max_connections_per_client: usize,
    /// Seconds between checks of the policy and clients files.
    #[arg(long, default_value_t = 2)]
    pub reload_secs: u64,
}

fn log_dependency_problems(policy: &policy::PolicyFile, index: &index::Index) -> Vec<policy::DependencyProblem> {
    let problems = policy::dependency_problems(policy, index);
    for p in &problems {
        tracing::warn!(project = %p.project, package = %p.package, missing = %p.missing, "{p}");
    }
    problems
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let upstream_ca = match &args.upstream_ca {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("--upstream-ca {}", p.display()))?),
        None => None,
    };
    let upstream = args
        .upstream
        .as_deref()
        .map(|url| {
            let timeout = Duration::from_secs(args.tuning.upstream_timeout_secs);
            store::Upstream::new(url, timeout, upstream_ca.as_deref(), args.allow_http_upstream)
        })
        .transpose()?;
    let store = Arc::new(store::Store::open(args.cache_dir.clone(), args.snapshot.clone(), upstream)?);
    if store.has_upstream() {
        match store.refresh_index().await {
            Ok(n) => tracing::info!(packages = n, "upstream index loaded"),
            Err(e) => tracing::warn!(error = %e, "upstream index unavailable; serving the cached one"),
        }
    }
    let (policy_file, policy_bytes) = reload::load(&args.policy, policy::PolicyFile::from_yaml)?;
    if args.check_policy {
        let problems = policy::dependency_problems(&policy_file, &store.index().index);
        for p in &problems {
            println!("{p}");
        }
        if !problems.is_empty() {
            anyhow::bail!("{} allowed package(s) need packages their project may not install", problems.len());
        }
        println!("policy ok: every allowed package's dependencies are allowed");
        return Ok(());
    }
    let audit = audit_file::open_sink(
        noexit_audit::writers::MIRROR,
        args.database_url.as_deref(),
        args.audit_key.as_deref(),
        args.audit_file.as_deref(),
    )
    .await?;
    log_dependency_problems(&policy_file, &store.index().index);
    let policy = Arc::new(reload::Watched::new(policy_file));
    let reload_every = Duration::from_secs(args.tuning.reload_secs.max(1));
    {
        let store = store.clone();
        reload::watch(
            args.policy.clone(),
            policy_bytes,
            policy.clone(),
            reload_every,
            policy::PolicyFile::from_yaml,
            move |p| {
                log_dependency_problems(p, &store.index().index);
            },
        );
    }
    let clients = match &args.clients {
        Some(path) => {
            let (map, bytes) = reload::load(path, clients::ClientMap::from_yaml)?;
            let watched = Arc::new(reload::Watched::new(map));
            reload::watch(path.clone(), bytes, watched.clone(), reload_every, clients::ClientMap::from_yaml, |_| {});
            watched
        }
        None if args.tls.client_ca.is_some() => Arc::new(reload::Watched::new(clients::ClientMap::default())),
        None => anyhow::bail!("no way to attribute requests: give --clients, --client-ca, or both"),
    };
    if store.has_upstream() {
        let (store, policy) = (store.clone(), policy.clone());
        let every = Duration::from_secs(args.tuning.index_refresh_secs.max(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tick.tick().await;
                let before = store.index().generation;
                match store.refresh_index().await {
                    Ok(n) if store.index().generation != before => {
                        tracing::info!(packages = n, "upstream index changed");
                        log_dependency_problems(&policy.get(), &store.index().index);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "upstream index refresh failed; keeping the previous one"),
                }
            }
        });
    }
    let tls = tls_acceptor(&args)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(listen = %args.listen, tls = tls.is_some(), "mirror serving");
    let mirror = Arc::new(serve::Mirror::new(store, policy, clients, audit));
    let limits = serve::Limits {
        idle: Duration::from_secs(args.tuning.idle_timeout_secs.max(1)),
        header_read: Duration::from_secs(10),
        tls_handshake: Duration::from_secs(10),
        max_connections: args.tuning.max_connections.max(1),
        max_per_client: args.tuning.max_connections_per_client.max(1),
    };
    serve::serve(listener, mirror, tls, limits, noexit_common::telemetry::shutdown_signal()).await;
    tracing::info!("mirror stopped");
    Ok(())
}

fn read_pem_certs(path: &PathBuf) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not PEM certificates", path.display()))
}

fn tls_acceptor(args: &Args) -> anyhow::Result<Option<tokio_rustls::TlsAcceptor>> {
    let (Some(cert), Some(key)) = (&args.tls.tls_cert, &args.tls.tls_key) else { return Ok(None) };
    let chain = read_pem_certs(cert)?;
    let key_pem = std::fs::read(key).with_context(|| format!("cannot read {}", key.display()))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .with_context(|| format!("{}: not a PEM private key", key.display()))?
        .with_context(|| format!("{}: no private key found", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder =
        rustls::ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let builder = match &args.tls.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_pem_certs(ca)? {
                roots.add(c).with_context(|| format!("{}: unusable CA certificate", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .context("client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(chain, key).context("TLS certificate and key do not match")?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}
