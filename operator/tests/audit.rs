//! The audit store and `verify` on SQLite and on a real PostgreSQL: every case runs on both.

mod support;

use std::sync::Arc;

use noexit_operator::audit::{
    AuditEvent, Outcome,
    store::{Backend, Filter, Store, StoreOptions},
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
    #[allow(dead_code)]
    async fn disable_triggers(&self) {
        let statements: &[&str] = match self.backend {
            Backend::Sqlite => &[
                "DROP TRIGGER audit_log_no_update",
                "DROP TRIGGER audit_log_no_delete",
                "DROP TRIGGER audit_checkpoint_no_update",
                "DROP TRIGGER audit_checkpoint_no_delete",
            ],
            Backend::Postgres => {
                &["ALTER TABLE audit_log DISABLE TRIGGER USER", "ALTER TABLE audit_checkpoint DISABLE TRIGGER USER"]
            }
        };
        self.sql(statements).await.unwrap();
    }
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
    database_refuses_update_and_delete,
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
