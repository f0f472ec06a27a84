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
    let server = ca.issue_server(
        &[API_NAME.into(), MIRROR_NAME.into(), "localhost".into(), "127.0.0.1".into()],
        chrono::Duration::days(365),
    )?;
    std::fs::write(pki.join("server.crt"), &server.cert_pem)?;
    super::write_private(&pki.join("server.key"), &server.key_pem)?;
    let listen = |port: u16| format!("{}:{port}", args.listen_address);

    let api: crate::api::Args = parse(
        "API",
        vec![
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
        ],
    )?;
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
}
