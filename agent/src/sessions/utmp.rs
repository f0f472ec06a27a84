//! Terminal logins and logouts from the binary `utmp`/`wtmp` files (glibc layout, 384-byte
//! records on 64-bit Linux). `wtmp` is a log: we follow it from a saved offset. `utmp` is the
//! current table: we read it whole to count sessions and find their ttys for idle time.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use noexit_crds::agent::{AgentEvent, EventKind, SessionAction, SessionEvent};
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub const DEFAULT_WTMP: &str = "/var/log/wtmp";
pub const DEFAULT_UTMP: &str = "/var/run/utmp";

pub const RECORD_SIZE: usize = 384;
const USER_PROCESS: i16 = 7;
const DEAD_PROCESS: i16 = 8;

/// The fields of a `struct utmp` record the agent uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: i16,
    pub pid: i32,
    pub line: String,
    pub user: String,
    pub host: String,
    pub time: i64,
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Decode one record (`ut_type` @0, `ut_pid` @4, `ut_line[32]` @8, `ut_user[32]` @44,
/// `ut_host[256]` @76, `ut_tv.tv_sec` @340).
pub fn parse(rec: &[u8; RECORD_SIZE]) -> Record {
    let i16_at = |o: usize| i16::from_ne_bytes([rec[o], rec[o + 1]]);
    let i32_at = |o: usize| i32::from_ne_bytes([rec[o], rec[o + 1], rec[o + 2], rec[o + 3]]);
    Record {
        kind: i16_at(0),
        pid: i32_at(4),
        line: c_string(&rec[8..40]),
        user: c_string(&rec[44..76]),
        host: c_string(&rec[76..332]),
        time: i64::from(i32_at(340)),
    }
}

/// Encode a record (tests and tools that write wtmp).
pub fn encode(r: &Record) -> [u8; RECORD_SIZE] {
    let mut rec = [0u8; RECORD_SIZE];
    rec[0..2].copy_from_slice(&r.kind.to_ne_bytes());
    rec[4..8].copy_from_slice(&r.pid.to_ne_bytes());
    let put = |rec: &mut [u8; RECORD_SIZE], at: usize, len: usize, s: &str| {
        let b = s.as_bytes();
        rec[at..at + b.len().min(len)].copy_from_slice(&b[..b.len().min(len)]);
    };
    put(&mut rec, 8, 32, &r.line);
    put(&mut rec, 44, 32, &r.user);
    put(&mut rec, 76, 256, &r.host);
    rec[340..344].copy_from_slice(&(r.time as i32).to_ne_bytes());
    rec
}

/// Logged-in terminal sessions: `USER_PROCESS` entries of `utmp`.
pub fn current_sessions(utmp: &Path) -> io::Result<Vec<Record>> {
    let data = match fs::read(utmp) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(data
        .chunks_exact(RECORD_SIZE)
        .filter_map(|c| <&[u8; RECORD_SIZE]>::try_from(c).ok())
        .map(parse)
        .filter(|r| r.kind == USER_PROCESS && !r.user.is_empty())
        .collect())
}

/// Follows `wtmp` from a saved position (`<inode> <offset>` in `state`), turning records into
/// login/logout events. A rotated file (new inode, or shorter than the offset) is read from the
/// start.
#[derive(Debug)]
pub struct WtmpFollower {
    path: PathBuf,
    state: PathBuf,
    inode: u64,
    offset: u64,
    /// tty → user of open logins, since logout records carry no user name.
    open: HashMap<String, String>,
}

impl WtmpFollower {
    /// Without a saved position, start at the current end: history before the agent first ran
    /// is not reported.
    pub fn new(path: &Path, state: &Path) -> Self {
        let saved = fs::read_to_string(state).ok().and_then(|s| {
            let mut it = s.split_whitespace().map(str::parse::<u64>);
            match (it.next(), it.next()) {
                (Some(Ok(i)), Some(Ok(o))) => Some((i, o)),
                _ => None,
            }
        });
        let (inode, offset) = saved.unwrap_or_else(|| {
            fs::metadata(path).map(|m| (m.ino(), m.len() - m.len() % RECORD_SIZE as u64)).unwrap_or((0, 0))
        });
        Self { path: path.into(), state: state.into(), inode, offset, open: HashMap::new() }
    }

    /// New events since the last call. Call [`Self::commit`] once they are spooled.
    ///
    /// Each event's idempotency key is a UUIDv7 derived from the record (its time, and a hash of
    /// the file's inode, the record's offset and its bytes), so a record read again after a crash
    /// between spooling and [`Self::commit`] gets the same key and the API stores it once.
    pub fn poll(&mut self) -> io::Result<Vec<AgentEvent>> {
        let mut f = match fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let meta = f.metadata()?;
        if meta.ino() != self.inode || meta.len() < self.offset {
            self.inode = meta.ino();
            self.offset = 0;
        }
        f.seek(SeekFrom::Start(self.offset))?;
        let mut data = Vec::new();
        f.take(4096 * RECORD_SIZE as u64).read_to_end(&mut data)?;
        let mut events = Vec::new();
        for chunk in data.chunks_exact(RECORD_SIZE) {
            let Ok(rec) = <&[u8; RECORD_SIZE]>::try_from(chunk) else { break };
            let r = parse(rec);
            let key = record_key(self.inode, self.offset, rec, r.time);
            self.offset += RECORD_SIZE as u64;
            let session = match r.kind {
                USER_PROCESS if !r.user.is_empty() => {
                    self.open.insert(r.line.clone(), r.user.clone());
                    event(SessionAction::Login, r.user, &r.line, &r.host)
                }
                DEAD_PROCESS if !r.line.is_empty() => {
                    let user = self.open.remove(&r.line).unwrap_or(r.user);
                    let user = if user.is_empty() { "unknown".to_owned() } else { user };
                    event(SessionAction::Logout, user, &r.line, &r.host)
                }
                _ => continue,
            };
            let at = DateTime::<Utc>::from_timestamp(r.time, 0).filter(|_| r.time > 0).unwrap_or_else(Utc::now);
            events.push(AgentEvent { id: key, at, kind: EventKind::Session(session) });
        }
        Ok(events)
    }

    /// Save the position after the events returned by [`Self::poll`] are recorded.
    pub fn commit(&self) -> io::Result<()> {
        let tmp = self.state.with_extension("tmp");
        fs::write(&tmp, format!("{} {}\n", self.inode, self.offset))?;
        fs::rename(&tmp, &self.state)
    }
}

fn record_key(inode: u64, offset: u64, rec: &[u8; RECORD_SIZE], time: i64) -> Uuid {
    let mut h = Sha256::new();
    h.update(inode.to_le_bytes());
    h.update(offset.to_le_bytes());
    h.update(rec);
    let digest = h.finalize();
    let mut rand = [0u8; 10];
    rand.copy_from_slice(&digest[..10]);
    let millis = u64::try_from(time).unwrap_or(0).saturating_mul(1000);
    uuid::Builder::from_unix_timestamp_millis(millis, &rand).into_uuid()
}

fn event(action: SessionAction, user: String, line: &str, host: &str) -> SessionEvent {
    SessionEvent {
        action,
        user,
        session: (!line.is_empty()).then(|| line.to_owned()),
        source: (!host.is_empty()).then(|| host.to_owned()),
        idle_seconds: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn rec(kind: i16, line: &str, user: &str, host: &str) -> [u8; RECORD_SIZE] {
        encode(&Record { kind, pid: 42, line: line.into(), user: user.into(), host: host.into(), time: 1_700_000_000 })
    }

    #[test]
    fn records_round_trip_at_the_glibc_offsets() {
        let r =
            Record { kind: 7, pid: 9, line: "pts/3".into(), user: "alice".into(), host: "10.0.0.5".into(), time: 5 };
        let bytes = encode(&r);
        assert_eq!(&bytes[8..13], b"pts/3");
        assert_eq!(&bytes[44..49], b"alice");
        assert_eq!(parse(&bytes), r);
    }

    #[test]
    fn wtmp_is_followed_from_the_saved_position() {
        let dir = tempfile::tempdir().unwrap();
        let wtmp = dir.path().join("wtmp");
        let state = dir.path().join("wtmp.pos");
        fs::write(&wtmp, rec(2, "~", "reboot", "")).unwrap(); // history before the first start
        let mut f = WtmpFollower::new(&wtmp, &state);
        assert!(f.poll().unwrap().is_empty());
        f.commit().unwrap();
        let mut w = fs::OpenOptions::new().append(true).open(&wtmp).unwrap();
        w.write_all(&rec(7, "pts/0", "alice", "10.1.2.3")).unwrap();
        w.write_all(&rec(8, "pts/0", "", "")).unwrap();
        w.write_all(&rec(7, "pts/1", "bob", "")).unwrap();
        w.write_all(&rec(7, "pts/1", "bob", "")[..100]).unwrap(); // half-written record
        let ev = f.poll().unwrap();
        let sessions: Vec<&SessionEvent> = ev
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::Session(s) => Some(s),
                EventKind::Violation(_) => None,
            })
            .collect();
        let got: Vec<_> = sessions.iter().map(|e| (e.action, e.user.as_str())).collect();
        assert_eq!(
            got,
            [(SessionAction::Login, "alice"), (SessionAction::Logout, "alice"), (SessionAction::Login, "bob")]
        );
        assert_eq!(sessions[0].source.as_deref(), Some("10.1.2.3"));
        assert!(ev.iter().all(|e| e.id.get_version_num() == 7));
        // A crash after spooling but before the commit: read again, with the same keys.
        let again: Vec<Uuid> = WtmpFollower::new(&wtmp, &state).poll().unwrap().iter().map(|e| e.id).collect();
        assert_eq!(again, ev.iter().map(|e| e.id).collect::<Vec<_>>());
        f.commit().unwrap();
        // after a restart nothing is reported twice
        let mut again = WtmpFollower::new(&wtmp, &state);
        assert!(again.poll().unwrap().is_empty());
    }

    #[test]
    fn current_sessions_are_user_processes() {
        let dir = tempfile::tempdir().unwrap();
        let utmp = dir.path().join("utmp");
        let mut data = Vec::new();
        data.extend_from_slice(&rec(7, "pts/0", "alice", ""));
        data.extend_from_slice(&rec(8, "pts/1", "", ""));
        data.extend_from_slice(&rec(6, "tty1", "LOGIN", ""));
        fs::write(&utmp, data).unwrap();
        let s = current_sessions(&utmp).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].user, "alice");
        assert!(current_sessions(&dir.path().join("none")).unwrap().is_empty());
    }
}
