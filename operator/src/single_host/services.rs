//! The control-plane API, the mirror and the DNS server, run in this process with the options
//! their own subcommands take (so they behave exactly as `noexit-operator api|mirror|dns`). All
//! three append to the one audit log in the API's database, each signing as its own writer.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio::task::JoinSet;

use super::world::{API_NAME, MIRROR_NAME};
use super::{UpArgs, audit};
use crate::api::{Cluster, MemoryCluster};
use crate::audit::writers;
use crate::pki::Ca;

/// Files the services read, under the state directory.
#[derive(Clone, Debug)]
pub struct Paths {
    pub dir: PathBuf,
    pub clients: PathBuf,
    pub policy: PathBuf,
    /// The gateway's directory (mode 0600: it holds the consoles' passwords).
    pub gateway_directory: PathBuf,
}

impl Paths {
    pub fn new(state_dir: &Path) -> Self {
        let dir = state_dir.join("services");
        Self {
            clients: dir.join("clients.yaml"),
            policy: dir.join("mirror-policy.yaml"),
            gateway_directory: dir.join("gateway-directory.yaml"),
            dir,
        }
    }
}

#[derive(Parser)]
#[command(no_binary_name = true)]
struct Wrap<T: clap::Args> {
    #[command(flatten)]
    inner: T,
}

pub(crate) fn parse<T: clap::Args>(what: &str, args: Vec<String>) -> anyhow::Result<T> {
    Ok(Wrap::<T>::try_parse_from(args).with_context(|| format!("options of the {what}"))?.inner)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Where processes on this host reach the API (the gateway's review pages, the `noexit` CLI).
pub fn api_address(args: &UpArgs) -> std::net::SocketAddrV4 {
    let ip = if args.listen_address.is_unspecified() { std::net::Ipv4Addr::LOCALHOST } else { args.listen_address };
    std::net::SocketAddrV4::new(ip, args.api_port)
}

/// Start the three services; each task ends with its name (or its error).
pub fn start(
    args: &UpArgs,
    paths: &Paths,
    ca: &Ca,
    cluster: Arc<MemoryCluster>,
) -> anyhow::Result<JoinSet<anyhow::Result<&'static str>>> {
    std::fs::create_dir_all(&paths.dir).with_context(|| format!("creating {}", paths.dir.display()))?;
    let state = &args.common.state_dir;
    let pki = state.join("pki");
    let mut names = vec![API_NAME.to_owned(), MIRROR_NAME.into(), "localhost".into(), "127.0.0.1".into()];
    if !args.listen_address.is_unspecified() && !args.listen_address.is_loopback() {
        names.push(args.listen_address.to_string());
    }
    let server = ca.issue_server(&names, chrono::Duration::days(365))?;
    std::fs::write(pki.join("server.crt"), &server.cert_pem)?;
    super::write_private(&pki.join("server.key"), &server.key_pem)?;
    let listen = |port: u16| format!("{}:{port}", args.listen_address);

    let mut api_args: Vec<String> = vec![
        "--listen".into(),
        listen(args.api_port),
        "--tls-cert".into(),
        s(&pki.join("server.crt")),
        "--tls-key".into(),
        s(&pki.join("server.key")),
        "--client-ca".into(),
        s(&pki.join("ca.crt")),
        "--database-url".into(),
        audit::database_url(state),
        "--audit-key".into(),
        s(&audit::key_path(state, writers::API)),
        "--data-dir".into(),
        s(&state.join("api-data")),
        // Not the API's default under /var/lib/noexit: each state directory is one instance.
        "--seal-key".into(),
        s(&state.join("airlock-seal.key")),
    ];
    // People sign in to the API (the `noexit` CLI, the airlock's review pages) at the same issuer
    // as at the gateway.
    api_args.extend(super::gateway::api_sign_in_args(&args.gateway));
    let api: crate::api::Args = parse("API", api_args)?;
    // Without an upstream the mirror serves an offline snapshot: an empty one by default.
    let snapshot = state.join("mirror-snapshot");
    let packages = snapshot.join("src/contrib/PACKAGES");
    if !packages.exists() {
        std::fs::create_dir_all(snapshot.join("src/contrib"))
            .with_context(|| format!("creating {}", snapshot.display()))?;
        std::fs::write(&packages, "")?;
    }
    let mut mirror_args = vec![
        "--listen".into(),
        listen(args.mirror_port),
        "--policy".into(),
        s(&paths.policy),
        "--clients".into(),
        s(&paths.clients),
        "--cache-dir".into(),
        s(&state.join("mirror-cache")),
    ];
    mirror_args.extend(audit_args(state, writers::MIRROR));
    match &args.mirror_upstream {
        Some(up) => mirror_args.extend(["--upstream".into(), up.clone()]),
        None => mirror_args.extend(["--snapshot".into(), s(&snapshot)]),
    }
    let mirror: crate::mirror::Args = parse("mirror", mirror_args)?;
    let site = paths.dir.join("dns-site.yaml");
    std::fs::write(&site, dns_site())?;
    let mut dns_args = vec![
        "--listen".into(),
        listen(args.dns_port),
        "--metrics-addr".into(),
        "127.0.0.1:0".into(),
        "--site".into(),
        s(&site),
        "--clients".into(),
        s(&paths.clients),
    ];
    dns_args.extend(audit_args(state, writers::DNS));
    let dns: crate::dns::Args = parse("DNS server", dns_args)?;
    let mut set = JoinSet::new();
    let cluster: Arc<dyn Cluster> = cluster;
    set.spawn(async move {
        crate::api::run_with_cluster(api, Some(cluster)).await.context("control-plane API").map(|()| "the API")
    });
    set.spawn(async move { crate::mirror::run(mirror).await.context("mirror").map(|()| "the mirror") });
    set.spawn(async move { crate::dns::run(dns).await.context("DNS server").map(|()| "the DNS server") });
    Ok(set)
}

/// Where a writer's audit entries go: the API's database, signed with its own key
/// ([`audit::prepare`] made the key and migrated the database).
fn audit_args(state: &Path, writer: &str) -> [String; 4] {
    ["--database-url".into(), audit::database_url(state), "--audit-key".into(), s(&audit::key_path(state, writer))]
}

/// The DNS server's site: its zone holds the Kubernetes service names only. In single-host mode
/// the guests find the API and the mirror through the seed's hosts entries (each project on its
/// own gateway address); the DNS server's job is to refuse every other name without recursing.
fn dns_site() -> String {
    "operatorNamespace: noexit-system\n".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_and_dns_audit_into_the_apis_database_as_themselves() {
        let state = Path::new("/st");
        let mirror: crate::mirror::Args = parse(
            "mirror",
            [
                vec!["--snapshot".into(), "/snap".into(), "--policy".into(), "/p".into()],
                audit_args(state, writers::MIRROR).to_vec(),
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(mirror.database_url.as_deref(), Some("sqlite:/st/api.db"));
        assert_eq!(mirror.audit_key.as_deref(), Some(Path::new("/st/audit-keys/mirror.pem")));
        assert!(mirror.audit_file.is_none());
        let dns: crate::dns::Args = parse("DNS server", audit_args(state, writers::DNS).to_vec()).unwrap();
        assert_eq!(dns.database_url.as_deref(), Some("sqlite:/st/api.db"));
        assert_eq!(dns.audit_key.as_deref(), Some(Path::new("/st/audit-keys/dns.pem")));
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    /// `up`'s three services as `start` runs them, against a temporary state directory: a
    /// request to the mirror and a query to the DNS server from an address that is no
    /// workspace are refused and audited, and those entries land in the API's chain signed by
    /// the mirror and the DNS server, beside the API's, so the command `up` prints verifies.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_services_audit_signed_into_the_apis_chain() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        let (api_port, mirror_port, dns_port) = (free_port(), free_port(), free_port());
        let port = |p: u16| p.to_string();
        let args: UpArgs = parse(
            "up",
            vec![
                "-f".into(),
                "unused.yaml".into(),
                "--state-dir".into(),
                s(state),
                "--listen-address".into(),
                "127.0.0.1".into(),
                "--api-port".into(),
                port(api_port),
                "--mirror-port".into(),
                port(mirror_port),
                "--dns-port".into(),
                port(dns_port),
            ],
        )
        .unwrap();
        let paths = Paths::new(state);
        std::fs::create_dir_all(&paths.dir).unwrap();
        // What the reconcile loop writes: no workspaces yet.
        std::fs::write(&paths.clients, crate::mirror::clients::clients_yaml(&[])).unwrap();
        std::fs::write(&paths.policy, crate::mirror::policy::policy_from_projects(&[]).to_yaml()).unwrap();
        audit::prepare(state).await.unwrap();
        let ca = super::super::load_or_make_ca(state).unwrap();
        let mut services = start(&args, &paths, &ca, Arc::new(MemoryCluster::new())).unwrap();

        let url = audit::database_url(state);
        let actions = || async {
            let store = crate::audit::Store::open_read_only(&url).await.ok()?;
            let rows = store.tail(1000).await.ok();
            store.pool_close().await;
            rows.map(|r| r.into_iter().map(|e| (e.event.action, e.writer)).collect::<Vec<_>>())
        };
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut query = hickory_proto::op::Message::query();
        query.add_query(hickory_proto::op::Query::query(
            hickory_proto::rr::Name::from_ascii("exfil.example.org.").unwrap(),
            hickory_proto::rr::RecordType::A,
        ));
        let query = query.to_vec().unwrap();
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let seen = loop {
            if let Some(Some(done)) = futures::FutureExt::now_or_never(services.join_next()) {
                panic!("a service stopped: {:?}", done.map(|r| r.map_err(|e| format!("{e:#}"))));
            }
            // Until each has audited once: a GET from an address that is no workspace, a name
            // workspaces may not resolve.
            if let Ok(mut c) = tokio::net::TcpStream::connect(("127.0.0.1", mirror_port)).await {
                let _ = c.write_all(b"GET /src/contrib/PACKAGES HTTP/1.0\r\n\r\n").await;
                let mut sink = Vec::new();
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), c.read_to_end(&mut sink)).await;
            }
            let _ = udp.send_to(&query, ("127.0.0.1", dns_port)).await;
            let seen = actions().await.unwrap_or_default();
            let has = |prefix: &str| seen.iter().any(|(a, _)| a.starts_with(prefix));
            if has("mirror.") && has("dns.") {
                break seen;
            }
            assert!(tokio::time::Instant::now() < deadline, "no mirror.* and dns.* entries: {seen:?}");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        services.abort_all();
        while services.join_next().await.is_some() {}
        for (action, writer) in &seen {
            let want = crate::audit::writers::owner_of(action.as_bytes());
            assert_eq!(writer.as_deref(), Some(want), "{action} written by {writer:?}");
        }

        let verify: crate::cli::audit::AuditArgs = parse("audit", audit::verify_args(state)[1..].to_vec()).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = crate::cli::audit::run_with(verify, &mut out, &mut err).await;
        let report = String::from_utf8_lossy(&out).into_owned() + &String::from_utf8_lossy(&err);
        eprintln!("{report}");
        assert_eq!(code, 0, "{report}");
        assert!(
            report.contains("audit log intact") && report.contains("mirror ") && report.contains("dns "),
            "{report}"
        );
        assert!(!state.join("mirror-audit.jsonl").exists() && !state.join("dns-audit.jsonl").exists());
    }
}
