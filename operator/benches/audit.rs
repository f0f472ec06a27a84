//! Audit store benchmark: appends/s one by one and with group commit, and `verify` entries/s,
//! on SQLite (file, WAL, synchronous=FULL) and PostgreSQL (private server, fsync on).
//!
//! `cargo bench -p noexit-operator --bench audit`
//! Sizes: NOEXIT_BENCH_SINGLE (default 300), NOEXIT_BENCH_GROUP (20000), NOEXIT_BENCH_WRITERS
//! (64), NOEXIT_BENCH_VERIFY (1000000). NOEXIT_BENCH_BACKENDS=sqlite,postgres.

#[path = "../tests/support/pg.rs"]
mod pg;

use std::{sync::Arc, time::Instant};

use noexit_operator::audit::{
    AuditEvent,
    store::{Store, StoreOptions},
    verify::{VerifyOptions, verify},
};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn event(i: usize) -> AuditEvent {
    AuditEvent {
        role: Some("agent".into()),
        source: Some("cert:5f3a9c01".into()),
        detail: serde_json::json!({ "agentVersion": "0.1.0", "egressLocked": true, "n": i }),
        ..AuditEvent::allowed(format!("workspace:ward-7/ws-{}", i % 200), "agent.heartbeat", "workspace:ward-7")
    }
}

/// `total` appends from `writers` concurrent tasks; returns appends/s.
async fn appends(store: Arc<Store>, writers: usize, total: usize) -> f64 {
    let started = Instant::now();
    let per = total / writers;
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..per {
                    store.append(event(w * per + i)).await.expect("append");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("writer task");
    }
    (per * writers) as f64 / started.elapsed().as_secs_f64()
}

async fn bench(name: &str, url: &str) {
    let single = env("NOEXIT_BENCH_SINGLE", 300);
    let group = env("NOEXIT_BENCH_GROUP", 20_000);
    let writers = env("NOEXIT_BENCH_WRITERS", 64);
    let verify_n = env("NOEXIT_BENCH_VERIFY", 1_000_000);
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    // The API: signs each entry as writer `api`, and the checkpoints.
    let options = StoreOptions {
        signing_key: Some(key.clone()),
        writer: Some(noexit_operator::audit::writers::Writer::new("api", key.clone())),
        ..StoreOptions::default()
    };

    let store = Arc::new(Store::connect_with(url, options.clone()).await.expect("connect"));
    let one = appends(store.clone(), 1, single).await;
    println!("{name:<9} appends one by one (1 writer):        {one:>10.0} /s   ({single} appends)");
    let many = appends(store.clone(), writers, group).await;
    println!("{name:<9} appends group commit ({writers} writers): {many:>10.0} /s   ({group} appends)");

    // Fill up to the verify size with large batches, then verify the whole log (twice).
    let have = store.last_seq().await.expect("last seq") as usize;
    if verify_n > have {
        let filler = Arc::new(
            Store::connect_with(url, StoreOptions { max_batch: 4096, queue: 8192, ..options }).await.expect("connect"),
        );
        let rate = appends(filler.clone(), 1024, verify_n - have).await;
        println!("{name:<9} (filling {} entries at {rate:.0} /s with 1024 writers)", verify_n - have);
        filler.close().await;
    }
    store.close().await;
    let reader = Store::open_read_only(url).await.expect("open");
    for _ in 0..2 {
        let mut writers = noexit_operator::audit::writers::WriterKeys::new();
        writers.add("api", key.verifying_key());
        let options =
            VerifyOptions { keys: vec![key.verifying_key()], writers: Some(writers), ..VerifyOptions::default() };
        let report = verify(&reader, &options).await.expect("verify");
        assert!(report.is_intact() && report.entries_authenticated == report.entries, "{report:?}");
        println!(
            "{name:<9} verify: {:>10.0} entries/s   ({} entries, {} checkpoints, {:.3} s)",
            report.entries as f64 / report.elapsed.as_secs_f64(),
            report.entries,
            report.checkpoints,
            report.elapsed.as_secs_f64()
        );
    }
}

/// The CPU ceiling of verify on this machine: entry hashes plus Merkle tree, no database.
fn hash_only(n: usize) {
    use noexit_operator::audit::hash::{EntryFields, GENESIS, MerkleBuilder, entry_hash};
    let detail = r#"{"agentVersion":"0.1.0","egressLocked":true,"n":1}"#;
    let started = Instant::now();
    let mut prev = GENESIS;
    let mut merkle = MerkleBuilder::new();
    for seq in 1..=n as i64 {
        let f = EntryFields {
            seq,
            time_us: 1_764_576_000_000_000 + seq,
            actor: "workspace:ward-7/ws-17",
            role: Some("agent"),
            action: "agent.heartbeat",
            object: "workspace:ward-7",
            refused: false,
            reason: None,
            source: Some("cert:5f3a9c01"),
            detail,
            idempotency_key: None,
        };
        prev = entry_hash(&f, &prev);
        merkle.push(&prev);
    }
    std::hint::black_box(merkle.finish());
    println!("cpu       hash + Merkle only (1 thread): {:>10.0} entries/s", n as f64 / started.elapsed().as_secs_f64());
}

#[tokio::main]
async fn main() {
    hash_only(env("NOEXIT_BENCH_VERIFY", 1_000_000));
    let backends = std::env::var("NOEXIT_BENCH_BACKENDS").unwrap_or_else(|_| "sqlite,postgres".into());
    if backends.contains("sqlite") {
        let dir = tempfile::tempdir().expect("tempdir");
        bench("sqlite", &format!("sqlite://{}", dir.path().join("audit.db").display())).await;
    }
    if backends.contains("postgres") {
        match pg::PgServer::start_with(true) {
            Some(server) => {
                let url = server.create_database("bench").expect("create database");
                bench("postgres", &url).await;
            }
            None => println!("postgres  skipped: PostgreSQL not installed"),
        }
    }
}
