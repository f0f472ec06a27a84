//! Durable on-disk queue of events not yet acknowledged by the control plane.
//!
//! Layout of the spool directory:
//! - `seg-<20 digits>.log`: append-only segments, one record per line:
//!   `<16 hex FNV-1a of the JSON> <AgentEvent JSON>\n`. An event counts as recorded only after
//!   its line is written and `fsync`ed. A line with a bad checksum (torn write after a crash) is
//!   skipped and logged; it was never reported as recorded.
//! - `cursor`: `<segment> <offset>` of the first unacknowledged record, replaced atomically
//!   (write, fsync, rename, fsync directory) after each ack. Segments wholly before the cursor
//!   are deleted.
//! - `lock`: `flock`ed by appenders, so the agent and `noexit-agent session …` hook commands
//!   can append at the same time.
//!
//! A crash anywhere leaves the cursor at or before the first undelivered event, so everything
//! undelivered is sent again; the API stores each event id once, so delivery is exactly-once.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use chrono::Utc;
use noexit_crds::agent::{AgentEvent, EventKind};
use uuid::Uuid;

/// Rotate to a new segment past this size.
const SEGMENT_BYTES: u64 = 1 << 20;
/// Default bound on the spool's disk use.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {dir}: {op}: {source}")]
    Io { dir: PathBuf, op: &'static str, source: io::Error },
    /// The bound is reached: the event was NOT recorded. Callers must keep it (retry later) or
    /// fail loudly; nothing is dropped silently.
    #[error("spool {dir} is full ({used} of {max} bytes): event not recorded")]
    Full { dir: PathBuf, used: u64, max: u64 },
    #[error("spool {dir}: cursor file is corrupt: {content:?}")]
    Cursor { dir: PathBuf, content: String },
}

impl SpoolError {
    /// Fixed label for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            SpoolError::Io { .. } => "io",
            SpoolError::Full { .. } => "full",
            SpoolError::Cursor { .. } => "cursor",
        }
    }
}

/// Position in the spool: segment number and byte offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    pub seg: u64,
    pub off: u64,
}

/// A batch read from the spool, to be acknowledged with [`Spool::ack`].
#[derive(Debug)]
pub struct Batch {
    pub events: Vec<AgentEvent>,
    /// Position after the last record in the batch.
    pub end: Pos,
    /// Records in the batch including unreadable ones skipped.
    records: u64,
}

impl Batch {
    /// Nothing was read (unreadable records count as read).
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }
}

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    cursor: Pos,
    /// How far records were counted into `depth`.
    counted_to: Pos,
    depth: u64,
}

impl Spool {
    /// Open (creating) the spool and count what is waiting.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        create_dir(dir)?;
        let cursor = read_cursor(dir)?;
        let mut spool = Self { dir: dir.to_owned(), max_bytes, cursor, counted_to: cursor, depth: 0 };
        spool.refresh()?;
        Ok(spool)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Events waiting for an ack (as of the last [`Self::refresh`]).
    pub fn depth(&self) -> u64 {
        self.depth
    }

    /// Record a new event with a fresh idempotency key. Returns it once it is on disk.
    pub fn record(&mut self, kind: EventKind) -> Result<AgentEvent, SpoolError> {
        let event = AgentEvent { id: Uuid::now_v7(), at: Utc::now(), kind };
        self.record_event(&event)?;
        Ok(event)
    }

    /// Record an event whose key the source chose (derived from the source, so that re-reading
    /// the source after a crash yields the same key).
    pub fn record_event(&mut self, event: &AgentEvent) -> Result<(), SpoolError> {
        append(&self.dir, self.max_bytes, std::slice::from_ref(event))?;
        self.refresh()
    }

    /// Count records appended since the last call (by this process or a hook command).
    pub fn refresh(&mut self) -> Result<(), SpoolError> {
        let mut counted = 0;
        let end = scan(&self.dir, self.counted_to, u64::MAX, usize::MAX, |_| counted += 1)?;
        self.depth += counted;
        self.counted_to = end;
        Ok(())
    }

    /// Up to `max_events` undelivered events (and at most about `max_bytes` of them), oldest first.
    pub fn read_batch(&self, max_events: usize, max_bytes: u64) -> Result<Batch, SpoolError> {
        let mut events = Vec::new();
        let mut records = 0;
        let end = scan(&self.dir, self.cursor, max_bytes, max_events, |line| {
            records += 1;
            match parse_line(line) {
                Some(ev) => events.push(ev),
                None => tracing::warn!(spool = %self.dir.display(), "skipping a corrupt spool record (torn write)"),
            }
        })?;
        Ok(Batch { events, end, records })
    }

    /// The control plane acknowledged `batch`: move the cursor past it and drop finished segments.
    pub fn ack(&mut self, batch: &Batch) -> Result<(), SpoolError> {
        if batch.end <= self.cursor {
            return Ok(());
        }
        write_cursor(&self.dir, batch.end)?;
        self.cursor = batch.end;
        self.depth = self.depth.saturating_sub(batch.records);
        if self.counted_to < self.cursor {
            self.counted_to = self.cursor;
        }
        for (seg, path) in segments(&self.dir)? {
            if seg < self.cursor.seg {
                fs::remove_file(&path).map_err(|source| io_err(&self.dir, "remove acknowledged segment", source))?;
            }
        }
        Ok(())
    }
}

/// Append events durably. Usable from any process: appenders hold an exclusive `flock`.
pub fn append(dir: &Path, max_bytes: u64, events: &[AgentEvent]) -> Result<(), SpoolError> {
    create_dir(dir)?;
    let mut data = Vec::new();
    for ev in events {
        let json = serde_json::to_vec(ev).map_err(|e| io_err(dir, "encode event", io::Error::other(e)))?;
        data.extend_from_slice(format!("{:016x} ", fnv1a(&json)).as_bytes());
        data.extend_from_slice(&json);
        data.push(b'\n');
    }
    let _lock = Lock::take(dir)?;
    let segs = segments(dir)?;
    let used: u64 = segs.iter().filter_map(|(_, p)| fs::metadata(p).ok()).map(|m| m.len()).sum();
    if used + data.len() as u64 > max_bytes {
        return Err(SpoolError::Full { dir: dir.to_owned(), used, max: max_bytes });
    }
    let (seq, new_segment) = match segs.last() {
        Some((seq, path)) if fs::metadata(path).map(|m| m.len()).unwrap_or(0) < SEGMENT_BYTES => (*seq, false),
        Some((seq, _)) => (seq + 1, true),
        None => (read_cursor(dir)?.seg.max(1), true),
    };
    let path = segment_path(dir, seq);
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(&path)
        .map_err(|source| io_err(dir, "open segment", source))?;
    // A writer that crashed mid-record left a line without its newline: end it, so the torn
    // record stays one (skipped) line instead of swallowing this one.
    let len = file.metadata().map_err(|source| io_err(dir, "stat segment", source))?.len();
    if len > 0 {
        let mut last = [0u8];
        file.seek(SeekFrom::Start(len - 1))
            .and_then(|_| file.read_exact(&mut last))
            .map_err(|s| io_err(dir, "read segment", s))?;
        if last[0] != b'\n' {
            data.insert(0, b'\n');
        }
    }
    file.write_all(&data).map_err(|source| io_err(dir, "write segment", source))?;
    file.sync_data().map_err(|source| io_err(dir, "fsync segment", source))?;
    if new_segment {
        sync_dir(dir)?;
    }
    Ok(())
}

fn parse_line(line: &[u8]) -> Option<AgentEvent> {
    let (sum, json) = (line.get(..16)?, line.get(17..)?);
    let sum = u64::from_str_radix(std::str::from_utf8(sum).ok()?, 16).ok()?;
    (sum == fnv1a(json)).then(|| serde_json::from_slice(json).ok()).flatten()
}

/// Walk complete lines from `from`, stopping after `max_records` or once `max_bytes` were read.
/// Returns the position after the last line visited.
fn scan(
    dir: &Path,
    from: Pos,
    max_bytes: u64,
    max_records: usize,
    mut visit: impl FnMut(&[u8]),
) -> Result<Pos, SpoolError> {
    let mut pos = from;
    let (mut bytes, mut records) = (0u64, 0usize);
    for (seg, path) in segments(dir)? {
        if seg < from.seg {
            continue;
        }
        if seg > pos.seg {
            pos = Pos { seg, off: 0 };
        }
        let mut file = File::open(&path).map_err(|source| io_err(dir, "open segment", source))?;
        file.seek(SeekFrom::Start(pos.off)).map_err(|source| io_err(dir, "seek segment", source))?;
        let mut reader = BufReader::with_capacity(64 * 1024, file);
        let mut line = Vec::new();
        loop {
            if records >= max_records || bytes >= max_bytes {
                return Ok(pos);
            }
            line.clear();
            let n = reader.read_until(b'\n', &mut line).map_err(|source| io_err(dir, "read segment", source))?;
            if n == 0 || line.last() != Some(&b'\n') {
                break; // end of segment, or a record still being written
            }
            pos.off += n as u64;
            bytes += n as u64;
            let body = &line[..n - 1];
            if !body.is_empty() {
                records += 1;
                visit(body);
            }
        }
    }
    Ok(pos)
}

fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SpoolError> {
    let mut segs = Vec::new();
    for entry in fs::read_dir(dir).map_err(|source| io_err(dir, "list", source))? {
        let entry = entry.map_err(|source| io_err(dir, "list", source))?;
        let name = entry.file_name();
        let seq = name.to_str().and_then(|n| n.strip_prefix("seg-")?.strip_suffix(".log")?.parse().ok());
        if let Some(seq) = seq {
            segs.push((seq, entry.path()));
        }
    }
    segs.sort();
    Ok(segs)
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("seg-{seq:020}.log"))
}

fn read_cursor(dir: &Path) -> Result<Pos, SpoolError> {
    let text = match fs::read_to_string(dir.join("cursor")) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Pos { seg: 1, off: 0 }),
        Err(source) => return Err(io_err(dir, "read cursor", source)),
    };
    let mut parts = text.split_whitespace().map(str::parse::<u64>);
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Ok(seg)), Some(Ok(off)), None) => Ok(Pos { seg, off }),
        _ => Err(SpoolError::Cursor { dir: dir.to_owned(), content: text }),
    }
}

fn write_cursor(dir: &Path, pos: Pos) -> Result<(), SpoolError> {
    let tmp = dir.join("cursor.tmp");
    let mut f = File::create(&tmp).map_err(|source| io_err(dir, "write cursor", source))?;
    f.write_all(format!("{} {}\n", pos.seg, pos.off).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|source| io_err(dir, "write cursor", source))?;
    fs::rename(&tmp, dir.join("cursor")).map_err(|source| io_err(dir, "replace cursor", source))?;
    sync_dir(dir)
}

fn create_dir(dir: &Path) -> Result<(), SpoolError> {
    fs::create_dir_all(dir).map_err(|source| io_err(dir, "create directory", source))
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|source| io_err(dir, "fsync directory", source))
}

fn io_err(dir: &Path, op: &'static str, source: io::Error) -> SpoolError {
    SpoolError::Io { dir: dir.to_owned(), op, source }
}

/// Exclusive `flock` on `<dir>/lock`, released when the file is closed on drop (or when the
/// process dies).
struct Lock(#[allow(dead_code, reason = "held for its drop")] File);

impl Lock {
    fn take(dir: &Path) -> Result<Self, SpoolError> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(|source| io_err(dir, "open lock", source))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_err(dir, "lock", io::Error::last_os_error()));
        }
        Ok(Self(f))
    }
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;
    use noexit_crds::agent::{SessionAction, SessionEvent};

    fn login(user: &str) -> EventKind {
        EventKind::Session(SessionEvent {
            action: SessionAction::Login,
            user: user.into(),
            session: None,
            source: None,
            idle_seconds: None,
        })
    }

    fn users(b: &Batch) -> Vec<String> {
        b.events
            .iter()
            .map(|e| match &e.kind {
                EventKind::Session(s) => s.user.clone(),
                EventKind::Violation(v) => v.detail.clone(),
            })
            .collect()
    }

    #[test]
    fn events_survive_reopen_until_acked() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        let first = s.record(login("a")).unwrap();
        s.record(login("b")).unwrap();
        s.record(login("c")).unwrap();
        assert_eq!(s.depth(), 3);
        let batch = s.read_batch(2, u64::MAX).unwrap();
        assert_eq!(users(&batch), ["a", "b"]);
        assert_eq!(batch.events[0].id, first.id);
        assert_eq!(first.id.get_version_num(), 7);
        drop(s); // crash before the ack: both are sent again
        let mut s = Spool::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        assert_eq!(s.depth(), 3);
        let batch = s.read_batch(2, u64::MAX).unwrap();
        assert_eq!(users(&batch), ["a", "b"]);
        s.ack(&batch).unwrap();
        assert_eq!(s.depth(), 1);
        let s = Spool::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        assert_eq!(s.depth(), 1);
        assert_eq!(users(&s.read_batch(10, u64::MAX).unwrap()), ["c"]);
    }

    #[test]
    fn other_processes_appends_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        let ev = AgentEvent { id: Uuid::now_v7(), at: Utc::now(), kind: login("hook") };
        append(dir.path(), DEFAULT_MAX_BYTES, &[ev]).unwrap();
        s.refresh().unwrap();
        assert_eq!(s.depth(), 1);
        assert_eq!(users(&s.read_batch(10, u64::MAX).unwrap()), ["hook"]);
    }

    #[test]
    fn a_torn_record_is_skipped_and_later_records_survive() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        s.record(login("a")).unwrap();
        let seg = segment_path(dir.path(), 1);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(b"0123456789abcdef {\"id\":\"0190").unwrap(); // crash mid-write
        drop(f);
        s.record(login("b")).unwrap();
        let batch = Spool::open(dir.path(), DEFAULT_MAX_BYTES).unwrap().read_batch(10, u64::MAX).unwrap();
        assert_eq!(users(&batch), ["a", "b"]);
        assert_eq!(batch.records, 3);
    }

    #[test]
    fn segments_rotate_and_acked_ones_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        let big = "x".repeat(200 * 1024);
        for _ in 0..12 {
            s.record(login(&big)).unwrap();
        }
        assert!(segments(dir.path()).unwrap().len() >= 2);
        let batch = s.read_batch(1000, u64::MAX).unwrap();
        assert_eq!(batch.events.len(), 12);
        s.ack(&batch).unwrap();
        assert_eq!(s.depth(), 0);
        assert_eq!(segments(dir.path()).unwrap().len(), 1, "only the active segment remains");
        s.record(login("after")).unwrap();
        assert_eq!(users(&s.read_batch(10, u64::MAX).unwrap()), ["after"]);
    }

    #[test]
    fn a_full_spool_refuses_loudly() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 600).unwrap();
        let mut recorded = 0;
        let err = loop {
            match s.record(login("someone")) {
                Ok(_) => recorded += 1,
                Err(e) => break e,
            }
        };
        assert!(recorded >= 2);
        assert_eq!(err.category(), "full");
        assert!(err.to_string().contains("event not recorded"), "{err}");
        assert_eq!(s.depth(), recorded);
    }
}
