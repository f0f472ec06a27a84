//! `noexit-operator dns`: the workspace DNS server. Authoritative only, on the `hickory-server`
//! library: it answers the names a workspace needs (the control-plane API and the package
//! mirror, from the site file) and refuses everything else. It never recurses and never
//! forwards, so a query name (which can carry data: `<secret>.attacker.example`) goes no
//! further than this server. Names over the length caps are refused, each source address is
//! rate-limited, and refused names are counted per project (`/metrics`) and written to the
//! audit log per workspace, rate-limited, attributed through the mirror's clients file.
//!
//! Pieces: [`answer`] (pure: what to say), [`limit`] (token buckets), [`handler`] (the DNS
//! library's request handler, metrics), [`audit`] (refused names into the audit log).

pub mod answer;
pub mod audit;
pub mod handler;
pub mod limit;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;

use noexit_common::site::Site;
use noexit_mirror::clients::ClientMap;
use noexit_mirror::reload;

/// Arguments of `noexit-operator dns`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Address to serve DNS on, UDP and TCP.
    #[arg(long, default_value = "0.0.0.0:5353", env = "NOEXIT_DNS_LISTEN")]
    pub listen: SocketAddr,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,
    /// Site file: the names answered are the hosts of its control-plane and mirror URLs
    /// (`<service>.<operatorNamespace>.svc`) with their `address`. Default: the built-in site.
    #[arg(long, env = "NOEXIT_SITE")]
    pub site: Option<PathBuf>,
    /// Clients file (the mirror's: source address → <project>/<workspace>), reloaded on
    /// change; attributes refused names to workspaces. Without it every source is `unknown`.
    #[arg(long, env = "NOEXIT_DNS_CLIENTS")]
    pub clients: Option<PathBuf>,
    /// Append audit events to this file as JSON lines.
    #[arg(long, env = "NOEXIT_DNS_AUDIT_FILE", conflicts_with = "database_url")]
    pub audit_file: Option<PathBuf>,
    /// Append audit events to the shared tamper-evident log (the API's database, as the DNS
    /// server's own role: `dns.*` entries only).
    #[arg(long, env = "NOEXIT_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// The DNS server's audit key (ed25519 PKCS#8 PEM, `noexit-operator audit-keygen`): signs
    /// each entry as writer `dns`. Without it the entries are unsigned and `verify` says so.
    #[arg(long, env = "NOEXIT_AUDIT_KEY", requires = "database_url")]
    pub audit_key: Option<PathBuf>,
    #[command(flatten)]
    pub limits: Limits,
}

/// Caps and rates.
#[derive(clap::Args, Debug, Clone)]
pub struct Limits {
    /// Longest query name answered, in characters (DNS allows 253).
    #[arg(long, default_value_t = 100)]
    pub max_name_length: usize,
    /// Longest label answered (DNS allows 63).
    #[arg(long, default_value_t = 63)]
    pub max_label_length: usize,
    /// Queries a second each source address may send, on average ...
    #[arg(long, default_value_t = 50.0)]
    pub queries_per_second: f64,
    /// ... and at once.
    #[arg(long, default_value_t = 100)]
    pub query_burst: u32,
    /// Refused names audited a minute per workspace, on average (the rest are counted, and
    /// the next entry says how many were left out) ...
    #[arg(long, default_value_t = 10.0)]
    pub audits_per_minute: f64,
    /// ... and at once.
    #[arg(long, default_value_t = 20)]
    pub audit_burst: u32,
    /// Most source addresses tracked for rate limiting at once.
    #[arg(long, default_value_t = 4096)]
    pub max_sources: usize,
    /// Seconds a TCP connection may stay without a query.
    #[arg(long, default_value_t = 5)]
    pub tcp_idle_secs: u64,
    /// Seconds between checks of the clients file.
    #[arg(long, default_value_t = 2)]
    pub reload_secs: u64,
}

impl Limits {
    pub fn settings(&self) -> handler::Settings {
        handler::Settings {
            caps: answer::NameCaps::new(self.max_name_length, self.max_label_length),
            query_rate: limit::Rate::new(self.queries_per_second, self.query_burst),
            audit_rate: limit::Rate::new(self.audits_per_minute / 60.0, self.audit_burst),
            max_sources: self.max_sources.max(1),
            ..handler::Settings::default()
        }
    }
}

/// The zone the site describes: the API's and the mirror's names.
pub fn zone_for(site: &Site) -> Result<answer::Zone, answer::ZoneError> {
    let server = format!("{}.{}.svc.", site.dns.service, site.operator_namespace);
    answer::Zone::new(&site.workspace_names(), &server)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let site = match &args.site {
        Some(path) => Site::from_file(path)?,
        None => Site::default(),
    };
    let zone = zone_for(&site).context("the site's names")?;
    let reload_every = Duration::from_secs(args.limits.reload_secs.max(1));
    let clients = match &args.clients {
        Some(path) => {
            let (map, bytes) = reload::load(path, ClientMap::from_yaml)?;
            let watched = Arc::new(reload::Watched::new(map));
            reload::watch(path.clone(), bytes, watched.clone(), reload_every, ClientMap::from_yaml, |_| {});
            watched
        }
        None => {
            tracing::warn!("no --clients: refused names are attributed to `unknown`");
            Arc::new(reload::Watched::new(ClientMap::default()))
        }
    };
    let sink = noexit_mirror::audit_file::open_sink(
        noexit_audit::writers::DNS,
        args.database_url.as_deref(),
        args.audit_key.as_deref(),
        args.audit_file.as_deref(),
    )
    .await?;
    let metrics = Arc::new(handler::DnsMetrics::default());
    let (writer, writer_task) = {
        let metrics = metrics.clone();
        audit::Writer::start(sink, 1024, move |_| {
            metrics.audit_failed.inc();
        })
    };

    let udp = tokio::net::UdpSocket::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (UDP)", args.listen))?;
    let tcp = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (TCP)", args.listen))?;
    let health = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on --metrics-addr {}", args.metrics_addr))?;

    let names = zone.names();
    let handler = handler::Handler::new(zone, args.limits.settings(), clients, metrics.clone(), writer);
    let mut server = hickory_server::Server::new(handler);
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(args.limits.tcp_idle_secs.max(1)), 32);
    let ready = Arc::new(AtomicBool::new(true));
    let stop = server.shutdown_token().clone();
    let health_stop = stop.clone();
    let health_task = tokio::spawn(async move {
        let router = health_router(metrics, ready);
        let shutdown = async move { health_stop.cancelled().await };
        if let Err(e) = axum::serve(health, router).with_graceful_shutdown(shutdown).await {
            tracing::error!(error = %e, "health server failed");
        }
    });
    tokio::spawn(async move {
        noexit_common::telemetry::shutdown_signal().await;
        stop.cancel();
    });
    tracing::info!(listen = %args.listen, names = ?names, "workspace DNS serving (authoritative only, no recursion)");
    let served = server.block_until_done().await;
    // The handler (and with it the audit queue's sender) goes with the server: the writer
    // drains what is queued, then ends.
    drop(server);
    if tokio::time::timeout(Duration::from_secs(10), writer_task).await.is_err() {
        tracing::warn!("audit entries still queued after 10 s; stopping anyway");
    }
    let _ = health_task.await;
    tracing::info!("workspace DNS stopped");
    served.map_err(|e| anyhow::anyhow!("DNS server: {e}"))
}

/// `/healthz`, `/readyz` and `/metrics`.
pub fn health_router(metrics: Arc<handler::DnsMetrics>, ready: Arc<AtomicBool>) -> axum::Router {
    noexit_common::telemetry::health_router(move || metrics.encode(), ready)
}
