//! The control-plane API over real HTTPS: rustls clients with their own certificates, a fake OIDC
//! issuer on loopback, the audit store on SQLite and PostgreSQL (a private server that the fault
//! test stops and starts while agents report).

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use noexit_crds::Role;
use noexit_crds::agent::{
    AgentEvent, EventBatch, EventKind, SessionAction, SessionEvent, Violation, ViolationKind, WorkspaceIdentity,
};
use noexit_operator::api::authz::{Authn, Endpoint};
use noexit_operator::api::{self, ApiConfig, ApiStore, AppState, MemoryCluster, server, tls};
use noexit_operator::audit::{self, Outcome, Store};
use noexit_operator::pki::{Ca, IssuedCert};
use noexit_test_support::oidc::{self, Issuer, SigningKey};
use noexit_test_support::process::Proc;
use noexit_test_support::{net, poll};
use serde_json::{Value, json};
use uuid::Uuid;

// ---- fixtures ----------------------------------------------------------------------------

/// How long a test waits for something to settle (audit entries, a restarted server).
const SETTLE: Duration = Duration::from_secs(30);

struct Pki {
    ca: Ca,
    dir: tempfile::TempDir,
}

fn pki() -> Pki {
    let ca = Ca::generate("noexit test CA").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = ca.issue_server(&["localhost".into(), "127.0.0.1".into()], chrono::Duration::days(1)).unwrap();
    std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).unwrap();
    std::fs::write(dir.path().join("tls.crt"), &server.cert_pem).unwrap();
    std::fs::write(dir.path().join("tls.key"), &server.key_pem).unwrap();
    Pki { ca, dir }
}

fn ws(name: &str) -> WorkspaceIdentity {
    WorkspaceIdentity { project: "ward-7".into(), name: name.into() }
}

impl Pki {
    fn agent(&self, name: &str) -> IssuedCert {
        self.ca.issue_workspace_client(&ws(name), chrono::Duration::days(1)).unwrap()
    }
}

const PROJECT: &str = r#"
apiVersion: noexit.io/v1alpha1
kind: Project
metadata: {name: ward-7}
spec:
  members:
    - {user: alice@ward7.example, roles: [researcher]}
    - {user: bob@ward7.example, roles: [dataAnalyst]}
    - {user: carol@ward7.example, roles: [admin]}
    - {user: olive@ward7.example, roles: [outputChecker]}
    - {user: dave@ward7.example, roles: [auditor]}
    - {user: erin@ward7.example, roles: [sre]}
    - {user: gina@ward7.example, roles: [dataAnalyst, admin]}
    - {user: oscar@ward7.example, roles: [outputChecker]}
    - {user: rita@ward7.example, roles: [researcher, outputChecker]}
  approval: {reference: "REC 23/LO/0042", expires: "2027-06-30"}
  datasets: [icu-2019]
---
apiVersion: noexit.io/v1alpha1
kind: Workspace
metadata: {name: alice-r, namespace: noexit-ward-7}
spec: {project: ward-7, owner: alice@ward7.example, runtime: pod, image: "r:4"}
status: {agentCertificateSerial: "0a0b"}
---
apiVersion: noexit.io/v1alpha1
kind: Workspace
metadata: {name: rita-r, namespace: noexit-ward-7}
spec: {project: ward-7, owner: rita@ward7.example, runtime: pod, image: "r:4"}
"#;

fn user_with(role: Role) -> &'static str {
    match role {
        Role::Researcher => "alice@ward7.example",
        Role::DataAnalyst => "bob@ward7.example",
        Role::Admin => "carol@ward7.example",
        Role::OutputChecker => "olive@ward7.example",
        Role::Auditor => "dave@ward7.example",
        Role::Sre => "erin@ward7.example",
    }
}

/// The fake issuer over HTTPS (its own CA), as every test here uses it.
async fn https_issuer() -> Issuer {
    Issuer::builder().https().start().await
}

/// A verifier for `issuer`, as the API builds it.
fn oidc_config(issuer: &Issuer) -> api::oidc::OidcConfig {
    api::oidc::OidcConfig {
        ca_pem: issuer.ca_pem().map(|pem| pem.as_bytes().to_vec()),
        ..api::oidc::OidcConfig::new(&issuer.url)
    }
}

struct Api {
    addr: SocketAddr,
    cluster: Arc<MemoryCluster>,
    audit: Arc<Store>,
    store: ApiStore,
    data_dir: tempfile::TempDir,
    state: AppState,
    /// Verifies the release receipts this API signs.
    receipt_key: ed25519_dalek::VerifyingKey,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Api {
    async fn start(pki: &Pki, issuer: Option<&Issuer>, db_url: &str) -> Api {
        let cluster = Arc::new(api::memory_cluster_from(PROJECT).unwrap());
        let audit = Arc::new(Store::connect(db_url).await.unwrap());
        Self::start_on(pki, issuer, cluster, audit).await
    }

    async fn start_on(pki: &Pki, issuer: Option<&Issuer>, cluster: Arc<MemoryCluster>, audit: Arc<Store>) -> Api {
        Self::start_with_limits(pki, issuer, cluster, audit, noexit_operator::serving::Limits::default()).await
    }

    async fn start_with_limits(
        pki: &Pki,
        issuer: Option<&Issuer>,
        cluster: Arc<MemoryCluster>,
        audit: Arc<Store>,
        limits: noexit_operator::serving::Limits,
    ) -> Api {
        let store = ApiStore::new(audit.pool().clone());
        let oidc = issuer.map(|i| Arc::new(api::oidc::Oidc::new(oidc_config(i)).unwrap()));
        let data_dir = tempfile::tempdir().unwrap();
        let config = ApiConfig {
            data_dir: data_dir.path().to_owned(),
            require_mfa: false,
            max_upload_bytes: 1024 * 1024,
            inbox: Default::default(),
        };
        let airlock = api::outputs::Airlock::ephemeral();
        let receipt_key = airlock.signer.verifying_key();
        let state =
            AppState::with_airlock(store.clone(), audit.clone(), cluster.clone(), oidc, config, airlock).await.unwrap();
        let cert = Arc::new(
            tls::ReloadingCert::load(&pki.dir.path().join("tls.crt"), &pki.dir.path().join("tls.key")).unwrap(),
        );
        let tls_config = tls::server_config(cert, pki.ca.cert_pem().as_bytes()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let router = api::router(state.clone());
        let served = state.clone();
        tokio::spawn(async move {
            let _ = server::serve_with(listener, tls_config, served, router, limits, async {
                let _ = stopped.await;
            })
            .await;
        });
        Api { addr, cluster, audit, store, data_dir, state, receipt_key, stop: Some(stop) }
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    async fn entries(&self) -> Vec<audit::store::Entry> {
        self.audit.query(&audit::store::Filter::default()).await.unwrap()
    }

    async fn refused(&self, action: &str) -> Vec<audit::store::Entry> {
        self.entries()
            .await
            .into_iter()
            .filter(|e| e.event.action == action && matches!(e.event.outcome, Outcome::Refused(_)))
            .collect()
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

type Https = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

fn client(pki: &Pki, identity: Option<&IssuedCert>) -> Https {
    let id = identity.map(|c| (c.cert_pem.as_bytes(), c.key_pem.as_bytes()));
    let config = tls::client_config(Some(pki.ca.cert_pem().as_bytes()), id).unwrap();
    let connector =
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config).https_only().enable_http1().build();
    Client::builder(TokioExecutor::new()).build(connector)
}

/// One call. `Err` when the TLS handshake or the connection failed.
async fn call(
    client: &Https,
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<(&str, Vec<u8>)>,
) -> Result<(StatusCode, Value)> {
    let mut req = http::Request::builder().method(method).uri(url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = match body {
        Some((ctype, bytes)) => req.header("content-type", ctype).body(Full::new(Bytes::from(bytes)))?,
        None => req.body(Full::new(Bytes::new()))?,
    };
    let response = client.request(req).await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    let value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).context("JSON body")? };
    Ok((status, value))
}

fn json_body(v: &Value) -> Option<(&'static str, Vec<u8>)> {
    Some(("application/json", serde_json::to_vec(v).unwrap()))
}

fn heartbeat() -> Value {
    json!({
        "at": chrono::Utc::now(), "agentVersion": "0.1.0",
        "egress": {"locked": true, "mode": "pod"},
        "hardening": {"clipboardOutDisabled": true, "driveRedirectionDisabled": true},
        "spoolDepth": 0, "activeSessions": 1,
    })
}

fn session_event(action: SessionAction) -> AgentEvent {
    AgentEvent {
        id: Uuid::new_v4(),
        at: chrono::Utc::now(),
        kind: EventKind::Session(SessionEvent {
            action,
            user: "alice".into(),
            session: Some("desktop-1".into()),
            source: None,
            idle_seconds: None,
        }),
    }
}

fn violation_event() -> AgentEvent {
    AgentEvent {
        id: Uuid::new_v4(),
        at: chrono::Utc::now(),
        kind: EventKind::Violation(Violation {
            kind: ViolationKind::EgressBlocked,
            count: 2,
            detail: "1.1.1.1:443".into(),
        }),
    }
}

fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite:{}", dir.path().join("noexit.db").display())
}

// ---- agents over mTLS ----------------------------------------------------------------------

#[tokio::test]
async fn agent_certificates_ok_expired_forged_and_revoked_at_once() {
    let pki = pki();
    let db = tempfile::tempdir().unwrap();
    let api = Api::start(&pki, None, &sqlite_url(&db)).await;
    let hb_url = api.url("/v1/agent/heartbeat");

    let good = pki.agent("alice-r");
    let agent = client(&pki, Some(&good));
    let (status, body) = call(&agent, Method::POST, &hb_url, None, json_body(&heartbeat())).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    let reflected = api.cluster.workspace_now("ward-7", "alice-r").unwrap().status.unwrap().agent.unwrap();
    assert!(reflected.egress_locked);
    assert_eq!(reflected.active_sessions, 1);

    // No certificate at all: 401 with a JSON error.
    let (status, body) = call(&client(&pki, None), Method::POST, &hb_url, None, json_body(&heartbeat())).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("clientCertificateRequired")));

    // Expired, and forged (same identity, another CA): the holder proves the key in the
    // handshake, the certificate itself is refused with a JSON 401 naming the problem.
    let expired = pki.ca.issue_workspace_client(&ws("alice-r"), chrono::Duration::minutes(-1)).unwrap();
    let (status, body) =
        call(&client(&pki, Some(&expired)), Method::POST, &hb_url, None, json_body(&heartbeat())).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("certificateExpired")), "{body}");
    let other = Ca::generate("evil CA").unwrap();
    let forged = other.issue_workspace_client(&ws("alice-r"), chrono::Duration::days(1)).unwrap();
    let (status, body) =
        call(&client(&pki, Some(&forged)), Method::POST, &hb_url, None, json_body(&heartbeat())).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("untrustedCertificate")), "{body}");
    // A forged certificate gets nothing anywhere, not even the operator's endpoint.
    let forged_op = other.issue_operator_client(chrono::Duration::days(1)).unwrap();
    let revoke_url = api.url("/v1/operator/revocations");
    let any = json!({"workspace": "ward-7/alice-r", "serial": "0a", "reason": "x"});
    let (status, _) =
        call(&client(&pki, Some(&forged_op)), Method::POST, &revoke_url, None, json_body(&any)).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let refused = api.refused("agent.heartbeat").await;
    let reasons: Vec<String> = refused
        .iter()
        .filter_map(|e| if let Outcome::Refused(r) = &e.event.outcome { Some(r.clone()) } else { None })
        .collect();
    assert!(reasons.iter().any(|r| r.starts_with("certificateExpired")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.starts_with("untrustedCertificate")), "{reasons:?}");
    // A bare TCP connect-and-close (a TCP probe) is no TLS attempt and is not audited; something
    // that does not even speak TLS is refused by the handshake, and that is audited.
    drop(tokio::net::TcpStream::connect(api.addr).await.unwrap());
    let mut plain = tokio::net::TcpStream::connect(api.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut plain, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let handshakes = poll::settle(SETTLE, || api.refused("tls.handshake"), |v| !v.is_empty()).await;
    assert_eq!(handshakes.len(), 1, "{handshakes:?}");

    // An agent may not call the operator's endpoint.
    let revocation = json!({"workspace": "ward-7/alice-r", "serial": good.serial, "reason": "workspace deleted"});
    let (status, body) = call(&agent, Method::POST, &revoke_url, None, json_body(&revocation)).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::FORBIDDEN, Some("notTheOperator")));

    // Revocation by the operator takes effect on the very next request, even on a kept-alive
    // connection, and is idempotent.
    let operator = client(&pki, Some(&pki.ca.issue_operator_client(chrono::Duration::days(1)).unwrap()));
    let (status, body) = call(&operator, Method::POST, &revoke_url, None, json_body(&revocation)).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["new"], true);
    let (status, body) = call(&agent, Method::POST, &hb_url, None, json_body(&heartbeat())).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("certificateRevoked")), "{body}");
    let (status, body) = call(&operator, Method::POST, &revoke_url, None, json_body(&revocation)).await.unwrap();
    assert_eq!((status, body["new"].as_bool()), (StatusCode::OK, Some(false)));
    // The refusal is filed under the workspace whose (genuine, withdrawn) certificate it was.
    let revoked_attempts: Vec<_> = api
        .refused("agent.heartbeat")
        .await
        .into_iter()
        .filter(|e| matches!(&e.event.outcome, Outcome::Refused(r) if r.starts_with("certificateRevoked")))
        .collect();
    assert_eq!(revoked_attempts.len(), 1, "{revoked_attempts:?}");
    assert_eq!(revoked_attempts[0].event.actor, "workspace:ward-7/alice-r");

    // Another certificate of the same workspace still works.
    let renewed = client(&pki, Some(&pki.agent("alice-r")));
    let (status, _) = call(&renewed, Method::POST, &hb_url, None, json_body(&heartbeat())).await.unwrap();
    assert_eq!(status, StatusCode::OK);

    // The revocation survives a restart of the API (loaded from the database).
    let restarted = Api::start_on(&pki, None, api.cluster.clone(), api.audit.clone()).await;
    let (status, _) = call(
        &client(&pki, Some(&good)),
        Method::POST,
        &restarted.url("/v1/agent/heartbeat"),
        None,
        json_body(&heartbeat()),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn events_are_stored_once_per_idempotency_key_sqlite() {
    let db = tempfile::tempdir().unwrap();
    events_once(&sqlite_url(&db)).await;
}

#[tokio::test]
async fn events_are_stored_once_per_idempotency_key_postgres() {
    let Some(pg) = support::pg::shared() else { return };
    events_once(&pg.create_database("events_once").unwrap()).await;
}

async fn events_once(db_url: &str) {
    let pki = pki();
    let api = Api::start(&pki, None, db_url).await;
    let agent = client(&pki, Some(&pki.agent("alice-r")));
    let batch = EventBatch {
        events: vec![session_event(SessionAction::Login), violation_event(), session_event(SessionAction::Logout)],
    };
    let body = json_body(&serde_json::to_value(&batch).unwrap());
    let url = api.url("/v1/agent/events");
    let (status, ack) = call(&agent, Method::POST, &url, None, body.clone()).await.unwrap();
    assert_eq!((status, ack.clone()), (StatusCode::OK, json!({"accepted": 3, "duplicates": 0})));
    let (status, ack) = call(&agent, Method::POST, &url, None, body).await.unwrap();
    assert_eq!((status, ack), (StatusCode::OK, json!({"accepted": 0, "duplicates": 3})));
    let entries = api.entries().await;
    for ev in &batch.events {
        let key = ev.id.to_string();
        assert_eq!(entries.iter().filter(|e| e.idempotency_key.as_deref() == Some(key.as_str())).count(), 1);
    }
    let violation = entries.iter().find(|e| e.event.action == "agent.violation.egressBlocked").unwrap();
    assert_eq!(violation.event.actor, "workspace:ward-7/alice-r");
    assert!(matches!(&violation.event.outcome, Outcome::Refused(r) if r.contains("1.1.1.1")));
    assert_eq!(api.store.event_count().await.unwrap(), 3);
}

#[tokio::test]
async fn outbox_upload_must_match_size_and_hash_sqlite() {
    let db = tempfile::tempdir().unwrap();
    outbox_upload(&sqlite_url(&db)).await;
}

#[tokio::test]
async fn outbox_upload_must_match_size_and_hash_postgres() {
    let Some(pg) = support::pg::shared() else { return };
    outbox_upload(&pg.create_database("outbox_upload").unwrap()).await;
}

async fn outbox_upload(db_url: &str) {
    let pki = pki();
    let api = Api::start(&pki, None, db_url).await;
    let agent = client(&pki, Some(&pki.agent("alice-r")));
    let content = b"region,n\nnorth,12\nsouth,15\n".to_vec();
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&content));
    let id = Uuid::new_v4();
    let manifest = json!({
        "id": id, "fileName": "results/table1.csv", "size": content.len(), "sha256": sha,
        "submittedBy": "alice", "scan": {"verdict": "clean", "findings": []},
    });
    let (status, ack) =
        call(&agent, Method::POST, &api.url("/v1/agent/outbox"), None, json_body(&manifest)).await.unwrap();
    assert_eq!((status, ack["state"].as_str()), (StatusCode::CREATED, Some("submitted")), "{ack}");

    let put = api.url(&format!("/v1/agent/outbox/{id}/content"));
    let octets = |b: &[u8]| Some(("application/octet-stream", b.to_vec()));
    let mut tampered = content.clone();
    tampered[10] ^= 1;
    let (status, body) = call(&agent, Method::PUT, &put, None, octets(&tampered)).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("hashMismatch")));
    let (status, body) = call(&agent, Method::PUT, &put, None, octets(&content[..5])).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("sizeMismatch")));
    let mut longer = content.clone();
    longer.extend_from_slice(b"extra");
    let (status, body) = call(&agent, Method::PUT, &put, None, octets(&longer)).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("sizeMismatch")));
    let (status, body) = call(&agent, Method::PUT, &put, None, Some(("text/plain", content.clone()))).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNSUPPORTED_MEDIA_TYPE, Some("unsupportedMediaType")));
    assert_eq!(api.refused("agent.outbox.upload").await.len(), 4);

    let (status, ack) = call(&agent, Method::PUT, &put, None, octets(&content)).await.unwrap();
    assert_eq!((status, ack["state"].as_str()), (StatusCode::OK, Some("checked")), "{ack}");
    // Stored sealed: the plaintext is nowhere on disk.
    let stored = api.data_dir.path().join("outbox/ward-7/alice-r").join(id.to_string());
    let sealed = std::fs::read(&stored).unwrap();
    assert!(sealed.starts_with(b"NXSEAL1\n"), "content is stored sealed");
    assert!(!sealed.windows(content.len()).any(|w| w == content.as_slice()));
    assert_eq!(sealed.len() as u64, noexit_airlock::seal::sealed_len(content.len() as u64));
    let row = api.store.output_request(id).await.unwrap().unwrap();
    assert_eq!((row.state.as_str(), row.sha256.as_str()), ("checked", sha.as_str()));
    assert_eq!(row.requester.as_deref(), Some("alice@ward7.example"), "the workspace owner requests");
    assert!(row.report.as_deref().is_some_and(|r| r.contains("verdict")), "the control plane's checks ran");
    assert!(row.scan.contains("clean"));

    // Resending the manifest is idempotent; reusing its id for another file is a conflict.
    let (status, ack) =
        call(&agent, Method::POST, &api.url("/v1/agent/outbox"), None, json_body(&manifest)).await.unwrap();
    assert_eq!((status, ack["state"].as_str()), (StatusCode::CREATED, Some("checked")));
    let mut other = manifest.clone();
    other["sha256"] = json!("0".repeat(64));
    let (status, body) =
        call(&agent, Method::POST, &api.url("/v1/agent/outbox"), None, json_body(&other)).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("idempotencyConflict")));
    // Another workspace cannot upload into it.
    let bob = client(&pki, Some(&pki.agent("bob-r")));
    let (status, _) = call(&bob, Method::PUT, &put, None, octets(&content)).await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// Body (content type, bytes), expected status, code, and a word the message must contain.
type BadBodyCase = (Option<(&'static str, Vec<u8>)>, StatusCode, &'static str, &'static str);

#[tokio::test]
async fn bad_bodies_get_a_json_4xx_naming_the_problem_and_are_audited() {
    let pki = pki();
    let db = tempfile::tempdir().unwrap();
    let issuer = https_issuer().await;
    let api = Api::start(&pki, Some(&issuer), &sqlite_url(&db)).await;
    let agent = client(&pki, Some(&pki.agent("alice-r")));
    let url = api.url("/v1/agent/heartbeat");
    let cases: Vec<BadBodyCase> = vec![
        (Some(("application/json", b"{\"at\": ".to_vec())), StatusCode::BAD_REQUEST, "malformedJson", "not valid JSON"),
        (
            Some(("application/json", {
                let mut hb = heartbeat();
                hb["egress"]["surprise"] = json!(1);
                serde_json::to_vec(&hb).unwrap()
            })),
            StatusCode::BAD_REQUEST,
            "unknownField",
            "surprise",
        ),
        (
            Some(("application/json", {
                let mut hb = heartbeat();
                hb["spoolDepth"] = json!("many");
                serde_json::to_vec(&hb).unwrap()
            })),
            StatusCode::BAD_REQUEST,
            "invalidBody",
            "spoolDepth",
        ),
        (
            Some(("text/plain", b"{}".to_vec())),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupportedMediaType",
            "text/plain",
        ),
        (None, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupportedMediaType", "none"),
        (
            Some(("application/json", vec![b' '; 2 * 1024 * 1024])),
            StatusCode::PAYLOAD_TOO_LARGE,
            "bodyTooLarge",
            "larger",
        ),
    ];
    let n = cases.len();
    for (body, want_status, want_code, mention) in cases {
        let (status, err) = call(&agent, Method::POST, &url, None, body).await.unwrap();
        assert_eq!((status, err["code"].as_str()), (want_status, Some(want_code)), "{err}");
        assert!(err["message"].as_str().unwrap().contains(mention), "{err}");
    }
    let refused = api.refused("agent.heartbeat").await;
    assert_eq!(refused.len(), n);
    assert!(refused.iter().all(|e| e.event.actor == "workspace:ward-7/alice-r" && e.event.source.is_some()));

    // People's bodies too.
    let token = issuer.token("bob@ward7.example");
    let person = client(&pki, None);
    let create = api.url("/v1/projects/ward-7/workspacerequests");
    let body = json!({"workspaceName": "x", "owner": "alice@ward7.example", "runtime": "pod", "image": "r", "justification": "j", "sudo": true});
    let (status, err) = call(&person, Method::POST, &create, Some(&token), json_body(&body)).await.unwrap();
    assert_eq!((status, err["code"].as_str()), (StatusCode::BAD_REQUEST, Some("unknownField")));
    let body = json!({"workspaceName": "x", "owner": "alice@ward7.example", "runtime": "lxc", "image": "r", "justification": "j"});
    let (status, err) = call(&person, Method::POST, &create, Some(&token), json_body(&body)).await.unwrap();
    assert_eq!((status, err["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalidBody")), "{err}");
    let refused = api.refused("request.create").await;
    assert_eq!(refused.len(), 2);
    assert_eq!(refused[0].event.actor, "user:bob@ward7.example");
    assert_eq!(refused[0].event.role.as_deref(), Some("dataAnalyst"));
    // Unknown paths are refused with JSON too.
    let (status, err) = call(&person, Method::GET, &api.url("/v1/nothing"), None, None).await.unwrap();
    assert_eq!((status, err["code"].as_str()), (StatusCode::NOT_FOUND, Some("notFound")));
}

// ---- people: OIDC ----------------------------------------------------------------------------

#[tokio::test]
async fn oidc_tokens_with_wrong_issuer_audience_signature_expiry_or_no_mfa_are_refused() {
    let pki = pki();
    let db = tempfile::tempdir().unwrap();
    let issuer = https_issuer().await;
    let api = Api::start(&pki, Some(&issuer), &sqlite_url(&db)).await;
    let person = client(&pki, None);
    let url = api.url("/v1/projects/ward-7/whoami");
    let user = "bob@ward7.example";

    let (status, me) = call(&person, Method::GET, &url, Some(&issuer.token(user)), None).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(
        (me["user"].as_str(), me["roles"].clone(), me["mfa"].as_bool()),
        (Some(user), json!(["dataAnalyst"]), Some(true))
    );

    let other_key = SigningKey::es256("k1");
    let forged = {
        let claims = json!({"iss": issuer.url, "aud": "noexit", "email": user, "exp": chrono::Utc::now().timestamp() + 600, "amr": ["otp"]});
        oidc::sign(jsonwebtoken::Algorithm::ES256, "k1", &other_key.key, &claims)
    };
    let hmac = {
        let claims =
            json!({"iss": issuer.url, "aud": "noexit", "email": user, "exp": chrono::Utc::now().timestamp() + 600});
        oidc::sign(jsonwebtoken::Algorithm::HS256, "k1", &jsonwebtoken::EncodingKey::from_secret(b"k1"), &claims)
    };
    let unknown_kid = {
        let claims =
            json!({"iss": issuer.url, "aud": "noexit", "email": user, "exp": chrono::Utc::now().timestamp() + 600});
        oidc::sign(jsonwebtoken::Algorithm::ES256, "k9", &issuer.key().key, &claims)
    };
    let cases = vec![
        (
            issuer.token_with(user, |c| c["iss"] = json!("https://evil.example")),
            StatusCode::UNAUTHORIZED,
            "wrongIssuer",
        ),
        (issuer.token_with(user, |c| c["aud"] = json!("other-app")), StatusCode::UNAUTHORIZED, "wrongAudience"),
        (forged, StatusCode::UNAUTHORIZED, "invalidSignature"),
        (hmac, StatusCode::UNAUTHORIZED, "unsupportedAlgorithm"),
        (unknown_kid, StatusCode::UNAUTHORIZED, "unknownSigningKey"),
        (
            issuer.token_with(user, |c| c["exp"] = json!(chrono::Utc::now().timestamp() - 3600)),
            StatusCode::UNAUTHORIZED,
            "tokenExpired",
        ),
        (
            issuer.token_with(user, |c| c["nbf"] = json!(chrono::Utc::now().timestamp() + 600)),
            StatusCode::UNAUTHORIZED,
            "tokenNotYetValid",
        ),
        (issuer.token_with(user, |c| c["email_verified"] = json!(false)), StatusCode::UNAUTHORIZED, "emailNotVerified"),
        (
            issuer.token_with(user, |c| c.as_object_mut().unwrap().remove("email_verified").map(|_| ()).unwrap_or(())),
            StatusCode::UNAUTHORIZED,
            "emailNotVerified",
        ),
        (issuer.token_with(user, |c| c["amr"] = json!(["pwd"])), StatusCode::FORBIDDEN, "mfaRequired"),
        (
            issuer.token_with(user, |c| c.as_object_mut().unwrap().remove("email").map(|_| ()).unwrap_or(())),
            StatusCode::UNAUTHORIZED,
            "malformedToken",
        ),
        ("not-a-jwt".to_owned(), StatusCode::UNAUTHORIZED, "malformedToken"),
        (issuer.token("mallory@elsewhere.example"), StatusCode::FORBIDDEN, "forbidden"),
    ];
    let n = cases.len();
    for (token, want_status, want_code) in cases {
        let (status, err) = call(&person, Method::GET, &url, Some(&token), None).await.unwrap();
        assert_eq!((status, err["code"].as_str()), (want_status, Some(want_code)), "{err}");
        assert!(!err["message"].as_str().unwrap_or_default().is_empty());
    }
    let (status, err) = call(&person, Method::GET, &url, None, None).await.unwrap();
    assert_eq!((status, err["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("tokenRequired")));
    let refused = api.refused("api.whoami").await;
    assert_eq!(refused.len(), n + 1);
    let no_mfa = refused
        .iter()
        .find(|e| matches!(&e.event.outcome, Outcome::Refused(r) if r.starts_with("mfaRequired")))
        .unwrap();
    assert_eq!(no_mfa.event.actor, format!("user:{user}"));
    for code in ["tokenNotYetValid", "emailNotVerified"] {
        assert!(
            refused.iter().any(|e| matches!(&e.event.outcome, Outcome::Refused(r) if r.starts_with(code))),
            "{code} refusal not audited"
        );
    }
    // A token valid a few seconds from now (clock skew) is accepted.
    let skewed = issuer.token_with(user, |c| c["nbf"] = json!(chrono::Utc::now().timestamp() + 5));
    let (status, me) = call(&person, Method::GET, &url, Some(&skewed), None).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{me}");
}

#[tokio::test]
async fn oidc_rs256_and_es256_keys_work_through_an_issuer_key_rotation() {
    let issuer = https_issuer().await;
    let SigningKey { key: es, jwk: es_jwk, .. } = SigningKey::es256("k1");
    let SigningKey { key: rs_old, jwk: rs_old_jwk, .. } = SigningKey::rs256("rsa-2025");
    let SigningKey { key: rs_new, jwk: rs_new_jwk, .. } = SigningKey::rs256("rsa-2026");
    issuer.publish(vec![es_jwk.clone(), rs_old_jwk.clone()]);
    let oidc = Arc::new(
        api::oidc::Oidc::new(api::oidc::OidcConfig {
            refresh_every: Duration::from_millis(200),
            min_refetch: Duration::ZERO,
            ..oidc_config(&issuer)
        })
        .unwrap(),
    );
    let _timer = oidc.spawn_refresh();
    let user = "bob@ward7.example";
    let es_token = issuer.token_signed(user, jsonwebtoken::Algorithm::ES256, "k1", &es);
    let old_token = issuer.token_signed(user, jsonwebtoken::Algorithm::RS256, "rsa-2025", &rs_old);
    let new_token = issuer.token_signed(user, jsonwebtoken::Algorithm::RS256, "rsa-2026", &rs_new);
    assert_eq!(oidc.verify(&es_token).await.unwrap().user, user);
    assert_eq!(oidc.verify(&old_token).await.unwrap().user, user);
    // An RS256 token signed with the old key but naming the new kid, and the reverse, fail.
    let mixed = issuer.token_signed(user, jsonwebtoken::Algorithm::RS256, "k1", &rs_old);
    assert!(oidc.verify(&mixed).await.is_err());

    // Rotation starts: both RSA keys are published; the new kid is fetched on first sight.
    issuer.publish(vec![es_jwk.clone(), rs_old_jwk, rs_new_jwk.clone()]);
    assert_eq!(oidc.verify(&new_token).await.unwrap().user, user);
    assert_eq!(oidc.verify(&old_token).await.unwrap().user, user);

    // Rotation ends: the old key is withdrawn; the timer drops it without a restart.
    issuer.publish(vec![es_jwk, rs_new_jwk]);
    let e = poll::eventually("the withdrawn key to stop verifying", Duration::from_secs(10), || async {
        oidc.verify(&old_token).await.err()
    })
    .await;
    assert_eq!(e.code(), "unknownSigningKey", "{e}");
    assert_eq!(oidc.verify(&new_token).await.unwrap().user, user);
    assert_eq!(oidc.verify(&es_token).await.unwrap().user, user);
}

#[tokio::test]
async fn a_flood_of_unknown_key_ids_makes_a_bounded_number_of_jwks_fetches() {
    let issuer = https_issuer().await;
    let oidc = Arc::new(
        api::oidc::Oidc::new(api::oidc::OidcConfig { min_refetch: Duration::from_secs(60), ..oidc_config(&issuer) })
            .unwrap(),
    );
    let user = "bob@ward7.example";
    assert_eq!(oidc.verify(&issuer.token(user)).await.unwrap().user, user);
    assert_eq!(issuer.jwks_fetches(), 1);
    let garbage = SigningKey::es256("k1").key;
    let tokens: Vec<String> = (0..500)
        .map(|i| issuer.token_signed(user, jsonwebtoken::Algorithm::ES256, &format!("made-up-{i}"), &garbage))
        .collect();
    let started = Instant::now();
    let results = futures::future::join_all(tokens.iter().map(|t| oidc.verify(t))).await;
    for r in &results {
        assert_eq!(r.as_ref().map_err(|e| e.code()).err(), Some("unknownSigningKey"));
    }
    // The keys were fetched moments ago: within the minute, the flood causes no fetch at all.
    assert_eq!(issuer.jwks_fetches(), 1, "JWKS fetches for 500 unknown kids");
    assert!(started.elapsed() < Duration::from_secs(10), "the flood took {:?}", started.elapsed());
    // Known keys kept verifying throughout.
    assert_eq!(oidc.verify(&issuer.token(user)).await.unwrap().user, user);
    // A very long kid is refused without a fetch.
    let long = issuer.token_signed(user, jsonwebtoken::Algorithm::ES256, &"x".repeat(4000), &garbage);
    assert_eq!(oidc.verify(&long).await.map_err(|e| e.code()).err(), Some("unknownSigningKey"));
    assert_eq!(issuer.jwks_fetches(), 1);
    eprintln!("500 unknown kids refused in {:?} with {} JWKS fetch(es)", started.elapsed(), issuer.jwks_fetches());

    // A cold verifier hit by the flood at once: one fetch, which every other token waits for.
    let cold = Arc::new(
        api::oidc::Oidc::new(api::oidc::OidcConfig { min_refetch: Duration::from_secs(60), ..oidc_config(&issuer) })
            .unwrap(),
    );
    let before = issuer.jwks_fetches();
    let mut all = tokens.clone();
    all.push(issuer.token(user));
    let results = futures::future::join_all(all.iter().map(|t| cold.verify(t))).await;
    assert_eq!(issuer.jwks_fetches() - before, 1, "one fetch for a cold flood");
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "the genuine token among them verifies");
}

#[test]
fn the_api_refuses_an_http_oidc_issuer_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_noexit-operator"))
        .args(["api", "--oidc-issuer", "http://login.example.org/realms/x", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--oidc-issuer")
            && stderr.contains("http://login.example.org/realms/x")
            && stderr.contains("https://"),
        "{stderr}"
    );
    // The development flag covers loopback only.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_noexit-operator"))
        .args(["api", "--oidc-issuer", "http://10.1.2.3/", "--oidc-allow-http-loopback", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("not https://"), "{stderr}");
}

// ---- authorisation matrix ----------------------------------------------------------------------

/// Who calls, in the matrix.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Caller {
    Person(Role),
    Stranger,
    Agent,
    Operator,
}

fn callers() -> Vec<Caller> {
    let mut all: Vec<Caller> = Role::ALL.into_iter().map(Caller::Person).collect();
    all.extend([Caller::Stranger, Caller::Agent, Caller::Operator]);
    all
}

fn column(c: Caller) -> &'static str {
    match c {
        Caller::Person(r) => r.as_str(),
        Caller::Stranger => "non-member",
        Caller::Agent => "agent",
        Caller::Operator => "operator",
    }
}

/// What the code's table says.
fn allowed(endpoint: Endpoint, caller: Caller) -> bool {
    match (endpoint.authn(), caller) {
        (Authn::None, _) => true,
        (Authn::AgentCert, c) => c == Caller::Agent,
        (Authn::OperatorCert, c) => c == Caller::Operator,
        (Authn::Bearer, Caller::Person(r)) => endpoint.allowed_roles().contains(&r),
        (Authn::Bearer, _) => false,
    }
}

/// The matrix as `docs/api.md` writes it: `| METHOD path | ✓ | – | … |` rows.
fn documented_matrix() -> Vec<(String, Vec<bool>)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md")).unwrap();
    let start = doc.find("<!-- authz-matrix -->").expect("docs/api.md has the authz-matrix marker");
    doc[start..]
        .lines()
        .skip(1)
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            (cells[0].trim_matches('`').to_owned(), cells[1..].iter().map(|c| *c == "✓").collect())
        })
        .collect()
}

#[test]
fn docs_matrix_matches_the_code() {
    let doc = documented_matrix();
    assert_eq!(doc.len(), Endpoint::ALL.len(), "docs/api.md lists {} endpoints", doc.len());
    for e in Endpoint::ALL {
        let (method, path) = e.route();
        let key = format!("{method} {path}");
        let row = doc.iter().find(|(k, _)| *k == key).unwrap_or_else(|| panic!("{key} missing from docs/api.md"));
        let want: Vec<bool> = callers().into_iter().map(|c| allowed(e, c)).collect();
        assert_eq!(
            row.1,
            want,
            "docs/api.md row {key} (columns {:?})",
            callers().into_iter().map(column).collect::<Vec<_>>()
        );
    }
}

#[tokio::test]
async fn authz_matrix_every_caller_times_every_endpoint() {
    let pki = pki();
    let db = tempfile::tempdir().unwrap();
    let issuer = https_issuer().await;
    let api = Api::start(&pki, Some(&issuer), &sqlite_url(&db)).await;
    // A request by someone else than every caller who may decide on it.
    let gina = issuer.token("gina@ward7.example");
    let create = json!({"name": "by-gina", "workspaceName": "alice-2", "owner": "alice@ward7.example", "runtime": "pod", "image": "r:4", "justification": "cohort study"});
    let (status, body) = call(
        &client(&pki, None),
        Method::POST,
        &api.url("/v1/projects/ward-7/workspacerequests"),
        Some(&gina),
        json_body(&create),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");

    let agent_cert = pki.agent("alice-r");
    let operator_cert = pki.ca.issue_operator_client(chrono::Duration::days(1)).unwrap();
    let mut checked = 0;
    for endpoint in Endpoint::ALL {
        for caller in callers() {
            let (client, token) = match caller {
                Caller::Person(role) => (client(&pki, None), Some(issuer.token(user_with(role)))),
                Caller::Stranger => (client(&pki, None), Some(issuer.token("mallory@elsewhere.example"))),
                Caller::Agent => (client(&pki, Some(&agent_cert)), None),
                Caller::Operator => (client(&pki, Some(&operator_cert)), None),
            };
            let (method, path) = endpoint.route();
            let path = path
                .replace("{project}", "ward-7")
                .replace("{name}", if path.contains("workspacerequests") { "by-gina" } else { "alice-r" })
                .replace("{id}", &Uuid::new_v4().to_string())
                .replace("{token}", "not-a-token");
            let path = if matches!(endpoint, Endpoint::AuditQuery | Endpoint::OutputDownload) {
                format!("{path}?project=ward-7")
            } else {
                path
            };
            let body = match endpoint {
                Endpoint::RequestCreate => json_body(
                    &json!({"workspaceName": "m", "owner": "alice@ward7.example", "runtime": "vm", "image": "r", "justification": "j"}),
                ),
                Endpoint::RequestDeny => json_body(&json!({"reason": "not now"})),
                Endpoint::OperatorRevoke => {
                    json_body(&json!({"workspace": "ward-7/old", "serial": "0c0d", "reason": "matrix"}))
                }
                Endpoint::WorkspaceRevoke => json_body(&json!({"serial": "0a0b", "reason": "matrix"})),
                Endpoint::AgentHeartbeat => json_body(&heartbeat()),
                Endpoint::AgentEvents => json_body(&json!({"events": []})),
                Endpoint::AgentOutboxContent => Some(("application/octet-stream", b"x".to_vec())),
                _ if method == "POST" => json_body(&json!({})),
                _ => None,
            };
            let (status, body) =
                call(&client, method.parse().unwrap(), &api.url(&path), token.as_deref(), body).await.unwrap();
            let refused = status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN;
            assert_eq!(!refused, allowed(endpoint, caller), "{method} {path} as {}: {status} {body}", column(caller));
            if refused {
                assert!(body["code"].is_string(), "refusal without a JSON code: {body}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, Endpoint::ALL.len() * callers().len());
    // Every refusal is in the log with its actor.
    let entries = api.entries().await;
    let refused_by_stranger = entries
        .iter()
        .filter(|e| e.event.actor == "user:mallory@elsewhere.example" && matches!(e.event.outcome, Outcome::Refused(_)))
        .count();
    assert_eq!(refused_by_stranger, Endpoint::ALL.iter().filter(|e| e.authn() == Authn::Bearer).count());
}

#[tokio::test]
async fn analysts_request_admins_decide_but_not_on_their_own_and_auditors_read_the_log_sqlite() {
    let db = tempfile::tempdir().unwrap();
    request_flow(&sqlite_url(&db)).await;
}

#[tokio::test]
async fn analysts_request_admins_decide_but_not_on_their_own_and_auditors_read_the_log_postgres() {
    let Some(pg) = support::pg::shared() else { return };
    request_flow(&pg.create_database("request_flow").unwrap()).await;
}

async fn request_flow(db_url: &str) {
    let pki = pki();
    let issuer = https_issuer().await;
    let api = Api::start(&pki, Some(&issuer), db_url).await;
    let c = client(&pki, None);
    let (bob, carol, gina, dave) = (
        issuer.token("bob@ward7.example"),
        issuer.token("carol@ward7.example"),
        issuer.token("gina@ward7.example"),
        issuer.token("dave@ward7.example"),
    );
    let requests = api.url("/v1/projects/ward-7/workspacerequests");
    let body = json!({"name": "alice-vm-1", "workspaceName": "alice-vm", "owner": "alice@ward7.example", "runtime": "vm", "image": "r-vm:4", "justification": "sepsis cohort", "datasets": ["icu-2019"]});
    let (status, created) = call(&c, Method::POST, &requests, Some(&bob), json_body(&body)).await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["spec"]["requester"], "bob@ward7.example");
    let (status, err) = call(&c, Method::POST, &requests, Some(&bob), json_body(&body)).await.unwrap();
    assert_eq!((status, err["code"].as_str()), (StatusCode::CONFLICT, Some("alreadyExists")));
    let mut bad = body.clone();
    bad["name"] = json!("other");
    bad["owner"] = json!("bob@ward7.example");
    let (status, err) = call(&c, Method::POST, &requests, Some(&bob), json_body(&bad)).await.unwrap();
    assert_eq!((status, err["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("ownerNotResearcher")));

    // gina is analyst and admin: she may request, but not approve her own request.
    let mut own = body.clone();
    own["name"] = json!("gina-own");
    let (status, _) = call(&c, Method::POST, &requests, Some(&gina), json_body(&own)).await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    let (status, err) =
        call(&c, Method::POST, &api.url("/v1/projects/ward-7/workspacerequests/gina-own/approve"), Some(&gina), None)
            .await
            .unwrap();
    assert_eq!((status, err["code"].as_str()), (StatusCode::FORBIDDEN, Some("selfDecision")));

    let approve = api.url("/v1/projects/ward-7/workspacerequests/alice-vm-1/approve");
    let (status, decided) =
        call(&c, Method::POST, &approve, Some(&carol), json_body(&json!({"reason": "REC approved"}))).await.unwrap();
    assert_eq!(
        (status, decided["decision"].as_str(), decided["decidedBy"].as_str()),
        (StatusCode::OK, Some("Approved"), Some("carol@ward7.example"))
    );
    let (status, err) = call(
        &c,
        Method::POST,
        &api.url("/v1/projects/ward-7/workspacerequests/alice-vm-1/deny"),
        Some(&carol),
        json_body(&json!({"reason": "changed my mind"})),
    )
    .await
    .unwrap();
    assert_eq!((status, err["code"].as_str()), (StatusCode::CONFLICT, Some("alreadyDecided")));
    let (status, err) = call(
        &c,
        Method::POST,
        &api.url("/v1/projects/ward-7/workspacerequests/gina-own/deny"),
        Some(&carol),
        json_body(&json!({})),
    )
    .await
    .unwrap();
    assert_eq!((status, err["code"].as_str()), (StatusCode::BAD_REQUEST, Some("reasonRequired")));

    let (status, list) = call(&c, Method::GET, &requests, Some(&dave), None).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 2);
    let req = api.cluster.get_request_now("ward-7", "alice-vm-1").unwrap();
    assert_eq!(
        req.status.unwrap().decision_from_conditions(),
        Some(noexit_crds::workspace_request::Decision::Approved)
    );

    let audit_url = api.url("/v1/audit?project=ward-7&action=request.");
    let (status, log) = call(&c, Method::GET, &audit_url, Some(&dave), None).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{log}");
    let actions: Vec<(&str, &str)> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["outcome"].as_str().unwrap()))
        .collect();
    assert!(actions.contains(&("request.create", "allowed")));
    assert!(actions.contains(&("request.approve", "allowed")));
    assert!(actions.contains(&("request.approve", "refused")), "{actions:?}");
    let approval =
        log.as_array().unwrap().iter().find(|e| e["action"] == "request.approve" && e["outcome"] == "allowed").unwrap();
    assert_eq!(
        (approval["actor"].as_str(), approval["role"].as_str(), approval["object"].as_str()),
        (Some("user:carol@ward7.example"), Some("admin"), Some("workspacerequest:ward-7/alice-vm-1"))
    );
    let (status, err) =
        call(&c, Method::GET, &api.url("/v1/audit?project=ward-7&bogus=1"), Some(&dave), None).await.unwrap();
    assert_eq!((status, err["code"].as_str()), (StatusCode::BAD_REQUEST, Some("unknownParameter")));

    // Sessions reported by an agent show up for the auditor.
    let agent = client(&pki, Some(&pki.agent("alice-r")));
    let batch = json!({"events": [serde_json::to_value(session_event(SessionAction::DesktopConnect)).unwrap()]});
    let (status, _) = call(&agent, Method::POST, &api.url("/v1/agent/events"), None, json_body(&batch)).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let (status, sessions) =
        call(&c, Method::GET, &api.url("/v1/projects/ward-7/sessions"), Some(&dave), None).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sessions["events"][0]["action"], "desktopConnect");
}

// ---- faults: the database goes away while agents report --------------------------------------

/// `agents` agents each send `batches` batches; each batch is retried until acknowledged. Returns
/// the acknowledged events and how many 503 answers the agents saw.
async fn agents_report(
    api_url: String,
    pki: &Pki,
    agents: usize,
    batches: usize,
    pause: Duration,
) -> (Vec<AgentEvent>, usize) {
    let mut tasks = Vec::new();
    for a in 0..agents {
        let client = client(pki, Some(&pki.agent(&format!("ws-{a}"))));
        let url = format!("{api_url}/v1/agent/events");
        tasks.push(tokio::spawn(async move {
            let (mut acked, mut errors) = (Vec::new(), 0usize);
            for _ in 0..batches {
                let batch = EventBatch { events: vec![session_event(SessionAction::Login), violation_event()] };
                let body = serde_json::to_vec(&batch).unwrap();
                let deadline = Instant::now() + Duration::from_secs(120);
                loop {
                    match call(&client, Method::POST, &url, None, Some(("application/json", body.clone()))).await {
                        Ok((StatusCode::OK, _)) => break,
                        Ok((s, b)) if s.is_server_error() => {
                            assert_eq!(b["code"], "unavailable", "{b}");
                            errors += 1
                        }
                        Ok((s, b)) => panic!("unexpected {s}: {b}"),
                        Err(e) => panic!("the API itself stayed up, yet the connection failed: {e}"),
                    }
                    assert!(Instant::now() < deadline, "agent never got an acknowledgement");
                    tokio::time::sleep(Duration::from_millis(100)).await; // agent retry backoff
                }
                acked.extend(batch.events);
                tokio::time::sleep(pause).await; // heartbeat-like pacing
            }
            (acked, errors)
        }));
    }
    let mut acked = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (a, e) = t.await.unwrap();
        acked.extend(a);
        errors += e;
    }
    (acked, errors)
}

async fn assert_each_once(audit: &Store, store: &ApiStore, acked: &[AgentEvent]) {
    let entries = audit.query(&audit::store::Filter::default()).await.unwrap();
    let mut counts = std::collections::HashMap::new();
    for e in &entries {
        if let Some(k) = &e.idempotency_key {
            *counts.entry(k.clone()).or_insert(0) += 1;
        }
    }
    for id in acked.iter().map(|e| e.id) {
        assert_eq!(counts.get(&id.to_string()).copied(), Some(1), "event {id} not in the log exactly once");
    }
    assert!(counts.values().all(|n| *n == 1), "a key appears twice in the log");
    assert_eq!(store.event_count().await.unwrap(), counts.len() as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_while_agents_report_loses_and_duplicates_nothing() {
    // fsync on: a crash (immediate stop) must not lose a committed transaction.
    let Some(pg) = support::pg::PgServer::start_with(true) else { return };
    let url = pg.create_database("api_restart").unwrap();
    let pki = pki();
    let api = Api::start(&pki, None, &url).await;
    let base = api.url("");
    let reporting = {
        let base = base.clone();
        let pki_ref = &pki;
        async move { agents_report(base, pki_ref, 8, 30, Duration::from_millis(50)).await }
    };
    let outage = async {
        // Let some reports through, then take the database away until agents notice.
        let log = poll::settle(SETTLE, || api.store.event_count(), |n| n.as_ref().is_ok_and(|n| *n >= 40)).await;
        assert!(log.is_ok());
        pg.kill().unwrap();
        let before = api.store.event_count().await;
        assert!(before.is_err(), "the store still answers with PostgreSQL down");
        tokio::time::sleep(Duration::from_secs(2)).await; // keep it down while agents retry
        pg.start_again().unwrap();
    };
    let ((acked, errors), ()) = tokio::join!(reporting, outage);
    assert_eq!(acked.len(), 8 * 30 * 2);
    assert!(errors > 0, "no agent got a 503 during the outage");
    eprintln!("{} events acknowledged, {errors} answers 503 during the outage", acked.len());
    assert_each_once(&api.audit, &api.store, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_acknowledged_events_survive_a_restart_and_resends_are_not_duplicated() {
    let pki = pki();
    let db = tempfile::tempdir().unwrap();
    let url = sqlite_url(&db);
    let api = Api::start(&pki, None, &url).await;
    let (acked, errors) = agents_report(api.url(""), &pki, 8, 10, Duration::ZERO).await;
    assert_eq!(errors, 0);
    // Restart on the same file, as after a crash, and resend everything as an agent's spool
    // would after losing the acknowledgements.
    let cluster = api.cluster.clone();
    drop(api);
    let audit = Arc::new(Store::connect(&url).await.unwrap());
    let api = Api::start_on(&pki, None, cluster, audit).await;
    let agent = client(&pki, Some(&pki.agent("ws-0")));
    let resend: Vec<Value> = acked.iter().map(|e| serde_json::to_value(e).unwrap()).collect();
    for chunk in resend.chunks(500) {
        let (status, ack) =
            call(&agent, Method::POST, &api.url("/v1/agent/events"), None, json_body(&json!({"events": chunk})))
                .await
                .unwrap();
        assert_eq!((status, ack["accepted"].as_u64()), (StatusCode::OK, Some(0)), "{ack}");
    }
    assert_each_once(&api.audit, &api.store, &acked).await;
}

// ---- the `noexit` CLI against the real API ----------------------------------------------------

/// Run `noexit args…` with `token`; returns (exit code, stdout, stderr).
async fn noexit(api: &Api, pki: &Pki, token: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_noexit"));
    cmd.args(args)
        .env("NOEXIT_API", api.url(""))
        .env("NOEXIT_CA", pki.dir.path().join("ca.crt"))
        .env_remove("NOEXIT_TOKEN");
    if let Some(t) = token {
        cmd.env("NOEXIT_TOKEN", t);
    }
    let out = cmd.output().await.unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[tokio::test]
async fn cli_requests_approves_and_reports_with_documented_exit_codes() {
    let pki = pki();
    let db = tempfile::tempdir().unwrap();
    let issuer = https_issuer().await;
    let api = Api::start(&pki, Some(&issuer), &sqlite_url(&db)).await;
    let (bob, carol, dave) =
        (issuer.token("bob@ward7.example"), issuer.token("carol@ward7.example"), issuer.token("dave@ward7.example"));

    let request = [
        "request",
        "workspace",
        "--project",
        "ward-7",
        "--owner",
        "alice@ward7.example",
        "--runtime",
        "vm",
        "--image",
        "registry.example/r-vm:4.4",
        "--justification",
        "sepsis cohort, REC 23/LO/0042",
        "--dataset",
        "icu-2019",
        "--name",
        "alice-vm-req",
    ];
    let (code, out, err) = noexit(&api, &pki, Some(&bob), &request).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("workspacerequest ward-7/alice-vm-req created"), "{out}");
    // Again: the server refuses (exists) → 1.
    let (code, _, err) = noexit(&api, &pki, Some(&bob), &request).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("alreadyExists"), "{err}");
    // bob is no admin → 1 with the reason.
    let (code, _, err) = noexit(&api, &pki, Some(&bob), &["approve", "alice-vm-req", "--project", "ward-7"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("403 Forbidden forbidden") && err.contains("admin"), "{err}");
    let (code, out, err) =
        noexit(&api, &pki, Some(&carol), &["approve", "alice-vm-req", "--project", "ward-7", "--reason", "ok"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("approved"));
    let (code, out, _) = noexit(&api, &pki, Some(&dave), &["requests", "list", "--project", "ward-7"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("alice-vm-req") && out.contains("Approved") && out.contains("carol@ward7.example"), "{out}");
    let (code, out, _) = noexit(&api, &pki, Some(&dave), &["--json", "requests", "list", "-p", "ward-7"]).await;
    assert_eq!(code, 0);
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list[0]["decision"], "Approved");
    let (code, out, _) = noexit(&api, &pki, Some(&dave), &["sessions", "--project", "ward-7"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("WORKSPACE"));
    let (code, out, err) =
        noexit(&api, &pki, Some(&carol), &["revoke", "alice-r", "--project", "ward-7", "--reason", "laptop lost"])
            .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("certificate 0a0b of workspace ward-7/alice-r revoked"), "{out}");

    // Usage errors → 2; no token → refused 1; nothing listening → 3.
    let (code, _, _) = noexit(&api, &pki, Some(&bob), &["approve", "x"]).await;
    assert_eq!(code, 2);
    let (code, _, err) = noexit(&api, &pki, None, &["whoami", "--project", "ward-7"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("tokenRequired"));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_noexit"));
    let out = cmd
        .args(["--api-url", &format!("https://127.0.0.1:{}", closed.port()), "whoami", "-p", "ward-7"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    for args in [
        vec!["--help"],
        vec!["request", "workspace", "--help"],
        vec!["requests", "list", "--help"],
        vec!["deny", "--help"],
        vec!["audit", "--help"],
    ] {
        let (code, out, _) = noexit(&api, &pki, None, &args).await;
        assert_eq!(code, 0, "{args:?}");
        assert!(out.contains("Usage"), "{args:?}: {out}");
    }
}

// ---- the real binary, killed right after acknowledging -----------------------------------------

/// `noexit-operator api` on a free loopback port; waits (bounded) until it answers.
async fn start_binary(pki: &Pki, db_url: &str, dir: &Path) -> (Proc, String) {
    start_binary_with(pki, db_url, dir, &[]).await
}

async fn start_binary_with(pki: &Pki, db_url: &str, dir: &Path, extra: &[&str]) -> (Proc, String) {
    let port = net::free_port();
    std::fs::write(dir.join("manifests.yaml"), PROJECT).unwrap();
    let p = |name: &str| pki.dir.path().join(name).display().to_string();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_noexit-operator"))
        .args([
            "api",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--tls-cert",
            &p("tls.crt"),
            "--tls-key",
            &p("tls.key"),
        ])
        .args(["--client-ca", &p("ca.crt"), "--database-url", db_url])
        .arg("--audit-key")
        .arg(dir.join("audit-key.pem"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--manifests")
        .arg(dir.join("manifests.yaml"))
        .args(extra)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let child = Proc::new(child);
    let base = format!("https://localhost:{port}");
    let health = client(pki, None);
    let health_url = format!("{base}/healthz");
    let ready = poll::settle(SETTLE, || call(&health, Method::GET, &health_url, None, None), |r| r.is_ok()).await;
    assert!(ready.is_ok(), "noexit-operator api did not come up: {ready:?}");
    (child, base)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_events_acknowledged_by_the_binary_survive_kill_9() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(&dir);
    let (mut child, base) = start_binary(&pki, &url, dir.path()).await;
    let (acked, errors) = agents_report(base, &pki, 4, 10, Duration::ZERO).await;
    assert_eq!(errors, 0);
    // SIGKILL right after the last acknowledgement: no shutdown, no flush.
    child.kill9();
    let audit = Store::connect(&url).await.unwrap();
    let store = ApiStore::new(audit.pool().clone());
    assert_each_once(&audit, &store, &acked).await;
    audit.close().await;
    // Restarted, the agents resend their spool: nothing is stored twice.
    let (_child, base) = start_binary(&pki, &url, dir.path()).await;
    let agent = client(&pki, Some(&pki.agent("ws-1")));
    let resend: Vec<Value> = acked.iter().map(|e| serde_json::to_value(e).unwrap()).collect();
    let (status, ack) =
        call(&agent, Method::POST, &format!("{base}/v1/agent/events"), None, json_body(&json!({"events": resend})))
            .await
            .unwrap();
    assert_eq!((status, ack["duplicates"].as_u64()), (StatusCode::OK, Some(acked.len() as u64)), "{ack}");
}

#[tokio::test]
async fn the_workspace_finalizers_revoker_is_accepted_and_takes_effect_at_once() {
    use noexit_operator::controllers::revoke::{HttpRevoker, Revocation, Revoker};
    let pki = pki();
    let db = tempfile::tempdir().unwrap();
    let api = Api::start(&pki, None, &sqlite_url(&db)).await;
    let cert = pki.agent("alice-r");
    let agent = client(&pki, Some(&cert));
    let hb = api.url("/v1/agent/heartbeat");
    assert_eq!(call(&agent, Method::POST, &hb, None, json_body(&heartbeat())).await.unwrap().0, StatusCode::OK);
    let ca = Arc::new(Ca::from_pem(pki.ca.cert_pem(), pki.ca.key_pem()).unwrap());
    let revoker = HttpRevoker::new(&api.url(""), ca).unwrap();
    let revocation = Revocation {
        workspace: "ward-7/alice-r".into(),
        serial: cert.serial.clone(),
        reason: "workspace deleted".into(),
    };
    revoker.revoke(&revocation).await.unwrap();
    revoker.revoke(&revocation).await.unwrap(); // idempotent
    let (status, body) = call(&agent, Method::POST, &hb, None, json_body(&heartbeat())).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("certificateRevoked")));
    let logged = api.entries().await;
    let revoked =
        logged.iter().filter(|e| e.event.action == "certificate.revoke" && e.event.actor == "operator").count();
    assert_eq!(revoked, 2);
}

// ---- 5xx bodies --------------------------------------------------------------------------------

#[tokio::test]
async fn database_failures_answer_503_without_database_internals_or_paths() {
    let pki = pki();
    let db = tempfile::tempdir().unwrap();
    let issuer = https_issuer().await;
    let api = Api::start(&pki, Some(&issuer), &sqlite_url(&db)).await;
    let role = Endpoint::SessionList.allowed_roles()[0];
    let token = issuer.token(user_with(role));
    let person = client(&pki, None);
    let url = api.url("/v1/projects/ward-7/sessions");
    let (status, _) = call(&person, Method::GET, &url, Some(&token), None).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    // Break the database under the API: the table the sessions view reads is gone.
    match api.audit.pool() {
        audit::store::Pool::Sqlite(p) => {
            sqlx::query("DROP TABLE agent_heartbeats").execute(p).await.unwrap();
        }
        audit::store::Pool::Postgres(_) => unreachable!("this test runs on SQLite"),
    }
    let (status, err) = call(&person, Method::GET, &url, Some(&token), None).await.unwrap();
    assert_eq!((status, err["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("unavailable")), "{err}");
    let message = err["message"].as_str().unwrap().to_owned();
    let lower = message.to_lowercase();
    for leak in ["sqlx", "sqlite", "postgres", "table", "agent_heartbeats", "error returned from database"] {
        assert!(!lower.contains(leak), "{leak:?} in {message:?}");
    }
    assert!(!message.contains('/') && !message.contains(&db.path().display().to_string()), "{message}");
    let correlation = message.rsplit("correlation id ").next().unwrap().trim_end_matches(')').to_owned();
    assert_eq!(correlation.len(), 32, "{message}");
    // The auditor's record of the refusal carries the same id, to find the server's log line.
    let refused = api.refused("session.list").await;
    assert!(
        refused.iter().any(|e| matches!(&e.event.outcome, Outcome::Refused(r) if r.contains(&correlation))),
        "{refused:?}"
    );
}

// ---- refusals nobody routed, and availability ------------------------------------------------

#[tokio::test]
async fn unknown_paths_and_wrong_methods_are_refused_with_json_and_audited() {
    let pki = pki();
    let db = tempfile::tempdir().unwrap();
    let api = Api::start(&pki, None, &sqlite_url(&db)).await;
    let anon = client(&pki, None);
    let (status, body) = call(&anon, Method::GET, &api.url("/v1/nothing/here"), None, None).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::NOT_FOUND, Some("notFound")), "{body}");
    let (status, body) = call(&anon, Method::DELETE, &api.url("/v1/agent/events"), None, None).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::METHOD_NOT_ALLOWED, Some("methodNotAllowed")), "{body}");
    let (status, _) = call(&anon, Method::PATCH, &api.url("/healthz"), None, None).await.unwrap();
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let refused = api.refused("api.request").await;
    let seen: Vec<(String, String)> = refused
        .iter()
        .map(|e| (e.event.object.clone(), e.event.detail["method"].as_str().unwrap_or_default().to_owned()))
        .collect();
    assert_eq!(
        seen,
        [
            ("path:/v1/nothing/here".to_owned(), "GET".to_owned()),
            ("path:/v1/agent/events".to_owned(), "DELETE".to_owned()),
            ("path:/healthz".to_owned(), "PATCH".to_owned()),
        ]
    );
    assert!(matches!(&refused[1].event.outcome, Outcome::Refused(r) if r.starts_with("methodNotAllowed")));
    assert_eq!(refused[0].event.source.as_deref().map(|s| s.starts_with("127.0.0.1:")), Some(true));
    // Routed refusals are recorded once, by the guard, not twice.
    let (status, _) = call(&anon, Method::GET, &api.url("/v1/projects/ward-7/whoami"), None, None).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(api.refused("api.request").await.len(), 3);
}

fn limits(header_read: Duration, per_address: usize) -> noexit_operator::serving::Limits {
    noexit_operator::serving::Limits {
        header_read,
        idle: Duration::from_secs(30),
        tls_handshake: Duration::from_secs(5),
        max_per_address: per_address,
        max_connections: 1000,
    }
}

async fn start_limited(pki: &Pki, db: &tempfile::TempDir, limits: noexit_operator::serving::Limits) -> Api {
    let cluster = Arc::new(api::memory_cluster_from(PROJECT).unwrap());
    let audit = Arc::new(Store::connect(&sqlite_url(db)).await.unwrap());
    Api::start_with_limits(pki, None, cluster, audit, limits).await
}

/// A TLS connection as a raw stream (no HTTP client in between).
async fn raw_tls(
    pki: &Pki,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let config = tls::client_config(Some(pki.ca.cert_pem().as_bytes()), None).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await
}

#[tokio::test]
async fn a_slowloris_client_is_cut_off_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = pki();
    let db = tempfile::tempdir().unwrap();
    let api = start_limited(&pki, &db, limits(Duration::from_secs(1), 64)).await;
    let mut tls = raw_tls(&pki, api.addr).await.unwrap();
    let started = Instant::now();
    // Headers one byte every 50 ms, forever: only the header timeout ends this.
    let headers = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n".iter().chain(b"X-Slow: a\r\n".iter().cycle());
    let mut cut = None;
    for &byte in headers {
        if tls.write_all(&[byte]).await.and(tls.flush().await).is_err() {
            cut = Some(started.elapsed());
            break;
        }
        // The server closing shows up as EOF on a read that does not wait.
        let mut buf = [0u8; 256];
        if tokio::time::timeout(Duration::from_millis(50), tls.read(&mut buf)).await.is_ok() {
            cut = Some(started.elapsed());
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "still connected after 10 s of slow headers");
    }
    let cut = cut.expect("the server closed the connection");
    assert!(cut >= Duration::from_millis(900) && cut < Duration::from_secs(5), "cut after {cut:?}");
    // A normal request is still served.
    let (status, _) = call(&client(&pki, None), Method::GET, &api.url("/healthz"), None, None).await.unwrap();
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn connections_over_the_per_address_limit_are_refused_and_audited() {
    use tokio::io::AsyncReadExt;
    let pki = pki();
    let db = tempfile::tempdir().unwrap();
    let n = 4;
    let api = start_limited(&pki, &db, limits(Duration::from_secs(10), n)).await;
    let mut open = Vec::new();
    for _ in 0..n {
        open.push(raw_tls(&pki, api.addr).await.expect("within the limit"));
    }
    // The (n+1)th from the same address: closed before the handshake completes.
    let over = raw_tls(&pki, api.addr).await;
    let refused = match over {
        Err(_) => true,
        Ok(mut s) => {
            let mut buf = [0u8; 16];
            matches!(tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
        }
    };
    assert!(refused, "connection {} from one address was served", n + 1);
    let entries = poll::settle(SETTLE, || api.refused("api.connection"), |e: &Vec<_>| !e.is_empty()).await;
    assert!(matches!(&entries[0].event.outcome, Outcome::Refused(r) if r.contains("more than 4 open connections")));
    // A place frees when a connection closes.
    drop(open.pop());
    let again = poll::settle(SETTLE, || raw_tls(&pki, api.addr), |r| r.is_ok()).await;
    assert!(again.is_ok(), "{:?}", again.err());
}

#[tokio::test]
async fn a_hundred_failed_handshakes_make_one_audit_entry() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = pki();
    let db = tempfile::tempdir().unwrap();
    let api = Api::start(&pki, None, &sqlite_url(&db)).await;
    for _ in 0..100 {
        let mut tcp = tokio::net::TcpStream::connect(api.addr).await.unwrap();
        // Plain HTTP to a TLS port: the handshake fails.
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
    }
    let entries = poll::settle(SETTLE, || api.refused("tls.handshake"), |e: &Vec<_>| !e.is_empty()).await;
    // One handshake that succeeds afterwards proves the server got past all of them.
    let (status, _) = call(&client(&pki, None), Method::GET, &api.url("/healthz"), None, None).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let entries = api.refused("tls.handshake").await.len().max(entries.len());
    assert_eq!(entries, 1, "the first failure per address per minute is recorded, the rest counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_seals_the_audit_tail_and_publishes_the_checkpoint() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(&dir);
    let export = dir.path().join("checkpoints");
    let export_arg = export.display().to_string();
    let (mut child, base) = start_binary_with(
        &pki,
        &url,
        dir.path(),
        &["--checkpoint-export", &export_arg, "--checkpoint-interval-secs", "3600"],
    )
    .await;
    let anon = client(&pki, None);
    for i in 0..3 {
        let (status, _) = call(&anon, Method::GET, &format!("{base}/v1/nope/{i}"), None, None).await.unwrap();
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    let key = noexit_operator::audit::keys::load_verifying_key(&dir.path().join("audit-key.pem")).unwrap();
    let options = || noexit_operator::audit::verify::VerifyOptions {
        keys: vec![key],
        writers: {
            let mut w = noexit_operator::audit::writers::WriterKeys::new();
            w.add("api", key);
            Some(w)
        },
        published: Some(noexit_operator::audit::store::read_exported_checkpoints(&export).unwrap_or_default()),
    };
    let reader = Store::open_read_only(&url).await.unwrap();
    let before = noexit_operator::audit::verify::verify(&reader, &options()).await.unwrap();
    assert!(before.is_intact() && before.unsealed >= 3, "{before:?}");
    reader.close().await;

    let status = child.terminate_within(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    let reader = Store::open_read_only(&url).await.unwrap();
    let after = noexit_operator::audit::verify::verify(&reader, &options()).await.unwrap();
    assert!(after.is_intact(), "{after:?}");
    assert_eq!(after.unsealed, 0, "a checkpoint covers the last entry: {after:?}");
    assert_eq!(after.entries_authenticated, after.entries);
    let published = noexit_operator::audit::store::read_exported_checkpoints(&export).unwrap();
    assert_eq!(published.last().map(|c| c.body.last_seq), Some(after.last_seq), "published outside the database too");
}

/// An admin of project A may revoke only A's workspaces' certificates: not B's (seen when B's
/// agent authenticated), not the operator's own client certificate; each refusal is audited.
#[tokio::test]
async fn an_admin_revokes_only_their_own_projects_certificates() {
    let pki = pki();
    let db = tempfile::tempdir().unwrap();
    let issuer = https_issuer().await;
    let ward9 = r#"
---
apiVersion: noexit.io/v1alpha1
kind: Project
metadata: {name: ward-9}
spec:
  members:
    - {user: zoe@ward9.example, roles: [researcher, admin]}
  approval: {reference: "REC 24/LO/0001", expires: "2027-06-30"}
---
apiVersion: noexit.io/v1alpha1
kind: Workspace
metadata: {name: zoe-r, namespace: noexit-ward-9}
spec: {project: ward-9, owner: zoe@ward9.example, runtime: pod, image: "r:4"}
"#;
    let cluster = Arc::new(api::memory_cluster_from(&format!("{PROJECT}{ward9}")).unwrap());
    let audit = Arc::new(Store::connect(&sqlite_url(&db)).await.unwrap());
    let api = Api::start_on(&pki, Some(&issuer), cluster, audit).await;

    // ward-9's agent and the operator talk to the API: their serials are now known.
    let zoe_agent = pki
        .ca
        .issue_workspace_client(
            &WorkspaceIdentity { project: "ward-9".into(), name: "zoe-r".into() },
            chrono::Duration::days(1),
        )
        .unwrap();
    let (status, body) = call(
        &client(&pki, Some(&zoe_agent)),
        Method::POST,
        &api.url("/v1/agent/heartbeat"),
        None,
        json_body(&heartbeat()),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    let operator = pki.ca.issue_operator_client(chrono::Duration::days(1)).unwrap();

    let carol = issuer.token("carol@ward7.example");
    let url = api.url("/v1/projects/ward-7/workspaces/alice-r/revoke");
    for (serial, whose) in [(&zoe_agent.serial, "ward-9's agent"), (&operator.serial, "the operator")] {
        let body = json!({"serial": serial, "reason": "attack"});
        let (status, body) =
            call(&client(&pki, None), Method::POST, &url, Some(&carol), json_body(&body)).await.unwrap();
        assert_eq!(status, StatusCode::FORBIDDEN, "{whose}: {body}");
        assert_eq!(body["code"], "serialNotOfWorkspace", "{whose}: {body}");
    }
    // Neither was revoked: both still work.
    let (status, _) = call(
        &client(&pki, Some(&zoe_agent)),
        Method::POST,
        &api.url("/v1/agent/heartbeat"),
        None,
        json_body(&heartbeat()),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK, "ward-9's agent was revoked by ward-7's admin");
    let revocation = json!({"workspace": "ward-7/old", "serial": "0c0d", "reason": "still the operator"});
    let (status, body) = call(
        &client(&pki, Some(&operator)),
        Method::POST,
        &api.url("/v1/operator/revocations"),
        None,
        json_body(&revocation),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK, "the operator's certificate was revoked: {body}");
    // Both refusals are in the audit log, under carol.
    let refused = api.refused("certificate.revoke").await;
    assert_eq!(refused.len(), 2, "{refused:#?}");
    assert!(refused.iter().all(|e| e.event.actor == "user:carol@ward7.example"), "{refused:#?}");

    // Her own workspace's certificates: the current one (status) and one its agent used.
    let alice_agent = pki.agent("alice-r");
    let (status, _) = call(
        &client(&pki, Some(&alice_agent)),
        Method::POST,
        &api.url("/v1/agent/heartbeat"),
        None,
        json_body(&heartbeat()),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK);
    for serial in ["0a0b", alice_agent.serial.as_str()] {
        let body = json!({"serial": serial, "reason": "laptop lost"});
        let (status, body) =
            call(&client(&pki, None), Method::POST, &url, Some(&carol), json_body(&body)).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{serial}: {body}");
        assert_eq!(body["new"], true);
    }
    let (status, body) = call(
        &client(&pki, Some(&alice_agent)),
        Method::POST,
        &api.url("/v1/agent/heartbeat"),
        None,
        json_body(&heartbeat()),
    )
    .await
    .unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("certificateRevoked")));
}

// ---- the airlock: review and release of outputs ------------------------------------------

/// One call, answering the raw body and headers (downloads).
async fn call_raw(
    client: &Https,
    method: Method,
    url: &str,
    token: Option<&str>,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let mut req = http::Request::builder().method(method).uri(url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let response = client.request(req.body(Full::new(Bytes::new())).unwrap()).await.unwrap();
    let (parts, body) = response.into_parts();
    (parts.status, parts.headers, body.collect().await.unwrap().to_bytes())
}

/// Submit `content` as `name` from the agent holding `agent`; answers the request id and the
/// upload's ack.
async fn submit(api: &Api, agent: &Https, name: &str, content: &[u8]) -> (Uuid, Value) {
    let id = Uuid::new_v4();
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(content));
    let manifest = json!({
        "id": id, "fileName": name, "size": content.len(), "sha256": sha,
        "submittedBy": "alice", "scan": {"verdict": "clean", "findings": []},
    });
    let (status, ack) =
        call(agent, Method::POST, &api.url("/v1/agent/outbox"), None, json_body(&manifest)).await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{name}: {ack}");
    let put = api.url(&format!("/v1/agent/outbox/{id}/content"));
    let (status, ack) =
        call(agent, Method::PUT, &put, None, Some(("application/octet-stream", content.to_vec()))).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{name}: {ack}");
    (id, ack)
}

/// A zip archive holding one deflated file of `len` zeros: a few KiB that expand a thousandfold.
fn zip_bomb(len: usize) -> Vec<u8> {
    use std::io::Write;
    let zeros = vec![0u8; len];
    let mut crc = flate2::Crc::new();
    crc.update(&zeros);
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(&zeros).unwrap();
    let data = enc.finish().unwrap();
    let name = b"zeros.bin";
    let (crc, csize, usize_) = (crc.sum(), data.len() as u32, len as u32);
    let mut z = Vec::new();
    let local = |z: &mut Vec<u8>| {
        z.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        z.extend_from_slice(&[20, 0, 0, 0, 8, 0, 0, 0, 0, 0]);
        z.extend_from_slice(&crc.to_le_bytes());
        z.extend_from_slice(&csize.to_le_bytes());
        z.extend_from_slice(&usize_.to_le_bytes());
        z.extend_from_slice(&(name.len() as u16).to_le_bytes());
        z.extend_from_slice(&0u16.to_le_bytes());
        z.extend_from_slice(name);
    };
    local(&mut z);
    z.extend_from_slice(&data);
    let central_at = z.len() as u32;
    z.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
    z.extend_from_slice(&[20, 0, 20, 0, 0, 0, 8, 0, 0, 0, 0, 0]);
    z.extend_from_slice(&crc.to_le_bytes());
    z.extend_from_slice(&csize.to_le_bytes());
    z.extend_from_slice(&usize_.to_le_bytes());
    z.extend_from_slice(&(name.len() as u16).to_le_bytes());
    z.extend_from_slice(&[0u8; 12]);
    z.extend_from_slice(&0u32.to_le_bytes());
    z.extend_from_slice(name);
    let central_len = z.len() as u32 - central_at;
    z.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    z.extend_from_slice(&[0, 0, 0, 0, 1, 0, 1, 0]);
    z.extend_from_slice(&central_len.to_le_bytes());
    z.extend_from_slice(&central_at.to_le_bytes());
    z.extend_from_slice(&0u16.to_le_bytes());
    z
}

const WARD9: &str = r#"
---
apiVersion: noexit.io/v1alpha1
kind: Project
metadata: {name: ward-9}
spec:
  members:
    - {user: pat@ward9.example, roles: [outputChecker]}
  approval: {reference: "REC 24/LO/0001", expires: "2027-06-30"}
"#;

#[tokio::test]
async fn airlock_review_and_release_sqlite() {
    let db = tempfile::tempdir().unwrap();
    airlock_flow(&sqlite_url(&db)).await;
}

#[tokio::test]
async fn airlock_review_and_release_postgres() {
    let Some(pg) = support::pg::shared() else { return };
    airlock_flow(&pg.create_database("airlock_flow").unwrap()).await;
}

/// The database is the airlock's source of truth: when the cluster refuses the kubectl mirror,
/// submission and decisions still succeed (the API only logs a warning).
#[tokio::test]
async fn airlock_decisions_do_not_wait_for_the_kubectl_mirror() {
    let pki = pki();
    let issuer = https_issuer().await;
    let cluster = Arc::new(api::memory_cluster_from(PROJECT).unwrap());
    cluster.refuse_mirrors(true);
    let db = tempfile::tempdir().unwrap();
    let audit = Arc::new(Store::connect(&sqlite_url(&db)).await.unwrap());
    let api = Api::start_on(&pki, Some(&issuer), cluster, audit).await;
    let agent = client(&pki, Some(&pki.agent("alice-r")));
    let people = client(&pki, None);
    let (id, ack) = submit(&api, &agent, "summary.csv", b"region,n\nnorth,120\nsouth,150\n").await;
    assert_eq!(ack["state"], "checked", "{ack}");
    let approve = api.url(&format!("/v1/projects/ward-7/outputs/{id}/approve"));
    for who in ["olive", "oscar"] {
        let token = issuer.token(&format!("{who}@ward7.example"));
        let (status, body) = call(&people, Method::POST, &approve, Some(&token), None).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let alice = issuer.token("alice@ward7.example");
    let (_, body) =
        call(&people, Method::GET, &api.url(&format!("/v1/projects/ward-7/outputs/{id}")), Some(&alice), None)
            .await
            .unwrap();
    assert_eq!(body["state"], "approved");
    assert!(api.cluster.mirrors().is_empty());
}

async fn airlock_flow(db_url: &str) {
    let pki = pki();
    let issuer = https_issuer().await;
    let cluster = Arc::new(api::memory_cluster_from(&format!("{PROJECT}{WARD9}")).unwrap());
    let audit = Arc::new(Store::connect(db_url).await.unwrap());
    let api = Api::start_on(&pki, Some(&issuer), cluster, audit).await;
    let agent = client(&pki, Some(&pki.agent("alice-r")));
    let people = client(&pki, None);
    let [alice, bob, olive, oscar, rita, pat, dave] =
        ["alice", "bob", "olive", "oscar", "rita", "pat", "dave"].map(|u| {
            let domain = if u == "pat" { "ward9" } else { "ward7" };
            issuer.token(&format!("{u}@{domain}.example"))
        });
    let outputs = |rest: &str| api.url(&format!("/v1/projects/ward-7/outputs{rest}"));
    let reason = |r: &str| json_body(&json!({"reason": r}));

    // The researcher's outbox: a table with one cell of 7, and a clean summary.
    let table = b"region,n\nnorth,7\nsouth,15\n".to_vec();
    let summary = b"region,n\nnorth,120\nsouth,150\n".to_vec();
    let (table_id, ack) = submit(&api, &agent, "table.csv", &table).await;
    assert_eq!(ack["state"], "checked", "{ack}");
    let (summary_id, _) = submit(&api, &agent, "summary.csv", &summary).await;

    // Checkers see both, with the control plane's checks.
    let (status, list) = call(&people, Method::GET, &outputs(""), Some(&olive), None).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{list}");
    let find = |list: &Value, id: Uuid| list.as_array().unwrap().iter().find(|o| o["id"] == id.to_string()).cloned();
    let t = find(&list, table_id).expect("table.csv listed");
    let s = find(&list, summary_id).expect("summary.csv listed");
    assert_eq!((t["state"].as_str(), t["requester"].as_str()), (Some("checked"), Some("alice@ward7.example")));
    assert_eq!(t["reviewersRequired"], 2);
    // The control plane's checks (branch `checks`, cherry-picked): the cell of 7 fails the
    // minimum cell count at file line 2, column 2; the summary passes.
    assert_eq!(t["checks"]["verdict"], "fail", "{t}");
    let failed: Vec<&Value> =
        t["checks"]["results"].as_array().unwrap().iter().filter(|r| r["verdict"] == "fail").collect();
    assert_eq!(failed.len(), 1, "{t}");
    assert_eq!(
        (failed[0]["check"].as_str(), &failed[0]["cells"]),
        (Some("minCellCount"), &json!([{"row": 2, "column": 2}])),
        "{t}"
    );
    assert_eq!(s["checks"]["verdict"], "pass", "{s}");
    // The researcher sees their own; another analyst sees none.
    let (_, mine) = call(&people, Method::GET, &outputs(""), Some(&alice), None).await.unwrap();
    assert_eq!(mine.as_array().unwrap().len(), 2, "{mine}");
    let (_, theirs) = call(&people, Method::GET, &outputs(""), Some(&bob), None).await.unwrap();
    assert_eq!(theirs.as_array().unwrap().len(), 0, "{theirs}");
    let (status, _) = call(&people, Method::GET, &outputs(&format!("/{table_id}")), Some(&bob), None).await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A checker reads the content for review (verified against the SHA-256).
    let (status, headers, bytes) =
        call_raw(&people, Method::GET, &outputs(&format!("/{table_id}/content")), Some(&olive)).await;
    assert_eq!((status, bytes.as_ref()), (StatusCode::OK, table.as_slice()));
    assert_eq!(headers["content-type"], "text/csv; charset=utf-8");

    // The review page marks the failing cell.
    let (status, headers, page) =
        call_raw(&people, Method::GET, &outputs(&format!("/{table_id}/review")), Some(&olive)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert!(headers["content-security-policy"].to_str().unwrap().contains("sandbox"));
    let page = String::from_utf8_lossy(&page);
    assert!(page.contains("minCellCount") && !page.contains("<script"), "{page}");

    // Refusals: a non-checker, a checker of another project, a researcher reviewing their own.
    let approve = |id: Uuid| outputs(&format!("/{id}/approve"));
    let (status, body) = call(&people, Method::POST, &approve(summary_id), Some(&bob), None).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "{body}");
    let (status, _) = call(&people, Method::POST, &approve(summary_id), Some(&pat), None).await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    let ward9 = api.url(&format!("/v1/projects/ward-9/outputs/{summary_id}/approve"));
    let (status, _) = call(&people, Method::POST, &ward9, Some(&pat), None).await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND, "another project's output is not found");
    let rita_agent = client(&pki, Some(&pki.agent("rita-r")));
    let (own, _) = submit(&api, &rita_agent, "own.csv", b"a,n\nx,50\n").await;
    let (status, body) = call(&people, Method::POST, &approve(own), Some(&rita), None).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::FORBIDDEN, Some("selfReview")), "{body}");

    // Two distinct checkers approve the summary; one checker rejects the table with a reason.
    let (status, body) = call(&people, Method::POST, &approve(summary_id), Some(&olive), None).await.unwrap();
    assert_eq!(
        (status, body["state"].as_str(), body["approvals"].as_u64()),
        (StatusCode::OK, Some("inReview"), Some(1))
    );
    let (status, body) = call(&people, Method::POST, &approve(summary_id), Some(&olive), None).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("alreadyReviewed")), "{body}");
    let (status, body) = call(&people, Method::POST, &approve(summary_id), Some(&oscar), None).await.unwrap();
    assert_eq!((status, body["state"].as_str()), (StatusCode::OK, Some("approved")), "{body}");
    let reject = outputs(&format!("/{table_id}/reject"));
    let (status, body) = call(&people, Method::POST, &reject, Some(&olive), reason("  ")).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("reasonRequired")), "{body}");
    let (status, body) = call(&people, Method::POST, &reject, Some(&olive), reason("cell of 7")).await.unwrap();
    assert_eq!((status, body["state"].as_str()), (StatusCode::OK, Some("rejected")), "{body}");
    // Decisions are final.
    let (status, body) = call(&people, Method::POST, &approve(table_id), Some(&oscar), None).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("wrongState")), "{body}");

    // The agent sees the decisions on its workspace's outputs (and only those).
    let (status, decisions) = call(&agent, Method::GET, &api.url("/v1/agent/outputs"), None, None).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{decisions}");
    let decisions = decisions.as_array().unwrap();
    assert_eq!(decisions.len(), 2, "{decisions:?}");
    let d = decisions.iter().find(|d| d["fileName"] == "table.csv").unwrap();
    assert_eq!(d["state"], "rejected");
    assert_eq!(d["id"], table_id.to_string());
    let r = &d["reasons"][0];
    assert_eq!(
        (r["reviewer"].as_str(), r["decision"].as_str(), r["reason"].as_str()),
        (Some("olive@ward7.example"), Some("reject"), Some("cell of 7"))
    );
    assert!(chrono::DateTime::parse_from_rfc3339(r["at"].as_str().unwrap()).is_ok());
    assert!(chrono::DateTime::parse_from_rfc3339(d["updatedAt"].as_str().unwrap()).is_ok());
    let keys: Vec<&String> = d.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["fileName", "id", "reasons", "state", "updatedAt"]);

    // Download: only the requester, only once approved, once.
    let link = |id: Uuid| outputs(&format!("/{id}/download-link"));
    let (status, body) = call(&people, Method::POST, &link(table_id), Some(&alice), None).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("wrongState")), "{body}");
    let (status, body) = call(&people, Method::POST, &link(summary_id), Some(&bob), None).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::FORBIDDEN, Some("notTheRequester")), "{body}");
    let (status, body) = call(&people, Method::POST, &link(summary_id), Some(&alice), None).await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let url = api.url(body["url"].as_str().unwrap());
    let (status, _, _) = call_raw(&people, Method::GET, &url, Some(&bob)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "someone else's link is not found (and not used up)");
    let (status, headers, bytes) = call_raw(&people, Method::GET, &url, Some(&alice)).await;
    assert_eq!((status, bytes.as_ref()), (StatusCode::OK, summary.as_slice()));
    use base64::Engine as _;
    let receipt = base64::engine::general_purpose::STANDARD.decode(headers["x-noexit-receipt"].as_bytes()).unwrap();
    let signed: noexit_airlock::receipt::SignedReceipt = serde_json::from_slice(&receipt).unwrap();
    noexit_airlock::receipt::verify(&signed, &summary, &api.receipt_key)
        .expect("the receipt verifies with the API's key");
    assert!(noexit_airlock::receipt::verify(&signed, &table, &api.receipt_key).is_err(), "not for another file");
    assert_eq!(signed.receipt.sha256, hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&summary)));
    assert_eq!((signed.receipt.file_name.as_str(), signed.receipt.size), ("summary.csv", summary.len() as u64));
    let reviewers: Vec<&str> = signed.receipt.reviews.iter().map(|r| r.reviewer.as_str()).collect();
    assert_eq!(reviewers, ["olive@ward7.example", "oscar@ward7.example"]);
    let mut forged = signed.clone();
    forged.receipt.size += 1;
    assert_eq!(
        noexit_airlock::receipt::verify_signature(&forged, &api.receipt_key),
        Err(noexit_airlock::receipt::ReceiptError::BadSignature),
        "a changed receipt does not verify"
    );
    // A replayed link is refused.
    let (status, _, body) = call_raw(&people, Method::GET, &url, Some(&alice)).await;
    assert_eq!(status, StatusCode::GONE, "{}", String::from_utf8_lossy(&body));
    let (status, stored) =
        call(&people, Method::GET, &outputs(&format!("/{summary_id}/receipt")), Some(&dave), None).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stored["signature"].as_str(), Some(signed.signature.as_str()));
    let (_, released) =
        call(&people, Method::GET, &outputs(&format!("/{summary_id}")), Some(&alice), None).await.unwrap();
    assert_eq!(released["state"], "released");

    // SREs see each step with kubectl: the API mirrored every state change into `out-<id>`.
    let mirrored = |id: Uuid| {
        let mut states: Vec<(String, String, Option<String>)> = Vec::new();
        for (project, o) in api.cluster.mirrors() {
            if project == "ward-7" && o.spec.request_id == id.to_string() {
                assert_eq!(o.metadata.name, Some(format!("out-{id}")));
                let s = o.status.expect("status");
                let step = (s.state, s.approvals, s.verdict);
                if states.last() != Some(&step) {
                    states.push(step);
                }
            }
        }
        states
    };
    let step = |state: &str, approvals: &str, verdict: Option<&str>| {
        (state.to_owned(), approvals.to_owned(), verdict.map(str::to_owned))
    };
    assert_eq!(
        mirrored(summary_id),
        vec![
            step("submitted", "0/2", None),
            step("checked", "0/2", Some("pass")),
            step("inReview", "1/2", Some("pass")),
            step("approved", "2/2", Some("pass")),
            step("released", "2/2", Some("pass")),
        ]
    );
    let last_table = api.cluster.mirrors().into_iter().rev().find(|(_, o)| o.spec.request_id == table_id.to_string());
    let table_mirror = last_table.expect("table mirrored").1;
    let table_status = table_mirror.status.clone().unwrap();
    assert_eq!((table_status.state.as_str(), table_status.verdict.as_deref()), ("rejected", Some("fail")));
    assert_eq!(table_status.decisions.len(), 1);
    assert_eq!(table_status.decisions[0].decision, "reject");
    let table_json = serde_json::to_string(&table_mirror).unwrap();
    assert!(!table_json.contains("cell of 7"), "reasons stay in the API: {table_json}");

    // A tampered stored file is refused at download (and stays approved).
    let (tamper_id, _) = submit(&api, &agent, "counts.csv", b"ward,n\n7a,40\n7b,44\n").await;
    for who in [&olive, &oscar] {
        let (status, _) = call(&people, Method::POST, &approve(tamper_id), Some(who), None).await.unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    let path = api.data_dir.path().join("outbox/ward-7/alice-r").join(tamper_id.to_string());
    let mut sealed = std::fs::read(&path).unwrap();
    let last = sealed.len() - 20;
    sealed[last] ^= 0x40;
    std::fs::write(&path, &sealed).unwrap();
    let (_, body) = call(&people, Method::POST, &link(tamper_id), Some(&alice), None).await.unwrap();
    let (status, _, body) = call_raw(&people, Method::GET, &api.url(body["url"].as_str().unwrap()), Some(&alice)).await;
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("integrityCheckFailed")), "{body}");
    let (_, still) = call(&people, Method::GET, &outputs(&format!("/{tamper_id}")), Some(&alice), None).await.unwrap();
    assert_eq!(still["state"], "approved");

    // Bad submissions: a path-traversal name, an oversized file, a zip bomb (refused, never expanded).
    let sha = "0".repeat(64);
    for (name, size, code) in [("../escape.csv", 10, "invalidFileName"), ("big.csv", 2 * 1024 * 1024, "fileTooLarge")] {
        let manifest = json!({"id": Uuid::new_v4(), "fileName": name, "size": size, "sha256": sha,
            "submittedBy": "alice", "scan": {"verdict": "clean", "findings": []}});
        let (status, body) =
            call(&agent, Method::POST, &api.url("/v1/agent/outbox"), None, json_body(&manifest)).await.unwrap();
        assert_eq!((status, body["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some(code)), "{name}");
    }
    let bomb = zip_bomb(64 * 1024 * 1024);
    assert!(bomb.len() < 1024 * 1024, "the bomb fits under the upload limit ({} bytes)", bomb.len());
    let (bomb_id, ack) = submit(&api, &agent, "bomb.zip", &bomb).await;
    assert_eq!(ack["state"], "rejected", "the agent is told at once (and does not retry): {ack}");
    let (_, b) = call(&people, Method::GET, &outputs(&format!("/{bomb_id}")), Some(&olive), None).await.unwrap();
    assert_eq!((b["state"].as_str(), b["checks"]["verdict"].as_str()), (Some("rejected"), Some("refuse")), "{b}");
    assert_eq!(b["contentDeleted"], true, "{b}");
    assert_eq!(b["reviews"][0]["reviewer"], "noexit-airlock", "{b}");
    let why = b["reviews"][0]["reason"].as_str().unwrap();
    assert!(why.contains("archives are not released: unpack and submit the files"), "{why}");
    assert!(
        !api.data_dir.path().join("outbox/ward-7/alice-r").join(bomb_id.to_string()).exists(),
        "the sealed content is deleted at once"
    );
    let refusals = api.refused("output.refuse").await;
    let entry = refusals.iter().find(|e| e.event.object.ends_with(&bomb_id.to_string())).expect("output.refuse entry");
    assert_eq!(entry.event.actor, "system:noexit-airlock");
    assert_eq!(entry.event.detail["bytesRead"], bomb.len() as u64, "only the bytes sent were read: never expanded");
    assert_eq!(entry.event.detail["expanded"], false);
    let (_, decisions) = call(&agent, Method::GET, &api.url("/v1/agent/outputs"), None, None).await.unwrap();
    let seen = decisions.as_array().unwrap().iter().find(|d| d["id"] == bomb_id.to_string()).expect("bomb decision");
    assert_eq!(seen["state"], "rejected");
    assert!(seen["reasons"][0]["reason"].as_str().unwrap().contains("unpack and submit the files"), "{seen}");
    // Reviewers cannot act on it: the decision is final.
    let (status, _) = call(&people, Method::POST, &approve(bomb_id), Some(&olive), None).await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT);

    // Withdrawal: only the requester, before release; then no one reviews it.
    let (notes_id, _) = submit(&api, &agent, "notes.txt", b"a model summary, no counts\n").await;
    let withdraw = outputs(&format!("/{notes_id}/withdraw"));
    let (status, body) = call(&people, Method::POST, &withdraw, Some(&bob), None).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (StatusCode::FORBIDDEN, Some("notTheRequester")), "{body}");
    let (status, body) = call(&people, Method::POST, &withdraw, Some(&alice), None).await.unwrap();
    assert_eq!((status, body["state"].as_str()), (StatusCode::OK, Some("withdrawn")), "{body}");
    assert_eq!(mirrored(notes_id).last().map(|s| s.0.as_str()), Some("withdrawn"));
    let (status, _) = call(&people, Method::POST, &approve(notes_id), Some(&olive), None).await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT);

    // Every refusal is in the audit log, under its action.
    let reasons = |entries: Vec<audit::store::Entry>| -> Vec<String> {
        entries
            .into_iter()
            .map(|e| match e.event.outcome {
                Outcome::Refused(r) => r,
                _ => String::new(),
            })
            .collect()
    };
    let approvals = reasons(api.refused("output.approve").await);
    for code in ["selfReview", "forbidden", "alreadyReviewed", "wrongState", "notFound"] {
        assert!(approvals.iter().any(|r| r.starts_with(code)), "no refused approval for {code}: {approvals:?}");
    }
    assert!(approvals.iter().any(|r| r.contains("pat@ward9.example")), "{approvals:?}");
    let downloads = reasons(api.refused("output.download").await);
    for code in ["linkUsed", "integrityCheckFailed", "notFound"] {
        assert!(downloads.iter().any(|r| r.starts_with(code)), "no refused download for {code}: {downloads:?}");
    }
    let submits = reasons(api.refused("agent.outbox.submit").await);
    for code in ["invalidFileName", "fileTooLarge"] {
        assert!(submits.iter().any(|r| r.starts_with(code)), "no refused submission for {code}: {submits:?}");
    }
    // The token never reaches the log.
    let token = url.split("/v1/downloads/").nth(1).unwrap().split('?').next().unwrap().to_owned();
    assert!(token.len() >= 43, "{url}");
    assert!(api.entries().await.iter().all(|e| !serde_json::to_string(&e.event).unwrap().contains(&token)));

    // After retention the sweeper deletes final content (metadata and receipt stay) and expires
    // what waited too long.
    let later = chrono::Utc::now() + chrono::Duration::days(31);
    let swept = api::sweeper::sweep_once(&api.state, later).await.unwrap();
    assert!(
        swept.deleted.contains(&summary_id.to_string()) && swept.deleted.contains(&table_id.to_string()),
        "{swept:?}"
    );
    assert!(swept.expired.contains(&tamper_id.to_string()) && swept.expired.contains(&own.to_string()), "{swept:?}");
    assert!(!api.data_dir.path().join("outbox/ward-7/alice-r").join(summary_id.to_string()).exists());
    let (status, r) =
        call(&people, Method::GET, &outputs(&format!("/{summary_id}/receipt")), Some(&alice), None).await.unwrap();
    assert_eq!((status, r["signature"].as_str()), (StatusCode::OK, Some(signed.signature.as_str())));
    let (_, t) = call(&people, Method::GET, &outputs(&format!("/{table_id}")), Some(&olive), None).await.unwrap();
    assert_eq!((t["state"].as_str(), t["contentDeleted"].as_bool()), (Some("rejected"), Some(true)));
}
