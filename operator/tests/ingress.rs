//! Ingress end to end: the real control-plane API (its router behind real TLS, a fake OIDC
//! issuer on loopback) and the real `noexit-agent` binary with a workspace certificate from the
//! same CA. An analyst submits `codebook.csv`; the submitter's own approval is refused; another
//! admin approves; the agent places the file read-only in its inbox with the right bytes and
//! reports it delivered. Refusals (a researcher submitting, an oversized file, a path-traversal
//! name, an ELF binary, an unknown workspace, another project's admin, a rejection without a
//! reason) are each checked in the audit log. On SQLite and on PostgreSQL.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use noexit_crds::agent::WorkspaceIdentity;
use noexit_operator::api::inbox::{AirlockSealer, InboxConfig, InboxPolicy};
use noexit_operator::api::{self, ApiConfig, ApiStore, AppState, server, tls};
use noexit_operator::audit::{self, Outcome, Store};
use noexit_operator::pki::Ca;
use noexit_test_support::oidc::Issuer;
use noexit_test_support::process::{self, Proc};
use noexit_test_support::{agent, poll};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const PROJECTS: &str = r#"
apiVersion: noexit.io/v1alpha1
kind: Project
metadata: {name: ward-7}
spec:
  members:
    - {user: alice@ward7.example, roles: [researcher]}
    - {user: bob@ward7.example, roles: [dataAnalyst]}
    - {user: carol@ward7.example, roles: [admin]}
    - {user: gina@ward7.example, roles: [dataAnalyst, admin]}
  approval: {reference: "REC 23/LO/0042", expires: "2027-06-30"}
  datasets: [icu-2019]
---
apiVersion: noexit.io/v1alpha1
kind: Project
metadata: {name: ward-9}
spec:
  members:
    - {user: zed@ward9.example, roles: [admin, dataAnalyst]}
  approval: {reference: "REC 24/LO/0001", expires: "2027-06-30"}
  datasets: [icu-2019]
---
apiVersion: noexit.io/v1alpha1
kind: Workspace
metadata: {name: alice-r, namespace: noexit-ward-7}
spec: {project: ward-7, owner: alice@ward7.example, runtime: pod, image: "r:4"}
"#;

/// Small enough to exceed in a test.
const MAX_BYTES: u64 = 64 * 1024;

/// `noexit-agent`, built once per test binary.
fn agent_bin() -> PathBuf {
    process::workspace_bin(&["-p", "noexit-agent", "--bin", "noexit-agent"], "noexit-agent")
}

// ---- the API and its callers ---------------------------------------------------------------

struct World {
    dir: tempfile::TempDir,
    ca: Ca,
    issuer: Issuer,
    port: u16,
    audit: Arc<Store>,
    store: ApiStore,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

type Https = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

impl World {
    async fn start(db_url: &str) -> World {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("noexit ingress test CA").unwrap();
        let server_cert =
            ca.issue_server(&["localhost".into(), "127.0.0.1".into()], chrono::Duration::days(1)).unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).unwrap();
        std::fs::write(dir.path().join("api.crt"), &server_cert.cert_pem).unwrap();
        std::fs::write(dir.path().join("api.key"), &server_cert.key_pem).unwrap();
        let issuer = Issuer::builder().https().start().await;
        let audit = Arc::new(Store::connect(db_url).await.unwrap());
        let store = ApiStore::new(audit.pool().clone());
        let cluster = Arc::new(api::memory_cluster_from(PROJECTS).unwrap());
        let oidc = api::oidc::Oidc::new(api::oidc::OidcConfig {
            ca_pem: issuer.ca_pem().map(|pem| pem.as_bytes().to_vec()),
            ..api::oidc::OidcConfig::new(&issuer.url)
        })
        .unwrap();
        let config = ApiConfig {
            data_dir: dir.path().join("api-data"),
            require_mfa: false,
            max_upload_bytes: 1024 * 1024,
            inbox: InboxConfig {
                policy: InboxPolicy { max_bytes: MAX_BYTES, ..InboxPolicy::default() },
                sealer: Arc::new(AirlockSealer::new(noexit_airlock::seal::SealKey::generate())),
            },
        };
        let state = AppState::new(store.clone(), audit.clone(), cluster, Some(Arc::new(oidc)), config).await.unwrap();
        let cert =
            Arc::new(tls::ReloadingCert::load(&dir.path().join("api.crt"), &dir.path().join("api.key")).unwrap());
        let tls_config = tls::server_config(cert, ca.cert_pem().as_bytes()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let router = api::router(state.clone());
        tokio::spawn(async move {
            let limits = noexit_operator::serving::Limits::default();
            let _ = server::serve_with(listener, tls_config, state, router, limits, async {
                let _ = stopped.await;
            })
            .await;
        });
        World { dir, ca, issuer, port, audit, store, stop: Some(stop) }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn client(&self) -> Https {
        let config = tls::client_config(Some(self.ca.cert_pem().as_bytes()), None).unwrap();
        let connector =
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config).https_only().enable_http1().build();
        Client::builder(TokioExecutor::new()).build(connector)
    }

    async fn call(&self, user: &str, method: Method, path: &str, body: Option<(&str, Vec<u8>)>) -> (StatusCode, Value) {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("https://localhost:{}{path}", self.port))
            .header("authorization", format!("Bearer {}", self.issuer.token(user)));
        let req = match body {
            Some((ctype, bytes)) => req.header("content-type", ctype).body(Full::new(Bytes::from(bytes))).unwrap(),
            None => req.body(Full::new(Bytes::new())).unwrap(),
        };
        let resp = self.client().request(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
        (status, value)
    }

    async fn submit(&self, user: &str, ws: &str, name: &str, content: &[u8]) -> (StatusCode, Value) {
        let path = format!("/v1/projects/ward-7/workspaces/{ws}/inbox?fileName={name}");
        self.call(user, Method::POST, &path, Some(("application/octet-stream", content.to_vec()))).await
    }

    async fn decide(
        &self,
        user: &str,
        project: &str,
        id: &str,
        verb: &str,
        reason: Option<&str>,
    ) -> (StatusCode, Value) {
        let path = format!("/v1/projects/{project}/inbox/{id}/{verb}");
        let body = reason.map(|r| ("application/json", serde_json::to_vec(&json!({"reason": r})).unwrap()));
        self.call(user, Method::POST, &path, body).await
    }

    async fn entries(&self) -> Vec<audit::store::Entry> {
        self.audit.query(&audit::store::Filter::default()).await.unwrap()
    }

    /// The refusal of `action` whose reason starts with `code`, by `actor`.
    async fn refused(&self, action: &str, actor: &str, code: &str) -> usize {
        self.entries()
            .await
            .into_iter()
            .filter(|e| {
                e.event.action == action
                    && e.event.actor == actor
                    && matches!(&e.event.outcome, Outcome::Refused(r) if r.starts_with(code))
            })
            .count()
    }

    fn start_agent(&self) -> Proc {
        let ws = WorkspaceIdentity { project: "ward-7".into(), name: "alice-r".into() };
        let cert = self.ca.issue_workspace_client(&ws, chrono::Duration::days(1)).unwrap();
        std::fs::write(self.path("agent.crt"), &cert.cert_pem).unwrap();
        std::fs::write(self.path("agent.key"), &cert.key_pem).unwrap();
        let dir = self.dir.path();
        agent::prepare(dir);
        let canary = noexit_test_support::net::free_port();
        agent::pod_config(dir, self.port).client_cert("agent.crt", "agent.key").canary(canary).write();
        let mut cmd = agent::run_command(&agent_bin(), dir);
        cmd.args(["--outbox-interval", "1", "--guard-interval", "1", "--poll-interval", "1"]).env("RUST_LOG", "info");
        Proc::spawn(&mut cmd, self.path("agent.log"))
    }
}

/// Polls `check` until it holds, at most `bound`; on timeout fail with the agent's log.
async fn until<F, Fut>(what: &str, bound: Duration, agent: &Proc, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    poll::until_explained(what, bound, || format!("--- agent log ---\n{}", agent.log()), check).await
}

const ANALYST: &str = "bob@ward7.example";
const ANALYST_ADMIN: &str = "gina@ward7.example";
const ADMIN: &str = "carol@ward7.example";
const RESEARCHER: &str = "alice@ward7.example";
const OTHER_ADMIN: &str = "zed@ward9.example";

async fn round_trip(db_url: &str) {
    let w = World::start(db_url).await;
    let agent = w.start_agent();
    let codebook = b"code,label\n1,admitted to ICU\n2,discharged\n9,unknown\n".to_vec();

    // Gina (analyst and admin) submits; her own approval is refused.
    let (status, item) = w.submit(ANALYST_ADMIN, "alice-r", "codebook.csv", &codebook).await;
    assert_eq!(status, StatusCode::CREATED, "{item}");
    assert_eq!(item["state"], "pendingApproval");
    assert_eq!(item["sha256"], hex::encode(Sha256::digest(&codebook)));
    assert_eq!(item["media"], "text");
    assert!(item.get("sealedPath").is_none(), "the storage path is not shown: {item}");
    let id = item["id"].as_str().unwrap().to_owned();
    // Sealed at rest: the stored bytes are not the file's.
    let stored = std::fs::read(w.path("api-data/inbox/ward-7/alice-r").join(&id)).unwrap();
    assert!(!stored.windows(9).any(|x| x == b"admitted "), "inbox content stored in the clear");
    let (status, body) = w.decide(ANALYST_ADMIN, "ward-7", &id, "approve", None).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::FORBIDDEN, Some("selfApproval")), "{body}");
    assert_eq!(w.refused("inbox.approve", &format!("user:{ANALYST_ADMIN}"), "selfApproval").await, 1);

    // Another project's admin may neither approve here nor reach the item from their project.
    let (status, _) = w.decide(OTHER_ADMIN, "ward-7", &id, "approve", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(w.refused("inbox.approve", &format!("user:{OTHER_ADMIN}"), "forbidden").await, 1);
    let (status, _) = w.decide(OTHER_ADMIN, "ward-9", &id, "approve", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(w.refused("inbox.approve", &format!("user:{OTHER_ADMIN}"), "notFound").await, 1);

    // Nothing is delivered before approval: the agent is up (its heartbeats arrive) and the
    // API lists it nothing.
    until("the agent's first heartbeat", Duration::from_secs(20), &agent, || async {
        !w.store.heartbeats("ward-7").await.unwrap().is_empty()
    })
    .await;
    assert!(!w.path("inbox/codebook.csv").exists(), "placed before approval");

    // Carol approves; the agent places it read-only with the right bytes and reports it.
    let (status, body) = w.decide(ADMIN, "ward-7", &id, "approve", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "approved");
    assert_eq!(body["decidedBy"], ADMIN);
    let placed = w.path("inbox/codebook.csv");
    until("the agent to place codebook.csv", Duration::from_secs(20), &agent, || async { placed.exists() }).await;
    assert_eq!(std::fs::read(&placed).unwrap(), codebook);
    let meta = std::fs::metadata(&placed).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o444);
    assert_eq!(meta.uid(), own_uid(&w));
    let uuid = uuid::Uuid::parse_str(&id).unwrap();
    until("delivery to be recorded", Duration::from_secs(20), &agent, || async {
        w.store.inbox_item(uuid).await.unwrap().is_some_and(|i| i.state == "delivered")
    })
    .await;
    // The guard records the call after the handler committed the row: wait for the entry too.
    until("the delivery's audit entry", Duration::from_secs(20), &agent, || async {
        w.entries().await.iter().any(|e| e.event.action == "agent.inbox.deliver" && e.event.outcome == Outcome::Allowed)
    })
    .await;
    let row = w.store.inbox_item(uuid).await.unwrap().unwrap();
    assert_eq!(row.placed_as.as_deref(), Some("codebook.csv"));
    let entries = w.entries().await;
    let allowed = |action: &str| {
        entries
            .iter()
            .filter(|e| e.event.action == action && e.event.outcome == Outcome::Allowed)
            .map(|e| (e.event.actor.clone(), e.event.object.clone()))
            .collect::<Vec<_>>()
    };
    let object = format!("inbox:ward-7/alice-r/{id}");
    assert_eq!(allowed("inbox.submit"), [(format!("user:{ANALYST_ADMIN}"), object.clone())]);
    assert_eq!(allowed("inbox.approve"), [(format!("user:{ADMIN}"), object.clone())]);
    assert_eq!(allowed("agent.inbox.fetch"), [("workspace:ward-7/alice-r".to_owned(), object.clone())]);
    assert_eq!(allowed("agent.inbox.deliver"), [("workspace:ward-7/alice-r".to_owned(), object.clone())]);

    // The list shows it delivered; a researcher may not list.
    let (status, list) = w.call(ANALYST, Method::GET, "/v1/projects/ward-7/inbox", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list[0]["state"], "delivered", "{list}");
    let (status, _) = w.call(RESEARCHER, Method::GET, "/v1/projects/ward-7/inbox", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Rejection needs a reason; a rejected file never reaches the workspace.
    let (status, item) = w.submit(ANALYST, "alice-r", "lookup.csv", b"a,b\n1,2\n").await;
    assert_eq!(status, StatusCode::CREATED, "{item}");
    let rid = item["id"].as_str().unwrap().to_owned();
    let (status, body) = w.decide(ADMIN, "ward-7", &rid, "reject", None).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("reasonRequired")));
    let (status, body) = w.decide(ADMIN, "ward-7", &rid, "reject", Some("contains row-level data")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "rejected");
    assert_eq!(body["reason"], "contains row-level data");
    let (status, body) = w.decide(ANALYST_ADMIN, "ward-7", &rid, "approve", None).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("alreadyDecided")));

    // Refusals, each audited under the caller.
    let (status, body) = w.submit(RESEARCHER, "alice-r", "notes.txt", b"hello\n").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(w.refused("inbox.submit", &format!("user:{RESEARCHER}"), "forbidden").await, 1);
    let big = vec![b'x'; MAX_BYTES as usize + 1];
    let (status, body) = w.submit(ANALYST, "alice-r", "big.csv", &big).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("fileTooLarge")));
    let (status, body) = w.submit(ANALYST, "alice-r", "..%2F..%2Fetc%2Fcron.d%2Fx.csv", b"a\n").await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalidFileName")), "{body}");
    let elf = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x02\0\x3e\0".to_vec();
    let (status, body) = w.submit(ANALYST, "alice-r", "tool.csv", &elf).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("executableRefused")));
    let (status, body) = w.submit(ANALYST, "nobody-r", "codebook.csv", &codebook).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::NOT_FOUND, Some("notFound")), "{body}");
    let (status, _) = w.submit(OTHER_ADMIN, "alice-r", "codebook.csv", &codebook).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let analyst = format!("user:{ANALYST}");
    for code in ["fileTooLarge", "invalidFileName", "executableRefused", "notFound"] {
        assert_eq!(w.refused("inbox.submit", &analyst, code).await, 1, "{code} not audited");
    }
    assert_eq!(w.refused("inbox.submit", &format!("user:{OTHER_ADMIN}"), "forbidden").await, 1);
    // Nothing refused was stored or placed.
    let (_, list) = w.call(ADMIN, Method::GET, "/v1/projects/ward-7/inbox", None).await;
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    let placed: Vec<_> = std::fs::read_dir(w.path("inbox")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(placed, ["codebook.csv"]);
}

/// The uid of this process (and so of the agent it started): the owner of a file it made.
fn own_uid(w: &World) -> u32 {
    std::fs::metadata(w.path("agent.yaml")).unwrap().uid()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_round_trip_with_the_real_agent_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    round_trip(&format!("sqlite:{}", dir.path().join("noexit.db").display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_round_trip_with_the_real_agent_postgres() {
    let Some(pg) = support::pg::shared() else { return };
    round_trip(&pg.create_database("ingress").unwrap()).await;
}
