//! `noexit audit verify`: recomputes every entry hash, the chain links, the Merkle root of every
//! checkpoint and its signature, and names the first entry that was changed, deleted, inserted
//! or reordered.
//!
//! Speed: the database streams rows in one compact binary form (PostgreSQL's `COPY … (FORMAT
//! binary)`, which SQLite rows are re-encoded into) in large chunks; a second thread parses and
//! hashes them without allocating per row. Only when the chain breaks is a small window of rows
//! read again, owned, to tell what kind of change it was.

use std::{collections::BTreeMap, collections::HashMap, sync::Arc, time::Duration, time::Instant};

use bytes::{BufMut, Bytes, BytesMut};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use futures::TryStreamExt;
use serde::Serialize;
use sqlx::{Row, postgres::PgPoolCopyExt};
use tokio::sync::mpsc;

use super::hash::{self, CheckpointBody, EntryBytes, GENESIS, Hash, MerkleBuilder};
use super::store::{Checkpoint, ENTRY_COLUMNS, EntryRaw, Pool, Seq, Store};
use super::writers::{self, EntryAuth, WriterKeys};
use super::{AuditError, keys, sqlite_scan};

/// Public keys that may have signed checkpoints (matched by key id). Empty: signatures are not
/// checked (the report says so).
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    pub keys: Vec<VerifyingKey>,
    /// The writers' public keys: each entry must be signed by the writer it names, and that
    /// writer must own its action ([`writers::WRITERS`]). `None`: entries' writers are not
    /// checked (the report says so).
    pub writers: Option<WriterKeys>,
    /// Checkpoints published outside the database (`--checkpoint-export`): each must still be
    /// in the database, unchanged; one that is missing means the log was rolled back.
    pub published: Option<Vec<Checkpoint>>,
}

/// What kind of tampering was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Tamper {
    /// The entry's content no longer matches its hash (or its hash was recomputed).
    Changed,
    /// Entries are missing here (a gap, or later entries renumbered to hide it).
    Deleted,
    /// An entry that was never appended sits here.
    Inserted,
    /// The entry belongs at another position.
    Reordered,
    /// A checkpoint's signature is wrong or made with an unknown key.
    CheckpointForged,
    /// The entries of a signed range do not match its Merkle root (rewritten with a recomputed chain).
    CheckpointMismatch,
    /// A checkpoint was removed, or the checkpoints do not cover the log consecutively.
    CheckpointMissing,
    /// Entries sealed by a checkpoint are missing from the end of the log.
    Truncated,
    /// An entry names no writer or carries no signature.
    Unsigned,
    /// An entry was written by a writer that does not own its action (the mirror writing
    /// `request.approve`).
    WrongWriter,
    /// An entry's signature does not verify with the key of the writer it names.
    EntryForged,
    /// A checkpoint published outside the database is missing from it or differs: the log was
    /// rolled back (and possibly rewritten after the rollback).
    RolledBack,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    pub kind: Tamper,
    /// The first entry affected.
    pub seq: Seq,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<i64>,
    pub message: String,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Entries read and verified (up to the first problem).
    pub entries: u64,
    pub last_seq: Seq,
    pub checkpoints: u64,
    /// Checkpoints whose signature was checked against a given key.
    pub signatures_checked: u64,
    /// Entries after the last checkpoint: chained, but not yet sealed by a signature.
    pub unsealed: u64,
    /// Whether each entry's writer and signature were checked.
    pub writers_checked: bool,
    /// Entries per writer (`unnamed` for entries without one), up to the first problem.
    pub writers: BTreeMap<String, u64>,
    /// Entries whose signature verified with their writer's key.
    pub entries_authenticated: u64,
    /// Writers that wrote entries but whose public key was not given: not authenticated.
    pub writers_without_key: Vec<String>,
    /// Checkpoints published outside the database that were compared (`--checkpoints`).
    pub published_checkpoints: Option<u64>,
    pub finding: Option<Finding>,
    #[serde(serialize_with = "seconds")]
    pub elapsed: Duration,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Report {
    pub fn is_intact(&self) -> bool {
        self.finding.is_none()
    }
}

/// How far around a break `diagnose` looks for where an entry came from.
const WINDOW: i64 = 256;
/// Bytes per chunk handed from the reader to the hashing thread.
const CHUNK: usize = 256 * 1024;

/// Verifies the whole log in `store`.
pub async fn verify(store: &Store, options: &VerifyOptions) -> Result<Report, AuditError> {
    let started = Instant::now();
    let checkpoints = store.checkpoints().await?;
    let (sealed, mut findings, signatures_checked) = check_checkpoints(&checkpoints, &options.keys);
    if let Some(published) = &options.published {
        findings.extend(check_published(published, &checkpoints, &options.keys));
    }

    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let mut chain = Chain::new(sealed.clone());
    chain.writer_keys = options.writers.clone().map(Arc::new);
    let workers = hashing_threads(store.pool());
    let hasher = tokio::task::spawn_blocking(move || chain.run(rx, workers));
    let read = read_all(store.pool(), tx).await;
    let chain = hasher.await.map_err(|e| AuditError::Unavailable(format!("verify thread failed: {e}")))?;
    read?;
    if let Some(e) = chain.wire_error {
        return Err(AuditError::Corrupt(e));
    }
    findings.extend(chain.finding.clone());
    findings.extend(chain.auth_finding.clone());
    let last_seen = chain.expect - 1;
    if let Some(at) = chain.broken_at {
        let rows = store.entries_from(at, WINDOW).await?;
        findings.push(diagnose(&rows, at, &chain.prev));
    } else if let Some(cp) = sealed.iter().find(|cp| cp.last_seq > last_seen) {
        findings.push(Finding {
            kind: Tamper::Truncated,
            seq: last_seen + 1,
            checkpoint: Some(cp.id),
            message: format!(
                "entries {}..={} are sealed by checkpoint {} but missing from the end of the log",
                last_seen + 1,
                cp.last_seq,
                cp.id
            ),
        });
    }
    let sealed_to = sealed.last().map_or(0, |cp| cp.last_seq);
    let finding = findings.into_iter().min_by_key(|f| f.seq);
    let mut writers = BTreeMap::new();
    let mut writers_without_key = Vec::new();
    for (i, &n) in chain.per_writer.iter().enumerate() {
        if n > 0 {
            let name = writer_label(i);
            writers.insert(name.to_owned(), n);
        }
        if chain.no_key[i] > 0 {
            writers_without_key.push(writer_label(i).to_owned());
        }
    }
    Ok(Report {
        entries: chain.entries,
        last_seq: last_seen,
        checkpoints: checkpoints.len() as u64,
        signatures_checked,
        unsealed: (last_seen - sealed_to).max(0) as u64,
        writers_checked: options.writers.is_some(),
        writers,
        entries_authenticated: chain.authenticated,
        writers_without_key,
        published_checkpoints: options.published.as_ref().map(|p| p.len() as u64),
        finding,
        elapsed: started.elapsed(),
    })
}

/// Index of a writer name in [`writers::WRITERS`]; one more for an entry without a known writer.
const UNNAMED: usize = writers::WRITERS.len();

fn writer_index(name: Option<&[u8]>) -> usize {
    name.and_then(|n| writers::WRITERS.iter().position(|w| w.name.as_bytes() == n)).unwrap_or(UNNAMED)
}

fn writer_label(i: usize) -> &'static str {
    writers::WRITERS.get(i).map_or("unnamed", |w| w.name)
}

/// Compares checkpoints published outside the database with those inside. A published one
/// that verifies (or any, when no key is given) must be in the database unchanged.
fn check_published(published: &[Checkpoint], stored: &[Checkpoint], keys: &[VerifyingKey]) -> Vec<Finding> {
    let by_id: HashMap<String, &VerifyingKey> = keys.iter().map(|k| (keys::key_id(k), k)).collect();
    let stored: HashMap<i64, &Checkpoint> = stored.iter().map(|c| (c.body.id, c)).collect();
    let mut findings = Vec::new();
    for cp in published {
        let b = &cp.body;
        if !keys.is_empty() {
            let good = by_id.get(&cp.key_id).is_some_and(|k| {
                Signature::from_slice(&cp.signature).is_ok_and(|sig| k.verify(&b.message(), &sig).is_ok())
            });
            if !good {
                findings.push(Finding {
                    kind: Tamper::CheckpointForged,
                    seq: b.first_seq,
                    checkpoint: Some(b.id),
                    message: format!(
                        "published checkpoint {} (entries {}..={}) is not signed by a trusted key",
                        b.id, b.first_seq, b.last_seq
                    ),
                });
                continue;
            }
        }
        match stored.get(&b.id) {
            Some(s) if *s == cp => {}
            Some(_) => findings.push(Finding {
                kind: Tamper::RolledBack,
                seq: b.first_seq,
                checkpoint: Some(b.id),
                message: format!(
                    "checkpoint {} in the database differs from the one published outside it (entries {}..={}): \
                     the log was rolled back and rewritten",
                    b.id, b.first_seq, b.last_seq
                ),
            }),
            None => findings.push(Finding {
                kind: Tamper::RolledBack,
                seq: b.first_seq,
                checkpoint: Some(b.id),
                message: format!(
                    "checkpoint {} (entries {}..={}) was published outside the database but is missing from it: \
                     the log was rolled back",
                    b.id, b.first_seq, b.last_seq
                ),
            }),
        }
    }
    findings
}

/// Threads that hash. PostgreSQL's server process and the protocol decoding need a core of
/// their own; reading an SQLite file is a cheap copy. `NOEXIT_VERIFY_THREADS` overrides it.
fn hashing_threads(pool: &Pool) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let default = match pool {
        Pool::Sqlite(_) => cores,
        Pool::Postgres(_) => cores.saturating_sub(1),
    };
    std::env::var("NOEXIT_VERIFY_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(default).clamp(1, 4)
}

/// Checks ids, ranges and signatures of the checkpoints. Returns the consecutive, validly signed
/// prefix (whose Merkle roots the chain pass then checks), problems found, and signatures checked.
fn check_checkpoints(all: &[Checkpoint], keys: &[VerifyingKey]) -> (Vec<CheckpointBody>, Vec<Finding>, u64) {
    let by_id: HashMap<String, &VerifyingKey> = keys.iter().map(|k| (keys::key_id(k), k)).collect();
    let mut sealed = Vec::new();
    let mut checked = 0;
    let mut next_first = 1;
    for (i, cp) in all.iter().enumerate() {
        let b = &cp.body;
        let expected_id = i as i64 + 1;
        let problem = if b.id != expected_id {
            Some((Tamper::CheckpointMissing, format!("checkpoint {expected_id} is missing (next stored is {})", b.id)))
        } else if b.first_seq != next_first || b.last_seq < b.first_seq {
            Some((
                Tamper::CheckpointMissing,
                format!(
                    "checkpoint {} covers entries {}..={}, expected it to start at {next_first}: a checkpoint was removed or altered",
                    b.id, b.first_seq, b.last_seq
                ),
            ))
        } else if keys.is_empty() {
            None
        } else {
            match by_id.get(&cp.key_id) {
                None => Some((
                    Tamper::CheckpointForged,
                    format!("checkpoint {} is signed by key {} which is not a trusted key", b.id, cp.key_id),
                )),
                Some(key) => {
                    checked += 1;
                    let good =
                        Signature::from_slice(&cp.signature).is_ok_and(|sig| key.verify(&b.message(), &sig).is_ok());
                    (!good).then(|| (Tamper::CheckpointForged, format!("checkpoint {} has a forged signature", b.id)))
                }
            }
        };
        if let Some((kind, message)) = problem {
            return (sealed, vec![Finding { kind, seq: next_first, checkpoint: Some(expected_id), message }], checked);
        }
        next_first = b.last_seq + 1;
        sealed.push(b.clone());
    }
    (sealed, Vec::new(), checked)
}

/// What a hashing worker learns about one row; the ordered pass needs nothing else.
struct Summary {
    seq: Seq,
    /// Stored predecessor hash (all `0xff` when the column is not 32 bytes: never matches).
    prev: Hash,
    hash: Hash,
    /// The stored hash is the hash of the row's fields and stored predecessor.
    self_consistent: bool,
    /// Index of the writer it names ([`writer_index`]).
    writer: usize,
    /// Who wrote it, when writers are checked.
    auth: Option<EntryAuth>,
}

/// Hashes every whole tuple of `chunk` (a worker's job; rows are independent of each other).
fn summarize(chunk: &[u8], out: &mut Vec<Summary>, writer_keys: Option<&WriterKeys>) -> Result<(), String> {
    let mut pos = 0;
    while pos < chunk.len() {
        match parse_tuple(&chunk[pos..])? {
            Parsed::Entry(row, used) => {
                pos += used;
                let prev = hash::to_hash(row.prev_hash).unwrap_or([0xff; 32]);
                let stored = hash::to_hash(row.hash);
                let hash = stored.unwrap_or([0xff; 32]);
                let self_consistent = stored.is_some() && hash::entry_hash_bytes(&row.entry, &prev) == hash;
                let auth = writer_keys.map(|k| k.check(row.writer, row.signature, row.entry.action, &hash));
                let writer = writer_index(row.writer);
                out.push(Summary { seq: row.entry.seq, prev, hash, self_consistent, writer, auth });
            }
            Parsed::Skip(used) => pos += used,
            Parsed::Incomplete => return Err("an entry was cut off in the stream".into()),
        }
    }
    Ok(())
}

/// Length of the longest prefix of `buf` made of whole tuples (and trailer).
fn whole_tuples(buf: &[u8]) -> usize {
    let mut pos = 0;
    'tuples: loop {
        let Some(count) = buf.get(pos..pos + 2) else { return pos };
        let count = i16::from_be_bytes([count[0], count[1]]);
        let mut end = pos + 2;
        if count > 0 {
            for _ in 0..count {
                let Some(len) = buf.get(end..end + 4) else { break 'tuples pos };
                let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
                end += 4 + len.max(0) as usize;
            }
        }
        if end > buf.len() {
            return pos;
        }
        pos = end;
    }
}

/// The pass over the stream: workers hash chunks in parallel, then one ordered pass checks
/// numbering, links and Merkle roots.
struct Chain {
    expect: Seq,
    prev: Hash,
    merkle: MerkleBuilder,
    sealed: Vec<CheckpointBody>,
    next_cp: usize,
    entries: u64,
    /// First position where the chain does not hold.
    broken_at: Option<Seq>,
    finding: Option<Finding>,
    wire_error: Option<String>,
    writer_keys: Option<Arc<WriterKeys>>,
    /// The first entry whose writer or signature is wrong.
    auth_finding: Option<Finding>,
    per_writer: [u64; UNNAMED + 1],
    no_key: [u64; UNNAMED + 1],
    authenticated: u64,
}

impl Chain {
    fn new(sealed: Vec<CheckpointBody>) -> Chain {
        Chain {
            expect: 1,
            prev: GENESIS,
            merkle: MerkleBuilder::new(),
            sealed,
            next_cp: 0,
            entries: 0,
            broken_at: None,
            finding: None,
            wire_error: None,
            writer_keys: None,
            auth_finding: None,
            per_writer: [0; UNNAMED + 1],
            no_key: [0; UNNAMED + 1],
            authenticated: 0,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Bytes>, workers: usize) -> Chain {
        if let Err(e) = self.run_with(rx, workers) {
            self.wire_error = Some(e);
        }
        self
    }

    fn run_with(&mut self, mut rx: mpsc::Receiver<Bytes>, workers: usize) -> Result<(), String> {
        use std::sync::mpsc::sync_channel;
        std::thread::scope(|scope| {
            let mut jobs = Vec::with_capacity(workers);
            let mut results = Vec::with_capacity(workers);
            for _ in 0..workers {
                let (job_tx, job_rx) = sync_channel::<Bytes>(2);
                let (result_tx, result_rx) = sync_channel::<Result<Vec<Summary>, String>>(2);
                let writer_keys = self.writer_keys.clone();
                scope.spawn(move || {
                    for chunk in job_rx {
                        let mut rows = Vec::with_capacity(chunk.len() / 160);
                        let result = summarize(&chunk, &mut rows, writer_keys.as_deref()).map(|()| rows);
                        if result_tx.send(result).is_err() {
                            break;
                        }
                    }
                });
                jobs.push(job_tx);
                results.push(result_rx);
            }
            // Chunks go to workers round-robin and come back in the same order.
            let (mut sent, mut done) = (0usize, 0usize);
            let mut carry = BytesMut::new();
            let mut header_seen = false;
            let mut input_open = true;
            loop {
                while input_open && sent - done < workers {
                    let Some(chunk) = rx.blocking_recv() else {
                        input_open = false;
                        break;
                    };
                    let mut whole = if carry.is_empty() {
                        chunk
                    } else {
                        carry.extend_from_slice(&chunk);
                        carry.split().freeze()
                    };
                    if !header_seen {
                        match parse_header(&whole)? {
                            Some(used) => {
                                header_seen = true;
                                whole = whole.slice(used..);
                            }
                            None => {
                                carry.extend_from_slice(&whole);
                                continue;
                            }
                        }
                    }
                    // Readers cut chunks between tuples; this only copies if one did not.
                    let cut = whole_tuples(&whole);
                    carry.extend_from_slice(&whole[cut..]);
                    if cut > 0 {
                        jobs[sent % workers].send(whole.slice(..cut)).map_err(|_| "hashing worker stopped")?;
                        sent += 1;
                    }
                }
                if done == sent {
                    break;
                }
                let rows = results[done % workers].recv().map_err(|_| "hashing worker stopped")??;
                done += 1;
                for row in &rows {
                    if !self.push(row) {
                        return Ok(());
                    }
                }
            }
            if !carry.is_empty() {
                return Err("the stream ended inside an entry".into());
            }
            Ok(())
        })
    }

    /// Checks one row in order; `false` when the chain breaks here.
    fn push(&mut self, row: &Summary) -> bool {
        if row.seq != self.expect || row.prev != self.prev || !row.self_consistent {
            self.broken_at = Some(self.expect);
            return false;
        }
        let stored = row.hash;
        self.per_writer[row.writer] += 1;
        match row.auth {
            None => {}
            Some(EntryAuth::Good) => self.authenticated += 1,
            Some(EntryAuth::NoKey) => self.no_key[row.writer] += 1,
            Some(bad) if self.auth_finding.is_none() => {
                let (kind, message) = match bad {
                    EntryAuth::Unsigned => {
                        (Tamper::Unsigned, format!("entry {} names no writer or carries no signature", row.seq))
                    }
                    EntryAuth::WrongWriter => (
                        Tamper::WrongWriter,
                        format!(
                            "entry {} was written by {}, which may not write this action",
                            row.seq,
                            writer_label(row.writer)
                        ),
                    ),
                    _ => (
                        Tamper::EntryForged,
                        format!(
                            "entry {}'s signature does not verify with the key of writer {}",
                            row.seq,
                            writer_label(row.writer)
                        ),
                    ),
                };
                self.auth_finding = Some(Finding { kind, seq: row.seq, checkpoint: None, message });
            }
            Some(_) => {}
        }
        self.entries += 1;
        self.expect += 1;
        self.prev = stored;
        if self.finding.is_none() && self.next_cp < self.sealed.len() {
            self.merkle.push(&stored);
            let cp = &self.sealed[self.next_cp];
            if cp.last_seq == row.seq {
                let root = self.merkle.finish();
                if root != cp.merkle_root || cp.head_hash != stored {
                    self.finding = Some(Finding {
                        kind: Tamper::CheckpointMismatch,
                        seq: cp.first_seq,
                        checkpoint: Some(cp.id),
                        message: format!(
                            "entries {}..={} do not match signed checkpoint {}: an entry in this range was changed, \
                             inserted, deleted or reordered and the chain after it recomputed",
                            cp.first_seq, cp.last_seq, cp.id
                        ),
                    });
                }
                self.next_cp += 1;
            }
        }
        true
    }
}

/// One row in the wire form, borrowed from the chunk.
struct WireRow<'a> {
    entry: EntryBytes<'a>,
    prev_hash: &'a [u8],
    hash: &'a [u8],
    writer: Option<&'a [u8]>,
    signature: Option<&'a [u8]>,
}

// Returned by value once per row on the hot path; boxing would allocate per row.
#[allow(clippy::large_enum_variant)]
enum Parsed<'a> {
    Entry(WireRow<'a>, usize),
    /// The trailer of the binary COPY format.
    Skip(usize),
    Incomplete,
}

const COPY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
pub(crate) const COLUMNS: i16 = 15;

/// The binary COPY header: signature, flags, extension area. `None` = need more bytes.
fn parse_header(buf: &[u8]) -> Result<Option<usize>, String> {
    let n = COPY_SIGNATURE.len();
    if buf.len() < n + 8 {
        return if COPY_SIGNATURE.starts_with(&buf[..buf.len().min(n)]) {
            Ok(None)
        } else {
            Err("bad COPY header".into())
        };
    }
    if &buf[..n] != COPY_SIGNATURE {
        return Err("bad COPY header".into());
    }
    let ext = u32::from_be_bytes([buf[n + 4], buf[n + 5], buf[n + 6], buf[n + 7]]) as usize;
    let used = n + 8 + ext;
    Ok((buf.len() >= used).then_some(used))
}

/// Writes the header [`parse_header`] expects (no flags, no extension).
fn put_header(out: &mut BytesMut) {
    out.put_slice(COPY_SIGNATURE);
    out.put_u32(0);
    out.put_u32(0);
}

/// Parses one tuple of PostgreSQL's binary COPY format: i16 field count, then per field an i32
/// length (-1 = NULL) and the bytes; `bigint` is 8 bytes big-endian.
fn parse_tuple(buf: &[u8]) -> Result<Parsed<'_>, String> {
    if buf.len() < 2 {
        return Ok(Parsed::Incomplete);
    }
    let count = i16::from_be_bytes([buf[0], buf[1]]);
    if count == -1 {
        return Ok(Parsed::Skip(2));
    }
    if count != COLUMNS {
        return Err(format!("expected {COLUMNS} columns per entry, got {count}"));
    }
    let mut pos = 2;
    let mut fields: [Option<&[u8]>; COLUMNS as usize] = [None; COLUMNS as usize];
    for f in fields.iter_mut() {
        let Some(len) = buf.get(pos..pos + 4) else { return Ok(Parsed::Incomplete) };
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        pos += 4;
        if len >= 0 {
            let end = pos + len as usize;
            let Some(bytes) = buf.get(pos..end) else { return Ok(Parsed::Incomplete) };
            *f = Some(bytes);
            pos = end;
        }
    }
    let int = |f: Option<&[u8]>| -> Result<i64, String> {
        f.and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(i64::from_be_bytes)
            .ok_or_else(|| "bad integer column".to_string())
    };
    let [
        seq,
        time_us,
        actor,
        role,
        action,
        object,
        outcome,
        reason,
        source,
        detail,
        key,
        prev,
        hash,
        writer,
        signature,
    ] = fields;
    let entry = EntryBytes {
        seq: int(seq)?,
        time_us: int(time_us)?,
        actor: actor.unwrap_or_default(),
        role,
        action: action.unwrap_or_default(),
        object: object.unwrap_or_default(),
        refused: outcome == Some(b"refused".as_slice()),
        reason,
        source,
        detail: detail.unwrap_or_default(),
        idempotency_key: key,
    };
    Ok(Parsed::Entry(
        WireRow { entry, prev_hash: prev.unwrap_or_default(), hash: hash.unwrap_or_default(), writer, signature },
        pos,
    ))
}

fn put_field(out: &mut BytesMut, value: Option<&[u8]>) {
    match value {
        None => out.put_i32(-1),
        Some(v) => {
            out.put_i32(i32::try_from(v.len()).unwrap_or(i32::MAX));
            out.put_slice(v);
        }
    }
}

/// Streams every entry, in seq order, as binary COPY tuples into `tx`. Stops early (without
/// error) when the hashing side hangs up.
async fn read_all(pool: &Pool, tx: mpsc::Sender<Bytes>) -> Result<(), AuditError> {
    let failed = |e: sqlx::Error| AuditError::Unavailable(format!("reading the audit log: {e}"));
    let mut buf = BytesMut::with_capacity(CHUNK + 4096);
    match pool {
        Pool::Postgres(p) => {
            let sql = format!("COPY (SELECT {ENTRY_COLUMNS} FROM audit_log ORDER BY seq) TO STDOUT (FORMAT binary)");
            let mut stream = p.copy_out_raw(&sql).await.map_err(failed)?;
            let mut open = true;
            while let Some(chunk) = stream.try_next().await.map_err(failed)? {
                // Keep draining after the other side stopped so the connection stays usable.
                if !open {
                    continue;
                }
                buf.put_slice(&chunk);
                if buf.len() >= CHUNK {
                    open = tx.send(buf.split().freeze()).await.is_ok();
                }
            }
        }
        Pool::Sqlite(p) => {
            let sql = format!("SELECT {ENTRY_COLUMNS} FROM audit_log ORDER BY seq");
            let file = p.connect_options().get_filename().to_path_buf();
            if file.is_file() {
                let mut header = BytesMut::new();
                put_header(&mut header);
                let scan =
                    tokio::task::spawn_blocking(move || sqlite_scan::scan(&file, &sql, COLUMNS, &header, CHUNK, tx));
                return scan
                    .await
                    .map_err(|e| AuditError::Unavailable(format!("reading the audit log: {e}")))?
                    .map_err(|e| AuditError::Unavailable(format!("reading the audit log: {e}")));
            }
            // An in-memory database is only reachable through the pool.
            put_header(&mut buf);
            let mut rows = sqlx::query(&sql).fetch(p);
            while let Some(row) = rows.try_next().await.map_err(failed)? {
                buf.put_i16(COLUMNS);
                for i in 0..2 {
                    let v: i64 = row.try_get_unchecked(i).map_err(failed)?;
                    buf.put_i32(8);
                    buf.put_i64(v);
                }
                for i in 2..COLUMNS as usize {
                    let v: Option<&[u8]> = row.try_get_unchecked(i).map_err(failed)?;
                    put_field(&mut buf, v);
                }
                if buf.len() >= CHUNK && tx.send(buf.split().freeze()).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
    if !buf.is_empty() {
        let _ = tx.send(buf.freeze()).await;
    }
    Ok(())
}

/// Names what happened at `at`, the first position where the chain does not hold. `rows` are
/// the stored rows with `seq >= at` (a few hundred), `prev` the hash of the last good entry.
pub(crate) fn diagnose(rows: &[(EntryRaw, Hash)], at: Seq, prev: &Hash) -> Finding {
    let finding = |kind, seq, message: String| Finding { kind, seq, checkpoint: None, message };
    let Some((r, stored)) = rows.first() else {
        return finding(Tamper::Deleted, at, format!("entry {at} is missing"));
    };
    let hash_as = |raw: &EntryRaw, seq: Seq| hash::entry_hash(&raw.fields_as(seq), &raw.prev_hash);
    // The position an entry was written at: where its own hash matches.
    let origin = |raw: &EntryRaw, stored: &Hash| -> Option<Seq> {
        if hash_as(raw, raw.seq) == *stored {
            return Some(raw.seq);
        }
        ((raw.seq - WINDOW).max(1)..=raw.seq + WINDOW).find(|&s| s != raw.seq && hash_as(raw, s) == *stored)
    };
    if r.seq < at {
        return finding(Tamper::Inserted, r.seq, format!("a second entry {} was inserted", r.seq));
    }
    match origin(r, stored) {
        Some(o) if o == r.seq && r.seq > at => finding(
            Tamper::Deleted,
            at,
            format!("entries {at}..={} were deleted (entry {} follows entry {})", r.seq - 1, r.seq, at - 1),
        ),
        Some(_) if r.seq > at => finding(Tamper::Deleted, at, format!("entry {at} is missing")),
        Some(o) if o == r.seq => finding(
            Tamper::Changed,
            (at - 1).max(1),
            format!(
                "entry {} was rewritten with a recomputed hash: entry {at} names a different predecessor",
                (at - 1).max(1)
            ),
        ),
        Some(o) if o > r.seq => {
            let home = rows.iter().skip(1).find(|(raw, h)| hash_as(raw, at) == *h);
            match home {
                Some((moved, _)) => finding(
                    Tamper::Reordered,
                    at,
                    format!("entries were reordered: entry {o} now sits at {at}, entry {at} at {}", moved.seq),
                ),
                None => finding(
                    Tamper::Deleted,
                    at,
                    format!("entries {at}..={} were deleted and the entries after them renumbered", o - 1),
                ),
            }
        }
        Some(o) => finding(
            Tamper::Inserted,
            o,
            format!(
                "{} entr{} inserted at {o}: the original entry {o} now sits at {}",
                r.seq - o,
                if r.seq - o == 1 { "y was" } else { "ies were" },
                r.seq
            ),
        ),
        None => {
            let next_links_back = rows.get(1).is_some_and(|(next, _)| next.prev_hash == *prev);
            if next_links_back && r.prev_hash != *prev {
                finding(
                    Tamper::Inserted,
                    at,
                    format!("entry {at} was inserted: entry {} follows entry {}", at + 1, at - 1),
                )
            } else {
                finding(Tamper::Changed, at, format!("entry {at} was changed: its content does not match its hash"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::{EntryFields, entry_hash};

    fn chain(n: i64) -> Vec<(EntryRaw, Hash)> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|seq| {
                let raw = EntryRaw {
                    seq,
                    time_us: 1_000 + seq,
                    actor: format!("user:u{seq}"),
                    role: None,
                    action: "x.y".into(),
                    object: "o".into(),
                    refused: false,
                    reason: None,
                    source: None,
                    detail: "{}".into(),
                    idempotency_key: None,
                    prev_hash: prev,
                };
                let h = entry_hash(&raw.fields_as(seq), &prev);
                prev = h;
                (raw, h)
            })
            .collect()
    }

    fn encode(rows: &[(EntryRaw, Hash)]) -> BytesMut {
        let mut buf = BytesMut::new();
        put_header(&mut buf);
        for (r, h) in rows {
            let f: EntryFields<'_> = r.fields_as(r.seq);
            buf.put_i16(COLUMNS);
            for v in [f.seq, f.time_us] {
                buf.put_i32(8);
                buf.put_i64(v);
            }
            let outcome: &[u8] = if f.refused { b"refused" } else { b"allowed" };
            for v in [
                Some(f.actor.as_bytes()),
                f.role.map(str::as_bytes),
                Some(f.action.as_bytes()),
                Some(f.object.as_bytes()),
                Some(outcome),
                f.reason.map(str::as_bytes),
                f.source.map(str::as_bytes),
                Some(f.detail.as_bytes()),
                f.idempotency_key.map(str::as_bytes),
                Some(r.prev_hash.as_slice()),
                Some(h.as_slice()),
                None,
                None,
            ] {
                put_field(&mut buf, v);
            }
        }
        buf.put_i16(-1);
        buf
    }

    fn run_chain(bytes: &[u8], split: usize) -> Chain {
        let (tx, rx) = mpsc::channel(16);
        let split = split.min(bytes.len());
        tx.try_send(Bytes::copy_from_slice(&bytes[..split])).unwrap();
        tx.try_send(Bytes::copy_from_slice(&bytes[split..])).unwrap();
        drop(tx);
        Chain::new(Vec::new()).run(rx, 2)
    }

    #[test]
    fn intact_stream_verifies_whatever_the_chunk_boundaries() {
        let rows = chain(20);
        let bytes = encode(&rows);
        for split in [0, 1, 5, 19, 20, 200, bytes.len() / 2, bytes.len()] {
            let c = run_chain(&bytes, split);
            assert_eq!((c.entries, c.broken_at, c.wire_error.clone()), (20, None, None), "split {split}");
        }
    }

    #[test]
    fn many_small_chunks_across_three_workers_keep_their_order() {
        let rows = chain(300);
        let bytes = encode(&rows);
        let (tx, rx) = mpsc::channel(bytes.len() / 97 + 2);
        for piece in bytes.chunks(97) {
            tx.try_send(Bytes::copy_from_slice(piece)).unwrap();
        }
        drop(tx);
        let mut c = Chain::new(Vec::new());
        c.run_with(rx, 3).unwrap();
        assert_eq!((c.entries, c.broken_at, c.prev), (300, None, rows[299].1));

        let mut cut = bytes.clone();
        cut.truncate(bytes.len() - 40);
        let (tx, rx) = mpsc::channel(2);
        tx.try_send(cut.freeze()).unwrap();
        drop(tx);
        let c = Chain::new(Vec::new()).run(rx, 2);
        assert!(c.wire_error.is_some(), "a stream cut inside an entry is an error");
    }

    #[test]
    fn changed_content_breaks_at_that_entry() {
        let mut rows = chain(10);
        rows[4].0.actor = "user:mallory".into();
        let c = run_chain(&encode(&rows), 7);
        assert_eq!(c.broken_at, Some(5));
        let f = diagnose(&rows[4..], 5, &rows[3].1);
        assert_eq!((f.kind, f.seq), (Tamper::Changed, 5), "{}", f.message);
    }

    #[test]
    fn diagnosis_tells_deleted_inserted_reordered() {
        let rows = chain(12);
        // Deleted with a gap.
        let gap: Vec<_> = rows.iter().filter(|(r, _)| r.seq != 5).cloned().collect();
        let f = diagnose(&gap[4..], 5, &rows[3].1);
        assert_eq!((f.kind, f.seq), (Tamper::Deleted, 5), "{}", f.message);
        // Deleted, later entries renumbered.
        let mut renumbered = gap.clone();
        renumbered.iter_mut().filter(|(r, _)| r.seq > 5).for_each(|(r, _)| r.seq -= 1);
        let f = diagnose(&renumbered[4..], 5, &rows[3].1);
        assert_eq!((f.kind, f.seq), (Tamper::Deleted, 5), "{}", f.message);
        // Swapped.
        let mut swapped = rows.clone();
        swapped.swap(4, 5);
        swapped[4].0.seq = 5;
        swapped[5].0.seq = 6;
        let f = diagnose(&swapped[4..], 5, &rows[3].1);
        assert_eq!((f.kind, f.seq), (Tamper::Reordered, 5), "{}", f.message);
        // Inserted with a well-formed hash, later entries renumbered.
        let mut forged = rows[4].clone();
        forged.0.actor = "user:ghost".into();
        forged.1 = entry_hash(&forged.0.fields_as(5), &rows[3].1);
        let mut inserted: Vec<_> = rows[..4].to_vec();
        inserted.push(forged);
        inserted.extend(rows[4..].iter().cloned().map(|(mut r, h)| {
            r.seq += 1;
            (r, h)
        }));
        let c = run_chain(&encode(&inserted), 100);
        assert_eq!(c.broken_at, Some(6));
        let f = diagnose(&inserted[5..], 6, &inserted[4].1);
        assert_eq!((f.kind, f.seq), (Tamper::Inserted, 5), "{}", f.message);
        // Inserted as garbage.
        let mut junk = inserted.clone();
        junk[4].1 = [9; 32];
        junk[4].0.prev_hash = [8; 32];
        let f = diagnose(&junk[4..], 5, &rows[3].1);
        assert_eq!((f.kind, f.seq), (Tamper::Inserted, 5), "{}", f.message);
    }

    #[test]
    fn checkpoints_with_gaps_or_bad_signatures_are_reported() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let other = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
        let cp = |id: i64, first: i64, last: i64, k: &ed25519_dalek::SigningKey| {
            let body = CheckpointBody {
                id,
                first_seq: first,
                last_seq: last,
                time_us: 0,
                merkle_root: [1; 32],
                head_hash: [2; 32],
            };
            use ed25519_dalek::Signer;
            let signature = k.sign(&body.message()).to_bytes().to_vec();
            Checkpoint { key_id: keys::key_id(&k.verifying_key()), body, signature }
        };
        let trusted = [key.verifying_key()];
        let good = [cp(1, 1, 10, &key), cp(2, 11, 20, &key)];
        let (sealed, findings, checked) = check_checkpoints(&good, &trusted);
        assert_eq!((sealed.len(), findings.len(), checked), (2, 0, 2));

        let missing = [cp(1, 1, 10, &key), cp(3, 21, 30, &key)];
        let (_, f, _) = check_checkpoints(&missing, &trusted);
        assert_eq!((f[0].kind, f[0].seq), (Tamper::CheckpointMissing, 11));

        let mut forged = good.clone();
        forged[1].signature[0] ^= 1;
        let (sealed, f, _) = check_checkpoints(&forged, &trusted);
        assert_eq!((sealed.len(), f[0].kind, f[0].checkpoint), (1, Tamper::CheckpointForged, Some(2)));

        let foreign = [cp(1, 1, 10, &other)];
        let (_, f, _) = check_checkpoints(&foreign, &trusted);
        assert_eq!(f[0].kind, Tamper::CheckpointForged);
        assert!(f[0].message.contains("not a trusted key"), "{}", f[0].message);

        let (_, f, checked) = check_checkpoints(&foreign, &[]);
        assert_eq!((f.len(), checked), (0, 0), "without keys signatures are not checked");
    }
}
