//! The audit store: SQLite (embedded default) or PostgreSQL, through `sqlx`, same schema and
//! behaviour on both.
//!
//! Writes go through one writer task per store (group commit): callers queue events on a bounded
//! channel, the writer takes everything queued (up to `max_batch`), writes it in one transaction
//! and answers each caller only after the commit. Every transaction re-reads the chain head under
//! a write lock (`BEGIN IMMEDIATE` on SQLite, an advisory lock on PostgreSQL), so several
//! processes may append to the same database without forking the chain.

use std::{borrow::Cow, collections::HashMap, str::FromStr, sync::Mutex, time::Duration};

use chrono::{DateTime, Utc};
use ed25519_dalek::{Signer, SigningKey};
use futures::{TryStreamExt, future::BoxFuture};
use sqlx::{
    migrate::{Migration, MigrationType, Migrator},
    postgres::{PgConnectOptions, PgPool, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous},
};
use tokio::sync::{mpsc, oneshot};

use super::hash::{self, CheckpointBody, EntryFields, GENESIS, Hash};
use super::writers::Writer;
use super::{AuditError, AuditEvent, AuditSink, Outcome, keys};

/// Position of an entry in the log: 1, 2, 3, … without gaps.
pub type Seq = i64;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/migrations.rs"));
}

/// Which database a store talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The connection pool, for components that keep their own tables in the same database
/// (their migrations live next to ours in `operator/audit/migrations/<backend>/`).
#[derive(Clone, Debug)]
pub enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Pool {
    pub fn backend(&self) -> Backend {
        match self {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }
}

/// Runs `$body` once per backend with `$p` bound to the concrete pool: the SQL is shared (`$1`
/// placeholders work on both), the Rust types differ.
/// Other modules of this crate may use it too: `crate::store::with_pool!(store.pool(), p => …)`.
macro_rules! with_pool {
    ($pool:expr, $p:ident => $body:expr) => {
        match $pool {
            $crate::store::Pool::Sqlite($p) => $body,
            $crate::store::Pool::Postgres($p) => $body,
        }
    };
}
#[allow(unused_imports)] // exported for the API's own tables
pub(crate) use with_pool;

/// Knobs of the writer; the defaults suit the API.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Signs checkpoints; without it no checkpoints are written (verify then reports that).
    pub signing_key: Option<SigningKey>,
    /// Names and signs every entry this store appends; without it entries are unsigned (and
    /// `verify` reports them).
    pub writer: Option<Writer>,
    /// Every checkpoint is also written to this directory (`checkpoint-<id>.json`), outside
    /// the database, so that `verify --checkpoints` catches a rollback.
    pub checkpoint_export: Option<std::path::PathBuf>,
    /// A checkpoint after this many new entries…
    pub checkpoint_every: u64,
    /// …or after this long, whichever comes first (only when there are new entries).
    pub checkpoint_interval: Duration,
    /// Most events written in one transaction.
    pub max_batch: usize,
    /// Events that may wait for the writer before `append` itself waits (back-pressure).
    pub queue: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            signing_key: None,
            writer: None,
            checkpoint_export: None,
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(10),
            max_batch: 256,
            queue: 4096,
        }
    }
}

/// One stored entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub seq: Seq,
    pub time: DateTime<Utc>,
    pub event: AuditEvent,
    pub idempotency_key: Option<String>,
    pub prev_hash: Hash,
    pub hash: Hash,
    /// The component that wrote it (`api`, `mirror`, `webhook`, `dns`, `gateway`), if named.
    pub writer: Option<String>,
    /// The writer's ed25519 signature over the entry hash.
    pub signature: Option<Vec<u8>>,
}

impl Entry {
    /// One line of `noexit audit export`: flat camelCase JSON with everything needed to
    /// recompute the hash (`detail` is the stored JSON text, parsed).
    pub fn to_json(&self) -> serde_json::Value {
        let (outcome, reason) = match &self.event.outcome {
            Outcome::Allowed => ("allowed", None),
            Outcome::Refused(r) => ("refused", Some(r.as_str())),
        };
        serde_json::json!({
            "seq": self.seq,
            "time": self.time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "actor": self.event.actor,
            "role": self.event.role,
            "action": self.event.action,
            "object": self.event.object,
            "outcome": outcome,
            "reason": reason,
            "source": self.event.source,
            "detail": self.event.detail,
            "idempotencyKey": self.idempotency_key,
            "prevHash": hex::encode(self.prev_hash),
            "hash": hex::encode(self.hash),
            "writer": self.writer,
            "signature": self.signature.as_ref().map(hex::encode),
        })
    }
}

/// Which entries `query` returns. Empty filter = everything. `action` ending in `*` is a prefix.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub actor: Option<String>,
    pub action: Option<String>,
    pub object: Option<String>,
    /// `Some(false)` = allowed only, `Some(true)` = refused only.
    pub refused: Option<bool>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub after_seq: Option<Seq>,
    pub limit: Option<i64>,
}

/// A stored checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub body: CheckpointBody,
    pub key_id: String,
    pub signature: Vec<u8>,
}

impl Checkpoint {
    /// The form published outside the database (`--checkpoint-export`) and read back by
    /// `verify --checkpoints`.
    pub fn to_json(&self) -> serde_json::Value {
        let b = &self.body;
        serde_json::json!({
            "id": b.id,
            "firstSeq": b.first_seq,
            "lastSeq": b.last_seq,
            "timeUs": b.time_us,
            "merkleRoot": hex::encode(b.merkle_root),
            "headHash": hex::encode(b.head_hash),
            "keyId": self.key_id,
            "signature": hex::encode(&self.signature),
        })
    }

    pub fn from_json(v: &serde_json::Value) -> Result<Checkpoint, String> {
        let int = |k: &str| {
            v.get(k).and_then(|x| x.as_i64()).ok_or_else(|| format!("checkpoint field {k} missing or not a number"))
        };
        let text = |k: &str| {
            v.get(k).and_then(|x| x.as_str()).ok_or_else(|| format!("checkpoint field {k} missing or not a string"))
        };
        let bytes = |k: &str| hex::decode(text(k)?).map_err(|e| format!("checkpoint field {k}: {e}"));
        let hash32 = |k: &str| hash::to_hash(&bytes(k)?).ok_or_else(|| format!("checkpoint field {k} is not 32 bytes"));
        Ok(Checkpoint {
            body: CheckpointBody {
                id: int("id")?,
                first_seq: int("firstSeq")?,
                last_seq: int("lastSeq")?,
                time_us: int("timeUs")?,
                merkle_root: hash32("merkleRoot")?,
                head_hash: hash32("headHash")?,
            },
            key_id: text("keyId")?.to_owned(),
            signature: bytes("signature")?,
        })
    }
}

/// File name of checkpoint `id` in an export directory (sorts by id).
pub fn checkpoint_file_name(id: i64) -> String {
    format!("checkpoint-{id:012}.json")
}

/// Writes `cp` into `dir` unless a file for its id is already there (never overwritten:
/// what was published stays published). Written to a temporary name, synced, then renamed.
pub fn export_checkpoint(dir: &std::path::Path, cp: &Checkpoint) -> std::io::Result<bool> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let path = dir.join(checkpoint_file_name(cp.body.id));
    if path.exists() {
        return Ok(false);
    }
    let tmp = dir.join(format!(".{}.tmp", checkpoint_file_name(cp.body.id)));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(serde_json::to_string_pretty(&cp.to_json()).unwrap_or_default().as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(true)
}

/// Reads published checkpoints: a directory of `*.json` files, or one file holding a JSON
/// object, a JSON array, or one object per line. Sorted by id.
pub fn read_exported_checkpoints(path: &std::path::Path) -> Result<Vec<Checkpoint>, String> {
    let read =
        |p: &std::path::Path| std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let mut texts = Vec::new();
    if path.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        for e in entries.filter_map(Result::ok) {
            let p = e.path();
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".json") && !name.starts_with('.') {
                texts.push((p.clone(), read(&p)?));
            }
        }
    } else {
        texts.push((path.to_owned(), read(path)?));
    }
    let mut out = Vec::new();
    for (p, text) in texts {
        let bad = |e: String| format!("{}: {e}", p.display());
        let values: Vec<serde_json::Value> = match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(serde_json::Value::Array(a)) => a,
            Ok(v) => vec![v],
            Err(_) => text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| serde_json::from_str(l).map_err(|e| bad(e.to_string())))
                .collect::<Result<_, _>>()?,
        };
        for v in values {
            out.push(Checkpoint::from_json(&v).map_err(bad)?);
        }
    }
    out.sort_by_key(|c| c.body.id);
    Ok(out)
}

/// The columns of `audit_log`, in the order every query selects them.
pub(crate) const ENTRY_COLUMNS: &str = "seq, time_us, actor, role, action, object, outcome, reason, source, detail, \
     idempotency_key, prev_hash, hash, writer, signature";

#[derive(sqlx::FromRow)]
pub(crate) struct EntryRow {
    seq: i64,
    time_us: i64,
    actor: String,
    role: Option<String>,
    action: String,
    object: String,
    outcome: String,
    reason: Option<String>,
    source: Option<String>,
    detail: String,
    idempotency_key: Option<String>,
    prev_hash: Vec<u8>,
    hash: Vec<u8>,
    writer: Option<String>,
    signature: Option<Vec<u8>>,
}

impl EntryRow {
    fn fields(&self) -> EntryFields<'_> {
        EntryFields {
            seq: self.seq,
            time_us: self.time_us,
            actor: &self.actor,
            role: self.role.as_deref(),
            action: &self.action,
            object: &self.object,
            refused: self.outcome == "refused",
            reason: self.reason.as_deref(),
            source: self.source.as_deref(),
            detail: &self.detail,
            idempotency_key: self.idempotency_key.as_deref(),
        }
    }

    fn into_entry(self) -> Result<Entry, AuditError> {
        let corrupt = |what: &str| AuditError::Corrupt(format!("entry {}: {what}", self.seq));
        let outcome = match (self.outcome.as_str(), self.reason) {
            ("allowed", _) => Outcome::Allowed,
            ("refused", reason) => Outcome::Refused(reason.unwrap_or_default()),
            _ => return Err(corrupt("outcome is neither allowed nor refused")),
        };
        let detail = serde_json::from_str(&self.detail).map_err(|_| corrupt("detail is not JSON"))?;
        let prev_hash = hash::to_hash(&self.prev_hash).ok_or_else(|| corrupt("prev_hash is not 32 bytes"))?;
        let hash = hash::to_hash(&self.hash).ok_or_else(|| corrupt("hash is not 32 bytes"))?;
        let time = DateTime::from_timestamp_micros(self.time_us).ok_or_else(|| corrupt("time out of range"))?;
        Ok(Entry {
            seq: self.seq,
            time,
            event: AuditEvent {
                actor: self.actor,
                role: self.role,
                action: self.action,
                object: self.object,
                outcome,
                source: self.source,
                detail,
            },
            idempotency_key: self.idempotency_key,
            prev_hash,
            hash,
            writer: self.writer,
            signature: self.signature,
        })
    }
}

#[derive(sqlx::FromRow)]
struct CheckpointRow {
    id: i64,
    first_seq: i64,
    last_seq: i64,
    time_us: i64,
    merkle_root: Vec<u8>,
    head_hash: Vec<u8>,
    key_id: String,
    signature: Vec<u8>,
}

impl CheckpointRow {
    fn into_checkpoint(self) -> Result<Checkpoint, AuditError> {
        let corrupt = |what: &str| AuditError::Corrupt(format!("checkpoint {}: {what} is not 32 bytes", self.id));
        Ok(Checkpoint {
            body: CheckpointBody {
                id: self.id,
                first_seq: self.first_seq,
                last_seq: self.last_seq,
                time_us: self.time_us,
                merkle_root: hash::to_hash(&self.merkle_root).ok_or_else(|| corrupt("merkle_root"))?,
                head_hash: hash::to_hash(&self.head_hash).ok_or_else(|| corrupt("head_hash"))?,
            },
            key_id: self.key_id,
            signature: self.signature,
        })
    }
}

/// An event ready to be written (serialised before it reaches the writer).
struct Pending {
    key: Option<String>,
    event: AuditEvent,
    detail: String,
}

enum Msg {
    Append(Box<Pending>, oneshot::Sender<Result<(Seq, bool), AuditError>>),
    Close(oneshot::Sender<()>),
}

/// The audit log in a database. Share it behind an `Arc`.
pub struct Store {
    pool: Pool,
    writer: Option<mpsc::Sender<Msg>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("backend", &self.backend()).field("writable", &self.writer.is_some()).finish()
    }
}

fn unavailable(e: impl std::fmt::Display) -> AuditError {
    AuditError::Unavailable(e.to_string())
}

/// The URL without credentials, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

async fn open_pool(url: &str, read_only: bool) -> Result<Pool, AuditError> {
    let bad = |e: sqlx::Error| AuditError::Unavailable(format!("cannot open audit store {}: {e}", redact(url)));
    if url.starts_with("sqlite:") {
        let memory = url.contains(":memory:") || url.contains("mode=memory");
        let mut opts = SqliteConnectOptions::from_str(url)
            .map_err(bad)?
            .busy_timeout(Duration::from_secs(10))
            .synchronous(SqliteSynchronous::Full);
        opts = if read_only { opts.read_only(true) } else { opts.create_if_missing(true) };
        if !memory && !read_only {
            opts = opts.journal_mode(SqliteJournalMode::Wal);
        }
        // An in-memory database lives in one connection: keep exactly that one forever.
        let pool = if memory {
            SqlitePoolOptions::new().max_connections(1).min_connections(1).idle_timeout(None).max_lifetime(None)
        } else {
            SqlitePoolOptions::new().max_connections(4)
        };
        Ok(Pool::Sqlite(pool.connect_with(opts).await.map_err(bad)?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let mut opts = PgConnectOptions::from_str(url).map_err(bad)?;
        if read_only {
            opts = opts.options([("default_transaction_read_only", "on")]);
        }
        // While PostgreSQL is down an append fails after this long, so callers answer 5xx and retry.
        let pool = PgPoolOptions::new().max_connections(8).acquire_timeout(Duration::from_secs(3));
        Ok(Pool::Postgres(pool.connect_with(opts).await.map_err(bad)?))
    } else {
        Err(AuditError::Unavailable(format!(
            "unsupported audit store URL {}: use sqlite:///path/audit.db, sqlite::memory: or postgres://host/db",
            redact(url)
        )))
    }
}

/// Applies the embedded migrations unless they all are applied already. A writer's own database
/// role (`noexit-operator audit-roles`) may not create tables: it only checks.
pub async fn migrate(pool: &Pool, url: &str) -> Result<(), AuditError> {
    let migrate = migrator(pool.backend());
    let wanted: Vec<i64> = migrate.iter().map(|m| m.version).collect();
    let applied: Option<Vec<i64>> = with_pool!(pool, p => {
        sqlx::query_scalar::<_, i64>("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(p)
            .await
            .ok()
    });
    if applied.is_some_and(|a| wanted.iter().all(|v| a.contains(v))) {
        return Ok(());
    }
    with_pool!(pool, p => migrate.run(p).await).map_err(|e| {
        AuditError::Unavailable(format!(
            "migrating audit store {}: {e} (a writer's own role cannot migrate: run `noexit-operator audit-roles` \
             with the owner's URL first)",
            redact(url)
        ))
    })
}

/// The embedded migrations of one backend (all `migrations/<backend>/*.sql`, ours and others').
pub fn migrator(backend: Backend) -> Migrator {
    let files = match backend {
        Backend::Sqlite => embedded::SQLITE,
        Backend::Postgres => embedded::POSTGRES,
    };
    let migrations = files
        .iter()
        .map(|(version, name, sql)| {
            Migration::new(*version, Cow::Borrowed(*name), MigrationType::Simple, Cow::Borrowed(*sql), false)
        })
        .collect::<Vec<_>>();
    Migrator { migrations: Cow::Owned(migrations), ..Migrator::DEFAULT }
}

impl Store {
    /// Opens (creating if needed) the store at `url`, runs migrations, starts the writer.
    pub async fn connect(url: &str) -> Result<Store, AuditError> {
        Self::connect_with(url, StoreOptions::default()).await
    }

    pub async fn connect_with(url: &str, options: StoreOptions) -> Result<Store, AuditError> {
        let pool = open_pool(url, false).await?;
        migrate(&pool, url).await?;
        let (tx, rx) = mpsc::channel(options.queue.max(1));
        let task = tokio::spawn(writer(pool.clone(), rx, options));
        Ok(Store { pool, writer: Some(tx), task: Mutex::new(Some(task)) })
    }

    /// Opens the database with the owner's rights, without migrating or writing (for
    /// `audit-roles`).
    pub async fn open_for_owner(url: &str) -> Result<Store, AuditError> {
        Ok(Store { pool: open_pool(url, false).await?, writer: None, task: Mutex::new(None) })
    }

    /// Closes the pool of a store without a writer.
    pub async fn pool_close(&self) {
        with_pool!(&self.pool, p => p.close().await);
    }

    /// Opens an existing store for reading only (the CLI): no migrations, no writer.
    pub async fn open_read_only(url: &str) -> Result<Store, AuditError> {
        let pool = open_pool(url, true).await?;
        let probe = with_pool!(&pool, p => {
            sqlx::query("SELECT seq FROM audit_log WHERE seq = 0").fetch_optional(p).await.map(|_| ())
        });
        if let Err(e) = probe {
            return Err(AuditError::Unavailable(format!("cannot read the audit log in {}: {e}", redact(url))));
        }
        Ok(Store { pool, writer: None, task: Mutex::new(None) })
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn backend(&self) -> Backend {
        self.pool.backend()
    }

    /// Appends `event`; returns its sequence number once it is committed.
    pub async fn append(&self, event: AuditEvent) -> Result<Seq, AuditError> {
        self.submit(None, event).await.map(|(seq, _)| seq)
    }

    /// Appends `event` unless an event with the same `key` is already stored: then returns that
    /// entry's sequence number and `true` (duplicate). A client resending after a lost answer
    /// gets the same `Seq`, and the log holds the event once.
    pub async fn append_idempotent(&self, key: &str, event: AuditEvent) -> Result<(Seq, bool), AuditError> {
        self.submit(Some(key.to_string()), event).await
    }

    async fn submit(&self, key: Option<String>, event: AuditEvent) -> Result<(Seq, bool), AuditError> {
        let writer = self.writer.as_ref().ok_or_else(|| AuditError::Rejected("audit store is read-only".into()))?;
        let detail = serde_json::to_string(&event.detail).map_err(|e| AuditError::Rejected(e.to_string()))?;
        let (reply, answer) = oneshot::channel();
        writer
            .send(Msg::Append(Box::new(Pending { key, event, detail }), reply))
            .await
            .map_err(|_| unavailable("audit writer stopped"))?;
        answer.await.map_err(|_| unavailable("audit writer stopped before committing"))?
    }

    /// Writes a checkpoint now (if there are unsealed entries and a key). Returns its id.
    pub async fn checkpoint_now(&self, key: &SigningKey) -> Result<Option<i64>, AuditError> {
        write_checkpoint(&self.pool, key).await.map(|cp| cp.map(|c| c.body.id))
    }

    /// Stops the writer after everything queued is committed, seals the tail with a checkpoint
    /// (when a key is configured) and closes the pool.
    pub async fn close(&self) {
        if let Some(w) = &self.writer {
            let (done, wait) = oneshot::channel();
            if w.send(Msg::Close(done)).await.is_ok() {
                let _ = wait.await;
            }
        }
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
        with_pool!(&self.pool, p => p.close().await);
    }

    /// Entries matching `filter`, in log order.
    pub async fn query(&self, filter: &Filter) -> Result<Vec<Entry>, AuditError> {
        let mut out = Vec::new();
        self.for_each(filter, |e| {
            out.push(e);
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// Streams entries matching `filter` to `f` without holding them all (export).
    pub async fn for_each<F>(&self, filter: &Filter, mut f: F) -> Result<u64, AuditError>
    where
        F: FnMut(Entry) -> Result<(), AuditError>,
    {
        let (sql, args) = filter_sql(filter);
        let mut n = 0;
        with_pool!(&self.pool, p => {
            let mut q = sqlx::query_as::<_, EntryRow>(&sql);
            for a in &args {
                q = match a {
                    Arg::Text(s) => q.bind(s.as_str()),
                    Arg::Int(i) => q.bind(*i),
                };
            }
            let mut rows = q.fetch(p);
            while let Some(row) = rows.try_next().await.map_err(unavailable)? {
                f(row.into_entry()?)?;
                n += 1;
            }
        });
        Ok(n)
    }

    /// The last `n` entries, oldest first.
    pub async fn tail(&self, n: i64) -> Result<Vec<Entry>, AuditError> {
        let last = self.last_seq().await?;
        self.query(&Filter { after_seq: Some(last.saturating_sub(n.max(0))), ..Filter::default() }).await
    }

    /// Sequence number of the newest entry (0 when empty).
    pub async fn last_seq(&self) -> Result<Seq, AuditError> {
        with_pool!(&self.pool, p => {
            sqlx::query_scalar::<_, Option<i64>>("SELECT MAX(seq) FROM audit_log").fetch_one(p).await
        })
        .map(|s| s.unwrap_or(0))
        .map_err(unavailable)
    }

    /// Up to `limit` entries with `seq >= from` as stored, with their stored hash (to diagnose a
    /// broken chain).
    pub async fn entries_from(&self, from: Seq, limit: i64) -> Result<Vec<(EntryRaw, Hash)>, AuditError> {
        let sql = format!("SELECT {ENTRY_COLUMNS} FROM audit_log WHERE seq >= $1 ORDER BY seq LIMIT $2");
        let rows: Vec<EntryRow> = with_pool!(&self.pool, p => {
            sqlx::query_as::<_, EntryRow>(&sql).bind(from).bind(limit).fetch_all(p).await
        })
        .map_err(unavailable)?;
        Ok(rows.into_iter().map(EntryRaw::from_row).collect())
    }

    /// All checkpoints, by id.
    pub async fn checkpoints(&self) -> Result<Vec<Checkpoint>, AuditError> {
        read_checkpoints(&self.pool).await
    }
}

async fn read_checkpoints(pool: &Pool) -> Result<Vec<Checkpoint>, AuditError> {
    let sql = "SELECT id, first_seq, last_seq, time_us, merkle_root, head_hash, key_id, signature \
               FROM audit_checkpoint ORDER BY id";
    let rows: Vec<CheckpointRow> =
        with_pool!(pool, p => sqlx::query_as::<_, CheckpointRow>(sql).fetch_all(p).await).map_err(unavailable)?;
    rows.into_iter().map(CheckpointRow::into_checkpoint).collect()
}

/// An entry's stored columns, owned, with the stored prev hash (the `Hash` beside it is the
/// stored hash). Hash columns of the wrong length read as all-`0xff`, which never verifies.
#[derive(Clone, Debug)]
pub struct EntryRaw {
    pub seq: i64,
    pub time_us: i64,
    pub actor: String,
    pub role: Option<String>,
    pub action: String,
    pub object: String,
    pub refused: bool,
    pub reason: Option<String>,
    pub source: Option<String>,
    pub detail: String,
    pub idempotency_key: Option<String>,
    pub prev_hash: Hash,
}

impl EntryRaw {
    pub(crate) fn from_row(r: EntryRow) -> (EntryRaw, Hash) {
        let hash = hash::to_hash(&r.hash).unwrap_or([0xff; 32]);
        let raw = EntryRaw {
            seq: r.seq,
            time_us: r.time_us,
            refused: r.outcome == "refused",
            prev_hash: hash::to_hash(&r.prev_hash).unwrap_or([0xff; 32]),
            actor: r.actor,
            role: r.role,
            action: r.action,
            object: r.object,
            reason: r.reason,
            source: r.source,
            detail: r.detail,
            idempotency_key: r.idempotency_key,
        };
        (raw, hash)
    }

    pub fn fields_as(&self, seq: i64) -> EntryFields<'_> {
        EntryFields {
            seq,
            time_us: self.time_us,
            actor: &self.actor,
            role: self.role.as_deref(),
            action: &self.action,
            object: &self.object,
            refused: self.refused,
            reason: self.reason.as_deref(),
            source: self.source.as_deref(),
            detail: &self.detail,
            idempotency_key: self.idempotency_key.as_deref(),
        }
    }
}

enum Arg {
    Text(String),
    Int(i64),
}

fn filter_sql(f: &Filter) -> (String, Vec<Arg>) {
    let mut sql = format!("SELECT {ENTRY_COLUMNS} FROM audit_log WHERE 1=1");
    let mut args = Vec::new();
    let mut add = |clause: &str, arg: Arg, suffix: &str| {
        args.push(arg);
        sql.push_str(&format!(" AND {clause} ${}{suffix}", args.len()));
    };
    if let Some(a) = &f.actor {
        add("actor =", Arg::Text(a.clone()), "");
    }
    match f.action.as_deref() {
        Some(prefix) if prefix.ends_with('*') => {
            let prefix = prefix.trim_end_matches('*');
            let escaped = prefix.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
            add("action LIKE", Arg::Text(format!("{escaped}%")), " ESCAPE '\\'");
        }
        Some(a) => add("action =", Arg::Text(a.to_string()), ""),
        None => {}
    }
    if let Some(o) = &f.object {
        add("object =", Arg::Text(o.clone()), "");
    }
    if let Some(refused) = f.refused {
        add("outcome =", Arg::Text(if refused { "refused" } else { "allowed" }.into()), "");
    }
    if let Some(t) = f.since {
        add("time_us >=", Arg::Int(t.timestamp_micros()), "");
    }
    if let Some(t) = f.until {
        add("time_us <", Arg::Int(t.timestamp_micros()), "");
    }
    if let Some(s) = f.after_seq {
        add("seq >", Arg::Int(s), "");
    }
    sql.push_str(" ORDER BY seq");
    if let Some(l) = f.limit {
        args.push(Arg::Int(l.max(0)));
        sql.push_str(&format!(" LIMIT ${}", args.len()));
    }
    (sql, args)
}

impl AuditSink for Store {
    fn record(&self, event: AuditEvent) -> BoxFuture<'_, Result<(), AuditError>> {
        Box::pin(async move { self.append(event).await.map(|_| ()) })
    }
}

/// Begins the transaction that may append: it holds the log's write lock until commit.
macro_rules! begin_locked {
    ($p:expr) => {{
        match pool_backend($p) {
            Backend::Sqlite => $p.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => {
                let mut tx = $p.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(PG_APPEND_LOCK).execute(&mut *tx).await?;
                tx
            }
        }
    }};
}
trait BackendOf {
    const BACKEND: Backend;
}
impl BackendOf for SqlitePool {
    const BACKEND: Backend = Backend::Sqlite;
}
impl BackendOf for PgPool {
    const BACKEND: Backend = Backend::Postgres;
}
fn pool_backend<P: BackendOf>(_: &P) -> Backend {
    P::BACKEND
}

/// Rows per INSERT statement: 15 parameters each stays under every backend's limit.
const INSERT_ROWS: usize = 1000;

/// Key for PostgreSQL's transaction-scoped advisory lock that serialises appends ("noexit-a").
const PG_APPEND_LOCK: i64 = 0x6e6f_6578_6974_2d61;

/// Writes a checkpoint file, logging (not failing) when the directory is unusable: the
/// checkpoint is in the database, and the next start publishes what is missing.
fn publish(dir: &std::path::Path, cp: &Checkpoint) {
    match export_checkpoint(dir, cp) {
        Ok(_) => tracing::debug!(id = cp.body.id, dir = %dir.display(), "checkpoint published"),
        Err(e) => {
            tracing::error!(id = cp.body.id, dir = %dir.display(), error = %e, "checkpoint not published outside the database")
        }
    }
}

/// Publishes every stored checkpoint that the export directory lacks (after a restart or a
/// failed write). Existing files are never replaced.
async fn publish_missing(pool: &Pool, dir: &std::path::Path) {
    match read_checkpoints(pool).await {
        Ok(all) => all.iter().for_each(|cp| publish(dir, cp)),
        Err(e) => tracing::error!(error = %e, "cannot read checkpoints to publish them"),
    }
}

async fn writer(pool: Pool, mut rx: mpsc::Receiver<Msg>, options: StoreOptions) {
    if let Some(dir) = &options.checkpoint_export {
        publish_missing(&pool, dir).await;
    }
    let max_batch = options.max_batch.max(1);
    let mut unsealed = match &options.signing_key {
        Some(_) => unsealed_count(&pool).await.unwrap_or(1) as u64,
        None => 0,
    };
    let period = options.checkpoint_interval.max(Duration::from_millis(10));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(max_batch);
    let mut closing = Vec::new();
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, max_batch) => {
                if n == 0 {
                    break;
                }
                let mut appends = Vec::with_capacity(n);
                for msg in batch.drain(..) {
                    match msg {
                        Msg::Append(p, reply) => appends.push((p, reply)),
                        Msg::Close(done) => closing.push(done),
                    }
                }
                if !appends.is_empty() {
                    let pending: Vec<&Pending> = appends.iter().map(|(p, _)| p.as_ref()).collect();
                    match write_batch(&pool, &pending, options.writer.as_ref()).await {
                        Ok(results) => {
                            unsealed += results.iter().filter(|(_, dup)| !dup).count() as u64;
                            for ((_, reply), r) in appends.into_iter().zip(results) {
                                let _ = reply.send(Ok(r));
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "audit batch not written");
                            let message = e.to_string();
                            for (_, reply) in appends {
                                let _ = reply.send(Err(AuditError::Unavailable(message.clone())));
                            }
                        }
                    }
                }
                if let Some(key) = &options.signing_key
                    && unsealed >= options.checkpoint_every
                    && seal(&pool, key, options.checkpoint_export.as_deref()).await
                {
                    unsealed = 0;
                    tick.reset();
                }
                if !closing.is_empty() {
                    break;
                }
            }
            // Other writers (mirror, webhook) append too: their entries are sealed by the timer
            // even when this store wrote nothing (sealing finds nothing to do otherwise).
            _ = tick.tick(), if options.signing_key.is_some() => {
                if let Some(key) = &options.signing_key && seal(&pool, key, options.checkpoint_export.as_deref()).await {
                    unsealed = 0;
                }
            }
        }
    }
    // Closed or dropped: seal the tail (whoever wrote it) so the next verify has nothing
    // unsigned.
    if let Some(key) = &options.signing_key {
        seal(&pool, key, options.checkpoint_export.as_deref()).await;
    }
    for done in closing {
        let _ = done.send(());
    }
}

async fn seal(pool: &Pool, key: &SigningKey, export: Option<&std::path::Path>) -> bool {
    match write_checkpoint(pool, key).await {
        Ok(cp) => {
            if let (Some(dir), Some(cp)) = (export, cp) {
                publish(dir, &cp);
            }
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "audit checkpoint not written");
            false
        }
    }
}

async fn unsealed_count(pool: &Pool) -> Result<i64, sqlx::Error> {
    with_pool!(pool, p => {
        sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM audit_log WHERE seq > (SELECT COALESCE(MAX(last_seq), 0) FROM audit_checkpoint)",
        )
        .fetch_one(p)
        .await
    })
}

/// Writes one batch in one transaction; per event `(seq, duplicate)`.
async fn write_batch(
    pool: &Pool,
    batch: &[&Pending],
    writer: Option<&Writer>,
) -> Result<Vec<(Seq, bool)>, sqlx::Error> {
    with_pool!(pool, p => {
        let mut tx = begin_locked!(p);
        let head: Option<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetch_optional(&mut *tx).await?;
        let (mut seq, mut prev) = match head {
            Some((s, h)) => (s, hash::to_hash(&h).unwrap_or([0xff; 32])),
            None => (0, GENESIS),
        };

        let keys: Vec<&str> = batch.iter().filter_map(|e| e.key.as_deref()).collect();
        let mut known: HashMap<String, i64> = HashMap::new();
        for keys in keys.chunks(INSERT_ROWS) {
            let mut q = sqlx::QueryBuilder::new("SELECT idempotency_key, seq FROM audit_log WHERE idempotency_key IN (");
            let mut list = q.separated(", ");
            for k in keys {
                list.push_bind(*k);
            }
            q.push(")");
            let rows: Vec<(String, i64)> = q.build_query_as().fetch_all(&mut *tx).await?;
            known.extend(rows);
        }

        let time_us = Utc::now().timestamp_micros();
        let mut results = Vec::with_capacity(batch.len());
        let mut rows = Vec::with_capacity(batch.len());
        for e in batch {
            if let Some(k) = &e.key
                && let Some(&existing) = known.get(k)
            {
                results.push((existing, true));
                continue;
            }
            seq += 1;
            let (refused, reason) = match &e.event.outcome {
                Outcome::Allowed => (false, None),
                Outcome::Refused(r) => (true, Some(r.as_str())),
            };
            let fields = EntryFields {
                seq,
                time_us,
                actor: &e.event.actor,
                role: e.event.role.as_deref(),
                action: &e.event.action,
                object: &e.event.object,
                refused,
                reason,
                source: e.event.source.as_deref(),
                detail: &e.detail,
                idempotency_key: e.key.as_deref(),
            };
            let h = hash::entry_hash(&fields, &prev);
            let signature = writer.map(|w| w.sign(&h));
            rows.push((fields, prev, h, signature));
            prev = h;
            if let Some(k) = &e.key {
                known.insert(k.clone(), seq);
            }
            results.push((seq, false));
        }

        // Both databases cap bind parameters per statement (SQLite 32766, PostgreSQL 65535).
        for rows in rows.chunks(INSERT_ROWS) {
            let mut q = sqlx::QueryBuilder::new(format!("INSERT INTO audit_log ({ENTRY_COLUMNS}) "));
            let writer_name = writer.map(|w| w.name.as_str());
            q.push_values(rows, |mut b, (f, prev, h, signature)| {
                b.push_bind(f.seq)
                    .push_bind(f.time_us)
                    .push_bind(f.actor)
                    .push_bind(f.role)
                    .push_bind(f.action)
                    .push_bind(f.object)
                    .push_bind(if f.refused { "refused" } else { "allowed" })
                    .push_bind(f.reason)
                    .push_bind(f.source)
                    .push_bind(f.detail)
                    .push_bind(f.idempotency_key)
                    .push_bind(prev.as_slice())
                    .push_bind(h.as_slice())
                    .push_bind(writer_name)
                    .push_bind(signature.as_ref().map(|s| s.as_slice()));
            });
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(results)
    })
}

/// Seals the entries after the last checkpoint: re-verifies them (never signs a broken chain),
/// computes their Merkle root and stores the signed checkpoint.
async fn write_checkpoint(pool: &Pool, key: &SigningKey) -> Result<Option<Checkpoint>, AuditError> {
    let result: Result<Option<Checkpoint>, AuditError> = with_pool!(pool, p => {
        async {
            let mut tx = (async { Ok::<_, sqlx::Error>(begin_locked!(p)) }).await.map_err(unavailable)?;
            let last: Option<(i64, i64, Vec<u8>)> = sqlx::query_as(
                "SELECT c.id, c.last_seq, l.hash FROM audit_checkpoint c LEFT JOIN audit_log l ON l.seq = c.last_seq \
                 ORDER BY c.id DESC LIMIT 1",
            )
            .fetch_optional(&mut *tx)
            .await
            .map_err(unavailable)?;
            let (last_id, last_seq, mut prev) = match last {
                Some((id, seq, h)) => (id, seq, hash::to_hash(&h).unwrap_or([0xff; 32])),
                None => (0, 0, GENESIS),
            };
            let sql = format!("SELECT {ENTRY_COLUMNS} FROM audit_log WHERE seq > $1 ORDER BY seq");
            let rows: Vec<EntryRow> = sqlx::query_as(&sql).bind(last_seq).fetch_all(&mut *tx).await.map_err(unavailable)?;
            if rows.is_empty() {
                return Ok(None);
            }
            let mut merkle = hash::MerkleBuilder::new();
            let mut expect = last_seq + 1;
            for r in &rows {
                let stored = hash::to_hash(&r.hash);
                if r.seq != expect || hash::to_hash(&r.prev_hash) != Some(prev) || stored != Some(hash::entry_hash(&r.fields(), &prev)) {
                    return Err(AuditError::Corrupt(format!(
                        "refusing to sign checkpoint: entry {} does not verify (run `noexit audit verify`)",
                        r.seq
                    )));
                }
                prev = stored.unwrap_or(GENESIS);
                merkle.push(&prev);
                expect += 1;
            }
            let body = CheckpointBody {
                id: last_id + 1,
                first_seq: last_seq + 1,
                last_seq: expect - 1,
                time_us: Utc::now().timestamp_micros(),
                merkle_root: merkle.finish(),
                head_hash: prev,
            };
            let signature = key.sign(&body.message()).to_bytes();
            let key_id = keys::key_id(&key.verifying_key());
            sqlx::query(
                "INSERT INTO audit_checkpoint (id, first_seq, last_seq, time_us, merkle_root, head_hash, key_id, signature) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(body.id)
            .bind(body.first_seq)
            .bind(body.last_seq)
            .bind(body.time_us)
            .bind(body.merkle_root.as_slice())
            .bind(body.head_hash.as_slice())
            .bind(&key_id)
            .bind(signature.as_slice())
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)?;
            Ok(Some(Checkpoint { body, key_id, signature: signature.to_vec() }))
        }
        .await
    });
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_builds_numbered_placeholders_and_escapes_prefixes() {
        let (sql, args) = filter_sql(&Filter {
            actor: Some("user:a".into()),
            action: Some("request_x.*".into()),
            refused: Some(true),
            limit: Some(5),
            ..Filter::default()
        });
        assert!(
            sql.contains("actor = $1 AND action LIKE $2 ESCAPE '\\' AND outcome = $3 ORDER BY seq LIMIT $4"),
            "{sql}"
        );
        assert!(matches!(&args[1], Arg::Text(s) if s == "request\\_x.%"));
    }

    #[test]
    fn redact_hides_credentials() {
        assert_eq!(redact("postgres://u:secret@db:5432/audit"), "postgres://…@db:5432/audit");
        assert_eq!(redact("sqlite:///var/lib/noexit/audit.db"), "sqlite:///var/lib/noexit/audit.db");
    }
}
