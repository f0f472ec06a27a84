//! The real `noexit-agent` against the real control-plane API (`noexit-operator api`), no fakes:
//! certificates from the operator's CA, SQLite store, the in-memory cluster from
//! `examples/ward-7.yaml`. Checks heartbeats, session events (exactly once, also across a
//! `kill -9` of the API), outbox submissions with their hash and DLP findings, a revocation sent
//! by the operator's own revoker, and `noexit audit verify` at the end.
//!
//! Needs nothing but the workspace's binaries, which it builds once with `$CARGO build` (a test
//! only gets `CARGO_BIN_EXE_*` paths for its own package). Run with
//! `cargo test -p noexit-e2e --test agent_api`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use noexit_agent::sessions::utmp;
use noexit_crds::agent::WorkspaceIdentity;
use noexit_operator::audit::store::{Pool, Store};
use noexit_operator::controllers::revoke::{HttpRevoker, Revocation, Revoker};
use noexit_operator::pki::Ca;
use noexit_test_support::oidc::Issuer;
use noexit_test_support::process::{self, Proc};
use noexit_test_support::{agent, net, poll};
use sha2::{Digest, Sha256};
use sqlx::SqlitePool;

/// A binary of the workspace's operator or agent, built once per test binary.
fn bin(name: &str) -> PathBuf {
    process::workspace_bin(&["-p", "noexit-operator", "-p", "noexit-agent", "--bins"], name)
}

struct Env {
    dir: tempfile::TempDir,
    port: u16,
    db_url: String,
    agent_serial: String,
    ca: Arc<Ca>,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let ca = Ca::generate("noexit e2e CA").unwrap();
        let day = chrono::Duration::days(1);
        let server = ca.issue_server(&["localhost".into(), "127.0.0.1".into()], day).unwrap();
        let ws = WorkspaceIdentity { project: "ward-7".into(), name: "alice-r".into() };
        let agent_cert = ca.issue_workspace_client(&ws, day).unwrap();
        for (name, text) in [
            ("ca.crt", ca.cert_pem()),
            ("api.crt", &server.cert_pem),
            ("api.key", &server.key_pem),
            ("agent.crt", &agent_cert.cert_pem),
            ("agent.key", &agent_cert.key_pem),
        ] {
            std::fs::write(p.join(name), text).unwrap();
        }
        agent::prepare(p);
        std::fs::create_dir_all(p.join("api-data")).unwrap();
        let port = net::free_port();
        // Nothing listens on the canary port: the probe's "outside" address is refused.
        let canary = net::free_port();
        agent::pod_config(p, port).client_cert("agent.crt", "agent.key").canary(canary).without_inbox().write();
        let db_url = format!("sqlite://{}", p.join("api.db").display());
        Self { port, db_url, agent_serial: agent_cert.serial, ca: Arc::new(ca), dir }
    }

    /// A new client certificate for the agent, written as a rotation does (each file replaced
    /// by a rename); returns its serial.
    fn rotate_agent_cert(&self) -> String {
        let ws = WorkspaceIdentity { project: "ward-7".into(), name: "alice-r".into() };
        let cert = self.ca.issue_workspace_client(&ws, chrono::Duration::days(1)).unwrap();
        for (name, text) in [("agent.crt", &cert.cert_pem), ("agent.key", &cert.key_pem)] {
            let tmp = self.path(&format!(".{name}.new"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, self.path(name)).unwrap();
        }
        cert.serial
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start_api(&self) -> Proc {
        let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/ward-7.yaml");
        self.start_api_with(&manifests, &[])
    }

    fn start_api_with(&self, manifests: &Path, extra: &[String]) -> Proc {
        let mut cmd = Command::new(bin("noexit-operator"));
        cmd.arg("api")
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--tls-cert")
            .arg(self.path("api.crt"))
            .arg("--tls-key")
            .arg(self.path("api.key"))
            .arg("--client-ca")
            .arg(self.path("ca.crt"))
            .args(["--database-url", &self.db_url])
            .arg("--audit-key")
            .arg(self.path("audit-signing.pem"))
            .arg("--data-dir")
            .arg(self.path("api-data"))
            .arg("--seal-key")
            .arg(self.path("seal.key"))
            .arg("--manifests")
            .arg(manifests)
            .args(extra)
            .env("RUST_LOG", "info");
        let mut api = Proc::spawn(&mut cmd, self.path("api.log"));
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        poll::blocking("the API to listen", Duration::from_secs(20), || {
            api.check_alive("the API");
            net::accepts(addr).then_some(())
        });
        api
    }

    fn start_agent(&self) -> Proc {
        let mut cmd = agent::run_command(&bin("noexit-agent"), self.dir.path());
        cmd.args(["--outbox-interval", "1", "--guard-interval", "1"]).env("RUST_LOG", "info");
        Proc::spawn(&mut cmd, self.path("agent.log"))
    }

    /// `noexit-agent session <action> --user alice`, as the desktop's session scripts call it.
    fn hook(&self, action: &str) {
        agent::session_hook(&bin("noexit-agent"), self.dir.path(), action, "alice");
    }

    /// Login and logout records of `n` terminal sessions, appended to wtmp at once.
    fn wtmp_burst(&self, n: usize) {
        use std::io::Write;
        let mut bytes = Vec::new();
        for i in 0..n {
            let line = format!("pts/{i}");
            for (kind, user) in [(7, "bob"), (8, "")] {
                let rec = utmp::Record {
                    kind,
                    pid: 100 + i as i32,
                    line: line.clone(),
                    user: user.into(),
                    host: String::new(),
                    time: 0,
                };
                bytes.extend_from_slice(&utmp::encode(&rec));
            }
        }
        std::fs::OpenOptions::new().append(true).open(self.path("wtmp")).unwrap().write_all(&bytes).unwrap();
    }
}

async fn sqlite(url: &str) -> SqlitePool {
    match Store::open_read_only(url).await.unwrap().pool() {
        Pool::Sqlite(p) => p.clone(),
        Pool::Postgres(_) => unreachable!("the test uses SQLite"),
    }
}

async fn count(db: &SqlitePool, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql).fetch_one(db).await.unwrap()
}

/// Polls `check` until it holds, at most `bound`; on timeout fail with the processes' logs.
async fn until<F, Fut>(what: &str, bound: Duration, procs: &[&Proc], check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let logs = || {
        let logs: Vec<String> = procs
            .iter()
            .map(|p| format!("--- {}\n{}", p.log_path().map(|l| l.display().to_string()).unwrap_or_default(), p.log()))
            .collect();
        logs.join("\n")
    };
    poll::until_explained(what, bound, logs, check).await
}

const SESSIONS: &str = "SELECT COUNT(*) FROM agent_sessions WHERE project = 'ward-7' AND workspace = 'alice-r'";
const SESSION_ENTRIES: &str = "SELECT COUNT(*) FROM audit_log WHERE action LIKE 'agent.session.%'";
/// Stored session events without exactly one audit entry under their idempotency key.
const UNMATCHED: &str = "SELECT COUNT(*) FROM agent_sessions s \
    WHERE (SELECT COUNT(*) FROM audit_log a WHERE a.idempotency_key = s.id) <> 1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reports_to_the_real_api() {
    let mut env = Env::new();
    if std::env::var_os("NOEXIT_E2E_KEEP").is_some() {
        env.dir.disable_cleanup(true);
        println!("keeping {} (NOEXIT_E2E_KEEP)", env.dir.path().display());
    }
    let mut api = env.start_api();
    let mut agent = env.start_agent();
    let db = sqlite(&env.db_url).await;
    let t = Duration::from_secs(15);

    // Heartbeats arrive, with the pod-mode probe's verdict.
    until("a heartbeat from alice-r with the wall proven", t, &[&api, &agent], || async {
        count(
            &db,
            "SELECT COUNT(*) FROM agent_heartbeats WHERE project = 'ward-7' AND workspace = 'alice-r' AND egress_locked",
        )
        .await
            == 1
    })
    .await;
    let (version, locked, detail): (String, bool, Option<String>) = sqlx::query_as(
        "SELECT agent_version, egress_locked, egress_detail FROM agent_heartbeats WHERE workspace = 'alice-r'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    println!("heartbeat stored: version {version}, egress locked: {locked} ({detail:?})");

    // Desktop session hooks: each event lands once in the table and once in the audit log.
    env.hook("connect");
    env.hook("disconnect");
    // Table row and audit entry are written side by side (acknowledged when both are in), so
    // wait for both rather than read one right after seeing the other.
    until("the two desktop events, in the table and the log", t, &[&api, &agent], || async {
        count(&db, SESSIONS).await == 2 && count(&db, SESSION_ENTRIES).await == 2
    })
    .await;
    assert_eq!(count(&db, UNMATCHED).await, 0);
    let actions: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE action LIKE 'agent.session.%' AND actor = 'workspace:ward-7/alice-r' ORDER BY seq",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(actions, ["agent.session.desktopConnect", "agent.session.desktopDisconnect"]);

    // Outbox: a clean table and a file with a valid NHS number become checked output requests.
    let clean = b"arm,n,mean_los\ncontrol,112,6.4\ntreated,108,5.9\n".to_vec();
    let mut flagged = b"summary for the ward meeting\n".to_vec();
    flagged.extend_from_slice(b"note: patient NHS 943 476 5919\n");
    std::fs::write(env.path("outbox/los.csv"), &clean).unwrap();
    std::fs::write(env.path("outbox/notes.txt"), &flagged).unwrap();
    for (name, content) in [("los.csv", &clean), ("notes.txt", &flagged)] {
        until(&format!("{name} checked"), t, &[&api, &agent], || async {
            count(
                &db,
                &format!("SELECT COUNT(*) FROM output_requests WHERE file_name = '{name}' AND state = 'checked'"),
            )
            .await
                == 1
        })
        .await;
        let (sha, size, scan, path): (String, i64, String, String) =
            sqlx::query_as("SELECT sha256, size, scan, content_path FROM output_requests WHERE file_name = $1")
                .bind(name)
                .fetch_one(&db)
                .await
                .unwrap();
        assert_eq!(sha, hex::encode(Sha256::digest(content)), "{name}");
        assert_eq!(size, content.len() as i64, "{name}");
        // Stored sealed (noexit_airlock::seal): the plaintext is not on the API's disk.
        let stored = std::fs::read(&path).unwrap();
        assert!(stored.starts_with(b"NXSEAL1\n"), "{name}: stored sealed");
        assert!(!stored.windows(content.len()).any(|w| w == content.as_slice()), "{name}: plaintext on disk");
        let scan: serde_json::Value = serde_json::from_str(&scan).unwrap();
        let kinds: Vec<&str> = scan["findings"].as_array().unwrap().iter().filter_map(|f| f["kind"].as_str()).collect();
        if name == "notes.txt" {
            assert_eq!(scan["verdict"], "flagged", "{scan}");
            assert_eq!(kinds, ["nhsNumber"], "{scan}");
        } else {
            assert_eq!(scan["verdict"], "clean", "{scan}");
            assert!(kinds.is_empty(), "{scan}");
        }
    }
    until("the DLP hit in the audit log", t, &[&api, &agent], || async {
        count(&db, "SELECT COUNT(*) FROM audit_log WHERE action = 'agent.violation.dlpHit'").await == 1
    })
    .await;

    // kill -9 the API while the agent delivers a burst; more events while it is down; restart.
    let before = count(&db, SESSIONS).await;
    env.wtmp_burst(300);
    until("delivery of the burst to start", t, &[&api, &agent], || async { count(&db, SESSIONS).await > before }).await;
    api.kill9();
    let at_kill = count(&db, SESSIONS).await;
    env.hook("connect");
    env.hook("disconnect");
    env.hook("connect");
    // The agent dies too, with its spool on disk.
    agent.kill9();
    let mut agent = env.start_agent();
    let expected = before + 600 + 3;
    println!("API killed with {} of {} events stored", at_kill, expected);
    let mut api = env.start_api();
    let restarted = Instant::now();
    until("every event after the restart", Duration::from_secs(30), &[&api, &agent], || async {
        count(&db, SESSIONS).await >= expected
    })
    .await;
    // The agent's spool is empty once a heartbeat says so; nothing more may arrive after that.
    until("an empty spool", t, &[&api, &agent], || async {
        count(&db, "SELECT COUNT(*) FROM agent_heartbeats WHERE workspace = 'alice-r' AND spool_depth = 0").await == 1
    })
    .await;
    println!("all {expected} events stored {:?} after the restart", restarted.elapsed());
    assert_eq!(count(&db, SESSIONS).await, expected);
    assert_eq!(count(&db, SESSION_ENTRIES).await, expected);
    assert_eq!(count(&db, UNMATCHED).await, 0);
    // The pod-mode probe's connect-and-close to the API is not an audited TLS refusal.
    assert_eq!(count(&db, "SELECT COUNT(*) FROM audit_log WHERE action = 'tls.handshake'").await, 0);
    // The restarted agent did not submit the outbox files again.
    assert_eq!(count(&db, "SELECT COUNT(*) FROM output_requests").await, 2);

    // Rotation: the operator rewrites the certificate files (as the mounted Secret is updated);
    // the running agent picks them up, so revoking the old serial leaves it working.
    let revoker = HttpRevoker::new(&format!("https://127.0.0.1:{}", env.port), env.ca.clone()).unwrap();
    let old_serial = env.agent_serial.clone();
    let serial = env.rotate_agent_cert();
    let revoke = |serial: &str| Revocation {
        workspace: "ward-7/alice-r".into(),
        serial: serial.into(),
        reason: "workspace deleted (e2e)".into(),
    };
    until("the agent to reload its certificate", t, &[&api, &agent], || async {
        agent.log().contains("client certificate reloaded")
    })
    .await;
    revoker.revoke(&revoke(&old_serial)).await.unwrap();
    let stored = count(&db, SESSIONS).await;
    env.hook("disconnect");
    until("an event sent with the rotated certificate", t, &[&api, &agent], || async {
        count(&db, SESSIONS).await == stored + 1
    })
    .await;

    // Revocation through the operator's own client: the agent's next request is refused.
    revoker.revoke(&revoke(&serial)).await.unwrap();
    let revoked_at = Instant::now();
    let refused = format!(
        "SELECT COUNT(*) FROM audit_log WHERE outcome = 'refused' AND actor = 'workspace:ward-7/alice-r' \
         AND reason LIKE 'certificateRevoked:%' \
         AND source LIKE '%{serial}%'"
    );
    until("the revoked agent to be refused", t, &[&api, &agent], || async { count(&db, &refused).await >= 1 }).await;
    println!("revoked agent refused {:?} after the revocation", revoked_at.elapsed());
    assert!(revoked_at.elapsed() < Duration::from_secs(5), "refusal took {:?}", revoked_at.elapsed());
    let stored = count(&db, SESSIONS).await;
    env.hook("connect");
    until("the agent to log the refusal", t, &[&api, &agent], || async {
        let log = agent.log();
        log.contains("refuses this agent's certificate")
            && log.contains(&format!("certificate {serial} (noexit://workspace/ward-7/alice-r) is revoked"))
    })
    .await;
    api.check_alive("the API");
    agent.check_alive("the agent");
    assert_eq!(count(&db, SESSIONS).await, stored, "a revoked agent's event was stored");

    for line in agent.log().lines().filter(|l| l.contains("is revoked")).take(2) {
        println!("agent: {line}");
    }

    // An orderly stop seals the log with a signed checkpoint; the log is intact.
    drop(agent);
    let status = api.interrupt(Duration::from_secs(10));
    assert!(status.success(), "the API exited with {status}:\n{}", api.log());
    let out = Command::new(bin("noexit"))
        .args(["audit", "verify", "--database-url", &env.db_url, "--checkpoint-key-pub"])
        .arg(env.path("audit-signing.pub.pem"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "audit verify failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    println!("{stdout}");
    assert!(stdout.contains("intact"), "{stdout}");
    assert!(!stdout.contains(" 0 signatures checked"), "no signed checkpoint: {stdout}");
}

// ---- the airlock with the real agent and the real API ------------------------------------

type Https = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<bytes::Bytes>,
>;

fn https(env: &Env, identity: Option<(&str, &str)>) -> Https {
    let ca = std::fs::read(env.path("ca.crt")).unwrap();
    let id = identity.map(|(c, k)| (std::fs::read(env.path(c)).unwrap(), std::fs::read(env.path(k)).unwrap()));
    let config =
        noexit_operator::api::tls::client_config(Some(&ca), id.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())))
            .unwrap();
    let connector =
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config).https_only().enable_http1().build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector)
}

/// One call: status, headers, body.
async fn request(
    client: &Https,
    method: &str,
    url: &str,
    token: Option<&str>,
    json: Option<serde_json::Value>,
) -> (u16, http::HeaderMap, bytes::Bytes) {
    use http_body_util::BodyExt;
    let mut req = http::Request::builder().method(method).uri(url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = match json {
        Some(v) => {
            req = req.header("content-type", "application/json");
            bytes::Bytes::from(serde_json::to_vec(&v).unwrap())
        }
        None => bytes::Bytes::new(),
    };
    let response = client.request(req.body(http_body_util::Full::new(body)).unwrap()).await.unwrap();
    let (parts, body) = response.into_parts();
    (parts.status.as_u16(), parts.headers, body.collect().await.unwrap().to_bytes())
}

fn json_of(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or(serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn airlock_with_the_real_agent_and_api() {
    let env = Env::new();
    // Plain HTTP on loopback: the API runs with `--oidc-allow-http-loopback`.
    let issuer = Issuer::builder().start().await;
    // The shipped example, with a second output checker (release needs two).
    let example =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/ward-7.yaml")).unwrap();
    let carol = "    - user: carol@ward7.example\n      roles: [admin, outputChecker]\n";
    assert!(example.contains(carol), "examples/ward-7.yaml changed: carol is no longer a checker");
    let manifests =
        example.replacen(carol, &format!("{carol}    - user: olive@ward7.example\n      roles: [outputChecker]\n"), 1);
    std::fs::write(env.path("manifests.yaml"), manifests).unwrap();
    let extra = ["--oidc-issuer".to_owned(), issuer.url.clone(), "--oidc-allow-http-loopback".to_owned()];
    let mut api = env.start_api_with(&env.path("manifests.yaml"), &extra);
    let agent = env.start_agent();
    let db = sqlite(&env.db_url).await;
    let t = Duration::from_secs(20);

    // The researcher drops a table with one cell of 7 and a clean summary into the outbox.
    let table = b"region,n\nnorth,7\nsouth,15\n".to_vec();
    let summary = b"region,n\nnorth,120\nsouth,150\n".to_vec();
    std::fs::write(env.path("outbox/table.csv"), &table).unwrap();
    std::fs::write(env.path("outbox/summary.csv"), &summary).unwrap();
    until("both outputs checked by the control plane", t, &[&api, &agent], || async {
        count(&db, "SELECT COUNT(*) FROM output_requests WHERE state = 'checked'").await == 2
    })
    .await;

    let base = format!("https://localhost:{}", env.port);
    let people = https(&env, None);
    let [alice, bob, carol, olive] =
        ["alice", "bob", "carol", "olive"].map(|u| issuer.token(&format!("{u}@ward7.example")));
    let (status, _, body) =
        request(&people, "GET", &format!("{base}/v1/projects/ward-7/outputs"), Some(&carol), None).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let list = json_of(&body);
    let by_name = |name: &str| list.as_array().unwrap().iter().find(|o| o["fileName"] == name).cloned().unwrap();
    let (t_out, s_out) = (by_name("table.csv"), by_name("summary.csv"));
    assert_eq!(t_out["requester"], "alice@ward7.example");
    assert_eq!(t_out["checks"]["verdict"], "fail", "{t_out}");
    let fails: Vec<&serde_json::Value> =
        t_out["checks"]["results"].as_array().unwrap().iter().filter(|r| r["verdict"] == "fail").collect();
    assert_eq!(fails.len(), 1, "{t_out}");
    assert_eq!(fails[0]["check"], "minCellCount");
    assert_eq!(fails[0]["cells"], serde_json::json!([{"row": 2, "column": 2}]));
    assert_eq!(s_out["checks"]["verdict"], "pass", "{s_out}");
    let (table_id, summary_id) = (t_out["id"].as_str().unwrap().to_owned(), s_out["id"].as_str().unwrap().to_owned());
    let out = |id: &str, rest: &str| format!("{base}/v1/projects/ward-7/outputs/{id}{rest}");

    // A non-checker may not approve; two checkers approve the summary; one rejects the table.
    let (status, _, _) = request(&people, "POST", &out(&summary_id, "/approve"), Some(&bob), None).await;
    assert_eq!(status, 403);
    for (who, state) in [(&carol, "inReview"), (&olive, "approved")] {
        let (status, _, body) = request(&people, "POST", &out(&summary_id, "/approve"), Some(who), None).await;
        assert_eq!(
            (status, json_of(&body)["state"].as_str()),
            (200, Some(state)),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
    let reason = serde_json::json!({"reason": "cell of 7"});
    let (status, _, body) = request(&people, "POST", &out(&table_id, "/reject"), Some(&olive), Some(reason)).await;
    assert_eq!((status, json_of(&body)["state"].as_str()), (200, Some("rejected")));

    // The agent's view of its decisions.
    let agent_client = https(&env, Some(("agent.crt", "agent.key")));
    let (status, _, body) = request(&agent_client, "GET", &format!("{base}/v1/agent/outputs"), None, None).await;
    assert_eq!(status, 200);
    let decisions = json_of(&body);
    let d = decisions.as_array().unwrap().iter().find(|d| d["fileName"] == "table.csv").unwrap();
    assert_eq!((d["state"].as_str(), d["reasons"][0]["reason"].as_str()), (Some("rejected"), Some("cell of 7")));

    // The researcher downloads the summary once, with a receipt the site's key verifies.
    let (status, _, body) = request(&people, "POST", &out(&summary_id, "/download-link"), Some(&alice), None).await;
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let url = format!("{base}{}", json_of(&body)["url"].as_str().unwrap());
    let (status, headers, bytes) = request(&people, "GET", &url, Some(&alice), None).await;
    assert_eq!((status, bytes.as_ref()), (200, summary.as_slice()));
    use base64::Engine as _;
    let receipt = base64::engine::general_purpose::STANDARD.decode(headers["x-noexit-receipt"].as_bytes()).unwrap();
    let signed = noexit_airlock::receipt::SignedReceipt::from_json(&receipt).unwrap();
    let key = noexit_operator::audit::keys::load_verifying_key(&env.path("audit-signing.pub.pem")).unwrap();
    noexit_airlock::receipt::verify(&signed, &summary, &key).expect("receipt verifies with the site's key");
    let (status, _, _) = request(&people, "GET", &url, Some(&alice), None).await;
    assert_eq!(status, 410, "a second download is refused");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM output_receipts").await, 1);
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM audit_log WHERE action = 'output.download' AND outcome = 'refused'").await,
        1
    );

    // The audit chain with every decision in it is intact.
    drop(agent);
    let status = api.interrupt(Duration::from_secs(10));
    assert!(status.success(), "the API exited with {status}:\n{}", api.log());
    let out = Command::new(bin("noexit"))
        .args(["audit", "verify", "--database-url", &env.db_url, "--checkpoint-key-pub"])
        .arg(env.path("audit-signing.pub.pem"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("intact"), "audit verify: {stdout}");
}
