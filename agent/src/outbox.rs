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
//! Submission state (the manifest and its idempotency key) lives in the spool directory, which
//! researchers cannot write, so a retry or a restart resubmits the same id.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use noexit_crds::agent::{EventKind, OutboxManifest, ScanReport, ScanVerdict, Violation, ViolationKind};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::client::{ApiClient, Backoff, ClientError};
use crate::dlp::{Detectors, ScanResult};
use crate::spool::Spool;

/// Names looked at per pass; the rest wait for the next pass.
pub const MAX_ENTRIES: usize = 10_000;
/// A file must keep its size and mtime this long before it is taken.
pub const STABLE_FOR: Duration = Duration::from_secs(2);
/// Files larger than this are submitted unscanned, for manual review (config `dlp.maxScanBytes`).
pub const DEFAULT_MAX_SCAN_BYTES: u64 = 256 << 20;
pub const SUBMITTED_DIR: &str = ".submitted";

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox file {name:?}: {op}: {source}")]
    Io { name: String, op: &'static str, source: io::Error },
    #[error("outbox file {name:?}: {source}")]
    Api { name: String, source: ClientError },
    #[error("outbox file {name:?}: changed while being submitted; it will be scanned again")]
    Changed { name: String },
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

/// Hash (SHA-256) and, unless larger than `max_scan`, scan a file in one streaming pass.
/// Returns size, hex digest and the scan (None if too large).
pub fn hash_and_scan(path: &Path, det: &Detectors, max_scan: u64) -> io::Result<(u64, String, Option<ScanResult>)> {
    let mut f = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
    let scan = f.metadata()?.len() <= max_scan;
    let mut scanner = scan.then(|| det.scanner());
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
        if let Some(s) = scanner.as_mut() {
            if size > max_scan {
                scanner = None; // grew past the limit while we read: manual review
            } else {
                s.feed(&buf[..n]);
            }
        }
    }
    Ok((size, hex::encode(hasher.finalize()), scanner.map(|s| s.finish())))
}

/// A submission in progress, kept on disk so retries reuse its id.
#[derive(Serialize, Deserialize, Debug, Clone)]
struct Pending {
    manifest: OutboxManifest,
    mtime_ns: i64,
    manifest_acked: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Observed {
    len: u64,
    mtime_ns: i64,
}

struct Tracked {
    observed: Observed,
    since: Instant,
    retry_at: Option<Instant>,
    backoff: Backoff,
}

pub struct Outbox {
    dir: PathBuf,
    state_dir: PathBuf,
    detectors: Detectors,
    max_scan: u64,
    client: ApiClient,
    spool: Arc<Mutex<Spool>>,
    spooled: Arc<Notify>,
    tracked: HashMap<String, Tracked>,
    warned: HashSet<String>,
    /// Last listing error, logged once until it changes.
    list_error: Option<String>,
}

impl Outbox {
    pub fn new(
        dir: &Path,
        state_dir: &Path,
        detectors: Detectors,
        max_scan: u64,
        client: ApiClient,
        spool: Arc<Mutex<Spool>>,
        spooled: Arc<Notify>,
    ) -> Self {
        Self {
            dir: dir.into(),
            state_dir: state_dir.into(),
            detectors,
            max_scan,
            client,
            spool,
            spooled,
            tracked: HashMap::new(),
            warned: HashSet::new(),
            list_error: None,
        }
    }

    pub async fn run(mut self, interval: Duration) {
        if let Err(e) = fs::create_dir_all(&self.dir) {
            tracing::error!(outbox = %self.dir.display(), error = %e, "cannot create the outbox");
        }
        loop {
            self.pass().await;
            tokio::time::sleep(interval).await;
        }
    }

    /// Look at the directory once and submit every file that is ready.
    pub async fn pass(&mut self) {
        let names = match self.list() {
            Ok(n) => {
                self.list_error = None;
                n
            }
            Err(e) => {
                let e = e.to_string();
                if self.list_error.as_ref() != Some(&e) {
                    tracing::error!(outbox = %self.dir.display(), error = %e, "cannot list the outbox");
                    self.list_error = Some(e);
                }
                return;
            }
        };
        let now = Instant::now();
        self.tracked.retain(|name, _| names.iter().any(|(n, _)| n == name));
        for (name, observed) in names {
            let t = self.tracked.entry(name.clone()).or_insert_with(|| Tracked {
                observed,
                since: now,
                retry_at: None,
                backoff: Backoff::new(Duration::from_secs(2), Duration::from_secs(300)),
            });
            if t.observed != observed {
                t.observed = observed;
                t.since = now;
                continue;
            }
            if now.duration_since(t.since) < STABLE_FOR || t.retry_at.is_some_and(|r| now < r) {
                continue;
            }
            match self.submit(&name, observed).await {
                Ok(()) => {
                    self.tracked.remove(&name);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "outbox submission failed; will retry");
                    if let Some(t) = self.tracked.get_mut(&name) {
                        t.retry_at = Some(Instant::now() + t.backoff.next_delay());
                    }
                }
            }
        }
    }

    /// Regular files at the top of the outbox. Anything else is logged once and left alone.
    fn list(&mut self) -> io::Result<Vec<(String, Observed)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)?.take(MAX_ENTRIES) {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                self.warn_once(entry.file_name().to_string_lossy().into_owned(), "name is not UTF-8; rename it");
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            if name.contains('\\') {
                self.warn_once(name, "names with a backslash are refused by the airlock; rename it");
                continue;
            }
            let meta = entry.metadata()?; // does not follow symlinks
            if !meta.file_type().is_file() {
                self.warn_once(name, "only regular files are submitted (not links, directories or devices)");
                continue;
            }
            out.push((name, Observed { len: meta.len(), mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec() }));
        }
        Ok(out)
    }

    fn warn_once(&mut self, name: String, why: &str) {
        if self.warned.insert(name.clone()) {
            tracing::warn!(file = %name, "outbox entry skipped: {why}");
        }
    }

    fn state_path(&self, name: &str) -> PathBuf {
        self.state_dir.join(format!("{}.json", hex::encode(Sha256::digest(name.as_bytes()))))
    }

    async fn submit(&mut self, name: &str, observed: Observed) -> Result<(), OutboxError> {
        let io_err = |op| move |source| OutboxError::Io { name: name.to_owned(), op, source };
        let path = self.dir.join(name);
        let state_path = self.state_path(name);
        let saved: Option<Pending> = fs::read(&state_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let mut pending = match saved {
            Some(p) if p.mtime_ns == observed.mtime_ns && p.manifest.size == observed.len => p,
            _ => self.scan(name, &path, observed).await?,
        };
        if !pending.manifest_acked {
            match self.client.submit_manifest(&pending.manifest).await {
                Ok(_) => {}
                Err(e) if e.status() == Some(http::StatusCode::CONFLICT) => {} // already stored
                Err(source) => return Err(OutboxError::Api { name: name.into(), source }),
            }
            pending.manifest_acked = true;
            save(&state_path, &pending).map_err(io_err("save submission state"))?;
        }
        let id = pending.manifest.id;
        if let Err(source) = self.client.put_content(id, &path, pending.manifest.size).await {
            if !source.retryable() {
                // Refused (size or hash no longer match): scan again under a new id.
                let _ = fs::remove_file(&state_path);
                tracing::warn!(file = name, error = %source, "content refused; the file will be scanned again");
                return Err(OutboxError::Changed { name: name.into() });
            }
            return Err(OutboxError::Api { name: name.into(), source });
        }
        let done = self.dir.join(SUBMITTED_DIR);
        fs::create_dir_all(&done).map_err(io_err("create .submitted"))?;
        let mut target = done.join(name);
        if target.exists() {
            target = done.join(format!("{name}.{id}"));
        }
        fs::rename(&path, &target).map_err(io_err("move to .submitted"))?;
        let _ = fs::remove_file(&state_path);
        tracing::info!(file = name, %id, sha256 = %pending.manifest.sha256, verdict = ?pending.manifest.scan.verdict, "outbox file submitted for review");
        Ok(())
    }

    async fn scan(&mut self, name: &str, path: &Path, observed: Observed) -> Result<Pending, OutboxError> {
        let io_err = |op| move |source| OutboxError::Io { name: name.to_owned(), op, source };
        let (det, max, p) = (self.detectors.clone(), self.max_scan, path.to_owned());
        let (size, sha256, result) = tokio::task::spawn_blocking(move || hash_and_scan(&p, &det, max))
            .await
            .map_err(|e| io_err("scan")(io::Error::other(e)))?
            .map_err(io_err("read"))?;
        if size != observed.len {
            return Err(OutboxError::Changed { name: name.into() });
        }
        let scan = report(result.as_ref(), size, self.max_scan);
        let owner = fs::symlink_metadata(path).map(|m| m.uid()).map_err(io_err("stat"))?;
        let manifest = OutboxManifest {
            id: Uuid::now_v7(),
            file_name: name.to_owned(),
            size,
            sha256,
            submitted_by: user_name(owner),
            scan,
        };
        if !manifest.scan.findings.is_empty() {
            self.record_dlp_hit(&manifest);
        }
        let pending = Pending { manifest, mtime_ns: observed.mtime_ns, manifest_acked: false };
        fs::create_dir_all(&self.state_dir).map_err(io_err("create state directory"))?;
        save(&self.state_path(name), &pending).map_err(io_err("save submission state"))?;
        Ok(pending)
    }

    fn record_dlp_hit(&self, m: &OutboxManifest) {
        let found: Vec<String> = m.scan.findings.iter().map(|f| format!("{}×{}", f.kind, f.count)).collect();
        let v = Violation {
            kind: ViolationKind::DlpHit,
            count: m.scan.findings.iter().map(|f| f.count).sum(),
            detail: format!("outbox file {:?} ({}): {}", m.file_name, m.id, found.join(", ")),
        };
        let recorded = self
            .spool
            .lock()
            .map_err(|_| "spool lock poisoned".to_owned())
            .and_then(|mut s| s.record(EventKind::Violation(v)).map_err(|e| e.to_string()));
        match recorded {
            Ok(_) => self.spooled.notify_one(),
            // The submission itself still carries the findings to the reviewers.
            Err(e) => tracing::error!(error = %e, "could not record the DLP violation"),
        }
    }
}

fn save(path: &Path, pending: &Pending) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let data = serde_json::to_vec(pending).map_err(io::Error::other)?;
    let mut f = fs::File::create(&tmp)?;
    io::Write::write_all(&mut f, &data)?;
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
    fn hash_and_scan_stream_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("table.csv");
        let mut content = "ward,count\n".repeat(300_000).into_bytes();
        content.extend_from_slice(b"note,NHS 943 476 5919\n");
        fs::write(&p, &content).unwrap();
        let (size, sha, result) = hash_and_scan(&p, &Detectors::builtin(), u64::MAX).unwrap();
        assert_eq!(size, content.len() as u64);
        assert_eq!(sha, hex::encode(Sha256::digest(&content)));
        assert!(result.unwrap().has("nhsNumber"));
        let (_, _, none) = hash_and_scan(&p, &Detectors::builtin(), 10).unwrap();
        assert!(none.is_none());
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(hash_and_scan(&link, &Detectors::builtin(), u64::MAX).is_err(), "symlinks are not followed");
    }

    #[test]
    fn root_has_a_name() {
        assert_eq!(user_name(0), "root");
        assert_eq!(user_name(4_000_000_000), "uid:4000000000");
    }
}
