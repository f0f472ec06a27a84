//! The API's tables (sessions, violations, heartbeats, output requests, revocations) on SQLite or
//! PostgreSQL. The SQL is written once (`$n` placeholders work on both); [`on_db!`] runs it on
//! whichever pool is configured. Writes return only after the database committed them.

use chrono::{DateTime, Utc};
use noexit_crds::agent::{Heartbeat, SessionEvent, Violation, WorkspaceIdentity};
use serde::Serialize;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        Self::Unavailable(e.to_string())
    }
}

/// The audit store's connection pool: the API keeps its tables in the same database, and the
/// audit store's migrator applies `0002_api.sql` with its own.
pub type Db = noexit_audit::store::Pool;

/// Run the same expression with `$pool` bound to the SQLite or the PostgreSQL pool.
macro_rules! on_db {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::store::Db::Sqlite($pool) => $body,
            $crate::store::Db::Postgres($pool) => $body,
        }
    };
}
pub(crate) use on_db;

#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct SessionRow {
    pub id: String,
    pub workspace: String,
    pub at: DateTime<Utc>,
    pub action: String,
    pub username: String,
    pub session: Option<String>,
    pub source: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatRow {
    pub workspace: String,
    pub at: DateTime<Utc>,
    pub agent_version: String,
    pub egress_locked: bool,
    pub active_sessions: i64,
    pub spool_depth: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct RevocationRow {
    pub serial: String,
    pub project: String,
    pub workspace: String,
}

fn enum_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "unknown".into(),
    }
}

pub(crate) fn clamp_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// One write of an agent report, committed together with others in one transaction.
#[derive(Debug)]
enum Op {
    Session { id: Uuid, ws: WorkspaceIdentity, at: DateTime<Utc>, ev: SessionEvent },
    Violation { id: Uuid, ws: WorkspaceIdentity, at: DateTime<Utc>, v: Violation },
    Heartbeat { ws: WorkspaceIdentity, hb: Heartbeat },
}

const INSERT_SESSION: &str = "INSERT INTO agent_sessions \
    (id, project, workspace, at, action, username, session, source, idle_seconds, received_at) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO NOTHING";
const INSERT_VIOLATION: &str = "INSERT INTO agent_violations \
    (id, project, workspace, at, kind, count, detail, received_at) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING";
const UPSERT_HEARTBEAT: &str = "INSERT INTO agent_heartbeats \
    (project, workspace, at, agent_version, egress_locked, egress_detail, spool_depth, active_sessions, received_at) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
    ON CONFLICT (project, workspace) DO UPDATE SET at = excluded.at, agent_version = excluded.agent_version, \
    egress_locked = excluded.egress_locked, egress_detail = excluded.egress_detail, \
    spool_depth = excluded.spool_depth, active_sessions = excluded.active_sessions, \
    received_at = excluded.received_at";

/// Most reports committed in one transaction.
const MAX_GROUP: usize = 256;

type Reply = tokio::sync::oneshot::Sender<Result<bool, StoreError>>;

/// Commit everything waiting in one transaction: one fsync for a burst of reports instead of
/// one each. Every caller hears back only after the commit.
async fn group_writer(db: Db, mut rx: tokio::sync::mpsc::Receiver<(Op, Reply)>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let ops: Vec<&Op> = batch.iter().map(|(op, _)| op).collect();
        match commit_group(&db, &ops).await {
            Ok(results) => {
                for ((_, reply), new) in batch.into_iter().zip(results) {
                    let _ = reply.send(Ok(new));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for (_, reply) in batch {
                    let _ = reply.send(Err(StoreError::Unavailable(message.clone())));
                }
            }
        }
    }
}

async fn commit_group(db: &Db, ops: &[&Op]) -> Result<Vec<bool>, sqlx::Error> {
    on_db!(db, pool => {
        let mut tx = pool.begin().await?;
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            let affected = match op {
                Op::Session { id, ws, at, ev } => sqlx::query(INSERT_SESSION)
                    .bind(id.to_string())
                    .bind(&ws.project)
                    .bind(&ws.name)
                    .bind(at)
                    .bind(enum_name(&ev.action))
                    .bind(&ev.user)
                    .bind(&ev.session)
                    .bind(&ev.source)
                    .bind(ev.idle_seconds.map(clamp_i64))
                    .bind(Utc::now())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected(),
                Op::Violation { id, ws, at, v } => sqlx::query(INSERT_VIOLATION)
                    .bind(id.to_string())
                    .bind(&ws.project)
                    .bind(&ws.name)
                    .bind(at)
                    .bind(enum_name(&v.kind))
                    .bind(clamp_i64(v.count))
                    .bind(&v.detail)
                    .bind(Utc::now())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected(),
                Op::Heartbeat { ws, hb } => sqlx::query(UPSERT_HEARTBEAT)
                    .bind(&ws.project)
                    .bind(&ws.name)
                    .bind(hb.at)
                    .bind(&hb.agent_version)
                    .bind(hb.egress.locked)
                    .bind(&hb.egress.detail)
                    .bind(clamp_i64(hb.spool_depth))
                    .bind(i64::from(hb.active_sessions))
                    .bind(Utc::now())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected(),
            };
            results.push(affected == 1);
        }
        tx.commit().await?;
        Ok(results)
    })
}

/// The API's tables.
#[derive(Clone, Debug)]
pub struct ApiStore {
    db: Db,
    writer: tokio::sync::mpsc::Sender<(Op, Reply)>,
}

impl ApiStore {
    /// The store on `db`, with its group-commit writer (needs a tokio runtime).
    pub fn new(db: Db) -> Self {
        let (writer, rx) = tokio::sync::mpsc::channel(4096);
        tokio::spawn(group_writer(db.clone(), rx));
        Self { db, writer }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    async fn submit(&self, op: Op) -> Result<bool, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let gone = || StoreError::Unavailable("the report writer stopped".into());
        self.writer.send((op, reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Store a session event once; `true` if it was new.
    pub async fn insert_session(
        &self,
        id: Uuid,
        ws: &WorkspaceIdentity,
        at: DateTime<Utc>,
        ev: &SessionEvent,
    ) -> Result<bool, StoreError> {
        self.submit(Op::Session { id, ws: ws.clone(), at, ev: ev.clone() }).await
    }

    /// Store a violation once; `true` if it was new.
    pub async fn insert_violation(
        &self,
        id: Uuid,
        ws: &WorkspaceIdentity,
        at: DateTime<Utc>,
        v: &Violation,
    ) -> Result<bool, StoreError> {
        self.submit(Op::Violation { id, ws: ws.clone(), at, v: v.clone() }).await
    }

    /// Keep the latest heartbeat of the workspace.
    pub async fn upsert_heartbeat(&self, ws: &WorkspaceIdentity, hb: &Heartbeat) -> Result<(), StoreError> {
        self.submit(Op::Heartbeat { ws: ws.clone(), hb: hb.clone() }).await.map(|_| ())
    }

    /// Record a revocation once; `true` if it was new.
    pub async fn insert_revocation(
        &self,
        serial: &str,
        ws: &WorkspaceIdentity,
        reason: &str,
        by: &str,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "INSERT INTO certificate_revocations (serial, project, workspace, reason, revoked_by, revoked_at) \
            VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (serial) DO NOTHING";
        let done = on_db!(&self.db, pool => sqlx::query(SQL)
            .bind(serial)
            .bind(&ws.project)
            .bind(&ws.name)
            .bind(reason)
            .bind(by)
            .bind(Utc::now())
            .execute(pool)
            .await?
            .rows_affected());
        Ok(done == 1)
    }

    pub async fn revocations(&self) -> Result<Vec<RevocationRow>, StoreError> {
        const SQL: &str = "SELECT serial, project, workspace FROM certificate_revocations";
        Ok(on_db!(&self.db, pool => sqlx::query_as::<_, RevocationRow>(SQL).fetch_all(pool).await?))
    }

    /// The most recent session events of a project, newest first.
    pub async fn sessions(&self, project: &str, limit: i64) -> Result<Vec<SessionRow>, StoreError> {
        const SQL: &str = "SELECT id, workspace, at, action, username, session, source FROM agent_sessions \
            WHERE project = $1 ORDER BY at DESC, id LIMIT $2";
        Ok(on_db!(&self.db, pool => sqlx::query_as::<_, SessionRow>(SQL)
            .bind(project)
            .bind(limit)
            .fetch_all(pool)
            .await?))
    }

    pub async fn heartbeats(&self, project: &str) -> Result<Vec<HeartbeatRow>, StoreError> {
        const SQL: &str = "SELECT workspace, at, agent_version, egress_locked, active_sessions, spool_depth \
            FROM agent_heartbeats WHERE project = $1 ORDER BY workspace";
        Ok(on_db!(&self.db, pool => sqlx::query_as::<_, HeartbeatRow>(SQL)
            .bind(project)
            .fetch_all(pool)
            .await?))
    }

    /// Number of stored session and violation events (tests and benchmarks).
    pub async fn event_count(&self) -> Result<i64, StoreError> {
        const SQL: &str = "SELECT (SELECT COUNT(*) FROM agent_sessions) + (SELECT COUNT(*) FROM agent_violations)";
        Ok(on_db!(&self.db, pool => sqlx::query_scalar::<_, i64>(SQL).fetch_one(pool).await?))
    }
}

/// Where an inbox item is in its life: submitted, then approved or rejected by an admin who is
/// not the submitter, then delivered by the workspace's agent.
pub const INBOX_PENDING: &str = "pendingApproval";
pub const INBOX_APPROVED: &str = "approved";
pub const INBOX_REJECTED: &str = "rejected";
pub const INBOX_DELIVERED: &str = "delivered";

/// One file submitted for a workspace's `/inbox` (ingress).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct InboxRow {
    pub id: String,
    pub project: String,
    pub workspace: String,
    pub file_name: String,
    pub size: i64,
    pub sha256: String,
    /// What the content sniffing found (`text`, `pdf`).
    pub media: String,
    pub submitted_by: String,
    pub submitted_at: DateTime<Utc>,
    pub state: String,
    pub decided_by: Option<String>,
    pub decided_at: Option<DateTime<Utc>>,
    pub reason: Option<String>,
    pub delivered_at: Option<DateTime<Utc>>,
    /// The name the agent gave the file in `/inbox` (differs on a collision).
    pub placed_as: Option<String>,
    /// The sealed content on the API's disk; never shown.
    #[serde(skip)]
    pub sealed_path: String,
}

const INBOX_COLUMNS: &str = "id, project, workspace, file_name, size, sha256, media, submitted_by, submitted_at, \
    state, decided_by, decided_at, reason, delivered_at, placed_as, sealed_path";

/// Ingress: the inbox table.
impl ApiStore {
    pub async fn insert_inbox(&self, row: &InboxRow) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO inbox_items ({INBOX_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
        );
        on_db!(&self.db, pool => sqlx::query(&sql)
            .bind(&row.id)
            .bind(&row.project)
            .bind(&row.workspace)
            .bind(&row.file_name)
            .bind(row.size)
            .bind(&row.sha256)
            .bind(&row.media)
            .bind(&row.submitted_by)
            .bind(row.submitted_at)
            .bind(&row.state)
            .bind(&row.decided_by)
            .bind(row.decided_at)
            .bind(&row.reason)
            .bind(row.delivered_at)
            .bind(&row.placed_as)
            .bind(&row.sealed_path)
            .execute(pool)
            .await
            .map(|_| ())?);
        Ok(())
    }

    pub async fn inbox_item(&self, id: Uuid) -> Result<Option<InboxRow>, StoreError> {
        let sql = format!("SELECT {INBOX_COLUMNS} FROM inbox_items WHERE id = $1");
        Ok(on_db!(&self.db, pool => sqlx::query_as::<_, InboxRow>(&sql)
            .bind(id.to_string())
            .fetch_optional(pool)
            .await?))
    }

    /// A project's items, newest first, at most `limit`.
    pub async fn inbox_items(&self, project: &str, limit: i64) -> Result<Vec<InboxRow>, StoreError> {
        let sql = format!(
            "SELECT {INBOX_COLUMNS} FROM inbox_items WHERE project = $1 ORDER BY submitted_at DESC, id LIMIT $2"
        );
        Ok(on_db!(&self.db, pool => sqlx::query_as::<_, InboxRow>(&sql)
            .bind(project)
            .bind(limit)
            .fetch_all(pool)
            .await?))
    }

    /// Approved items a workspace's agent has not delivered yet, oldest first.
    pub async fn inbox_to_deliver(&self, ws: &WorkspaceIdentity, limit: i64) -> Result<Vec<InboxRow>, StoreError> {
        let sql = format!(
            "SELECT {INBOX_COLUMNS} FROM inbox_items WHERE project = $1 AND workspace = $2 AND state = $3 \
             ORDER BY submitted_at, id LIMIT $4"
        );
        Ok(on_db!(&self.db, pool => sqlx::query_as::<_, InboxRow>(&sql)
            .bind(&ws.project)
            .bind(&ws.name)
            .bind(INBOX_APPROVED)
            .bind(limit)
            .fetch_all(pool)
            .await?))
    }

    /// Approve or reject a pending item; `false` if it was no longer pending (someone decided
    /// first). The decision is taken once, by whoever's update lands.
    pub async fn decide_inbox(&self, id: Uuid, state: &str, by: &str, reason: &str) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE inbox_items SET state = $1, decided_by = $2, decided_at = $3, reason = $4 \
            WHERE id = $5 AND state = $6";
        let done = on_db!(&self.db, pool => sqlx::query(SQL)
            .bind(state)
            .bind(by)
            .bind(Utc::now())
            .bind(reason)
            .bind(id.to_string())
            .bind(INBOX_PENDING)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(done == 1)
    }

    /// The agent placed an approved item; `false` if it was not approved (or already delivered).
    pub async fn mark_inbox_delivered(&self, id: Uuid, placed_as: &str) -> Result<bool, StoreError> {
        const SQL: &str =
            "UPDATE inbox_items SET state = $1, delivered_at = $2, placed_as = $3 WHERE id = $4 AND state = $5";
        let done = on_db!(&self.db, pool => sqlx::query(SQL)
            .bind(INBOX_DELIVERED)
            .bind(Utc::now())
            .bind(placed_as)
            .bind(id.to_string())
            .bind(INBOX_APPROVED)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(done == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use noexit_crds::agent::{SessionAction, ViolationKind};

    async fn sqlite() -> (tempfile::TempDir, ApiStore) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("api.db").display());
        let audit = noexit_audit::Store::connect(&url).await.unwrap();
        (dir, ApiStore::new(audit.pool().clone()))
    }

    #[tokio::test]
    async fn events_are_stored_once_and_revocations_listed() {
        let (_dir, store) = sqlite().await;
        let ws = WorkspaceIdentity { project: "ward-7".into(), name: "alice".into() };
        let id = Uuid::new_v4();
        let ev = SessionEvent {
            action: SessionAction::Login,
            user: "alice".into(),
            session: Some("pts/0".into()),
            source: None,
            idle_seconds: None,
        };
        assert!(store.insert_session(id, &ws, Utc::now(), &ev).await.unwrap());
        assert!(!store.insert_session(id, &ws, Utc::now(), &ev).await.unwrap());
        let v = Violation { kind: ViolationKind::EgressBlocked, count: 3, detail: "1.1.1.1:443".into() };
        assert!(store.insert_violation(Uuid::new_v4(), &ws, Utc::now(), &v).await.unwrap());
        assert_eq!(store.event_count().await.unwrap(), 2);
        let sessions = store.sessions("ward-7", 10).await.unwrap();
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0].action, "login");
        assert!(store.insert_revocation("ab01", &ws, "deleted", "operator").await.unwrap());
        assert!(!store.insert_revocation("ab01", &ws, "deleted", "operator").await.unwrap());
        assert_eq!(store.revocations().await.unwrap().len(), 1);
    }
}
