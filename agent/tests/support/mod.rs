//! Shared by the integration tests and the idle-memory benchmark: a fake control-plane API
//! (axum behind rustls, client certificates required, certificates from the test CA), a temp
//! environment with config and certificates, and the agent process.

#![allow(dead_code, reason = "each test binary uses a different part")]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{post, put};
use noexit_agent::sessions::utmp::{self, Record};
use noexit_crds::agent::{AgentEvent, EventBatch, EventBatchAck, Heartbeat, OutboxAck, OutboxManifest};
use noexit_test_support::{agent, net, pki, poll};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use uuid::Uuid;

pub const AGENT: &str = env!("CARGO_BIN_EXE_noexit-agent");

// ---- the fake API ------------------------------------------------------------------------

#[derive(Default)]
pub struct Recorded {
    /// Stored events by idempotency key (what the real API keeps).
    pub events: HashMap<Uuid, AgentEvent>,
    /// Every event received, resends included.
    pub received: usize,
    pub heartbeats: Vec<Heartbeat>,
    pub manifests: HashMap<Uuid, OutboxManifest>,
    pub contents: HashMap<Uuid, Vec<u8>>,
    /// What `GET /v1/agent/outputs` answers (the decisions on this workspace's outputs).
    pub outputs: serde_json::Value,
    /// `GET /v1/agent/outputs` calls seen.
    pub output_polls: usize,
}

#[derive(Clone, Default)]
pub struct Api {
    pub rec: Arc<Mutex<Recorded>>,
    /// Answer 503 to event batches (heartbeats still work).
    pub refuse_events: Arc<AtomicBool>,
}

impl Api {
    pub fn with_mut<T>(&self, f: impl FnOnce(&mut Recorded) -> T) -> T {
        f(&mut self.rec.lock().unwrap())
    }

    pub fn with<T>(&self, f: impl FnOnce(&Recorded) -> T) -> T {
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

async fn outputs(State(api): State<Api>) -> Json<serde_json::Value> {
    let mut rec = api.rec.lock().unwrap();
    rec.output_polls += 1;
    let list = if rec.outputs.is_null() { serde_json::json!([]) } else { rec.outputs.clone() };
    Json(list)
}

fn router(api: Api) -> Router {
    Router::new()
        .route("/v1/agent/events", post(events))
        .route("/v1/agent/heartbeat", post(heartbeat))
        .route("/v1/agent/outbox", post(manifest))
        .route("/v1/agent/outbox/{id}/content", put(content))
        .route("/v1/agent/outputs", axum::routing::get(outputs))
        .with_state(api)
}

/// The API's listener; dropping the task closes the listener and every open connection.
pub struct Server(tokio::task::JoinHandle<()>);

impl Server {
    pub async fn start(addr: SocketAddr, tls: Arc<rustls::ServerConfig>, api: Api) -> (Self, SocketAddr) {
        let listener = TcpListener::bind(addr).await.unwrap();
        let local = listener.local_addr().unwrap();
        (Self(net::serve(listener, Some(tls), router(api))), local)
    }

    pub fn stop(self) {
        self.0.abort();
    }
}

// ---- certificates and config --------------------------------------------------------------

pub struct Env {
    pub dir: tempfile::TempDir,
    pub server_tls: Arc<rustls::ServerConfig>,
}

impl Env {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = pki::Ca::new("agent test CA");
        let server = ca.server(&["localhost"]);
        let client = ca.client("noexit://workspace/ward-7/alice-r");
        let p = dir.path();
        std::fs::write(p.join("ca.crt"), ca.cert_pem()).unwrap();
        client.write(p, "tls.crt", "tls.key");
        agent::prepare(p);

        Self { dir, server_tls: ca.mtls_server_config(&server) }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write_config(&self, port: u16) -> PathBuf {
        agent::pod_config(self.dir.path(), port).write()
    }

    pub fn hook(&self, action: &str, user: &str) {
        agent::session_hook(Path::new(AGENT), self.dir.path(), action, user);
    }

    pub fn append_wtmp(&self, kind: i16, line: &str, user: &str) {
        use std::io::Write;
        let rec =
            utmp::encode(&Record { kind, pid: 1, line: line.into(), user: user.into(), host: String::new(), time: 0 });
        std::fs::OpenOptions::new().append(true).open(self.path("wtmp")).unwrap().write_all(&rec).unwrap();
    }
}

/// The agent process; killed with SIGKILL when dropped.
pub struct Agent(pub Child);

impl Agent {
    pub fn start(env: &Env) -> Self {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(env.path("agent.log")).unwrap();
        let child = agent::run_command(Path::new(AGENT), env.dir.path())
            .args(["--outbox-interval", "1", "--poll-interval", "1"])
            .env("RUST_LOG", "info,noexit_agent=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Self(child)
    }

    /// `kill -9`: no chance to flush or say goodbye.
    pub fn kill9(mut self) {
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

/// Polls `cond` for at most `secs`; fails with the agent's log.
pub async fn until(env: &Env, secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let log = || format!("--- agent log ---\n{}", std::fs::read_to_string(env.path("agent.log")).unwrap_or_default());
    poll::until_explained(what, Duration::from_secs(secs), log, || std::future::ready(cond())).await
}
