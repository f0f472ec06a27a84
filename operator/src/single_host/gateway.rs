//! The remote-desktop gateway in `up`'s process: the same crate and options as
//! `noexit-operator gateway`, reading its directory from the file each reconcile pass writes
//! ([`super::desktops`]) and recording into the API's SQLite database (the audit log and the
//! session table `noexit-operator status` and `noexit sessions` read).
//!
//! It runs only when an OIDC issuer is given: without one nobody could sign in.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use super::desktops::Publish;
use super::services::{Paths, parse};
use crate::audit::writers::{self, Writer};
use crate::audit::{Store, StoreOptions};
use crate::gateway_store::StoreRecorder;
use crate::pki::Ca;

/// Options of `up` for the gateway.
#[derive(clap::Args, Debug, Clone)]
pub struct GatewayOptions {
    /// OIDC issuer people sign in with at the remote-desktop gateway (exactly as in the tokens'
    /// `iss`). Without it `up` runs no gateway and no desktop can be opened.
    #[arg(long)]
    pub oidc_issuer: Option<String>,
    /// HTTPS address of the gateway.
    #[arg(long, default_value = "127.0.0.1:8444")]
    pub gateway_listen: SocketAddr,
    /// Plain-HTTP address of the gateway's `/metrics`.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub gateway_metrics_listen: SocketAddr,
    /// The URL people open, registered at the issuer with `/callback` appended (default
    /// `https://localhost:<port of --gateway-listen>`).
    #[arg(long)]
    pub gateway_public_url: Option<String>,
    /// The gateway's OIDC client id.
    #[arg(long, default_value = "noexit-gateway")]
    pub gateway_client_id: String,
    /// File holding the client secret, for issuers that require one besides PKCE.
    #[arg(long)]
    pub gateway_client_secret_file: Option<PathBuf>,
    /// Claim that names the user as Project members are written.
    #[arg(long, default_value = "email")]
    pub oidc_user_claim: String,
    /// CA bundle for the issuer's HTTPS.
    #[arg(long)]
    pub oidc_ca: Option<PathBuf>,
    /// Allow sign-in without a second factor (projects may still require one).
    #[arg(long)]
    pub allow_single_factor: bool,
    /// Where noVNC is installed (Debian's `novnc` package).
    #[arg(long, default_value = "/usr/share/novnc")]
    pub novnc_dir: PathBuf,
    /// The gateway's certificate and key (PEM). Default: issued by the single-host CA
    /// (`<state-dir>/pki/ca.crt`) for localhost, 127.0.0.1, the listen address and the public
    /// URL's host.
    #[arg(long, requires = "gateway_tls_key")]
    pub gateway_tls_cert: Option<PathBuf>,
    #[arg(long, requires = "gateway_tls_cert")]
    pub gateway_tls_key: Option<PathBuf>,
}

/// A gateway `up` will run.
pub struct Planned {
    pub args: noexit_gateway::Args,
    /// Issue the certificate at start (none was given).
    issue_cert: bool,
    /// The API's database, where the one audit log is.
    database_url: String,
    /// The gateway's own audit key.
    audit_key: PathBuf,
}

/// Why the gateway is off, for `up`'s first lines and `status`.
pub const OFF: &str =
    "off (no --oidc-issuer: nobody could sign in, so no desktop can be opened; give the site's issuer to start it)";

/// The API's options for people signing in: the gateway's issuer, so a person who opens a
/// desktop can also use the `noexit` CLI and the review pages against this host. Empty without
/// an issuer (then only workspaces, by certificate, reach the API).
pub fn api_sign_in_args(opts: &GatewayOptions) -> Vec<String> {
    let Some(issuer) = &opts.oidc_issuer else { return Vec::new() };
    let mut v = vec!["--oidc-issuer".into(), issuer.clone(), "--oidc-user-claim".into(), opts.oidc_user_claim.clone()];
    if let Some(f) = &opts.oidc_ca {
        v.extend(["--oidc-ca".into(), f.display().to_string()]);
    }
    // The API accepts a plain-HTTP issuer only on a loopback address (it checks), as the
    // gateway does; an `https://` issuer needs nothing more.
    if issuer.starts_with("http://") {
        v.push("--oidc-allow-http-loopback".into());
    }
    v
}

/// The gateway's options, checked (before anything is made), or `None` without an issuer.
pub fn plan(
    opts: &GatewayOptions,
    state_dir: &Path,
    paths: &Paths,
    api: std::net::SocketAddrV4,
) -> anyhow::Result<Option<Planned>> {
    let Some(issuer) = &opts.oidc_issuer else { return Ok(None) };
    let public =
        opts.gateway_public_url.clone().unwrap_or_else(|| format!("https://localhost:{}", opts.gateway_listen.port()));
    let pki = state_dir.join("pki");
    let (cert, key, issue_cert) = match (&opts.gateway_tls_cert, &opts.gateway_tls_key) {
        (Some(c), Some(k)) => (c.clone(), k.clone(), false),
        _ => (pki.join("gateway.crt"), pki.join("gateway.key"), true),
    };
    let s = |p: &Path| p.display().to_string();
    let mut v: Vec<String> = vec![
        "--listen".into(),
        opts.gateway_listen.to_string(),
        "--metrics-listen".into(),
        opts.gateway_metrics_listen.to_string(),
        "--tls-cert".into(),
        s(&cert),
        "--tls-key".into(),
        s(&key),
        "--public-url".into(),
        public,
        "--oidc-issuer".into(),
        issuer.clone(),
        "--oidc-client-id".into(),
        opts.gateway_client_id.clone(),
        "--oidc-user-claim".into(),
        opts.oidc_user_claim.clone(),
        "--directory".into(),
        s(&paths.gateway_directory),
        "--novnc-dir".into(),
        s(&opts.novnc_dir),
        // The review pages call the in-process API (its certificate names this address).
        "--api-url".into(),
        format!("https://{api}"),
        "--api-ca".into(),
        s(&pki.join("ca.crt")),
    ];
    if let Some(f) = &opts.gateway_client_secret_file {
        v.extend(["--oidc-client-secret-file".into(), s(f)]);
    }
    if let Some(f) = &opts.oidc_ca {
        v.extend(["--oidc-ca".into(), s(f)]);
    }
    if opts.allow_single_factor {
        v.push("--allow-single-factor".into());
    }
    let args: noexit_gateway::Args = parse("gateway", v)?;
    anyhow::ensure!(
        args.novnc_dir.join("core/rfb.js").exists(),
        "--novnc-dir {}: no core/rfb.js; install noVNC (Debian package novnc) or point --novnc-dir at it",
        args.novnc_dir.display()
    );
    Ok(Some(Planned {
        args,
        issue_cert,
        database_url: super::audit::database_url(state_dir),
        audit_key: super::audit::key_path(state_dir, writers::GATEWAY),
    }))
}

impl Planned {
    /// What the reconcile loop writes for this gateway.
    pub fn publish(&self) -> Publish {
        Publish { path: self.args.directory.clone().unwrap_or_default(), site: self.args.site_policy() }
    }

    /// One line for people and `status`.
    pub fn describe(&self) -> String {
        format!(
            "{} (listening on {}; sign-in at {}; consoles reached through {})",
            self.args.public_url.trim_end_matches('/'),
            self.args.listen,
            self.args.oidc_issuer,
            self.args.directory.as_deref().map(|p| p.display().to_string()).unwrap_or_default()
        )
    }

    /// Issue the certificate and open the database; the returned task serves until shutdown.
    /// Call after `audit::prepare` (the key, the migrated database).
    pub async fn prepare(
        self,
        ca: &Ca,
    ) -> anyhow::Result<impl Future<Output = anyhow::Result<&'static str>> + Send + 'static> {
        if self.issue_cert {
            let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
            names.push(self.args.listen.ip().to_string());
            if let Some(host) = url_host(&self.args.public_url) {
                names.push(host);
            }
            names.sort();
            names.dedup();
            names.retain(|n| n != "0.0.0.0");
            let server = ca.issue_server(&names, chrono::Duration::days(365))?;
            std::fs::write(&self.args.tls_cert, &server.cert_pem)
                .with_context(|| format!("writing {}", self.args.tls_cert.display()))?;
            super::write_private(&self.args.tls_key, &server.key_pem)?;
        }
        // The gateway signs its entries as the writer `gateway`, with its own key
        // (`audit::prepare` made it and migrated the database).
        let writer = Writer::load(writers::GATEWAY, &self.audit_key)
            .with_context(|| format!("the gateway's audit key {}", self.audit_key.display()))?;
        let options = StoreOptions { writer: Some(writer), ..Default::default() };
        let store = Arc::new(
            Store::connect_with(&self.database_url, options)
                .await
                .with_context(|| format!("opening {} for the gateway", self.database_url))?,
        );
        let recorder = Arc::new(StoreRecorder::new(store.clone()));
        let args = self.args;
        Ok(async move {
            let r = noexit_gateway::run(args, recorder).await.context("remote-desktop gateway");
            store.close().await;
            r.map(|()| "the gateway")
        })
    }
}

/// The host of an `https://host[:port][/…]` URL.
fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    (!host.is_empty()).then(|| host.to_owned())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        o: GatewayOptions,
    }

    const API: std::net::SocketAddrV4 = std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 8443);

    fn opts(extra: &[&str]) -> GatewayOptions {
        Cli::try_parse_from([&["x"], extra].concat()).unwrap().o
    }

    #[test]
    fn no_issuer_no_gateway() {
        let dir = tempfile::tempdir().unwrap();
        assert!(plan(&opts(&[]), dir.path(), &Paths::new(dir.path()), API).unwrap().is_none());
    }

    #[test]
    fn the_gateway_gets_the_directory_file_and_a_certificate_from_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let novnc = dir.path().join("novnc");
        std::fs::create_dir_all(novnc.join("core")).unwrap();
        std::fs::write(novnc.join("core/rfb.js"), "").unwrap();
        let o = opts(&[
            "--oidc-issuer",
            "https://id.example",
            "--gateway-listen",
            "127.0.0.1:9444",
            "--novnc-dir",
            novnc.to_str().unwrap(),
        ]);
        let paths = Paths::new(dir.path());
        let p = plan(&o, dir.path(), &paths, API).unwrap().unwrap();
        assert_eq!(p.args.public_url, "https://localhost:9444");
        assert_eq!(p.args.directory.as_deref(), Some(paths.gateway_directory.as_path()));
        assert_eq!(p.args.tls_cert, dir.path().join("pki/gateway.crt"));
        assert!(p.issue_cert && !p.args.allow_single_factor);
        assert_eq!(p.publish().site.max_session_seconds, 8 * 60 * 60);
        // The review pages reach the in-process API, trusting the single-host CA.
        assert_eq!(p.args.api_url.as_deref(), Some("https://127.0.0.1:8443"));
        assert_eq!(p.args.api_ca, Some(dir.path().join("pki/ca.crt")));
        // No noVNC: refused before anything is made, naming the option.
        let e = plan(
            &opts(&["--oidc-issuer", "https://id.example", "--novnc-dir", "/nonexistent"]),
            dir.path(),
            &paths,
            API,
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("--novnc-dir /nonexistent"), "{e}");
    }

    #[test]
    fn people_sign_in_to_the_api_at_the_gateways_issuer() {
        assert!(api_sign_in_args(&opts(&[])).is_empty());
        let https = api_sign_in_args(&opts(&["--oidc-issuer", "https://id.example", "--oidc-ca", "/ca.pem"]));
        assert_eq!(
            https,
            ["--oidc-issuer", "https://id.example", "--oidc-user-claim", "email", "--oidc-ca", "/ca.pem"]
        );
        // A plain-HTTP issuer is a loopback test issuer: the API accepts it only there (it checks).
        let http = api_sign_in_args(&opts(&["--oidc-issuer", "http://127.0.0.1:5556"]));
        assert_eq!(http.last().map(String::as_str), Some("--oidc-allow-http-loopback"));
        // And the API takes these options as its own.
        let parsed: crate::api::Args = crate::single_host::services::parse("API", https).unwrap();
        assert_eq!(parsed.options.oidc_issuer.as_deref(), Some("https://id.example"));
    }

    #[test]
    fn hosts_of_public_urls() {
        assert_eq!(url_host("https://desktop.example.org").as_deref(), Some("desktop.example.org"));
        assert_eq!(url_host("https://10.0.0.5:8444/").as_deref(), Some("10.0.0.5"));
        assert_eq!(url_host("https://[::1]:8444").as_deref(), Some("::1"));
        assert_eq!(url_host("nonsense"), None);
    }
}
