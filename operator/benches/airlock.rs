//! Airlock review and release latency: 50 output checkers review at once (each with its own
//! HTTPS connection and OIDC token), then the requester downloads every approved output with 50
//! downloads in flight (download-link + download: open the sealed file, check its SHA-256, sign
//! and store the receipt). The API runs in this process on loopback over real TLS, with a local
//! OIDC issuer (HTTP on loopback, `allow_http_loopback`). Durable settings: SQLite WAL with
//! synchronous=FULL, PostgreSQL with fsync on.
//!
//! `cargo bench -p noexit-operator --bench airlock`
//! NOEXIT_BENCH_REVIEWERS (default 50), NOEXIT_BENCH_OUTPUTS (500), NOEXIT_BENCH_BACKENDS=sqlite,postgres.
//! Each output gets the project's 2 approvals from 2 distinct reviewers; each reviewer also
//! reads the output (GET) before deciding, as the CLI's `show` does.

#[path = "../tests/support/pg.rs"]
mod pg;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use noexit_crds::agent::WorkspaceIdentity;
use noexit_operator::api::{self, ApiConfig, ApiStore, AppState, server, tls};
use noexit_operator::audit::Store;
use noexit_operator::pki::Ca;
use noexit_test_support::oidc::Issuer;
use serde_json::{Value, json};

type Https = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let backends = std::env::var("NOEXIT_BENCH_BACKENDS").unwrap_or_else(|_| "sqlite,postgres".into());
    for backend in backends.split(',') {
        runtime.block_on(bench(backend.trim()));
    }
}

/// A token for `user` from the fake issuer, valid for an hour (longer than a large run).
fn token(issuer: &Issuer, user: &str) -> String {
    issuer.token_with(user, |c| c["exp"] = json!(chrono::Utc::now().timestamp() + 3600))
}

fn client(ca: &Ca, identity: Option<(&str, &str)>) -> Https {
    let id = identity.map(|(c, k)| (c.as_bytes(), k.as_bytes()));
    let config = tls::client_config(Some(ca.cert_pem().as_bytes()), id).expect("client tls");
    let connector =
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config).https_only().enable_http1().build();
    Client::builder(TokioExecutor::new()).build(connector)
}

async fn call(
    client: &Https,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<(&str, Vec<u8>)>,
) -> (u16, Bytes) {
    let mut req = http::Request::builder().method(method).uri(url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = match body {
        Some((ctype, bytes)) => req.header("content-type", ctype).body(Full::new(Bytes::from(bytes))),
        None => req.body(Full::new(Bytes::new())),
    }
    .expect("request");
    let response = client.request(req).await.expect("call");
    let status = response.status().as_u16();
    (status, response.into_body().collect().await.expect("body").to_bytes())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn report(what: &str, mut samples: Vec<Duration>, wall: Duration) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "  {what:<26} n={:<5} p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  ({:.0}/s)",
        samples.len(),
        ms(percentile(&samples, 0.50)),
        ms(percentile(&samples, 0.99)),
        ms(*samples.last().expect("samples")),
        samples.len() as f64 / wall.as_secs_f64()
    );
}

async fn bench(backend: &str) {
    let reviewers = env("NOEXIT_BENCH_REVIEWERS", 50);
    let outputs = env("NOEXIT_BENCH_OUTPUTS", 500);
    let dir = tempfile::tempdir().expect("tempdir");
    let _pg;
    let url = match backend {
        "sqlite" => format!("sqlite:{}", dir.path().join("noexit.db").display()),
        "postgres" => {
            let Some(server) = pg::PgServer::start_with(true) else {
                println!("postgres: SKIP (no PostgreSQL server binaries)");
                return;
            };
            let url = server.create_database("airlock_bench").expect("create database");
            _pg = server;
            url
        }
        other => panic!("unknown backend {other}"),
    };
    // Plain HTTP on loopback (`allow_http_loopback`).
    let issuer = Issuer::builder().start().await;
    let mut members = String::from("    - {user: alice@x, roles: [researcher]}\n");
    for r in 0..reviewers {
        members.push_str(&format!("    - {{user: checker-{r}@x, roles: [outputChecker]}}\n"));
    }
    let manifests = format!(
        "apiVersion: noexit.io/v1alpha1\nkind: Project\nmetadata: {{name: ward-7}}\nspec:\n  members:\n{members}  approval: {{reference: R, expires: \"2030-01-01\"}}\n  output: {{reviewers: 2}}\n---\napiVersion: noexit.io/v1alpha1\nkind: Workspace\nmetadata: {{name: ws-0, namespace: noexit-ward-7}}\nspec: {{project: ward-7, owner: alice@x, runtime: pod, image: r}}\n"
    );
    let cluster = Arc::new(api::memory_cluster_from(&manifests).expect("manifests"));
    let audit = Arc::new(Store::connect(&url).await.expect("audit store"));
    let store = ApiStore::new(audit.pool().clone());
    let config = ApiConfig {
        data_dir: dir.path().join("data"),
        require_mfa: false,
        max_upload_bytes: 1 << 20,
        inbox: Default::default(),
    };
    let oidc_config =
        api::oidc::OidcConfig { allow_http_loopback: true, ..api::oidc::OidcConfig::new(issuer.url.clone()) };
    let oidc = Arc::new(api::oidc::Oidc::new(oidc_config).expect("oidc"));
    let state = AppState::new(store, audit.clone(), cluster, Some(oidc), config).await.expect("state");
    let ca = Ca::generate("bench CA").expect("ca");
    let server_cert = ca.issue_server(&["localhost".into()], chrono::Duration::days(1)).expect("server cert");
    std::fs::write(dir.path().join("tls.crt"), &server_cert.cert_pem).expect("write");
    std::fs::write(dir.path().join("tls.key"), &server_cert.key_pem).expect("write");
    let cert =
        Arc::new(tls::ReloadingCert::load(&dir.path().join("tls.crt"), &dir.path().join("tls.key")).expect("cert"));
    let tls_config = tls::server_config(cert, ca.cert_pem().as_bytes()).expect("tls");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("https://localhost:{}", listener.local_addr().expect("addr").port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let router = api::router(state.clone());
    let served = tokio::spawn(server::serve(listener, tls_config, state, router, async move {
        let _ = stopped.await;
    }));

    // Outputs from the workspace's agent (not timed): small CSV tables, checked on arrival.
    let ws = WorkspaceIdentity { project: "ward-7".into(), name: "ws-0".into() };
    let agent_cert = ca.issue_workspace_client(&ws, chrono::Duration::days(1)).expect("agent cert");
    let agent = client(&ca, Some((&agent_cert.cert_pem, &agent_cert.key_pem)));
    let started = Instant::now();
    let mut ids = Vec::with_capacity(outputs);
    for o in 0..outputs {
        let content = format!("region,n\nnorth,{}\nsouth,{}\n", 100 + o, 200 + o).into_bytes();
        let id = uuid::Uuid::new_v4();
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&content));
        let manifest = json!({"id": id, "fileName": format!("t{o}.csv"), "size": content.len(), "sha256": sha,
            "submittedBy": "alice", "scan": {"verdict": "clean", "findings": []}});
        let body = Some(("application/json", serde_json::to_vec(&manifest).expect("json")));
        assert_eq!(call(&agent, "POST", &format!("{base}/v1/agent/outbox"), None, body).await.0, 201);
        let put = format!("{base}/v1/agent/outbox/{id}/content");
        assert_eq!(call(&agent, "PUT", &put, None, Some(("application/octet-stream", content))).await.0, 200);
        ids.push(id);
    }
    println!("{backend}: {outputs} outputs submitted and checked in {:.1?}; {reviewers} reviewers", started.elapsed());

    // One HTTPS client (connection) per reviewer, reused for the downloads: the API allows 64
    // connections per address.
    let clients: Vec<Https> = (0..reviewers.max(1)).map(|_| client(&ca, None)).collect();
    // Review: reviewer r approves outputs o with o % R == r or (o + 1) % R == r.
    let ids = Arc::new(ids);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (r, http) in clients.iter().enumerate().take(reviewers) {
        let (ids, token, base) = (ids.clone(), token(&issuer, &format!("checker-{r}@x")), base.clone());
        let http = http.clone();
        tasks.push(tokio::spawn(async move {
            let (mut gets, mut approves) = (Vec::new(), Vec::new());
            for (o, id) in ids.iter().enumerate() {
                if o % reviewers != r && (o + 1) % reviewers != r {
                    continue;
                }
                let t = Instant::now();
                let (status, _) =
                    call(&http, "GET", &format!("{base}/v1/projects/ward-7/outputs/{id}"), Some(&token), None).await;
                assert_eq!(status, 200);
                gets.push(t.elapsed());
                let t = Instant::now();
                let url = format!("{base}/v1/projects/ward-7/outputs/{id}/approve");
                let (status, body) = call(&http, "POST", &url, Some(&token), None).await;
                assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
                approves.push(t.elapsed());
            }
            (gets, approves)
        }));
    }
    let (mut gets, mut approves) = (Vec::new(), Vec::new());
    for t in tasks {
        let (g, a) = t.await.expect("reviewer");
        gets.extend(g);
        approves.extend(a);
    }
    let wall = started.elapsed();
    report("review: get", gets, wall);
    report("review: approve", approves, wall);

    // Release: the requester downloads every output, 50 in flight.
    let token = token(&issuer, "alice@x");
    let started = Instant::now();
    let mut tasks = Vec::new();
    let lanes = reviewers.max(1);
    for (lane, http) in clients.iter().enumerate().take(lanes) {
        let (ids, token, base) = (ids.clone(), token.clone(), base.clone());
        let http = http.clone();
        tasks.push(tokio::spawn(async move {
            let (mut links, mut downloads) = (Vec::new(), Vec::new());
            for id in ids.iter().skip(lane).step_by(lanes) {
                let t = Instant::now();
                let url = format!("{base}/v1/projects/ward-7/outputs/{id}/download-link");
                let (status, body) = call(&http, "POST", &url, Some(&token), None).await;
                assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
                links.push(t.elapsed());
                let link: Value = serde_json::from_slice(&body).expect("link");
                let t = Instant::now();
                let (status, body) =
                    call(&http, "GET", &format!("{base}{}", link["url"].as_str().expect("url")), Some(&token), None)
                        .await;
                assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
                downloads.push(t.elapsed());
            }
            (links, downloads)
        }));
    }
    let (mut links, mut downloads) = (Vec::new(), Vec::new());
    for t in tasks {
        let (l, d) = t.await.expect("downloader");
        links.extend(l);
        downloads.extend(d);
    }
    let wall = started.elapsed();
    report("release: download-link", links, wall);
    report("release: download+receipt", downloads, wall);
    let _ = stop.send(());
    let _ = served.await;
    audit.close().await;
}
