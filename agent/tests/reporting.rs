//! The real `noexit-agent` binary against a fake control-plane API (axum behind rustls with
//! client-certificate auth, certificates from the test CA): spool durability across an API outage and
//! `kill -9`, outbox submission, heartbeats.

mod support;

use std::process::Command;
use std::sync::atomic::Ordering;

use noexit_agent::sessions::utmp;
use noexit_crds::agent::{EventKind, ScanVerdict, SessionAction, ViolationKind};
use sha2::{Digest, Sha256};
use support::{AGENT, Agent, Api, Env, Recorded, Server, until};

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
        assert_eq!(hb.egress.mode, noexit_crds::agent::AgentMode::Pod);
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

#[test]
fn a_full_spool_refuses_a_hook_event_loudly() {
    let env = Env::new();
    env.write_config(9); // no API needed
    let hook = |user: &str| {
        Command::new(AGENT)
            .arg("--config")
            .arg(env.path("agent.yaml"))
            .args(["--spool-max-bytes", "600", "session", "connect", "--user", user])
            .output()
            .unwrap()
    };
    let mut recorded = 0;
    let refused = loop {
        let out = hook(&format!("u{recorded}"));
        if !out.status.success() {
            break String::from_utf8_lossy(&out.stderr).into_owned();
        }
        recorded += 1;
        assert!(recorded < 10, "the bound was never reached");
    };
    assert!(recorded >= 1);
    assert!(refused.contains("is full") && refused.contains("event not recorded"), "{refused}");
}
