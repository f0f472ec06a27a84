//! The real `noexit-agent` binary against the fake control-plane API: the reviewers' decisions
//! on the workspace's outputs (`GET /v1/agent/outputs`) appear in `<outbox>/.decisions/` as
//! text and JSON, are rewritten when they change and not otherwise, and a hostile file name
//! from the API stays inside the directory.

mod support;

use std::os::unix::fs::MetadataExt;

use support::{Agent, Api, Env, Server, until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_appear_next_to_the_outbox_and_follow_changes() {
    let env = Env::new();
    let api = Api::default();
    let decision = |state: &str, reason: &str, at: &str| {
        serde_json::json!([
            {"id": "0190c4d2-8a1e-7000-8000-000000000001", "fileName": "table.csv", "state": state,
             "reasons": [{"reviewer": "bob@x", "decision": "reject", "reason": reason, "at": at}],
             "updatedAt": at},
            {"id": "0190c4d2-8a1e-7000-8000-000000000002", "fileName": "../../../escape.txt", "state": "approved",
             "reasons": [], "updatedAt": "2026-12-07T01:00:00Z"},
        ])
    };
    api.with_mut(|r| r.outputs = decision("rejected", "cell of 7", "2026-12-07T01:00:00Z"));
    let (_server, addr) = Server::start("127.0.0.1:0".parse().unwrap(), env.server_tls.clone(), api.clone()).await;
    env.write_config(addr.port());
    let _agent = Agent::start(&env);

    let dir = env.path("outbox/.decisions");
    let text = dir.join("table.csv.txt");
    until(&env, 30, "table.csv.txt", || std::fs::read_to_string(&text).is_ok_and(|t| t.contains("cell of 7"))).await;
    let t = std::fs::read_to_string(&text).unwrap();
    assert!(t.contains("state:   rejected"), "{t}");
    assert!(t.contains("- bob@x reject (2026-12-07T01:00:00+00:00): cell of 7"), "{t}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("table.csv.json")).unwrap()).unwrap();
    assert_eq!(json["state"], "rejected");
    assert_eq!(json["reasons"][0]["reason"], "cell of 7");
    // The hostile name stayed inside, escaped.
    assert!(dir.join("%2E.%2F..%2F..%2Fescape.txt.txt").exists());
    assert!(!env.path("escape.txt.txt").exists() && !env.path("../escape.txt.txt").exists());

    // Unchanged: several more polls, same inode.
    let ino = std::fs::metadata(&text).unwrap().ino();
    let polls = api.with(|r| r.output_polls);
    until(&env, 30, "three more polls", || api.with(|r| r.output_polls >= polls + 3)).await;
    assert_eq!(std::fs::metadata(&text).unwrap().ino(), ino, "an unchanged decision was rewritten");

    // Changed: rewritten.
    api.with_mut(|r| r.outputs = decision("released", "ok after suppression", "2026-12-07T02:00:00Z"));
    until(&env, 30, "the new decision", || {
        std::fs::read_to_string(&text).is_ok_and(|t| t.contains("state:   released"))
    })
    .await;
    assert!(std::fs::read_to_string(&text).unwrap().contains("ok after suppression"));
}
