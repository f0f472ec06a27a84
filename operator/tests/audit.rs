//! The audit store and `verify` on SQLite and on a real PostgreSQL: every case runs on both.

mod support;

use std::sync::Arc;

use noexit_operator::audit::{
    AuditEvent, Outcome, hash,
    store::{Backend, Filter, Store, StoreOptions, read_exported_checkpoints},
    verify::{Report, Tamper, VerifyOptions, verify},
    writers::{self, Writer, WriterKeys},
};
use support::pg::PgServer;

/// A fresh, empty database of one backend, plus raw access for the attacker.
struct TestDb {
    backend: Backend,
    url: String,
    _dir: Option<tempfile::TempDir>,
    _pg: Option<Arc<PgServer>>,
}

impl TestDb {
    fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("audit.db").display());
        TestDb { backend: Backend::Sqlite, url, _dir: Some(dir), _pg: None }
    }

    fn postgres(name: &str) -> Option<TestDb> {
        let pg = support::pg::shared()?;
        let url = pg.create_database(name).unwrap();
        Some(TestDb { backend: Backend::Postgres, url, _dir: None, _pg: Some(pg) })
    }

    async fn store(&self) -> Store {
        Store::connect(&self.url).await.unwrap()
    }

    async fn store_with(&self, options: StoreOptions) -> Store {
        Store::connect_with(&self.url, options).await.unwrap()
    }

    /// Runs SQL with the rights of the table owner, outside the store.
    async fn sql(&self, statements: &[&str]) -> Result<(), String> {
        match self.backend {
            Backend::Sqlite => {
                let pool = sqlx::SqlitePool::connect(&self.url).await.unwrap();
                let mut result = Ok(());
                for s in statements {
                    if let Err(e) = sqlx::raw_sql(s).execute(&pool).await {
                        result = Err(e.to_string());
                        break;
                    }
                }
                pool.close().await;
                result
            }
            Backend::Postgres => {
                let pool = sqlx::PgPool::connect(&self.url).await.unwrap();
                let mut result = Ok(());
                for s in statements {
                    if let Err(e) = sqlx::raw_sql(s).execute(&pool).await {
                        result = Err(e.to_string());
                        break;
                    }
                }
                pool.close().await;
                result
            }
        }
    }

    /// What an attacker with owner rights does first: switch the append-only triggers off.
    async fn disable_triggers(&self) {
        let statements: &[&str] = match self.backend {
            Backend::Sqlite => &[
                "DROP TRIGGER IF EXISTS audit_log_no_update",
                "DROP TRIGGER IF EXISTS audit_log_no_delete",
                "DROP TRIGGER IF EXISTS audit_checkpoint_no_update",
                "DROP TRIGGER IF EXISTS audit_checkpoint_no_delete",
            ],
            Backend::Postgres => {
                &["ALTER TABLE audit_log DISABLE TRIGGER USER", "ALTER TABLE audit_checkpoint DISABLE TRIGGER USER"]
            }
        };
        self.sql(statements).await.unwrap();
    }
}

impl TestDb {
    /// A hex literal for a blob column.
    fn blob(&self, bytes: &[u8]) -> String {
        match self.backend {
            Backend::Sqlite => format!("X'{}'", hex::encode(bytes)),
            Backend::Postgres => format!("'\\x{}'::bytea", hex::encode(bytes)),
        }
    }

    /// `n` entries, sealed by a checkpoint every 10, and the key that signed them.
    async fn sealed_log(&self, n: usize) -> ed25519_dalek::SigningKey {
        let key = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
        let options = StoreOptions {
            signing_key: Some(key.clone()),
            checkpoint_every: 10,
            checkpoint_interval: std::time::Duration::from_secs(3600),
            ..StoreOptions::default()
        };
        let store = self.store_with(options).await;
        for i in 0..n {
            store.append(event(i)).await.unwrap();
        }
        store.close().await;
        key
    }

    async fn verify(&self, key: &ed25519_dalek::SigningKey) -> Report {
        let store = Store::open_read_only(&self.url).await.unwrap();
        verify(&store, &VerifyOptions { keys: vec![key.verifying_key()], ..VerifyOptions::default() }).await.unwrap()
    }

    /// Renumbers entries with `seq >= from` by `delta`, in two steps so no two rows collide.
    fn shift(from: i64, delta: i64) -> [String; 2] {
        [
            format!("UPDATE audit_log SET seq = -seq WHERE seq >= {from}"),
            format!("UPDATE audit_log SET seq = -seq + ({delta}) WHERE seq < 0"),
        ]
    }

    async fn attack(&self, statements: &[String]) {
        self.disable_triggers().await;
        let refs: Vec<&str> = statements.iter().map(String::as_str).collect();
        self.sql(&refs).await.unwrap();
    }
}

#[track_caller]
fn assert_finding(report: &Report, kind: Tamper, seq: i64) {
    let f = report.finding.as_ref().unwrap_or_else(|| panic!("tampering not found: {report:?}"));
    assert_eq!((f.kind, f.seq), (kind, seq), "{}", f.message);
}

/// Generates `sqlite::<case>` and `postgres::<case>` tests from `async fn <case>(db: TestDb)`.
macro_rules! on_both {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::TestDb::sqlite()).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(db) = super::TestDb::postgres(stringify!($case)) else { return };
                    super::$case(db).await
                }
            )*
        }
    };
}

on_both!(
    append_and_read_back,
    query_filters,
    idempotent_appends_are_stored_once,
    group_commit_is_durable_on_ok,
    checkpoints_are_written_by_count_and_by_time,
    database_refuses_update_and_delete,
    intact_log_verifies,
    edited_entry_is_named,
    deleted_entry_is_named,
    deleted_and_renumbered_is_named,
    inserted_entry_is_named,
    reordered_entries_are_named,
    rewritten_chain_is_caught_by_the_signed_checkpoint,
    forged_checkpoint_signature_is_detected,
    truncated_tail_is_detected,
    a_mirror_forging_an_approval_is_named,
    gateway_entries_verify_as_the_gateways_and_not_as_the_apis,
    rollback_of_the_newest_checkpoint_is_caught_by_the_published_copy,
    rollback_of_every_checkpoint_is_caught_by_the_published_copy,
    sigterm_style_close_publishes_a_checkpoint_covering_the_last_entry,
);

fn event(i: usize) -> AuditEvent {
    AuditEvent {
        role: Some("researcher".into()),
        source: Some(format!("10.0.0.{}", i % 250)),
        detail: serde_json::json!({ "n": i, "file": "results.csv" }),
        ..AuditEvent::allowed(format!("user:u{}", i % 3), "agent.heartbeat", format!("workspace:ward-7/ws-{}", i % 5))
    }
}

async fn append_and_read_back(db: TestDb) {
    let store = db.store().await;
    let refused = AuditEvent::refused("user:mallory", "request.approve", "workspacerequest:ward-7/r-1", "own request");
    assert_eq!(store.append(event(0)).await.unwrap(), 1);
    assert_eq!(store.append(refused.clone()).await.unwrap(), 2);
    assert_eq!(store.append(event(2)).await.unwrap(), 3);

    let all = store.query(&Filter::default()).await.unwrap();
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(all[0].event, event(0));
    assert_eq!(all[1].event, refused);
    assert_eq!(all[1].prev_hash, all[0].hash, "each entry names its predecessor");
    assert_eq!(all[0].prev_hash, [0; 32]);

    let tail = store.tail(2).await.unwrap();
    assert_eq!(tail.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3]);
    let line = all[1].to_json();
    assert_eq!(line["outcome"], "refused");
    assert_eq!(line["reason"], "own request");
    store.close().await;

    // The log survives closing and reopening, read-only too.
    let reader = Store::open_read_only(&db.url).await.unwrap();
    assert_eq!(reader.last_seq().await.unwrap(), 3);
    assert!(reader.append(event(9)).await.is_err(), "read-only store refuses appends");
}

async fn query_filters(db: TestDb) {
    let store = db.store().await;
    for i in 0..12 {
        store.append(event(i)).await.unwrap();
    }
    store
        .append(AuditEvent::refused("user:u1", "request.deny", "workspacerequest:ward-7/r-9", "not admin"))
        .await
        .unwrap();
    let count = |f: Filter| {
        let store = &store;
        async move { store.query(&f).await.unwrap().len() }
    };
    assert_eq!(count(Filter { actor: Some("user:u1".into()), ..Filter::default() }).await, 5);
    assert_eq!(count(Filter { action: Some("request.*".into()), ..Filter::default() }).await, 1);
    assert_eq!(count(Filter { action: Some("agent.heartbeat".into()), ..Filter::default() }).await, 12);
    assert_eq!(count(Filter { refused: Some(true), ..Filter::default() }).await, 1);
    assert_eq!(count(Filter { object: Some("workspace:ward-7/ws-0".into()), ..Filter::default() }).await, 3);
    assert_eq!(count(Filter { after_seq: Some(10), limit: Some(2), ..Filter::default() }).await, 2);
    let future = chrono::Utc::now() + chrono::Duration::hours(1);
    assert_eq!(count(Filter { since: Some(future), ..Filter::default() }).await, 0);
    assert_eq!(count(Filter { until: Some(future), ..Filter::default() }).await, 13);
    store.close().await;
}

async fn idempotent_appends_are_stored_once(db: TestDb) {
    let store = Arc::new(db.store().await);
    let (first, dup) = store.append_idempotent("agent-7:report-1", event(1)).await.unwrap();
    assert!(!dup);
    store.append(event(2)).await.unwrap();
    assert_eq!(store.append_idempotent("agent-7:report-1", event(1)).await.unwrap(), (first, true));

    // A burst of resends of one key, racing in the same batches: one entry, one seq for all.
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.append_idempotent("agent-7:report-2", event(3)).await.unwrap() })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let seq = results[0].0;
    assert!(results.iter().all(|(s, _)| *s == seq), "{results:?}");
    assert_eq!(results.iter().filter(|(_, dup)| !dup).count(), 1, "{results:?}");
    assert_eq!(store.last_seq().await.unwrap(), 3);
    let stored = store.query(&Filter::default()).await.unwrap();
    assert_eq!(stored[2].idempotency_key.as_deref(), Some("agent-7:report-2"));
    assert_eq!(stored[2].event.outcome, Outcome::Allowed);
    store.close().await;

    // The key outlives the process: a resend after a restart is still a duplicate.
    let reopened = db.store().await;
    assert_eq!(reopened.append_idempotent("agent-7:report-1", event(1)).await.unwrap(), (first, true));
    assert_eq!(reopened.last_seq().await.unwrap(), 3);
    reopened.close().await;
}

async fn group_commit_is_durable_on_ok(db: TestDb) {
    let store = Arc::new(db.store().await);
    let writers = 64;
    let each = 10;
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..each {
                    seqs.push(store.append(event(w * 100 + i)).await.unwrap());
                }
                seqs
            })
        })
        .collect();
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.extend(t.await.unwrap());
    }
    seqs.sort();
    let n = (writers * each) as i64;
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "every append got its own seq, no gaps");

    // Acknowledged means committed: another connection sees every entry while the writer still
    // runs, and after the writer is gone without a clean close.
    let other = Store::open_read_only(&db.url).await.unwrap();
    assert_eq!(other.last_seq().await.unwrap(), n);
    drop(store);
    let reopened = db.store().await;
    assert_eq!(reopened.last_seq().await.unwrap(), n);
    reopened.close().await;
}

async fn database_refuses_update_and_delete(db: TestDb) {
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let store = db.store_with(StoreOptions { signing_key: Some(key), ..StoreOptions::default() }).await;
    store.append(event(1)).await.unwrap();
    store.close().await;
    let mut attempts = vec![
        "UPDATE audit_log SET actor = 'user:mallory' WHERE seq = 1",
        "DELETE FROM audit_log WHERE seq = 1",
        "UPDATE audit_checkpoint SET last_seq = 0",
        "DELETE FROM audit_checkpoint",
    ];
    if db.backend == Backend::Postgres {
        attempts.push("TRUNCATE audit_log");
        attempts.push("TRUNCATE audit_checkpoint");
    }
    for sql in attempts {
        let err = db.sql(&[sql]).await.expect_err(sql);
        assert!(err.contains("append-only"), "{sql}: {err}");
    }
    let reader = Store::open_read_only(&db.url).await.unwrap();
    assert_eq!(reader.query(&Filter::default()).await.unwrap()[0].event, event(1));
    assert_eq!(reader.checkpoints().await.unwrap().len(), 1, "close sealed the tail");
}

async fn intact_log_verifies(db: TestDb) {
    let key = db.sealed_log(35).await;
    let report = db.verify(&key).await;
    assert!(report.is_intact(), "{report:?}");
    assert_eq!((report.entries, report.last_seq, report.checkpoints), (35, 35, 4));
    assert_eq!((report.signatures_checked, report.unsealed), (4, 0), "close seals the tail");
}

async fn edited_entry_is_named(db: TestDb) {
    let key = db.sealed_log(30).await;
    db.attack(&["UPDATE audit_log SET actor = 'user:mallory' WHERE seq = 17".into()]).await;
    assert_finding(&db.verify(&key).await, Tamper::Changed, 17);
}

async fn deleted_entry_is_named(db: TestDb) {
    let key = db.sealed_log(30).await;
    db.attack(&["DELETE FROM audit_log WHERE seq = 17".into()]).await;
    assert_finding(&db.verify(&key).await, Tamper::Deleted, 17);
}

async fn deleted_and_renumbered_is_named(db: TestDb) {
    let key = db.sealed_log(30).await;
    let mut attack = vec!["DELETE FROM audit_log WHERE seq = 17".to_string()];
    attack.extend(TestDb::shift(18, -1));
    db.attack(&attack).await;
    assert_finding(&db.verify(&key).await, Tamper::Deleted, 17);
}

async fn inserted_entry_is_named(db: TestDb) {
    let key = db.sealed_log(30).await;
    // The attacker even computes a correct hash for the forged entry.
    let store = Store::open_read_only(&db.url).await.unwrap();
    let (before, before_hash) = store.entries_from(16, 1).await.unwrap().remove(0);
    let mut forged = before.clone();
    forged.actor = "user:ghost".into();
    forged.prev_hash = before_hash;
    let forged_hash = hash::entry_hash(&forged.fields_as(17), &before_hash);
    let mut attack = TestDb::shift(17, 1).to_vec();
    attack.push(format!(
        "INSERT INTO audit_log (seq, time_us, actor, role, action, object, outcome, reason, source, detail, \
         idempotency_key, prev_hash, hash) VALUES (17, {}, 'user:ghost', '{}', '{}', '{}', 'allowed', NULL, '{}', '{}', NULL, {}, {})",
        forged.time_us,
        forged.role.as_deref().unwrap_or_default(),
        forged.action,
        forged.object,
        forged.source.as_deref().unwrap_or_default(),
        forged.detail,
        db.blob(&before_hash),
        db.blob(&forged_hash)
    ));
    db.attack(&attack).await;
    assert_finding(&db.verify(&key).await, Tamper::Inserted, 17);
}

async fn reordered_entries_are_named(db: TestDb) {
    let key = db.sealed_log(30).await;
    db.attack(&[
        "UPDATE audit_log SET seq = -1 WHERE seq = 17".into(),
        "UPDATE audit_log SET seq = 17 WHERE seq = 18".into(),
        "UPDATE audit_log SET seq = 18 WHERE seq = -1".into(),
    ])
    .await;
    assert_finding(&db.verify(&key).await, Tamper::Reordered, 17);
}

async fn rewritten_chain_is_caught_by_the_signed_checkpoint(db: TestDb) {
    let key = db.sealed_log(30).await;
    // The careful attacker edits entry 17 and recomputes every hash after it: the chain is
    // consistent again, only the signed Merkle root of entries 11..=20 still disagrees.
    let store = Store::open_read_only(&db.url).await.unwrap();
    let rows = store.entries_from(17, 100).await.unwrap();
    let mut prev = rows[0].0.prev_hash;
    let mut attack = Vec::new();
    for (mut raw, _) in rows {
        if raw.seq == 17 {
            raw.actor = "user:mallory".into();
            attack.push("UPDATE audit_log SET actor = 'user:mallory' WHERE seq = 17".to_string());
        }
        let h = hash::entry_hash(&raw.fields_as(raw.seq), &prev);
        attack.push(format!(
            "UPDATE audit_log SET prev_hash = {}, hash = {} WHERE seq = {}",
            db.blob(&prev),
            db.blob(&h),
            raw.seq
        ));
        prev = h;
    }
    db.attack(&attack).await;
    let report = db.verify(&key).await;
    assert_finding(&report, Tamper::CheckpointMismatch, 11);
    assert_eq!(report.finding.unwrap().checkpoint, Some(2));
}

async fn forged_checkpoint_signature_is_detected(db: TestDb) {
    let key = db.sealed_log(30).await;
    let mallory = ed25519_dalek::SigningKey::from_bytes(&[66; 32]);
    let bogus = ed25519_dalek::Signer::sign(&mallory, b"anything").to_bytes();
    db.attack(&[format!("UPDATE audit_checkpoint SET signature = {} WHERE id = 2", db.blob(&bogus))]).await;
    assert_finding(&db.verify(&key).await, Tamper::CheckpointForged, 11);

    // Without the public key the signature cannot be checked, and the report says so.
    let store = Store::open_read_only(&db.url).await.unwrap();
    let unchecked = verify(&store, &VerifyOptions::default()).await.unwrap();
    assert!(unchecked.is_intact() && unchecked.signatures_checked == 0, "{unchecked:?}");
}

async fn truncated_tail_is_detected(db: TestDb) {
    let key = db.sealed_log(30).await;
    db.attack(&["DELETE FROM audit_log WHERE seq > 25".into()]).await;
    assert_finding(&db.verify(&key).await, Tamper::Truncated, 26);
}

/// An in-memory store is verified through the pool (no file to scan).
#[tokio::test]
async fn in_memory_sqlite_verifies() {
    let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let options = StoreOptions { signing_key: Some(key.clone()), checkpoint_every: 4, ..StoreOptions::default() };
    let store = Store::connect_with("sqlite::memory:", options).await.unwrap();
    for i in 0..10 {
        store.append(event(i)).await.unwrap();
    }
    let report =
        verify(&store, &VerifyOptions { keys: vec![key.verifying_key()], ..VerifyOptions::default() }).await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!((report.entries, report.checkpoints, report.unsealed), (10, 2, 2));
}

async fn checkpoints_are_written_by_count_and_by_time(db: TestDb) {
    let key = ed25519_dalek::SigningKey::from_bytes(&[11; 32]);
    let options = StoreOptions {
        signing_key: Some(key),
        checkpoint_every: 5,
        checkpoint_interval: std::time::Duration::from_millis(200),
        ..StoreOptions::default()
    };
    let store = db.store_with(options).await;
    for i in 0..5 {
        store.append(event(i)).await.unwrap();
    }
    // Five entries: sealed by the count (just after the answers). Two more: sealed by the
    // timer, without a close.
    let first = checkpoints_when(&store, 1).await;
    assert_eq!((first[0].body.first_seq, first[0].body.last_seq), (1, 5));
    store.append(event(5)).await.unwrap();
    store.append(event(6)).await.unwrap();
    let checkpoints = checkpoints_when(&store, 2).await;
    let ranges: Vec<_> = checkpoints.iter().map(|c| (c.body.first_seq, c.body.last_seq)).collect();
    assert_eq!(ranges, [(1, 5), (6, 7)]);
    store.close().await;
}

/// The checkpoints once there are `n` of them (bounded wait).
async fn checkpoints_when(store: &Store, n: usize) -> Vec<noexit_operator::audit::store::Checkpoint> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let c = store.checkpoints().await.unwrap();
        if c.len() >= n || std::time::Instant::now() > deadline {
            return c;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// PostgreSQL dies under the writer: appends fail (the API answers 5xx), nothing half-written
/// stays behind, and after the restart resent events are stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_loses_nothing_acknowledged() {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.create_database("restart").unwrap();
    let store = Store::connect(&url).await.unwrap();
    let mut acknowledged = Vec::new();
    for i in 0..5 {
        let key = format!("agent-1:{i}");
        store.append_idempotent(&key, event(i)).await.unwrap();
        acknowledged.push(key);
    }
    pg.kill().unwrap();
    assert!(store.append_idempotent("agent-1:5", event(5)).await.is_err(), "no answer without a database");
    pg.start_again().unwrap();

    // The agent resends its whole spool until it gets answers (bounded).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut pending: Vec<usize> = (0..8).collect();
    while !pending.is_empty() {
        assert!(std::time::Instant::now() < deadline, "store did not recover");
        let mut still = Vec::new();
        for i in pending {
            if store.append_idempotent(&format!("agent-1:{i}"), event(i)).await.is_err() {
                still.push(i);
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    let entries = store.query(&Filter::default()).await.unwrap();
    let keys: Vec<_> = entries.iter().filter_map(|e| e.idempotency_key.clone()).collect();
    assert_eq!(keys, (0..8).map(|i| format!("agent-1:{i}")).collect::<Vec<_>>(), "each event exactly once");
    let report = verify(&store, &VerifyOptions::default()).await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    store.close().await;
}

// ---- writers, published checkpoints ------------------------------------------------------

fn api_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[42; 32])
}

fn mirror_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[43; 32])
}

fn gateway_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[44; 32])
}

fn all_writer_keys() -> WriterKeys {
    let mut k = WriterKeys::new();
    k.add(writers::API, api_key().verifying_key());
    k.add(writers::MIRROR, mirror_key().verifying_key());
    k.add(writers::GATEWAY, gateway_key().verifying_key());
    k
}

fn connect(actor: &str) -> AuditEvent {
    AuditEvent::allowed(actor, "gateway.connect", "workspace:ward-7/alice-r")
}

fn fetch(i: usize) -> AuditEvent {
    AuditEvent {
        source: Some("10.0.0.9".into()),
        detail: serde_json::json!({ "project": "ward-7", "n": i }),
        ..AuditEvent::allowed("workspace:ward-7/alice-r", "mirror.fetch", format!("package:pkg{i}@1.0"))
    }
}

impl TestDb {
    /// `n` mirror fetches (signed by the mirror) interleaved with API heartbeats (signed by the
    /// API, which seals a checkpoint every 10 entries and publishes each into `export`).
    async fn two_writer_log(&self, n: usize, export: &std::path::Path) {
        let api = self
            .store_with(StoreOptions {
                writer: Some(Writer::new(writers::API, api_key())),
                signing_key: Some(api_key()),
                checkpoint_every: 10,
                checkpoint_interval: std::time::Duration::from_secs(3600),
                checkpoint_export: Some(export.to_owned()),
                ..StoreOptions::default()
            })
            .await;
        let mirror = self
            .store_with(StoreOptions {
                writer: Some(Writer::new(writers::MIRROR, mirror_key())),
                ..StoreOptions::default()
            })
            .await;
        for i in 0..n {
            if i % 2 == 0 {
                mirror.append(fetch(i)).await.unwrap();
            } else {
                api.append(event(i)).await.unwrap();
            }
        }
        mirror.close().await;
        api.close().await;
    }

    async fn verify_with(&self, published: Option<&std::path::Path>) -> Report {
        let store = Store::open_read_only(&self.url).await.unwrap();
        let options = VerifyOptions {
            keys: vec![api_key().verifying_key()],
            writers: Some(all_writer_keys()),
            published: published.map(|p| read_exported_checkpoints(p).unwrap()),
        };
        verify(&store, &options).await.unwrap()
    }

    /// What a compromised mirror with the owner's rights does after removing checkpoints: it
    /// rewrites one of its own entries (`seq`) in the now unsealed range, recomputes every hash
    /// after it and re-signs each mirror entry with the mirror's key. API entries after it
    /// cannot be re-signed, so the attack rewrites only a tail of mirror entries: `seq` must be
    /// after the last API entry.
    async fn rewrite_tail(&self, from: i64) {
        let store = Store::open_read_only(&self.url).await.unwrap();
        let rows = store.entries_from(from, 1000).await.unwrap();
        let mut prev = rows[0].0.prev_hash;
        let mirror = Writer::new(writers::MIRROR, mirror_key());
        let mut attack = Vec::new();
        for (mut raw, _) in rows {
            assert_eq!(raw.action, "mirror.fetch", "the tail holds only the mirror's entries");
            if raw.seq == from {
                raw.object = "package:innocent@1.0".into();
                attack.push(format!("UPDATE audit_log SET object = 'package:innocent@1.0' WHERE seq = {from}"));
            }
            let h = hash::entry_hash(&raw.fields_as(raw.seq), &prev);
            attack.push(format!(
                "UPDATE audit_log SET prev_hash = {}, hash = {}, signature = {} WHERE seq = {}",
                self.blob(&prev),
                self.blob(&h),
                self.blob(&mirror.sign(&h)),
                raw.seq
            ));
            prev = h;
        }
        self.attack(&attack).await;
    }
}

async fn a_mirror_forging_an_approval_is_named(db: TestDb) {
    let export = tempfile::tempdir().unwrap();
    db.two_writer_log(6, export.path()).await;
    let intact = db.verify_with(Some(export.path())).await;
    assert!(intact.is_intact(), "{intact:?}");
    assert_eq!((intact.entries_authenticated, intact.writers_without_key.len()), (6, 0));

    // The mirror appends a correctly chained approval, signed with its own key. On SQLite
    // nothing stops the insert (on PostgreSQL its role does: see the roles test); verify names it.
    let mirror = db
        .store_with(StoreOptions {
            writer: Some(Writer::new(writers::MIRROR, mirror_key())),
            ..StoreOptions::default()
        })
        .await;
    let forged = AuditEvent::allowed("user:carol@ward7.example", "request.approve", "workspacerequest:ward-7/r-1");
    let seq = mirror.append(forged.clone()).await;
    mirror.close().await;
    if db.backend == Backend::Postgres {
        // The owner's connection has no writer role; the database takes it, verify must not.
        assert!(seq.is_ok(), "{seq:?}");
    }
    let seq = seq.unwrap();
    // The API seals it into its next checkpoint, as it would in production.
    let api = db
        .store_with(StoreOptions {
            writer: Some(Writer::new(writers::API, api_key())),
            signing_key: Some(api_key()),
            ..StoreOptions::default()
        })
        .await;
    api.append(event(99)).await.unwrap();
    api.close().await;
    let report = db.verify_with(None).await;
    assert_finding(&report, Tamper::WrongWriter, seq);
    assert!(report.finding.unwrap().message.contains("written by mirror"));

    // Claiming to be the API does not help: the signature is not the API's.
    let store = Store::open_read_only(&db.url).await.unwrap();
    let (raw, h) = store.entries_from(seq, 1).await.unwrap().remove(0);
    assert_eq!(raw.action, "request.approve");
    db.attack(&[format!("UPDATE audit_log SET writer = 'api' WHERE seq = {seq}")]).await;
    assert_finding(&db.verify_with(None).await, Tamper::EntryForged, seq);
    // Nor does leaving it unsigned.
    db.sql(&["UPDATE audit_log SET writer = NULL, signature = NULL WHERE seq = 7"]).await.unwrap();
    assert_finding(&db.verify_with(None).await, Tamper::Unsigned, seq);
    let _ = h;
}

async fn rollback_of_the_newest_checkpoint_is_caught_by_the_published_copy(db: TestDb) {
    let export = tempfile::tempdir().unwrap();
    // 30 entries, checkpoints 1..=2 (the API's tenth entry, then close), then 3 more fetches
    // sealed by checkpoint 3 at the API's close: entries 31..=33 are the mirror's alone.
    db.two_writer_log(30, export.path()).await;
    let api = db
        .store_with(StoreOptions {
            writer: Some(Writer::new(writers::API, api_key())),
            signing_key: Some(api_key()),
            checkpoint_export: Some(export.path().to_owned()),
            ..StoreOptions::default()
        })
        .await;
    let mirror = db
        .store_with(StoreOptions {
            writer: Some(Writer::new(writers::MIRROR, mirror_key())),
            ..StoreOptions::default()
        })
        .await;
    for i in 100..103 {
        mirror.append(fetch(i)).await.unwrap();
    }
    mirror.close().await;
    api.close().await;
    let before = db.verify_with(Some(export.path())).await;
    assert!(before.is_intact(), "{before:?}");
    assert_eq!((before.checkpoints, before.unsealed, before.published_checkpoints), (3, 0, Some(3)));

    // The attack of the issue: delete the newest checkpoint row, and the entries it sealed are
    // unsealed again; rewrite one and recompute (and re-sign) everything after it.
    db.attack(&["DELETE FROM audit_checkpoint WHERE id = 3".into()]).await;
    db.rewrite_tail(32).await;
    let fooled = db.verify_with(None).await;
    assert!(fooled.is_intact(), "without the published checkpoints the rollback is invisible: {fooled:?}");
    assert_eq!(fooled.unsealed, 3);

    let caught = db.verify_with(Some(export.path())).await;
    assert_finding(&caught, Tamper::RolledBack, 31);
    let f = caught.finding.unwrap();
    assert_eq!(f.checkpoint, Some(3));
    assert!(f.message.contains("missing from it"), "{}", f.message);
}

async fn rollback_of_every_checkpoint_is_caught_by_the_published_copy(db: TestDb) {
    let export = tempfile::tempdir().unwrap();
    // Checkpoint 1 seals 1..=20 (the API's tenth entry), checkpoint 2 21..=24 (close).
    db.two_writer_log(24, export.path()).await;
    let published = read_exported_checkpoints(export.path()).unwrap();
    assert_eq!(published.len(), 2);
    db.attack(&["DELETE FROM audit_checkpoint".into()]).await;
    let fooled = db.verify_with(None).await;
    assert!(fooled.is_intact() && fooled.checkpoints == 0, "{fooled:?}");
    assert_finding(&db.verify_with(Some(export.path())).await, Tamper::RolledBack, 1);

    // A published file that someone edited is not evidence: it must carry the API's signature.
    let file = export.path().join(noexit_operator::audit::store::checkpoint_file_name(2));
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    v["lastSeq"] = 23.into();
    std::fs::write(&file, v.to_string()).unwrap();
    let report = db.verify_with(Some(export.path())).await;
    assert_finding(&report, Tamper::RolledBack, 1);
    let forged = read_exported_checkpoints(export.path()).unwrap();
    let store = Store::open_read_only(&db.url).await.unwrap();
    let only_forged = VerifyOptions {
        keys: vec![api_key().verifying_key()],
        writers: Some(all_writer_keys()),
        published: Some(vec![forged[1].clone()]),
    };
    assert_finding(&verify(&store, &only_forged).await.unwrap(), Tamper::CheckpointForged, published[1].body.first_seq);
}

async fn sigterm_style_close_publishes_a_checkpoint_covering_the_last_entry(db: TestDb) {
    let export = tempfile::tempdir().unwrap();
    let api = db
        .store_with(StoreOptions {
            writer: Some(Writer::new(writers::API, api_key())),
            signing_key: Some(api_key()),
            checkpoint_export: Some(export.path().to_owned()),
            checkpoint_interval: std::time::Duration::from_secs(3600),
            ..StoreOptions::default()
        })
        .await;
    for i in 0..3 {
        api.append(event(i)).await.unwrap();
    }
    assert!(read_exported_checkpoints(export.path()).unwrap().is_empty(), "nothing sealed yet");
    api.close().await;
    let published = read_exported_checkpoints(export.path()).unwrap();
    assert_eq!(published.iter().map(|c| (c.body.first_seq, c.body.last_seq)).collect::<Vec<_>>(), [(1, 3)]);
    let report = db.verify_with(Some(export.path())).await;
    assert!(report.is_intact() && report.unsealed == 0, "{report:?}");
}

/// The gateway signs its `gateway.*` entries as the writer `gateway`; the API's key, which
/// signed them before the gateway had its own, no longer makes them good.
async fn gateway_entries_verify_as_the_gateways_and_not_as_the_apis(db: TestDb) {
    let api = db
        .store_with(StoreOptions {
            writer: Some(Writer::new(writers::API, api_key())),
            signing_key: Some(api_key()),
            ..StoreOptions::default()
        })
        .await;
    let gateway = db
        .store_with(StoreOptions {
            writer: Some(Writer::new(writers::GATEWAY, gateway_key())),
            ..StoreOptions::default()
        })
        .await;
    api.append(event(1)).await.unwrap();
    gateway.append(connect("user:alice@ward7.example")).await.unwrap();
    gateway.close().await;
    let report = db.verify_with(None).await;
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.entries_authenticated, 2);
    assert_eq!(report.writers.get("gateway"), Some(&1));

    // Without the gateway's public key the log is not authenticated (never "intact" by default).
    let store = Store::open_read_only(&db.url).await.unwrap();
    let mut without = WriterKeys::new();
    without.add(writers::API, api_key().verifying_key());
    let options = VerifyOptions { keys: vec![api_key().verifying_key()], writers: Some(without), published: None };
    let r = verify(&store, &options).await.unwrap();
    assert_eq!(r.writers_without_key, vec!["gateway".to_owned()], "{r:?}");

    // A gateway.* entry signed by the API (as single-host mode once did) is the wrong writer's.
    let seq = api.append(connect("user:mallory@ward7.example")).await.unwrap();
    api.close().await;
    assert_finding(&db.verify_with(None).await, Tamper::WrongWriter, seq);
}

/// Each writer its own PostgreSQL role: the mirror's role appends only `mirror.*` entries as
/// writer `mirror`, cannot change, delete or read back entries, and cannot drop the triggers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_writer_roles_may_append_only_their_own_entries() {
    let Some(db) = TestDb::postgres("writer_roles") else { return };
    let args = noexit_operator::audit::roles::RolesArgs {
        database_url: db.url.clone(),
        api: "noexit_api".into(),
        mirror: "noexit_mirror".into(),
        webhook: "noexit_webhook".into(),
        dns: "noexit_dns".into(),
        gateway: "noexit_gateway".into(),
        print_sql: false,
    };
    let message = noexit_operator::audit::roles::run(&args).await.unwrap();
    assert!(message.contains("noexit_mirror (mirror)"), "{message}");
    // Running it again (every upgrade does) is harmless.
    noexit_operator::audit::roles::run(&args).await.unwrap();
    let as_role = |role: &str| db.url.replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);

    let export = tempfile::tempdir().unwrap();
    let api = Store::connect_with(
        &as_role("noexit_api"),
        StoreOptions {
            writer: Some(Writer::new(writers::API, api_key())),
            signing_key: Some(api_key()),
            checkpoint_export: Some(export.path().to_owned()),
            ..StoreOptions::default()
        },
    )
    .await
    .expect("the API's role connects without migrating");
    let mirror = Store::connect_with(
        &as_role("noexit_mirror"),
        StoreOptions { writer: Some(Writer::new(writers::MIRROR, mirror_key())), ..StoreOptions::default() },
    )
    .await
    .unwrap();
    api.append(event(1)).await.unwrap();
    mirror.append(fetch(2)).await.unwrap();
    api.append(AuditEvent::allowed("user:carol@ward7.example", "request.approve", "workspacerequest:ward-7/r-1"))
        .await
        .unwrap();

    // The forged approval of the issue: refused by the database.
    let forged = AuditEvent::allowed("user:carol@ward7.example", "request.approve", "workspacerequest:ward-7/r-2");
    let err = mirror.append(forged).await.unwrap_err().to_string();
    assert!(err.contains("may append only mirror.* entries"), "{err}");
    // The API may not write the mirror's entries either.
    let err = api.append(fetch(3)).await.unwrap_err().to_string();
    assert!(err.contains("belongs to another writer"), "{err}");
    // The gateway appends its own entries and sessions, nothing of others'; nor may the API
    // write as the gateway.
    let gateway = Store::connect_with(
        &as_role("noexit_gateway"),
        StoreOptions { writer: Some(Writer::new(writers::GATEWAY, gateway_key())), ..StoreOptions::default() },
    )
    .await
    .unwrap();
    gateway.append(connect("user:alice@ward7.example")).await.unwrap();
    let err = gateway.append(event(4)).await.unwrap_err().to_string();
    assert!(err.contains("may append only gateway.* entries"), "{err}");
    let err = api.append(connect("user:mallory@ward7.example")).await.unwrap_err().to_string();
    assert!(err.contains("belongs to another writer"), "{err}");
    let sessions = noexit_operator::api::ApiStore::new(gateway.pool().clone());
    let ws = noexit_crds::agent::WorkspaceIdentity { project: "ward-7".into(), name: "alice-r".into() };
    let ev: noexit_crds::agent::SessionEvent = serde_json::from_value(serde_json::json!({
        "action": "desktopConnect", "user": "alice", "session": "s1", "source": "gateway"
    }))
    .unwrap();
    sessions.insert_session(uuid::Uuid::now_v7(), &ws, chrono::Utc::now(), &ev).await.expect("the gateway's sessions");
    gateway.close().await;

    let mirror_sql = |sql: &'static str| {
        let url = as_role("noexit_mirror");
        async move {
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            let r = sqlx::raw_sql(sql).execute(&pool).await.map(|_| ()).map_err(|e| e.to_string());
            pool.close().await;
            r
        }
    };
    for (sql, expect) in [
        (
            "INSERT INTO audit_log (seq, time_us, actor, action, object, outcome, detail, prev_hash, hash, writer) \
             VALUES (100, 0, 'user:x', 'request.approve', 'o', 'allowed', '{}', '\\x00', '\\x00', 'api')",
            "writes as writer mirror",
        ),
        ("UPDATE audit_log SET object = 'x' WHERE seq = 2", "permission denied"),
        ("DELETE FROM audit_log WHERE seq = 2", "permission denied"),
        ("TRUNCATE audit_log", "permission denied"),
        ("DROP TRIGGER audit_log_append_only ON audit_log", "must be owner"),
        ("ALTER TABLE audit_log DISABLE TRIGGER USER", "must be owner"),
        ("DROP TABLE audit_checkpoint", "must be owner"),
        ("DELETE FROM audit_checkpoint", "permission denied"),
        ("DELETE FROM audit_writers", "permission denied"),
        ("SELECT actor, object FROM audit_log", "permission denied"),
        ("CREATE TABLE audit_log2 (x int)", "permission denied"),
    ] {
        let err = mirror_sql(sql).await.expect_err(sql);
        assert!(err.contains(expect), "{sql}: {err}");
    }
    let api_pool = sqlx::PgPool::connect(&as_role("noexit_api")).await.unwrap();
    for sql in
        ["UPDATE audit_log SET object = 'x' WHERE seq = 1", "DELETE FROM audit_checkpoint", "DROP TABLE audit_log"]
    {
        let err = sqlx::raw_sql(sql).execute(&api_pool).await.expect_err(sql).to_string();
        assert!(err.contains("permission denied") || err.contains("must be owner"), "{sql}: {err}");
    }
    // The API's own tables stay writable for it.
    sqlx::raw_sql("DELETE FROM agent_heartbeats WHERE project = 'none'").execute(&api_pool).await.unwrap();
    api_pool.close().await;

    mirror.close().await;
    api.close().await;
    let report = db.verify_with(Some(export.path())).await;
    assert!(report.is_intact(), "{report:?}");
    assert_eq!((report.entries, report.entries_authenticated, report.unsealed), (4, 4, 0));
    assert_eq!(report.writers.get("mirror"), Some(&1));
    assert_eq!(report.writers.get("gateway"), Some(&1));
}
