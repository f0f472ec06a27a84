//! The outbox: the only way out of a workspace. A file placed in the outbox directory is, once
//! it stops changing, hashed and scanned in one streaming pass, then submitted to the control
//! plane's airlock (manifest first, then the content) and moved to `.submitted/`. It is never
//! sent anywhere else.
//!
//! The directory is polled (every couple of seconds, at most [`MAX_ENTRIES`] names a pass)
//! rather than watched with inotify: the outbox is often a network or container volume where
//! inotify misses writes made from other mounts, polling a handful of files costs nothing, and
//! "size and mtime unchanged for a while" is needed anyway to know a file is complete.
//!
//! **The outbox belongs to the researcher; the agent is root (in a VM).** Every operation works
//! from directory handles ([`fsx`]): entries are named relative to the outbox handle, opened
//! with `O_NOFOLLOW|O_NONBLOCK` and checked after opening (a regular file with one link, the
//! very inode that was scanned). Symlinks, FIFOs, sockets, devices, directories and hard-linked
//! files are refused: reported to the control plane as `outboxRefused` violations and listed
//! for the researcher in [`NOTE_NAME`]. `.submitted` must be a directory the agent owns that no
//! one else may write; anything else under that name is set aside and reported.
//!
//! Submission state (the manifest, its idempotency key, whether the content was accepted) lives
//! in the agent's state directory, which researchers cannot write, keyed by name and checked
//! against the inode, so a retry or a restart resubmits the same id and never trusts the outbox.

pub(crate) mod fsx;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use noexit_crds::agent::{EventKind, OutboxManifest, ScanReport, ScanVerdict, Violation, ViolationKind};
use rustix::fs::FileType;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::client::{ApiClient, Backoff, ClientError};
use crate::dlp::{Detectors, ScanResult};
use crate::spool::Spool;

pub use fsx::Entry;

/// Names looked at per pass; the rest wait for the next pass.
pub const MAX_ENTRIES: usize = 10_000;
/// A file must keep its size and mtime this long before it is taken.
pub const STABLE_FOR: Duration = Duration::from_secs(2);
/// Files larger than this are submitted unscanned, for manual review (config `dlp.maxScanBytes`).
pub const DEFAULT_MAX_SCAN_BYTES: u64 = 256 << 20;
pub const SUBMITTED_DIR: &str = ".submitted";
/// The note listing refused entries for the researcher (never submitted itself).
pub const NOTE_NAME: &str = "NOEXIT-REFUSED.txt";
/// Mode of the outbox directory when none is configured: anyone may drop files, only the
/// owner of a file may remove it (as `/tmp`).
pub const DEFAULT_MODE: u32 = 0o1777;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox file {name:?}: {op}: {source}")]
    Io { name: String, op: &'static str, source: io::Error },
    #[error("outbox file {name:?}: {source}")]
    Api { name: String, source: ClientError },
    #[error("outbox file {name:?}: changed while being submitted; it will be scanned again")]
    Changed { name: String },
    #[error("outbox entry {name:?} refused: {}", .why.reason())]
    Refused { name: String, why: Refusal },
}

/// Why an outbox entry is not submitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Refusal {
    Symlink,
    Fifo,
    Socket,
    Device,
    Directory,
    /// A regular file with more than one name: possibly a link to a file the researcher could
    /// not read, placed so the agent (root) reads it.
    HardLink,
    NotUtf8,
    Backslash,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Symlink => "a symbolic link; only regular files are submitted (copy the file itself)",
            Refusal::Fifo => "a FIFO (named pipe); only regular files are submitted",
            Refusal::Socket => "a socket; only regular files are submitted",
            Refusal::Device => "a device node; only regular files are submitted",
            Refusal::Directory => "a directory; only regular files at the top of the outbox are submitted",
            Refusal::HardLink => "a file with more than one hard link; copy it instead of linking it",
            Refusal::NotUtf8 => "the name is not UTF-8; rename it",
            Refusal::Backslash => "names with a backslash are refused by the airlock; rename it",
        }
    }

    fn of_type(kind: FileType) -> Option<Refusal> {
        match kind {
            FileType::RegularFile => None,
            FileType::Symlink => Some(Refusal::Symlink),
            FileType::Fifo => Some(Refusal::Fifo),
            FileType::Socket => Some(Refusal::Socket),
            FileType::Directory => Some(Refusal::Directory),
            FileType::CharacterDevice | FileType::BlockDevice | FileType::Unknown => Some(Refusal::Device),
        }
    }
}

/// Who owns the outbox directory and its mode; the agent creates and repairs it when root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutboxPolicy {
    /// `uid, gid` of the researcher; `None` leaves the directory to root.
    pub owner: Option<(u32, u32)>,
    /// Permission bits (including sticky/setgid) of the directory.
    pub mode: u32,
}

impl Default for OutboxPolicy {
    fn default() -> Self {
        Self { owner: None, mode: DEFAULT_MODE }
    }
}

/// The control plane's side of a submission (the API client, or a fake in tests).
pub trait Airlock: Send + Sync {
    fn submit_manifest(&self, m: &OutboxManifest) -> impl Future<Output = Result<(), ClientError>> + Send;
    /// Stream `size` bytes of `file` (positioned at its start) as the content of `id`.
    fn put_content(&self, id: Uuid, file: fs::File, size: u64) -> impl Future<Output = Result<(), ClientError>> + Send;
}

impl Airlock for ApiClient {
    async fn submit_manifest(&self, m: &OutboxManifest) -> Result<(), ClientError> {
        ApiClient::submit_manifest(self, m).await.map(drop)
    }
    async fn put_content(&self, id: Uuid, file: fs::File, size: u64) -> Result<(), ClientError> {
        ApiClient::put_content(self, id, file, size).await.map(drop)
    }
}

/// What the scan of a whole file says, as sent in the manifest.
pub fn report(result: Option<&ScanResult>, size: u64, max_scan: u64) -> ScanReport {
    let Some(result) = result else {
        return ScanReport {
            verdict: ScanVerdict::ManualReview,
            findings: Vec::new(),
            note: Some(format!("{size} bytes is over the automatic scan limit of {max_scan} bytes")),
        };
    };
    let verdict = match (result.findings.is_empty(), result.binary) {
        (false, _) => ScanVerdict::Flagged,
        (true, Some(_)) => ScanVerdict::ManualReview,
        (true, None) => ScanVerdict::Clean,
    };
    ScanReport { verdict, findings: crate::dlp::findings(result), note: result.binary.map(str::to_owned) }
}

/// Hash (SHA-256) and, unless larger than `max_scan`, scan a file given by path (the `scan`
/// command). Refuses anything but a regular file, without following or blocking on it.
pub fn hash_and_scan(path: &Path, det: &Detectors, max_scan: u64) -> io::Result<(u64, String, Option<ScanResult>)> {
    let flags = libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
    let mut f = std::os::unix::fs::OpenOptionsExt::custom_flags(fs::OpenOptions::new().read(true), flags).open(path)?;
    if !f.metadata()?.file_type().is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    hash_and_scan_reader(&mut f, det, max_scan)
}

/// Hash and scan in one streaming pass. Returns size, hex digest and the scan (None if the
/// content is, or grows while read, larger than `max_scan`).
pub fn hash_and_scan_reader(
    f: &mut impl Read,
    det: &Detectors,
    max_scan: u64,
) -> io::Result<(u64, String, Option<ScanResult>)> {
    let mut scanner = Some(det.scanner());
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
        if size > max_scan {
            scanner = None; // larger than the limit: manual review
        } else if let Some(s) = scanner.as_mut() {
            s.feed(&buf[..n]);
        }
    }
    Ok((size, hex::encode(hasher.finalize()), scanner.map(|s| s.finish())))
}

/// A submission in progress, kept in the agent's state directory so retries reuse its id.
#[derive(Serialize, Deserialize, Debug, Clone)]
struct Pending {
    manifest: OutboxManifest,
    dev: u64,
    ino: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    manifest_acked: bool,
    /// The airlock has the content: only the move to `.submitted` is left.
    #[serde(default)]
    content_acked: bool,
}

impl Pending {
    fn matches(&self, e: &Entry) -> bool {
        self.dev == e.dev
            && self.ino == e.ino
            && self.manifest.size == e.len
            && self.mtime_ns == e.mtime_ns
            && self.ctime_ns == e.ctime_ns
    }
}

/// Regular files (with what they looked like) and refused entries at the top of the outbox.
type Listing = (Vec<(String, Entry)>, Vec<(String, Refusal)>);

struct Tracked {
    observed: Entry,
    since: Instant,
    retry_at: Option<Instant>,
    backoff: Backoff,
}

/// Points in a submission where tests interfere (to stage races deterministically).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    BeforeScan,
    BeforeUpload,
    BeforeArchive,
}

type Hook = Box<dyn Fn(Stage, &str) + Send + Sync>;

pub struct Outbox<A: Airlock = ApiClient> {
    dir: PathBuf,
    state_dir: PathBuf,
    policy: OutboxPolicy,
    detectors: Detectors,
    max_scan: u64,
    airlock: A,
    spool: Arc<Mutex<Spool>>,
    spooled: Arc<Notify>,
    stable_for: Duration,
    retry_base: Duration,
    tracked: HashMap<String, Tracked>,
    /// Entries refused in the last pass, with the reason, as listed in the note.
    refused: HashMap<String, Refusal>,
    /// Refusals already reported: each is sent once while it lasts (again if it comes back).
    reported: HashSet<(String, Refusal)>,
    /// Last error of the directory itself, logged once until it changes.
    dir_error: Option<String>,
    hook: Option<Hook>,
}

impl<A: Airlock> Outbox<A> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dir: &Path,
        state_dir: &Path,
        policy: OutboxPolicy,
        detectors: Detectors,
        max_scan: u64,
        airlock: A,
        spool: Arc<Mutex<Spool>>,
        spooled: Arc<Notify>,
    ) -> Self {
        Self {
            dir: dir.into(),
            state_dir: state_dir.into(),
            policy,
            detectors,
            max_scan,
            airlock,
            spool,
            spooled,
            stable_for: STABLE_FOR,
            retry_base: Duration::from_secs(2),
            tracked: HashMap::new(),
            refused: HashMap::new(),
            reported: HashSet::new(),
            dir_error: None,
            hook: None,
        }
    }

    /// Shorter waits (tests).
    pub fn with_timing(mut self, stable_for: Duration, retry_base: Duration) -> Self {
        self.stable_for = stable_for;
        self.retry_base = retry_base;
        self
    }

    /// Call `hook` at each [`Stage`] of a submission (tests).
    pub fn with_hook(mut self, hook: impl Fn(Stage, &str) + Send + Sync + 'static) -> Self {
        self.hook = Some(Box::new(hook));
        self
    }

    pub async fn run(mut self, interval: Duration) {
        loop {
            self.pass().await;
            tokio::time::sleep(interval).await;
        }
    }

    /// Look at the directory once and submit every file that is ready.
    pub async fn pass(&mut self) {
        self.pass_at(Instant::now()).await;
    }

    /// [`Self::pass`] as if it were `now` (tests step time instead of sleeping).
    pub async fn pass_at(&mut self, now: Instant) {
        let outbox = match self.open_outbox() {
            Ok(fd) => {
                self.dir_error = None;
                fd
            }
            Err(e) => {
                let e = e.to_string();
                if self.dir_error.as_ref() != Some(&e) {
                    tracing::error!(outbox = %self.dir.display(), error = %e, "cannot open the outbox");
                    self.dir_error = Some(e);
                }
                return;
            }
        };
        let (files, refused) = match self.list(&outbox) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(outbox = %self.dir.display(), error = %e, "cannot list the outbox");
                return;
            }
        };
        self.report_refusals(&outbox, refused);
        self.tracked.retain(|name, _| files.iter().any(|(n, _)| n == name));
        for (name, observed) in files {
            let t = self.tracked.entry(name.clone()).or_insert_with(|| Tracked {
                observed,
                since: now,
                retry_at: None,
                backoff: Backoff::new(self.retry_base, Duration::from_secs(300)),
            });
            if t.observed != observed {
                t.observed = observed;
                t.since = now;
                continue;
            }
            if now.duration_since(t.since) < self.stable_for || t.retry_at.is_some_and(|r| now < r) {
                continue;
            }
            match self.submit(&outbox, &name, observed).await {
                Ok(()) => {
                    self.tracked.remove(&name);
                }
                Err(OutboxError::Refused { name, why }) => {
                    self.refuse(&name, why);
                    self.tracked.remove(&name);
                    self.write_note(&outbox);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "outbox submission failed; will retry");
                    if let Some(t) = self.tracked.get_mut(&name) {
                        t.retry_at = Some(now + t.backoff.next_delay());
                    }
                }
            }
        }
    }

    /// Opens the outbox (creating it if missing) and, when root, puts its owner and mode right.
    fn open_outbox(&self) -> io::Result<OwnedFd> {
        match fsx::mkdir(&self.dir, self.policy.mode) {
            Ok(()) => tracing::info!(outbox = %self.dir.display(), "outbox created"),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let fd = fsx::open_dir(&self.dir)?;
        if fsx::euid() == 0 {
            let (uid, gid, mode) = fsx::gid_of(&fd)?;
            if let Some((want_uid, want_gid)) = self.policy.owner
                && (uid, gid) != (want_uid, want_gid)
            {
                fsx::chown_fd(&fd, want_uid, want_gid)?;
                tracing::info!(outbox = %self.dir.display(), uid = want_uid, gid = want_gid, "outbox owner set");
            }
            if mode != self.policy.mode {
                fsx::chmod_fd(&fd, self.policy.mode)?;
                tracing::info!(outbox = %self.dir.display(), mode = format!("{:o}", self.policy.mode), "outbox mode set");
            }
        }
        Ok(fd)
    }

    /// Regular files at the top of the outbox, and the entries refused.
    fn list(&self, outbox: &OwnedFd) -> io::Result<Listing> {
        let (mut files, mut refused) = (Vec::new(), Vec::new());
        for raw in fsx::list(outbox, MAX_ENTRIES)? {
            let Ok(name) = String::from_utf8(raw) else {
                refused.push(("(a name that is not UTF-8)".to_owned(), Refusal::NotUtf8));
                continue;
            };
            if name.starts_with('.') || name == NOTE_NAME {
                continue;
            }
            let entry = match fsx::stat_at(outbox, &name) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // gone meanwhile
                Err(e) => return Err(e),
            };
            let why = if name.contains('\\') {
                Some(Refusal::Backslash)
            } else if let Some(why) = Refusal::of_type(entry.kind) {
                Some(why)
            } else if entry.nlink > 1 {
                Some(Refusal::HardLink)
            } else {
                None
            };
            match why {
                Some(why) => refused.push((name, why)),
                None => files.push((name, entry)),
            }
        }
        Ok((files, refused))
    }

    /// Reports new refusals (once each) and keeps the note in step with the current set.
    fn report_refusals(&mut self, outbox: &OwnedFd, refused: Vec<(String, Refusal)>) {
        let now: HashMap<String, Refusal> = refused.into_iter().collect();
        // A refused entry that is now gone (or was fixed) leaves the note.
        let changed = now != self.refused;
        self.reported.retain(|(n, w)| now.get(n) == Some(w));
        for (name, why) in &now {
            self.refuse(name, *why);
        }
        self.refused = now;
        if changed {
            self.write_note(outbox);
        }
    }

    /// Reports one refusal (event and log) unless it was reported before.
    fn refuse(&mut self, name: &str, why: Refusal) {
        self.refused.insert(name.to_owned(), why);
        if !self.reported.insert((name.to_owned(), why)) {
            return;
        }
        tracing::warn!(file = %name, reason = why.reason(), "outbox entry refused");
        self.record(Violation {
            kind: ViolationKind::OutboxRefused,
            count: 1,
            detail: format!("outbox entry {name:?} refused: {}", why.reason()),
        });
    }

    /// Writes (or removes) [`NOTE_NAME`]: a new file created exclusively under a temporary name
    /// and renamed over the old note, so nothing the researcher put there is followed.
    fn write_note(&self, outbox: &OwnedFd) {
        let result = if self.refused.is_empty() {
            match fsx::stat_at(outbox, NOTE_NAME) {
                Ok(e) if e.kind == FileType::RegularFile => fsx::unlink_at(outbox, NOTE_NAME),
                _ => Ok(()),
            }
        } else {
            let mut names: Vec<_> = self.refused.iter().collect();
            names.sort();
            let mut text =
                String::from("noexit: these outbox entries were not submitted (the control plane has been told):\n\n");
            for (name, why) in names {
                text.push_str(&format!("{name}: {}\n", why.reason()));
            }
            self.replace_file(outbox, NOTE_NAME, text.as_bytes())
        };
        if let Err(e) = result {
            tracing::error!(error = %e, note = NOTE_NAME, "cannot update the outbox note");
        }
    }

    fn replace_file(&self, outbox: &OwnedFd, name: &str, data: &[u8]) -> io::Result<()> {
        let tmp = format!(".noexit-{}.tmp", Uuid::new_v4().simple());
        let mut f = fsx::create_new_at(outbox, &tmp, 0o644)?;
        let written = f.write_all(data).and_then(|()| match self.policy.owner {
            Some((uid, gid)) if fsx::euid() == 0 => fsx::chown_fd(&f, uid, gid),
            _ => Ok(()),
        });
        let renamed = written.and_then(|()| fsx::rename_at(outbox, &tmp, outbox, name));
        if renamed.is_err() {
            let _ = fsx::unlink_at(outbox, &tmp);
        }
        renamed
    }

    fn state_path(&self, name: &str) -> PathBuf {
        self.state_dir.join(format!("{}.json", hex::encode(Sha256::digest(name.as_bytes()))))
    }

    fn stage(&self, stage: Stage, name: &str) {
        if let Some(hook) = &self.hook {
            hook(stage, name);
        }
    }

    async fn submit(&mut self, outbox: &OwnedFd, name: &str, observed: Entry) -> Result<(), OutboxError> {
        let io_err = |op| move |source| OutboxError::Io { name: name.to_owned(), op, source };
        let state_path = self.state_path(name);
        let saved: Option<Pending> = fs::read(&state_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let mut pending = match saved {
            Some(p) if p.matches(&observed) => p,
            _ => {
                self.stage(Stage::BeforeScan, name);
                self.scan(outbox, name, observed).await?
            }
        };
        if !pending.manifest_acked {
            match self.airlock.submit_manifest(&pending.manifest).await {
                Ok(()) => {}
                Err(e) if e.status() == Some(http::StatusCode::CONFLICT) => {} // already stored
                Err(source) => return Err(OutboxError::Api { name: name.into(), source }),
            }
            pending.manifest_acked = true;
            save(&state_path, &pending).map_err(io_err("save submission state"))?;
        }
        let id = pending.manifest.id;
        if !pending.content_acked {
            self.stage(Stage::BeforeUpload, name);
            let mut file = open_checked(outbox, name, &observed)?;
            file.rewind().map_err(io_err("rewind"))?;
            if let Err(source) = self.airlock.put_content(id, file, pending.manifest.size).await {
                if !source.retryable() {
                    // Refused (size or hash no longer match): scan again under a new id.
                    let _ = fs::remove_file(&state_path);
                    tracing::warn!(file = name, error = %source, "content refused; the file will be scanned again");
                    return Err(OutboxError::Changed { name: name.into() });
                }
                return Err(OutboxError::Api { name: name.into(), source });
            }
            pending.content_acked = true;
            save(&state_path, &pending).map_err(io_err("save submission state"))?;
        }
        self.stage(Stage::BeforeArchive, name);
        self.archive(outbox, name, &observed, id)?;
        let _ = fs::remove_file(&state_path);
        tracing::info!(file = name, %id, sha256 = %pending.manifest.sha256, verdict = ?pending.manifest.scan.verdict, "outbox file submitted for review");
        Ok(())
    }

    /// Moves the submitted file into `.submitted` (by handle; never over an existing name).
    fn archive(&mut self, outbox: &OwnedFd, name: &str, observed: &Entry, id: Uuid) -> Result<(), OutboxError> {
        let io_err = |op| move |source| OutboxError::Io { name: name.to_owned(), op, source };
        let done = self.submitted_dir(outbox).map_err(io_err("open .submitted"))?;
        // Only the inode that was submitted moves; a file put in its place stays for its own turn.
        match fsx::stat_at(outbox, name) {
            Ok(now) if now.dev == observed.dev && now.ino == observed.ino => {}
            Ok(_) => return Err(OutboxError::Changed { name: name.into() }),
            Err(e) => return Err(io_err("stat before moving to .submitted")(e)),
        }
        match fsx::rename_noreplace_at(outbox, name, &done, name) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                fsx::rename_noreplace_at(outbox, name, &done, &format!("{name}.{id}"))
            }
            r => r,
        }
        .map_err(io_err("move to .submitted"))
    }

    /// `.submitted`, created if missing. It must be a real directory owned by the agent that no
    /// one else can write; anything else in its place is set aside (renamed) and reported.
    fn submitted_dir(&mut self, outbox: &OwnedFd) -> io::Result<OwnedFd> {
        for _ in 0..2 {
            match fsx::mkdir_at(outbox, SUBMITTED_DIR, 0o755) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            let problem = match fsx::open_dir_at(outbox, SUBMITTED_DIR) {
                Ok(fd) => {
                    let (uid, _, mode) = fsx::gid_of(&fd)?;
                    if uid == fsx::euid() && mode & 0o022 == 0 {
                        return Ok(fd);
                    }
                    format!("a directory owned by uid {uid} with mode {mode:o}, not the agent's")
                }
                Err(e) if e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::ENOTDIR) => {
                    "not a directory (a symbolic link or a file)".to_owned()
                }
                Err(e) => return Err(e),
            };
            let aside = format!("{SUBMITTED_DIR}.set-aside-{}", Uuid::new_v4().simple());
            fsx::rename_noreplace_at(outbox, SUBMITTED_DIR, outbox, &aside)?;
            tracing::warn!(%problem, %aside, "outbox .submitted replaced");
            self.record(Violation {
                kind: ViolationKind::OutboxRefused,
                count: 1,
                detail: format!("outbox {SUBMITTED_DIR:?} was {problem}; renamed to {aside:?} and recreated"),
            });
        }
        Err(io::Error::other(format!("{SUBMITTED_DIR} keeps being replaced")))
    }

    async fn scan(&mut self, outbox: &OwnedFd, name: &str, observed: Entry) -> Result<Pending, OutboxError> {
        let io_err = |op| move |source| OutboxError::Io { name: name.to_owned(), op, source };
        let mut file = open_checked(outbox, name, &observed)?;
        let (det, max) = (self.detectors.clone(), self.max_scan);
        let (file, scanned) = tokio::task::spawn_blocking(move || {
            let r = hash_and_scan_reader(&mut file, &det, max);
            (file, r)
        })
        .await
        .map_err(|e| io_err("scan")(io::Error::other(e)))?;
        let (size, sha256, result) = scanned.map_err(io_err("read"))?;
        let after = fsx::stat_fd(&file).map_err(io_err("stat"))?;
        if size != observed.len || !after.same_content(&observed) {
            return Err(OutboxError::Changed { name: name.into() });
        }
        let scan = report(result.as_ref(), size, self.max_scan);
        let manifest = OutboxManifest {
            id: Uuid::now_v7(),
            file_name: name.to_owned(),
            size,
            sha256,
            submitted_by: user_name(observed.uid),
            scan,
        };
        if !manifest.scan.findings.is_empty() {
            self.record_dlp_hit(&manifest);
        }
        let pending = Pending {
            manifest,
            dev: observed.dev,
            ino: observed.ino,
            mtime_ns: observed.mtime_ns,
            ctime_ns: observed.ctime_ns,
            manifest_acked: false,
            content_acked: false,
        };
        fs::create_dir_all(&self.state_dir).map_err(io_err("create state directory"))?;
        save(&self.state_path(name), &pending).map_err(io_err("save submission state"))?;
        Ok(pending)
    }

    fn record_dlp_hit(&self, m: &OutboxManifest) {
        let found: Vec<String> = m
            .scan
            .findings
            .iter()
            .map(|f| format!("{}×{} (first at byte {})", f.kind, f.count, f.first_offset))
            .collect();
        self.record(Violation {
            kind: ViolationKind::DlpHit,
            count: m.scan.findings.iter().map(|f| f.count).sum(),
            detail: format!("outbox file {:?} ({}): {}", m.file_name, m.id, found.join(", ")),
        });
    }

    fn record(&self, v: Violation) {
        let recorded = self
            .spool
            .lock()
            .map_err(|_| "spool lock poisoned".to_owned())
            .and_then(|mut s| s.record(EventKind::Violation(v)).map_err(|e| e.to_string()));
        match recorded {
            Ok(_) => self.spooled.notify_one(),
            Err(e) => tracing::error!(error = %e, "could not record an outbox violation"),
        }
    }
}

/// Opens `name` in the outbox and checks it is the regular, singly linked file that was
/// observed, with the same content stamps.
fn open_checked(outbox: &OwnedFd, name: &str, observed: &Entry) -> Result<fs::File, OutboxError> {
    let file = match fsx::open_file_at(outbox, name) {
        Ok(f) => f,
        // Replaced by a symlink since it was listed.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(OutboxError::Refused { name: name.into(), why: Refusal::Symlink });
        }
        // A socket cannot be opened.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
            return Err(OutboxError::Refused { name: name.into(), why: Refusal::Socket });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(OutboxError::Changed { name: name.into() }),
        Err(source) => return Err(OutboxError::Io { name: name.into(), op: "open", source }),
    };
    let got = fsx::stat_fd(file.as_fd()).map_err(|source| OutboxError::Io { name: name.into(), op: "stat", source })?;
    if let Some(why) = Refusal::of_type(got.kind) {
        return Err(OutboxError::Refused { name: name.into(), why });
    }
    if got.nlink > 1 {
        return Err(OutboxError::Refused { name: name.into(), why: Refusal::HardLink });
    }
    if !got.same_content(observed) {
        return Err(OutboxError::Changed { name: name.into() });
    }
    Ok(file)
}

fn save(path: &Path, pending: &Pending) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let data = serde_json::to_vec(pending).map_err(io::Error::other)?;
    let mut f = fs::File::create(&tmp)?;
    f.write_all(&data)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

/// Account name of `uid` (`uid:<n>` when it has none).
pub fn user_name(uid: u32) -> String {
    let mut buf = vec![0u8; 4096];
    // SAFETY: `passwd` is a plain C struct of integers and pointers; all-zero is a valid value.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes into `pwd` and `buf`, both live and sized as passed.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
        return format!("uid:{uid}");
    }
    // SAFETY: on success pw_name points to a NUL-terminated string inside `buf`.
    unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) }.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn verdicts_never_pass_a_file_silently() {
        let det = Detectors::builtin();
        let clean = det.scan(b"mean age 47.2 years\n");
        assert_eq!(report(Some(&clean), 20, 100).verdict, ScanVerdict::Clean);
        let hit = det.scan(b"NHS 9434765919\n");
        assert_eq!(report(Some(&hit), 15, 100).verdict, ScanVerdict::Flagged);
        let bin = det.scan(b"\x00\x01\x02RData");
        let r = report(Some(&bin), 8, 100);
        assert_eq!(r.verdict, ScanVerdict::ManualReview);
        assert!(r.note.unwrap().contains("binary"));
        let big = report(None, 1000, 100);
        assert_eq!(big.verdict, ScanVerdict::ManualReview);
        assert!(big.note.unwrap().contains("over the automatic scan limit"));
    }

    #[test]
    fn hash_and_scan_streams_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("table.csv");
        let mut content = "ward,count\n".repeat(300_000).into_bytes();
        content.extend_from_slice(b"note,NHS 943 476 5919\n");
        fs::write(&p, &content).unwrap();
        let (size, sha, result) = hash_and_scan(&p, &Detectors::builtin(), u64::MAX).unwrap();
        assert_eq!(size, content.len() as u64);
        assert_eq!(sha, hex::encode(Sha256::digest(&content)));
        assert!(result.unwrap().has("nhsNumber"));
        // At the limit it is scanned; one byte over, it is not.
        let len = content.len() as u64;
        assert!(hash_and_scan(&p, &Detectors::builtin(), len).unwrap().2.is_some());
        assert!(hash_and_scan(&p, &Detectors::builtin(), len - 1).unwrap().2.is_none());
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(hash_and_scan(&link, &Detectors::builtin(), u64::MAX).is_err(), "symlinks are not followed");
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(rustix::fs::CWD, &fifo, FileType::Fifo, rustix::fs::Mode::from_raw_mode(0o644), 0).unwrap();
        let err = hash_and_scan(&fifo, &Detectors::builtin(), u64::MAX).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn root_has_a_name() {
        assert_eq!(user_name(0), "root");
        assert_eq!(user_name(4_000_000_000), "uid:4000000000");
    }

    // ---- the outbox against a fake airlock ------------------------------------------------

    #[derive(Default)]
    struct Seen {
        manifests: Vec<OutboxManifest>,
        manifest_calls: usize,
        contents: HashMap<Uuid, Vec<u8>>,
        /// HTTP status for the next manifest / content calls (success when empty).
        manifest_answers: VecDeque<u16>,
        content_answers: VecDeque<u16>,
    }

    #[derive(Clone, Default)]
    struct FakeAirlock(Arc<Mutex<Seen>>);

    fn status(code: u16) -> ClientError {
        ClientError::Status {
            method: http::Method::POST,
            path: "/v1/agent/outbox".into(),
            status: http::StatusCode::from_u16(code).unwrap(),
            body: String::new(),
        }
    }

    impl Airlock for FakeAirlock {
        async fn submit_manifest(&self, m: &OutboxManifest) -> Result<(), ClientError> {
            let mut s = self.0.lock().unwrap();
            s.manifest_calls += 1;
            match s.manifest_answers.pop_front() {
                Some(code) if code != 409 => Err(status(code)),
                answer => {
                    s.manifests.push(m.clone());
                    if answer == Some(409) { Err(status(409)) } else { Ok(()) }
                }
            }
        }
        async fn put_content(&self, id: Uuid, mut file: fs::File, size: u64) -> Result<(), ClientError> {
            if let Some(code) = self.0.lock().unwrap().content_answers.pop_front() {
                return Err(status(code));
            }
            let mut data = Vec::new();
            file.read_to_end(&mut data).unwrap();
            assert_eq!(data.len() as u64, size);
            self.0.lock().unwrap().contents.insert(id, data);
            Ok(())
        }
    }

    impl FakeAirlock {
        fn with<T>(&self, f: impl FnOnce(&mut Seen) -> T) -> T {
            f(&mut self.0.lock().unwrap())
        }
    }

    struct Lab {
        dir: tempfile::TempDir,
        airlock: FakeAirlock,
        spool: Arc<Mutex<Spool>>,
        t0: Instant,
    }

    impl Lab {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            fs::create_dir(dir.path().join("outbox")).unwrap();
            fs::create_dir(dir.path().join("outside")).unwrap();
            let spool = Arc::new(Mutex::new(Spool::open(&dir.path().join("spool"), 1 << 20).unwrap()));
            Self { dir, airlock: FakeAirlock::default(), spool, t0: Instant::now() }
        }
        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
        fn outbox(&self) -> Outbox<FakeAirlock> {
            self.outbox_with(OutboxPolicy::default())
        }
        fn outbox_with(&self, policy: OutboxPolicy) -> Outbox<FakeAirlock> {
            Outbox::new(
                &self.path("outbox"),
                &self.path("state"),
                policy,
                Detectors::builtin(),
                DEFAULT_MAX_SCAN_BYTES,
                self.airlock.clone(),
                self.spool.clone(),
                Arc::new(Notify::new()),
            )
            .with_timing(STABLE_FOR, Duration::from_secs(1))
        }
        fn at(&self, secs: f64) -> Instant {
            self.t0 + Duration::from_secs_f64(secs)
        }
        /// Passes `secs` apart until `until` seconds, bounded (a FIFO must never hang one).
        async fn passes(&self, ob: &mut Outbox<FakeAirlock>, from: f64, until: f64) {
            let mut t = from;
            while t <= until {
                tokio::time::timeout(Duration::from_secs(20), ob.pass_at(self.at(t))).await.expect("a pass hung");
                t += 1.0;
            }
        }
        fn violations(&self) -> Vec<Violation> {
            let batch = self.spool.lock().unwrap().read_batch(1000, u64::MAX).unwrap();
            batch
                .events
                .into_iter()
                .filter_map(|e| match e.kind {
                    EventKind::Violation(v) => Some(v),
                    EventKind::Session(_) => None,
                })
                .collect()
        }
        fn refused(&self) -> Vec<String> {
            let mut v: Vec<String> = self
                .violations()
                .into_iter()
                .filter(|v| v.kind == ViolationKind::OutboxRefused)
                .map(|v| v.detail)
                .collect();
            v.sort();
            v
        }
        fn note(&self) -> Option<String> {
            fs::read_to_string(self.path("outbox").join(NOTE_NAME)).ok()
        }
        fn ls(&self, dir: &str) -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(self.path(dir))
                .map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            v.sort();
            v
        }
    }

    #[tokio::test]
    async fn a_file_is_taken_only_once_it_has_stopped_changing() {
        let lab = Lab::new();
        let mut ob = lab.outbox();
        let f = lab.path("outbox/results.csv");
        fs::write(&f, "ward,count\nA,31\n").unwrap();
        ob.pass_at(lab.at(0.0)).await;
        ob.pass_at(lab.at(1.9)).await;
        assert_eq!(lab.airlock.with(|s| s.manifest_calls), 0, "unchanged for less than STABLE_FOR");
        // Still being written: every change starts the wait again.
        let mut w = fs::OpenOptions::new().append(true).open(&f).unwrap();
        w.write_all(b"B,17\n").unwrap();
        ob.pass_at(lab.at(2.5)).await;
        ob.pass_at(lab.at(4.4)).await;
        assert_eq!(lab.airlock.with(|s| s.manifest_calls), 0, "a growing file is not taken");
        ob.pass_at(lab.at(4.5)).await;
        assert_eq!(lab.airlock.with(|s| s.manifest_calls), 1, "stable for exactly STABLE_FOR");
        lab.airlock.with(|s| {
            let m = &s.manifests[0];
            assert_eq!(m.file_name, "results.csv");
            assert_eq!(s.contents[&m.id], b"ward,count\nA,31\nB,17\n");
            assert_eq!(m.size, 21);
        });
        assert_eq!(lab.ls("outbox"), [".submitted"]);
        assert_eq!(lab.ls("outbox/.submitted"), ["results.csv"]);
        assert!(lab.ls("state").is_empty(), "no state is left once the file is archived");
        // The same name again lands beside the first, never over it.
        fs::write(&f, "second").unwrap();
        lab.passes(&mut ob, 10.0, 13.0).await;
        let id = lab.airlock.with(|s| s.manifests[1].id);
        assert_eq!(lab.ls("outbox/.submitted"), ["results.csv".to_owned(), format!("results.csv.{id}")]);
    }

    #[tokio::test]
    async fn only_409_counts_as_an_accepted_manifest_other_refusals_are_retried() {
        let lab = Lab::new();
        let mut ob = lab.outbox();
        fs::write(lab.path("outbox/a.csv"), "x,1\n").unwrap();
        lab.airlock.with(|s| s.manifest_answers.extend([500, 403, 400]));
        ob.pass_at(lab.at(0.0)).await;
        ob.pass_at(lab.at(2.0)).await; // 500
        assert_eq!(lab.airlock.with(|s| (s.manifest_calls, s.contents.len())), (1, 0));
        assert_eq!(lab.ls("outbox"), ["a.csv"], "the file stays");
        ob.pass_at(lab.at(2.4)).await; // within the backoff (at least half the 1 s base)
        assert_eq!(lab.airlock.with(|s| s.manifest_calls), 1, "retried only after the backoff");
        lab.passes(&mut ob, 3.1, 30.0).await; // 403, 400, then accepted
        lab.airlock.with(|s| {
            assert_eq!(s.manifest_calls, 4);
            assert_eq!(s.contents.len(), 1);
            // Every attempt carried the same idempotency key.
            assert_eq!(s.manifests.len(), 1);
        });
        assert_eq!(lab.ls("outbox/.submitted"), ["a.csv"]);

        // 409: the API has this manifest already; that is acceptance, the content follows.
        fs::write(lab.path("outbox/b.csv"), "y,2\n").unwrap();
        lab.airlock.with(|s| s.manifest_answers.push_back(409));
        lab.passes(&mut ob, 40.0, 43.0).await;
        assert_eq!(lab.airlock.with(|s| (s.manifest_calls, s.contents.len())), (5, 2));
        assert_eq!(lab.ls("outbox/.submitted"), ["a.csv", "b.csv"]);
    }

    #[tokio::test]
    async fn saved_state_is_used_only_for_the_very_file_it_was_made_for() {
        let lab = Lab::new();
        let mut ob = lab.outbox();
        let f = lab.path("outbox/a.csv");
        fs::write(&f, "first!\n").unwrap();
        lab.airlock.with(|s| s.manifest_answers.push_back(500));
        ob.pass_at(lab.at(0.0)).await;
        ob.pass_at(lab.at(2.0)).await; // scanned, state saved, manifest refused
        // Rewritten in place (same inode, same size) before the retry.
        fs::write(&f, "second\n").unwrap();
        lab.passes(&mut ob, 3.0, 30.0).await;
        lab.airlock.with(|s| {
            let m = s.manifests.last().unwrap();
            assert_eq!(s.contents[&m.id], b"second\n");
            assert_eq!(m.sha256, hex::encode(Sha256::digest(b"second\n")), "the old scan was reused");
        });
    }

    #[tokio::test]
    async fn a_refused_upload_is_rescanned_under_a_new_id_and_a_failed_one_retried() {
        let lab = Lab::new();
        let mut ob = lab.outbox();
        fs::write(lab.path("outbox/a.csv"), "x,1\n").unwrap();
        lab.airlock.with(|s| s.content_answers.extend([503, 422]));
        ob.pass_at(lab.at(0.0)).await;
        ob.pass_at(lab.at(2.0)).await; // 503: retryable, same id
        ob.pass_at(lab.at(4.0)).await; // 422: refused, scanned again under a new id
        assert_eq!(lab.ls("outbox"), ["a.csv"]);
        lab.passes(&mut ob, 6.0, 30.0).await;
        lab.airlock.with(|s| {
            assert_eq!(s.manifests.len(), 2, "a new manifest after the refusal");
            assert_ne!(s.manifests[0].id, s.manifests[1].id);
            assert_eq!(s.contents.keys().collect::<Vec<_>>(), [&s.manifests[1].id]);
        });
        assert_eq!(lab.ls("outbox/.submitted"), ["a.csv"]);
    }

    #[tokio::test]
    async fn a_dlp_hit_is_recorded_for_its_own_file_with_the_offset() {
        let lab = Lab::new();
        let mut ob = lab.outbox();
        fs::write(lab.path("outbox/clean.csv"), "ward,count\nA,31\n").unwrap();
        fs::write(lab.path("outbox/notes.txt"), "seen today.\nNHS 943 476 5919 and 4111 1111 1111 1111\n").unwrap();
        lab.passes(&mut ob, 0.0, 3.0).await;
        let hits: Vec<Violation> = lab.violations().into_iter().filter(|v| v.kind == ViolationKind::DlpHit).collect();
        assert_eq!(hits.len(), 1, "{hits:?}");
        let id = lab.airlock.with(|s| s.manifests.iter().find(|m| m.file_name == "notes.txt").unwrap().id);
        assert_eq!(hits[0].count, 2);
        assert_eq!(
            hits[0].detail,
            format!(
                "outbox file \"notes.txt\" ({id}): nhsNumber×1 (first at byte 16), paymentCard×1 (first at byte 33)"
            )
        );
        lab.airlock.with(|s| {
            let clean = s.manifests.iter().find(|m| m.file_name == "clean.csv").unwrap();
            assert_eq!(clean.scan.verdict, ScanVerdict::Clean);
            let notes = s.manifests.iter().find(|m| m.file_name == "notes.txt").unwrap();
            assert_eq!(notes.scan.findings[0].first_offset, 16);
            assert_eq!(
                notes.submitted_by,
                user_name(fs::metadata(lab.path("outbox/notes.txt")).map_or_else(
                    |_| fs::metadata(lab.path("outbox/.submitted/notes.txt")).unwrap().uid(),
                    |m| m.uid()
                ))
            );
        });
    }

    #[tokio::test]
    async fn links_fifos_sockets_devices_and_directories_are_refused_reported_and_noted() {
        let lab = Lab::new();
        let mut ob = lab.outbox();
        let outside = lab.path("outside/shadow");
        fs::write(&outside, "root:$6$secret\n").unwrap();
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o600)).unwrap();
        let o = |n: &str| lab.path("outbox").join(n);
        std::os::unix::fs::symlink(&outside, o("file-link")).unwrap();
        std::os::unix::fs::symlink(lab.path("outside"), o("dir-link")).unwrap();
        fs::hard_link(&outside, o("hard-link")).unwrap();
        let mode = rustix::fs::Mode::from_raw_mode(0o666);
        rustix::fs::mknodat(rustix::fs::CWD, o("pipe"), FileType::Fifo, mode, 0).unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(o("socket")).unwrap();
        fs::create_dir(o("subdir")).unwrap();
        let root = fsx::euid() == 0;
        if root {
            let null = rustix::fs::makedev(1, 3);
            rustix::fs::mknodat(rustix::fs::CWD, o("device"), FileType::CharacterDevice, mode, null).unwrap();
        }
        fs::write(o("ok.csv"), "fine\n").unwrap();
        lab.passes(&mut ob, 0.0, 4.0).await;

        let names: Vec<String> = lab.airlock.with(|s| s.manifests.iter().map(|m| m.file_name.clone()).collect());
        assert_eq!(names, ["ok.csv"]);
        assert!(lab.airlock.with(|s| !s.contents.values().any(|c| c.starts_with(b"root:"))));
        let mut want = vec![
            "outbox entry \"dir-link\" refused: a symbolic link; only regular files are submitted (copy the file itself)",
            "outbox entry \"file-link\" refused: a symbolic link; only regular files are submitted (copy the file itself)",
            "outbox entry \"hard-link\" refused: a file with more than one hard link; copy it instead of linking it",
            "outbox entry \"pipe\" refused: a FIFO (named pipe); only regular files are submitted",
            "outbox entry \"socket\" refused: a socket; only regular files are submitted",
            "outbox entry \"subdir\" refused: a directory; only regular files at the top of the outbox are submitted",
        ];
        if root {
            want.push("outbox entry \"device\" refused: a device node; only regular files are submitted");
            want.sort();
        }
        assert_eq!(lab.refused(), want, "each refusal reported once, however many passes");
        let note = lab.note().expect("a note for the researcher");
        for n in ["dir-link", "file-link", "hard-link", "pipe", "socket", "subdir"] {
            assert!(note.contains(&format!("\n{n}: ")), "{n} missing from the note:\n{note}");
        }
        assert!(!note.contains("ok.csv"));
        // Nothing was written outside, and the target of the links is as it was.
        assert_eq!(lab.ls("outside"), ["shadow"]);
        assert_eq!(fs::read_to_string(&outside).unwrap(), "root:$6$secret\n");

        // Fixed by the researcher: the note goes away.
        for n in ["dir-link", "file-link", "hard-link", "pipe", "socket", "device"] {
            let _ = fs::remove_file(o(n));
        }
        fs::remove_dir(o("subdir")).unwrap();
        lab.passes(&mut ob, 5.0, 5.0).await;
        assert_eq!(lab.note(), None);
    }

    #[tokio::test]
    async fn a_swapped_submitted_dir_is_set_aside_and_nothing_is_placed_through_it() {
        let lab = Lab::new();
        let mut ob = lab.outbox();
        // `.submitted -> ../outside` (think `/etc`) before the agent ever made it.
        std::os::unix::fs::symlink(lab.path("outside"), lab.path("outbox/.submitted")).unwrap();
        fs::write(lab.path("outbox/passwd"), "evil::0:0::/:/bin/sh\n").unwrap();
        lab.passes(&mut ob, 0.0, 3.0).await;
        assert!(lab.ls("outside").is_empty(), "a file was placed through the symlink");
        assert_eq!(lab.ls("outbox/.submitted"), ["passwd"]);
        assert!(!fs::symlink_metadata(lab.path("outbox/.submitted")).unwrap().file_type().is_symlink());
        let aside: Vec<String> =
            lab.ls("outbox").into_iter().filter(|n| n.starts_with(".submitted.set-aside-")).collect();
        assert_eq!(aside.len(), 1);
        assert!(fs::symlink_metadata(lab.path("outbox").join(&aside[0])).unwrap().file_type().is_symlink());
        let refused = lab.refused();
        assert_eq!(refused.len(), 1);
        assert!(refused[0].contains("not a directory (a symbolic link or a file)"), "{refused:?}");

        // Swapped again between upload and archive (the race): still nothing goes outside.
        let outbox = lab.path("outbox");
        let outside = lab.path("outside");
        let mut ob = lab.outbox().with_hook(move |stage, _| {
            if stage == Stage::BeforeArchive {
                fs::rename(outbox.join(".submitted"), outbox.join(".old")).unwrap();
                std::os::unix::fs::symlink(&outside, outbox.join(".submitted")).unwrap();
            }
        });
        fs::write(lab.path("outbox/shadow"), "x\n").unwrap();
        lab.passes(&mut ob, 10.0, 13.0).await;
        assert!(lab.ls("outside").is_empty(), "a file was placed through the swapped symlink");
        assert_eq!(lab.ls("outbox/.submitted"), ["shadow"]);
        assert_eq!(lab.refused().len(), 2);

        // A directory someone else made (or that others may write) is not the agent's either.
        let mut ob = lab.outbox();
        fs::rename(lab.path("outbox/.submitted"), lab.path("outbox/.older")).unwrap();
        fs::create_dir(lab.path("outbox/.submitted")).unwrap();
        fs::set_permissions(lab.path("outbox/.submitted"), fs::Permissions::from_mode(0o777)).unwrap();
        fs::write(lab.path("outbox/third"), "3\n").unwrap();
        lab.passes(&mut ob, 20.0, 23.0).await;
        assert_eq!(fs::metadata(lab.path("outbox/.submitted")).unwrap().mode() & 0o777, 0o755);
        assert_eq!(lab.ls("outbox/.submitted"), ["third"]);
        assert!(lab.refused().iter().any(|r| r.contains("with mode 777, not the agent's")), "{:?}", lab.refused());
    }

    #[tokio::test]
    async fn a_file_swapped_for_a_link_or_fifo_mid_submission_is_never_read() {
        let lab = Lab::new();
        let secret = lab.path("outside/secret");
        fs::write(&secret, "0123456789\n").unwrap();
        let outbox = lab.path("outbox");
        for (stage, swap) in [
            (Stage::BeforeScan, "symlink"),
            (Stage::BeforeUpload, "symlink"),
            (Stage::BeforeScan, "fifo"),
            (Stage::BeforeUpload, "fifo"),
            (Stage::BeforeUpload, "other file"),
        ] {
            let name = format!("{stage:?}-{swap}").replace(' ', "-");
            let (o, s, sw) = (outbox.clone(), secret.clone(), swap);
            let target = name.clone();
            let mut ob = lab.outbox().with_hook(move |at, n| {
                if at != stage || n != target {
                    return;
                }
                let p = o.join(n);
                fs::remove_file(&p).unwrap();
                match sw {
                    "symlink" => std::os::unix::fs::symlink(&s, &p).unwrap(),
                    "fifo" => rustix::fs::mknodat(
                        rustix::fs::CWD,
                        &p,
                        FileType::Fifo,
                        rustix::fs::Mode::from_raw_mode(0o666),
                        0,
                    )
                    .unwrap(),
                    _ => fs::write(&p, "ABCDEFGHIJ\n").unwrap(), // same size, another inode
                }
            });
            fs::write(outbox.join(&name), "same size!\n").unwrap();
            lab.passes(&mut ob, 0.0, 3.0).await;
            lab.airlock.with(|s| {
                assert!(
                    !s.contents.values().any(|c| c == b"0123456789\n" || c == b"ABCDEFGHIJ\n"),
                    "{name}: swapped content was uploaded under the scanned manifest"
                );
            });
            fs::remove_file(outbox.join(&name)).unwrap();
        }
        let refused = lab.refused();
        assert_eq!(refused.len(), 4, "{refused:?}");
        assert!(refused.iter().all(|r| r.contains("symbolic link") || r.contains("FIFO")), "{refused:?}");
    }

    #[tokio::test]
    async fn accepted_content_is_never_sent_twice_when_archiving_fails() {
        let lab = Lab::new();
        let outbox = lab.path("outbox");
        let airlock = lab.airlock.clone();
        let block = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let blocking = block.clone();
        // Both archive names taken: the move fails until they are gone.
        let mut ob = lab.outbox().with_hook(move |stage, n| {
            if stage == Stage::BeforeArchive && blocking.load(std::sync::atomic::Ordering::SeqCst) {
                let id = airlock.with(|s| s.manifests[0].id);
                let _ = fs::create_dir(outbox.join(".submitted"));
                let _ = fs::write(outbox.join(".submitted").join(n), "taken");
                let _ = fs::write(outbox.join(".submitted").join(format!("{n}.{id}")), "taken");
            }
        });
        fs::write(lab.path("outbox/a.csv"), "x,1\n").unwrap();
        lab.passes(&mut ob, 0.0, 30.0).await;
        assert_eq!(lab.ls("outbox"), [".submitted", "a.csv"]);
        assert_eq!(lab.airlock.with(|s| (s.manifest_calls, s.contents.len())), (1, 1), "sent once");
        // A restart reads the same state.
        block.store(false, std::sync::atomic::Ordering::SeqCst);
        let id = lab.airlock.with(|s| s.manifests[0].id);
        fs::remove_file(lab.path(&format!("outbox/.submitted/a.csv.{id}"))).unwrap();
        let mut ob = lab.outbox();
        lab.passes(&mut ob, 40.0, 43.0).await;
        assert_eq!(lab.airlock.with(|s| (s.manifest_calls, s.contents.len())), (1, 1), "not sent again");
        assert_eq!(fs::read_to_string(lab.path(&format!("outbox/.submitted/a.csv.{id}"))).unwrap(), "x,1\n");
        assert_eq!(lab.ls("outbox"), [".submitted"]);
    }

    #[tokio::test]
    async fn the_outbox_is_made_and_kept_with_its_owner_and_mode() {
        if fsx::euid() != 0 {
            eprintln!("SKIPPED outbox owner test: not root");
            return;
        }
        let lab = Lab::new();
        fs::remove_dir(lab.path("outbox")).unwrap();
        let policy = OutboxPolicy { owner: Some((4242, 4343)), mode: 0o2770 };
        let mut ob = lab.outbox_with(policy);
        ob.pass_at(lab.at(0.0)).await;
        let meta = |p: &str| fs::symlink_metadata(lab.path(p)).unwrap();
        let m = meta("outbox");
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (4242, 4343, 0o2770));
        // Changed behind the agent's back: put back on the next pass.
        rustix::fs::chown(lab.path("outbox"), Some(rustix::fs::Uid::ROOT), Some(rustix::fs::Gid::ROOT)).unwrap();
        fs::set_permissions(lab.path("outbox"), fs::Permissions::from_mode(0o755)).unwrap();
        ob.pass_at(lab.at(1.0)).await;
        let m = meta("outbox");
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (4242, 4343, 0o2770));
        // The note belongs to the researcher, so they can remove it; .submitted to the agent.
        fs::create_dir(lab.path("outbox/sub")).unwrap();
        fs::write(lab.path("outbox/f"), "1").unwrap();
        lab.passes(&mut ob, 2.0, 5.0).await;
        let n = meta(&format!("outbox/{NOTE_NAME}"));
        assert_eq!((n.uid(), n.gid(), n.mode() & 0o777), (4242, 4343, 0o644));
        let d = meta("outbox/.submitted");
        assert_eq!((d.uid(), d.mode() & 0o777), (0, 0o755));

        // Without an owner the default is root's, world-writable with the sticky bit.
        let lab = Lab::new();
        fs::remove_dir(lab.path("outbox")).unwrap();
        lab.outbox().pass_at(lab.at(0.0)).await;
        let m = fs::metadata(lab.path("outbox")).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o7777), (0, 0o1777));
    }

    #[tokio::test]
    async fn an_outbox_that_is_a_symlink_is_not_used() {
        let lab = Lab::new();
        fs::remove_dir(lab.path("outbox")).unwrap();
        std::os::unix::fs::symlink(lab.path("outside"), lab.path("outbox")).unwrap();
        fs::write(lab.path("outside/x.csv"), "1\n").unwrap();
        let mut ob = lab.outbox();
        lab.passes(&mut ob, 0.0, 3.0).await;
        assert_eq!(lab.airlock.with(|s| s.manifest_calls), 0);
        assert_eq!(lab.ls("outside"), ["x.csv"]);
    }
}
