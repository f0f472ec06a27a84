//! Agent report latency: 200 concurrent agents, each with its own mTLS client certificate and
//! connection, send heartbeats and event batches to the API running in a SECOND process (this
//! binary re-executed in server mode) over loopback. Durable settings: SQLite WAL with
//! synchronous=FULL, PostgreSQL with fsync on.
//!
//! `cargo bench -p noexit-operator --bench api`
//! NOEXIT_BENCH_AGENTS (default 200), NOEXIT_BENCH_REPORTS per agent (50),
//! NOEXIT_BENCH_BACKENDS=sqlite,postgres, NOEXIT_BENCH_PAUSE_MS between an agent's reports (0 =
//! closed loop: every agent sends its next report as soon as the last is answered, the worst
//! case; with a pause, agents start spread over one pause). Real agents heartbeat every 5 s.

#[path = "../tests/support/pg.rs"]
mod pg;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use noexit_crds::agent::WorkspaceIdentity;
use noexit_operator::api::{self, ApiConfig, ApiStore, AppState, server, tls};
use noexit_operator::audit::Store;
use noexit_operator::pki::Ca;

const SERVE_ENV: &str = "NOEXIT_BENCH_API_SERVE";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    if let Ok(dir) = std::env::var(SERVE_ENV) {
        runtime.block_on(serve(Path::new(&dir)));
        return;
    }
    let backends = std::env::var("NOEXIT_BENCH_BACKENDS").unwrap_or_else(|_| "sqlite,postgres".into());
    for backend in backends.split(',') {
        runtime.block_on(bench(backend.trim()));
    }
}

/// Server mode: the API on loopback, its port on stdout, until stdin closes.
async fn serve(dir: &Path) {
    let url = std::fs::read_to_string(dir.join("db-url")).expect("db-url");
    let manifests = std::fs::read_to_string(dir.join("manifests.yaml")).expect("manifests");
    let cluster = Arc::new(api::memory_cluster_from(&manifests).expect("manifests parse"));
    let audit = Arc::new(Store::connect(url.trim()).await.expect("audit store"));
    let store = ApiStore::new(audit.pool().clone());
    let config = ApiConfig {
        data_dir: dir.join("data"),
        require_mfa: false,
        max_upload_bytes: 1 << 20,
        inbox: Default::default(),
    };
    let state = AppState::new(store, audit.clone(), cluster, None, config).await.expect("state");
    let cert = Arc::new(tls::ReloadingCert::load(&dir.join("tls.crt"), &dir.join("tls.key")).expect("cert"));
    let ca = std::fs::read(dir.join("ca.crt")).expect("ca");
    let tls_config = tls::server_config(cert, &ca).expect("tls");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    println!("LISTEN {}", listener.local_addr().expect("addr").port());
    std::io::stdout().flush().expect("stdout");
    let stdin_closed = async {
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {}
        })
        .await;
    };
    let router = api::router(state.clone());
    server::serve(listener, tls_config, state, router, stdin_closed).await.expect("serve");
    audit.close().await;
}

fn manifests(agents: usize) -> String {
    let mut text = String::from(
        "apiVersion: noexit.io/v1alpha1\nkind: Project\nmetadata: {name: ward-7}\nspec:\n  members: [{user: a@x, roles: [researcher]}]\n  approval: {reference: R, expires: \"2030-01-01\"}\n",
    );
    for a in 0..agents {
        text.push_str(&format!(
            "---\napiVersion: noexit.io/v1alpha1\nkind: Workspace\nmetadata: {{name: ws-{a}, namespace: noexit-ward-7}}\nspec: {{project: ward-7, owner: a@x, runtime: pod, image: r}}\n"
        ));
    }
    text
}

fn heartbeat(i: usize) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "at": chrono::Utc::now(), "agentVersion": "0.1.0",
        "egress": {"locked": true, "mode": "vm", "blockedSinceLast": i % 3},
        "hardening": {"clipboardOutDisabled": true, "driveRedirectionDisabled": true, "usbStorageBlocked": true},
        "spoolDepth": 0, "activeSessions": 1,
    }))
    .expect("json")
}

fn events() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"events": [
        {"id": uuid::Uuid::new_v4(), "at": chrono::Utc::now(), "type": "session", "action": "active", "user": "alice", "session": "desktop-1"},
    ]}))
    .expect("json")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

async fn bench(backend: &str) {
    let agents = env("NOEXIT_BENCH_AGENTS", 200);
    let reports = env("NOEXIT_BENCH_REPORTS", 50);
    let pause = Duration::from_millis(env("NOEXIT_BENCH_PAUSE_MS", 0) as u64);
    let dir = tempfile::tempdir().expect("tempdir");
    let _pg; // keeps the PostgreSQL server alive for the run
    let url = match backend {
        "sqlite" => format!("sqlite:{}", dir.path().join("noexit.db").display()),
        "postgres" => {
            let Some(server) = pg::PgServer::start_with(true) else { return };
            let url = server.create_database("api_bench").expect("create database");
            _pg = server;
            url
        }
        other => panic!("unknown backend {other}"),
    };
    let ca = Ca::generate("bench CA").expect("ca");
    let server_cert = ca.issue_server(&["localhost".into()], chrono::Duration::days(1)).expect("server cert");
    for (name, content) in [
        ("ca.crt", ca.cert_pem().to_owned()),
        ("tls.crt", server_cert.cert_pem.clone()),
        ("tls.key", server_cert.key_pem.clone()),
        ("db-url", url.clone()),
        ("manifests.yaml", manifests(agents)),
    ] {
        std::fs::write(dir.path().join(name), content).expect("write");
    }
    let mut child = Command::new(std::env::current_exe().expect("exe"))
        .env(SERVE_ENV, dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the server process");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read port");
    let port: u16 = line.trim().strip_prefix("LISTEN ").and_then(|p| p.parse().ok()).expect("LISTEN <port>");
    let base = format!("https://localhost:{port}");

    let mut clients = Vec::new();
    for a in 0..agents {
        let id = WorkspaceIdentity { project: "ward-7".into(), name: format!("ws-{a}") };
        let cert = ca.issue_workspace_client(&id, chrono::Duration::days(1)).expect("client cert");
        let config = tls::client_config(
            Some(ca.cert_pem().as_bytes()),
            Some((cert.cert_pem.as_bytes(), cert.key_pem.as_bytes())),
        )
        .expect("client tls");
        let connector =
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config).https_only().enable_http1().build();
        clients
            .push(Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1).build::<_, Full<Bytes>>(connector));
    }
    let send = |client: Client<_, Full<Bytes>>, path: &'static str, body: Vec<u8>, base: String| async move {
        let req = http::Request::post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        let started = Instant::now();
        let response = client.request(req).await.expect("report");
        let status = response.status();
        let _ = response.into_body().collect().await;
        assert!(status.is_success(), "{path}: {status}");
        started.elapsed()
    };
    // Connect everyone first (TLS handshakes are not reports).
    for c in &clients {
        send(c.clone(), "/v1/agent/heartbeat", heartbeat(0), base.clone()).await;
    }
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(a, client)| {
            let base = base.clone();
            tokio::spawn(async move {
                // Paced agents start spread over one period, as real agents booted at different times.
                if !pause.is_zero() {
                    tokio::time::sleep(pause * a as u32 / agents as u32).await;
                }
                let mut latencies = Vec::with_capacity(reports);
                for i in 0..reports {
                    let (path, body) =
                        if i % 2 == 0 { ("/v1/agent/heartbeat", heartbeat(i)) } else { ("/v1/agent/events", events()) };
                    latencies.push(send(client.clone(), path, body, base.clone()).await);
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("agent task"));
    }
    let elapsed = started.elapsed();
    all.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "api reports [{backend}]: {agents} agents x {reports} reports ({} total) in {:.2} s = {:.0} reports/s; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (target p99 < 50 ms)",
        all.len(),
        elapsed.as_secs_f64(),
        all.len() as f64 / elapsed.as_secs_f64(),
        ms(percentile(&all, 0.50)),
        ms(percentile(&all, 0.99)),
        ms(*all.last().unwrap_or(&Duration::ZERO)),
    );
    drop(child.stdin.take());
    let _ = child.wait();
}
