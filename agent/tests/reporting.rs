//! The real `noexit-agent` binary against a fake control-plane API (axum behind rustls with
//! client-certificate auth, certificates from rcgen): spool durability across an API outage and
//! `kill -9`, outbox submission, heartbeats.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{post, put};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use noexit_agent::sessions::utmp::{self, Record};
use noexit_crds::agent::{
    AgentEvent, EventBatch, EventBatchAck, EventKind, Heartbeat, OutboxAck, OutboxManifest, ScanVerdict, SessionAction,
    ViolationKind,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use uuid::Uuid;

const AGENT: &str = env!("CARGO_BIN_EXE_noexit-agent");

// ---- the fake API ------------------------------------------------------------------------

#[derive(Default)]
struct Recorded {
    /// Stored events by idempotency key (what the real API keeps).
    events: HashMap<Uuid, AgentEvent>,
    /// Every event received, resends included.
    received: usize,
    heartbeats: Vec<Heartbeat>,
    manifests: HashMap<Uuid, OutboxManifest>,
    contents: HashMap<Uuid, Vec<u8>>,
}

#[derive(Clone, Default)]
struct Api {
    rec: Arc<Mutex<Recorded>>,
    /// Answer 503 to event batches (heartbeats still work).
    refuse_events: Arc<AtomicBool>,
}

impl Api {
    fn with<T>(&self, f: impl FnOnce(&Recorded) -> T) -> T {
        f(&self.rec.lock().unwrap())
    }
}

async fn events(State(api): State<Api>, Json(batch): Json<EventBatch>) -> Result<Json<EventBatchAck>, StatusCode> {
    if api.refuse_events.load(Ordering::SeqCst) {
        return Err(StatusCode::SERVICE_UNAVAILABLE);
    }
    let mut rec = api.rec.lock().unwrap();
    let (mut accepted, mut duplicates) = (0, 0);
    for ev in batch.events {
        rec.received += 1;
        if rec.events.insert(ev.id, ev).is_some() {
            duplicates += 1;
        } else {
            accepted += 1;
        }
    }
    Ok(Json(EventBatchAck { accepted, duplicates }))
}

async fn heartbeat(State(api): State<Api>, Json(hb): Json<Heartbeat>) -> Json<serde_json::Value> {
    api.rec.lock().unwrap().heartbeats.push(hb);
    Json(serde_json::json!({}))
}

async fn manifest(State(api): State<Api>, Json(m): Json<OutboxManifest>) -> (StatusCode, Json<OutboxAck>) {
    let id = m.id;
    api.rec.lock().unwrap().manifests.insert(id, m);
    (StatusCode::CREATED, Json(OutboxAck { id, state: "awaitingContent".into() }))
}

async fn content(
    State(api): State<Api>,
    UrlPath(id): UrlPath<Uuid>,
    body: Bytes,
) -> Result<Json<OutboxAck>, (StatusCode, String)> {
    let mut rec = api.rec.lock().unwrap();
    let m = rec.manifests.get(&id).ok_or((StatusCode::NOT_FOUND, "no manifest".into()))?;
    let sha = hex::encode(Sha256::digest(&body));
    if body.len() as u64 != m.size || sha != m.sha256 {
        return Err((StatusCode::CONFLICT, "size or sha256 differ from the manifest".into()));
    }
    rec.contents.insert(id, body.to_vec());
    Ok(Json(OutboxAck { id, state: "pendingReview".into() }))
}

fn router(api: Api) -> Router {
    Router::new()
        .route("/v1/agent/events", post(events))
        .route("/v1/agent/heartbeat", post(heartbeat))
        .route("/v1/agent/outbox", post(manifest))
        .route("/v1/agent/outbox/{id}/content", put(content))
        .with_state(api)
}

/// The API's listener; dropping the task closes the listener and every open connection.
struct Server(tokio::task::JoinHandle<()>);

impl Server {
    async fn start(addr: SocketAddr, tls: Arc<rustls::ServerConfig>, api: Api) -> (Self, SocketAddr) {
        let listener = TcpListener::bind(addr).await.unwrap();
        let local = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let app = router(api);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let (acceptor, app) = (acceptor.clone(), app.clone());
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let svc = TowerToHyperService::new(app);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
                });
            }
        });
        (Self(task), local)
    }

    fn stop(self) {
        self.0.abort();
    }
}

// ---- certificates and config --------------------------------------------------------------

struct Env {
    dir: tempfile::TempDir,
    server_tls: Arc<rustls::ServerConfig>,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().unwrap();
        let server_cert =
            CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&server_key, &issuer).unwrap();
        let client_key = KeyPair::generate().unwrap();
        let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        client_params.subject_alt_names = vec![SanType::URI("noexit://workspace/ward-7/alice-r".try_into().unwrap())];
        let client_cert = client_params.signed_by(&client_key, &issuer).unwrap();

        let p = dir.path();
        std::fs::write(p.join("ca.crt"), ca_cert.pem()).unwrap();
        std::fs::write(p.join("tls.crt"), client_cert.pem()).unwrap();
        std::fs::write(p.join("tls.key"), client_key.serialize_pem()).unwrap();
        for d in ["outbox", "spool", "root"] {
            std::fs::create_dir_all(p.join(d)).unwrap();
        }
        std::fs::write(p.join("wtmp"), b"").unwrap();
        std::fs::write(p.join("utmp"), b"").unwrap();

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .unwrap();
        let server_tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![server_cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(server_key.serialize_der()).unwrap(),
            )
            .unwrap();
        Self { dir, server_tls: Arc::new(server_tls) }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write_config(&self, port: u16) -> PathBuf {
        let p = self.dir.path();
        let cfg = format!(
            r#"workspace: {{ project: ward-7, name: alice-r }}
controlPlane:
  url: https://localhost:{port}
  caFile: {p}/ca.crt
  certFile: {p}/tls.crt
  keyFile: {p}/tls.key
egress:
  resolvers: [127.0.0.53]
  endpoints: [{{ name: controlPlane, address: 127.0.0.1, port: {port} }}]
  desktopPort: 5901
outbox: {p}/outbox
spool: {p}/spool
mode: pod
desktop: none
heartbeatSeconds: 1
"#,
            p = p.display()
        );
        let path = p.join("agent.yaml");
        std::fs::write(&path, cfg).unwrap();
        path
    }

    fn hook(&self, action: &str, user: &str) {
        let out = Command::new(AGENT)
            .args(["--config"])
            .arg(self.path("agent.yaml"))
            .args(["session", action, "--user", user, "--session", ":1", "--source", "10.9.8.7"])
            .output()
            .unwrap();
        assert!(out.status.success(), "hook failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn append_wtmp(&self, kind: i16, line: &str, user: &str) {
        use std::io::Write;
        let rec =
            utmp::encode(&Record { kind, pid: 1, line: line.into(), user: user.into(), host: String::new(), time: 0 });
        std::fs::OpenOptions::new().append(true).open(self.path("wtmp")).unwrap().write_all(&rec).unwrap();
    }
}

/// The agent process; killed with SIGKILL when dropped.
struct Agent(Child);

impl Agent {
    fn start(env: &Env) -> Self {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(env.path("agent.log")).unwrap();
        let child = Command::new(AGENT)
            .arg("--config")
            .arg(env.path("agent.yaml"))
            .arg("run")
            .arg("--wtmp")
            .arg(env.path("wtmp"))
            .arg("--utmp")
            .arg(env.path("utmp"))
            .arg("--root")
            .arg(env.path("root"))
            .args(["--outbox-interval", "1"])
            .env("RUST_LOG", "info,noexit_agent=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Self(child)
    }

    /// `kill -9`: no chance to flush or say goodbye.
    fn kill9(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Poll `cond` every 50 ms for at most `secs`; fail with the agent's log.
async fn until(env: &Env, secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            let log = std::fs::read_to_string(env.path("agent.log")).unwrap_or_default();
            panic!("timed out after {secs}s waiting for {what}\n--- agent log ---\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn session_actions(rec: &Recorded) -> Vec<(String, SessionAction)> {
    let mut v: Vec<_> = rec
        .events
        .values()
        .filter_map(|e| match &e.kind {
            EventKind::Session(s) => Some((s.user.clone(), s.action)),
            EventKind::Violation(_) => None,
        })
        .collect();
    v.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    v
}

// ---- tests -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_events_survive_an_api_outage_and_kill_9_and_arrive_once() {
    let env = Env::new();
    let api = Api::default();
    let (server, addr) = Server::start("127.0.0.1:0".parse().unwrap(), env.server_tls.clone(), api.clone()).await;
    env.write_config(addr.port());
    let agent = Agent::start(&env);

    // API up: delivered promptly.
    env.hook("connect", "early");
    until(&env, 30, "the first event", || api.with(|r| r.events.len() == 1)).await;

    // API down: events from hooks and from wtmp go to the spool only.
    server.stop();
    let mut expected = vec![("early".to_owned(), SessionAction::DesktopConnect)];
    for i in 0..10 {
        let user = format!("user{i}");
        env.hook("connect", &user);
        env.hook("disconnect", &user);
        expected.push((user.clone(), SessionAction::DesktopConnect));
        expected.push((user, SessionAction::DesktopDisconnect));
    }
    env.append_wtmp(7, "pts/4", "tty-user");
    env.append_wtmp(8, "pts/4", "");
    expected.push(("tty-user".into(), SessionAction::Login));
    expected.push(("tty-user".into(), SessionAction::Logout));
    let wtmp_len = 2 * utmp::RECORD_SIZE as u64;
    until(&env, 30, "the agent to spool the wtmp records", || {
        std::fs::read_to_string(env.path("spool/wtmp.pos"))
            .is_ok_and(|s| s.split_whitespace().nth(1) == Some(&wtmp_len.to_string()))
    })
    .await;
    agent.kill9();
    assert_eq!(api.with(|r| r.events.len()), 1, "nothing may arrive while the API is down");

    // Both back: everything arrives, exactly once.
    let (server, _) = Server::start(addr, env.server_tls.clone(), api.clone()).await;
    let _agent = Agent::start(&env);
    until(&env, 60, "all spooled events", || api.with(|r| r.events.len() >= expected.len())).await;
    // Give a straggler (a duplicate under a new key) the chance to show: two more heartbeats.
    let hb = api.with(|r| r.heartbeats.len());
    until(&env, 30, "two more heartbeats", || api.with(|r| r.heartbeats.len() >= hb + 2)).await;
    expected.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    api.with(|r| {
        assert_eq!(session_actions(r), expected, "each event stored exactly once");
        assert!(r.events.keys().all(|id| id.get_version_num() == 7), "idempotency keys are UUIDv7");
        println!("stored {} events from {} deliveries (resends deduplicated by key)", r.events.len(), r.received);
    });
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_report_the_spool_depth_while_events_are_refused() {
    let env = Env::new();
    let api = Api::default();
    api.refuse_events.store(true, Ordering::SeqCst);
    let (server, addr) = Server::start("127.0.0.1:0".parse().unwrap(), env.server_tls.clone(), api.clone()).await;
    env.write_config(addr.port());
    let _agent = Agent::start(&env);
    for i in 0..5 {
        env.hook("connect", &format!("u{i}"));
    }
    until(&env, 30, "a heartbeat with spool depth 5", || api.with(|r| r.heartbeats.iter().any(|h| h.spool_depth == 5)))
        .await;
    api.with(|r| {
        let hb = r.heartbeats.last().unwrap();
        assert_eq!(hb.agent_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(hb.active_sessions, 5, "five desktop connections");
        assert!(!hb.egress.locked || cfg!(feature = "guards"), "no lock confirmed without the guards");
    });
    api.refuse_events.store(false, Ordering::SeqCst);
    until(&env, 60, "the events and a heartbeat with depth 0", || {
        api.with(|r| r.events.len() == 5 && r.heartbeats.last().is_some_and(|h| h.spool_depth == 0))
    })
    .await;
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_file_reaches_the_airlock_with_its_hash_and_scan() {
    let env = Env::new();
    let api = Api::default();
    let (server, addr) = Server::start("127.0.0.1:0".parse().unwrap(), env.server_tls.clone(), api.clone()).await;
    env.write_config(addr.port());
    let _agent = Agent::start(&env);
    let mut content = "ward,admissions\nA,31\nB,17\n".repeat(50_000).into_bytes();
    content.extend_from_slice(b"note: patient NHS 943 476 5919\n");
    let tmp = env.path("results.csv.part");
    std::fs::write(&tmp, &content).unwrap();
    std::fs::rename(&tmp, env.path("outbox/results.csv")).unwrap();
    std::fs::write(env.path("outbox/model.rds"), b"X\n\x00\x00\x00\x03\x00\x04\x02\x01").unwrap();

    until(&env, 60, "both files' content at the API", || api.with(|r| r.contents.len() == 2)).await;
    api.with(|r| {
        let m = r.manifests.values().find(|m| m.file_name == "results.csv").unwrap();
        assert_eq!(m.sha256, hex::encode(Sha256::digest(&content)));
        assert_eq!(m.size, content.len() as u64);
        assert_eq!(r.contents[&m.id], content);
        assert_eq!(m.scan.verdict, ScanVerdict::Flagged);
        assert_eq!(m.scan.findings.len(), 1);
        assert_eq!(m.scan.findings[0].kind, "nhsNumber");
        let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(env.path("outbox")).unwrap());
        assert_eq!(m.submitted_by, noexit_agent::outbox::user_name(owner));
        let bin = r.manifests.values().find(|m| m.file_name == "model.rds").unwrap();
        assert_eq!(bin.scan.verdict, ScanVerdict::ManualReview, "binary files go to a person");
    });
    until(&env, 30, "the files moved to .submitted", || {
        env.path("outbox/.submitted/results.csv").exists() && !env.path("outbox/results.csv").exists()
    })
    .await;
    until(&env, 30, "the DLP violation event", || {
        api.with(|r| {
            r.events.values().any(|e| matches!(&e.kind, EventKind::Violation(v) if v.kind == ViolationKind::DlpHit))
        })
    })
    .await;
    server.stop();
}

#[test]
fn a_bad_config_is_refused_with_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.yaml");
    std::fs::write(&path, "workspace: { project: ward-7 }\n").unwrap();
    let out = Command::new(AGENT).arg("--config").arg(&path).arg("check-config").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("config {}: field `workspace`", path.display())), "{err}");
    assert!(err.contains("missing field `name`"), "{err}");
}
