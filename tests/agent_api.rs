//! The real `noexit-agent` against the real control-plane API (`noexit-operator api`), no fakes:
//! certificates from the operator's CA, SQLite store, the in-memory cluster from
//! `examples/ward-7.yaml`. Checks heartbeats, session events (exactly once, also across a
//! `kill -9` of the API), outbox submissions with their hash and DLP findings, a revocation sent
//! by the operator's own revoker, and `noexit audit verify` at the end.
//!
//! Needs nothing but the workspace's binaries, which it builds once with `$CARGO build` (a test
//! only gets `CARGO_BIN_EXE_*` paths for its own package). Run with
//! `cargo test -p noexit-e2e --test agent_api`.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use noexit_agent::sessions::utmp;
use noexit_crds::agent::WorkspaceIdentity;
use noexit_operator::audit::store::{Pool, Store};
use noexit_operator::controllers::revoke::{HttpRevoker, Revocation, Revoker};
use noexit_operator::pki::Ca;
use sha2::{Digest, Sha256};
use sqlx::SqlitePool;

/// Directory holding the workspace's binaries, built once per test binary.
fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        // Without the variables `cargo test` sets for this test, the build reuses what a plain
        // `cargo build` made instead of rebuilding half the tree each time.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            let keep = ["CARGO_HOME", "CARGO_TARGET_DIR"].contains(&name.as_ref());
            if (name.starts_with("CARGO_") && !keep) || name == "LD_LIBRARY_PATH" {
                cmd.env_remove(name.as_ref());
            }
        }
        // This test runs from <target>/<profile>/deps/; the binaries go to <target>/<profile>/.
        let exe = std::env::current_exe().unwrap();
        let dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(other) => other,
        };
        let status = cmd
            .args(["build", "-p", "noexit-operator", "-p", "noexit-agent", "--bins", "--profile", profile])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo build of noexit-operator and noexit-agent failed");
        dir
    })
}

fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A child process that is killed (SIGKILL) when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(cmd: &mut Command, log: PathBuf) -> Self {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = cmd.stdout(Stdio::null()).stderr(file).spawn().unwrap();
        Self { child, log }
    }

    /// Ctrl-C (SIGINT), as an orderly shutdown; waits for the exit, at most `bound`.
    fn interrupt(&mut self, bound: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-INT", &pid]).status().unwrap();
        assert!(sent.success(), "kill -INT {pid} failed");
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit {bound:?} after SIGINT:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fail if the process died (with its log, which says why).
    fn check_alive(&mut self, what: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{what} exited with {status}:\n{}", self.log());
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
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
        let agent = ca.issue_workspace_client(&ws, day).unwrap();
        for (name, text) in [
            ("ca.crt", ca.cert_pem()),
            ("api.crt", &server.cert_pem),
            ("api.key", &server.key_pem),
            ("agent.crt", &agent.cert_pem),
            ("agent.key", &agent.key_pem),
        ] {
            std::fs::write(p.join(name), text).unwrap();
        }
        for d in ["outbox", "spool", "root", "api-data"] {
            std::fs::create_dir_all(p.join(d)).unwrap();
        }
        std::fs::write(p.join("wtmp"), b"").unwrap();
        std::fs::write(p.join("utmp"), b"").unwrap();
        let port = free_port();
        // Nothing listens on the canary port: the probe's "outside" address is refused.
        let canary = free_port();
        let cfg = format!(
            r#"workspace: {{ project: ward-7, name: alice-r }}
controlPlane:
  url: https://localhost:{port}
  caFile: {p}/ca.crt
  certFile: {p}/agent.crt
  keyFile: {p}/agent.key
egress:
  resolvers: [127.0.0.53]
  endpoints: [{{ name: controlPlane, address: 127.0.0.1, port: {port} }}]
  desktopPort: 5901
  canary: {{ name: outside, address: 127.0.0.1, port: {canary} }}
outbox: {p}/outbox
spool: {p}/spool
mode: pod
desktop: none
heartbeatSeconds: 1
"#,
            p = p.display()
        );
        std::fs::write(p.join("agent.yaml"), cfg).unwrap();
        let db_url = format!("sqlite://{}", p.join("api.db").display());
        Self { port, db_url, agent_serial: agent.serial, ca: Arc::new(ca), dir }
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
            .env("RUST_LOG", "info");
        let mut api = Proc::spawn(&mut cmd, self.path("api.log"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            api.check_alive("the API");
            assert!(Instant::now() < deadline, "the API did not listen within 20 s:\n{}", api.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        api
    }

    fn start_agent(&self) -> Proc {
        let mut cmd = Command::new(bin("noexit-agent"));
        cmd.arg("--config")
            .arg(self.path("agent.yaml"))
            .arg("run")
            .arg("--wtmp")
            .arg(self.path("wtmp"))
            .arg("--utmp")
            .arg(self.path("utmp"))
            .arg("--root")
            .arg(self.path("root"))
            .args(["--outbox-interval", "1", "--guard-interval", "1"])
            .env("RUST_LOG", "info");
        Proc::spawn(&mut cmd, self.path("agent.log"))
    }

    /// `noexit-agent session <action> --user alice`, as the desktop's session scripts call it.
    fn hook(&self, action: &str) {
        let out = Command::new(bin("noexit-agent"))
            .arg("--config")
            .arg(self.path("agent.yaml"))
            .args(["session", action, "--user", "alice", "--session", ":1", "--source", "10.9.8.7"])
            .output()
            .unwrap();
        assert!(out.status.success(), "hook failed: {}", String::from_utf8_lossy(&out.stderr));
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

/// Poll `check` every 100 ms until it holds, at most `bound`; on timeout fail with the logs.
async fn until<F, Fut>(what: &str, bound: Duration, procs: &[&Proc], mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + bound;
    while !check().await {
        if Instant::now() > deadline {
            let logs: Vec<String> = procs.iter().map(|p| format!("--- {}\n{}", p.log.display(), p.log())).collect();
            panic!("timed out after {bound:?} waiting for {what}\n{}", logs.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    until("the two desktop events", t, &[&api, &agent], || async { count(&db, SESSIONS).await == 2 }).await;
    assert_eq!(count(&db, SESSION_ENTRIES).await, 2);
    assert_eq!(count(&db, UNMATCHED).await, 0);
    let actions: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE action LIKE 'agent.session.%' AND actor = 'workspace:ward-7/alice-r' ORDER BY seq",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(actions, ["agent.session.desktopConnect", "agent.session.desktopDisconnect"]);

    // Outbox: a clean table and a file with a valid NHS number become pending output requests.
    let clean = b"arm,n,mean_los\ncontrol,112,6.4\ntreated,108,5.9\n".to_vec();
    let mut flagged = b"summary for the ward meeting\n".to_vec();
    flagged.extend_from_slice(b"note: patient NHS 943 476 5919\n");
    std::fs::write(env.path("outbox/los.csv"), &clean).unwrap();
    std::fs::write(env.path("outbox/notes.txt"), &flagged).unwrap();
    for (name, content) in [("los.csv", &clean), ("notes.txt", &flagged)] {
        until(&format!("{name} pending review"), t, &[&api, &agent], || async {
            count(
                &db,
                &format!("SELECT COUNT(*) FROM output_requests WHERE file_name = '{name}' AND state = 'pendingReview'"),
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
        assert_eq!(&std::fs::read(&path).unwrap(), content, "{name}: stored content");
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
