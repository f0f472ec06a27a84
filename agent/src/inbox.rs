//! The door in: files an analyst submitted and an admin approved appear in the workspace's
//! inbox directory (`inbox` in the config, `/inbox` by default), read-only.
//!
//! Each pass asks the API for approved items not delivered yet, fetches each one, checks its
//! size and SHA-256 against what was approved, writes it under a temporary name in the inbox
//! (through the directory handle, never following a symlink), makes it mode 0444, syncs it and
//! renames it into place without replacing anything (a taken name gets ` (2)`, ` (3)` …). Only
//! then is the item reported delivered. What was placed is remembered in the agent's state
//! directory, so a lost acknowledgement is resent rather than the file placed twice.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use noexit_crds::agent::{InboxDelivered, InboxItem};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::client::{ApiClient, Backoff, ClientError};
use crate::decisions::safe_name;
use crate::outbox::fsx;

/// Mode of placed files: readable by all, writable by none.
pub const FILE_MODE: u32 = 0o444;
/// Mode of the inbox directory the agent makes (when root it keeps it so).
pub const DIR_MODE: u32 = 0o755;
/// Numbered names tried on a collision before falling back to the item id.
const MAX_SUFFIX: u32 = 100;

/// The API's side (the client, or a fake in tests).
pub trait InboxSource: Send + Sync {
    fn items(&self) -> impl Future<Output = Result<Vec<InboxItem>, ClientError>> + Send;
    fn content(&self, id: Uuid, max: u64) -> impl Future<Output = Result<Bytes, ClientError>> + Send;
    fn delivered(&self, id: Uuid, d: &InboxDelivered) -> impl Future<Output = Result<(), ClientError>> + Send;
}

impl InboxSource for ApiClient {
    async fn items(&self) -> Result<Vec<InboxItem>, ClientError> {
        self.inbox().await
    }
    async fn content(&self, id: Uuid, max: u64) -> Result<Bytes, ClientError> {
        self.inbox_content(id, max).await
    }
    async fn delivered(&self, id: Uuid, d: &InboxDelivered) -> Result<(), ClientError> {
        self.inbox_delivered(id, d).await
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("inbox item {id} ({name:?}): {problem}")]
    Content { id: Uuid, name: String, problem: String },
    #[error("inbox item {id} ({name:?}): {source}")]
    Api { id: Uuid, name: String, source: ClientError },
    #[error("inbox {path}: {op}: {source}")]
    Io { path: PathBuf, op: &'static str, source: io::Error },
}

/// A placed item whose delivery the API has not acknowledged yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Placed {
    placed_as: String,
    sha256: String,
}

/// What a pass did (tests and logs).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    /// (submitted name, name placed as)
    pub placed: Vec<(String, String)>,
    pub acknowledged: usize,
    pub failed: Vec<String>,
}

pub struct Inbox<S: InboxSource = ApiClient> {
    dir: PathBuf,
    state_dir: PathBuf,
    source: S,
    /// Items whose last failure is logged, so a repeating one is logged once.
    failing: HashMap<Uuid, String>,
}

impl<S: InboxSource> Inbox<S> {
    pub fn new(dir: &Path, state_dir: &Path, source: S) -> Self {
        Self { dir: dir.into(), state_dir: state_dir.into(), source, failing: HashMap::new() }
    }

    pub async fn run(mut self, interval: Duration) {
        let mut backoff = Backoff::new(interval, Duration::from_secs(300));
        let mut last: Option<String> = None;
        loop {
            let wait = match self.pass().await {
                Ok(r) => {
                    last = None;
                    if r.failed.is_empty() {
                        backoff.reset();
                        interval
                    } else {
                        backoff.next_delay()
                    }
                }
                Err(e) => {
                    let e = e.to_string();
                    if last.as_ref() != Some(&e) {
                        tracing::warn!(error = %e, "inbox pass failed; will retry");
                        last = Some(e);
                    }
                    backoff.next_delay()
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Place every approved item once and report it delivered.
    pub async fn pass(&mut self) -> Result<PassReport, InboxError> {
        let items = self.source.items().await.map_err(|source| InboxError::Api {
            id: Uuid::nil(),
            name: "(list)".into(),
            source,
        })?;
        let mut report = PassReport::default();
        if items.is_empty() {
            return Ok(report);
        }
        let dir = self.open_dir()?;
        for item in items {
            match self.deliver(&dir, &item, &mut report).await {
                Ok(()) => {
                    self.failing.remove(&item.id);
                }
                Err(e) => {
                    let e = e.to_string();
                    if self.failing.get(&item.id) != Some(&e) {
                        tracing::error!(error = %e, "inbox item not delivered; will retry");
                        self.failing.insert(item.id, e.clone());
                    }
                    report.failed.push(e);
                }
            }
        }
        Ok(report)
    }

    /// The inbox directory, created if missing; when root, owned by root with [`DIR_MODE`].
    fn open_dir(&self) -> Result<OwnedFd, InboxError> {
        let io_err = |op| move |source| InboxError::Io { path: self.dir.clone(), op, source };
        match fsx::mkdir(&self.dir, DIR_MODE) {
            Ok(()) => tracing::info!(inbox = %self.dir.display(), "inbox created"),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("create")(e)),
        }
        let fd = fsx::open_dir(&self.dir).map_err(io_err("open (it must be a directory, not a symlink)"))?;
        if fsx::euid() == 0 {
            let (uid, gid, mode) = fsx::gid_of(&fd).map_err(io_err("stat"))?;
            if (uid, gid) != (0, 0) {
                fsx::chown_fd(&fd, 0, 0).map_err(io_err("chown"))?;
            }
            if mode != DIR_MODE {
                fsx::chmod_fd(&fd, DIR_MODE).map_err(io_err("chmod"))?;
            }
        }
        Ok(fd)
    }

    fn state_path(&self, id: Uuid) -> PathBuf {
        self.state_dir.join(format!("{id}.json"))
    }

    async fn deliver(&self, dir: &OwnedFd, item: &InboxItem, report: &mut PassReport) -> Result<(), InboxError> {
        let (id, name) = (item.id, item.file_name.clone());
        let state_path = self.state_path(id);
        let saved: Option<Placed> = std::fs::read(&state_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let placed = match saved {
            Some(p) if p.sha256 == item.sha256 => p,
            _ => {
                let content = self.source.content(id, item.size).await.map_err(|source| InboxError::Api {
                    id,
                    name: name.clone(),
                    source,
                })?;
                let bad = |problem: String| InboxError::Content { id, name: name.clone(), problem };
                if content.len() as u64 != item.size {
                    return Err(bad(format!("{} bytes arrived; {} were approved", content.len(), item.size)));
                }
                let got = hex::encode(Sha256::digest(&content));
                if got != item.sha256 {
                    return Err(bad(format!("content has SHA-256 {got}; {} was approved", item.sha256)));
                }
                let placed_as = place(dir, &item.file_name, id, &content).map_err(|source| InboxError::Io {
                    path: self.dir.clone(),
                    op: "place",
                    source,
                })?;
                tracing::info!(%id, file = %placed_as, sha256 = %got, "inbox file placed");
                report.placed.push((item.file_name.clone(), placed_as.clone()));
                let placed = Placed { placed_as, sha256: got };
                save(&self.state_dir, &state_path, &placed).map_err(|source| InboxError::Io {
                    path: state_path.clone(),
                    op: "save state",
                    source,
                })?;
                placed
            }
        };
        let body = InboxDelivered { placed_as: placed.placed_as.clone(), sha256: placed.sha256.clone() };
        match self.source.delivered(id, &body).await {
            Ok(()) => {}
            // Withdrawn or refused for good: the file stays, the record goes.
            Err(e) if !e.retryable() => {
                tracing::error!(%id, error = %e, "the API refused the delivery report; not retrying it");
            }
            Err(source) => return Err(InboxError::Api { id, name, source }),
        }
        let _ = std::fs::remove_file(&state_path);
        report.acknowledged += 1;
        Ok(())
    }
}

fn save(dir: &Path, path: &Path, placed: &Placed) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(placed).map_err(io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The names tried for `name`, in order: itself, `stem (2).ext` … `stem (100).ext`, then
/// `<id>-name` (pure). `name` is already safe (see [`safe_name`]).
pub fn candidates(name: &str, id: Uuid) -> impl Iterator<Item = String> + '_ {
    let (stem, ext) = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => (stem, format!(".{ext}")),
        _ => (name, String::new()),
    };
    std::iter::once(name.to_owned())
        .chain((2..=MAX_SUFFIX).map(move |n| format!("{stem} ({n}){ext}")))
        .chain(std::iter::once(format!("{}-{name}", id.simple())))
}

/// Write `content` into `dir` as `name` (made safe; the next free name on a collision), mode
/// 0444, synced, without replacing anything. Returns the name used.
pub fn place(dir: &OwnedFd, name: &str, id: Uuid, content: &[u8]) -> io::Result<String> {
    let tmp = format!(".noexit-{}.part", Uuid::new_v4().simple());
    let mut f = fsx::create_new_at(dir, &tmp, 0o600)?;
    let written = f.write_all(content).and_then(|()| fsx::chmod_fd(&f, FILE_MODE)).and_then(|()| f.sync_all());
    if let Err(e) = written {
        let _ = fsx::unlink_at(dir, &tmp);
        return Err(e);
    }
    let safe = safe_name(name);
    for candidate in candidates(&safe, id) {
        match fsx::rename_noreplace_at(dir, &tmp, dir, &candidate) {
            Ok(()) => {
                // The rename is durable once the directory is synced.
                let _ = rustix::fs::fsync(dir);
                return Ok(candidate);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                let _ = fsx::unlink_at(dir, &tmp);
                return Err(e);
            }
        }
    }
    let _ = fsx::unlink_at(dir, &tmp);
    Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("every name for {safe:?} is taken")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Seen {
        items: Vec<InboxItem>,
        content: HashMap<Uuid, Vec<u8>>,
        delivered: Vec<(Uuid, InboxDelivered)>,
        fail_delivered: u32,
    }

    #[derive(Clone, Default)]
    struct Fake(Arc<Mutex<Seen>>);

    impl Fake {
        fn add(&self, name: &str, content: &[u8]) -> Uuid {
            let id = Uuid::new_v4();
            let mut s = self.0.lock().unwrap();
            s.items.push(InboxItem {
                id,
                file_name: name.into(),
                size: content.len() as u64,
                sha256: hex::encode(Sha256::digest(content)),
            });
            s.content.insert(id, content.to_vec());
            id
        }
    }

    fn unavailable() -> ClientError {
        ClientError::Status {
            method: http::Method::POST,
            path: "/x".into(),
            status: http::StatusCode::SERVICE_UNAVAILABLE,
            body: String::new(),
        }
    }

    impl InboxSource for Fake {
        async fn items(&self) -> Result<Vec<InboxItem>, ClientError> {
            Ok(self.0.lock().unwrap().items.clone())
        }
        async fn content(&self, id: Uuid, _max: u64) -> Result<Bytes, ClientError> {
            Ok(Bytes::from(self.0.lock().unwrap().content[&id].clone()))
        }
        async fn delivered(&self, id: Uuid, d: &InboxDelivered) -> Result<(), ClientError> {
            let mut s = self.0.lock().unwrap();
            if s.fail_delivered > 0 {
                s.fail_delivered -= 1;
                return Err(unavailable());
            }
            s.items.retain(|i| i.id != id);
            s.delivered.push((id, d.clone()));
            Ok(())
        }
    }

    fn setup() -> (tempfile::TempDir, Fake, Inbox<Fake>) {
        let t = tempfile::tempdir().unwrap();
        let fake = Fake::default();
        let inbox = Inbox::new(&t.path().join("inbox"), &t.path().join("state"), fake.clone());
        (t, fake, inbox)
    }

    #[tokio::test]
    async fn an_approved_file_is_placed_read_only_with_its_bytes_then_reported() {
        let (t, fake, mut inbox) = setup();
        let id = fake.add("codebook.csv", b"code,label\n1,yes\n");
        let r = inbox.pass().await.unwrap();
        assert_eq!(r.placed, [("codebook.csv".to_owned(), "codebook.csv".to_owned())]);
        let path = t.path().join("inbox/codebook.csv");
        assert_eq!(std::fs::read(&path).unwrap(), b"code,label\n1,yes\n");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, FILE_MODE);
        assert_eq!(meta.uid(), fsx::euid());
        let seen = fake.0.lock().unwrap();
        assert_eq!(seen.delivered.len(), 1);
        assert_eq!(seen.delivered[0].0, id);
        assert_eq!(seen.delivered[0].1.placed_as, "codebook.csv");
    }

    #[tokio::test]
    async fn collisions_get_numbered_names_and_nothing_is_replaced() {
        let (t, fake, mut inbox) = setup();
        std::fs::create_dir(t.path().join("inbox")).unwrap();
        std::fs::write(t.path().join("inbox/codebook.csv"), b"mine").unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, t.path().join("inbox/codebook (2).csv")).unwrap();
        fake.add("codebook.csv", b"new");
        let r = inbox.pass().await.unwrap();
        assert_eq!(r.placed[0].1, "codebook (3).csv");
        assert_eq!(std::fs::read(t.path().join("inbox/codebook.csv")).unwrap(), b"mine");
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(std::fs::read(t.path().join("inbox/codebook (3).csv")).unwrap(), b"new");
    }

    #[tokio::test]
    async fn content_that_does_not_match_the_approved_hash_is_not_placed() {
        let (t, fake, mut inbox) = setup();
        let id = fake.add("lookup.csv", b"a,b\n");
        fake.0.lock().unwrap().content.insert(id, b"a,c\n".to_vec());
        let r = inbox.pass().await.unwrap();
        assert!(r.placed.is_empty());
        assert!(r.failed[0].contains("SHA-256"), "{r:?}");
        assert!(std::fs::read_dir(t.path().join("inbox")).unwrap().next().is_none(), "something was placed");
        assert!(fake.0.lock().unwrap().delivered.is_empty());
    }

    #[tokio::test]
    async fn a_lost_acknowledgement_is_resent_without_placing_the_file_twice() {
        let (t, fake, mut inbox) = setup();
        fake.add("plan.R", b"x <- 1\n");
        fake.0.lock().unwrap().fail_delivered = 1;
        let r = inbox.pass().await.unwrap();
        assert_eq!(r.placed.len(), 1);
        assert_eq!(r.failed.len(), 1);
        // A new agent (restart) with the same state directory.
        let mut again = Inbox::new(&t.path().join("inbox"), &t.path().join("state"), fake.clone());
        let r = again.pass().await.unwrap();
        assert!(r.placed.is_empty(), "placed twice: {r:?}");
        assert_eq!(r.acknowledged, 1);
        assert_eq!(std::fs::read_dir(t.path().join("inbox")).unwrap().count(), 1);
        assert_eq!(fake.0.lock().unwrap().delivered[0].1.placed_as, "plan.R");
    }

    #[tokio::test]
    async fn hostile_names_and_a_symlinked_inbox_are_refused() {
        let (t, fake, mut inbox) = setup();
        fake.add("../../etc/cron.d/x.sh", b"echo\n");
        fake.add(".bashrc", b"echo\n");
        inbox.pass().await.unwrap();
        let mut names: Vec<String> = std::fs::read_dir(t.path().join("inbox"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["%2E.%2F..%2Fetc%2Fcron.d%2Fx.sh", "%2Ebashrc"]);
        assert!(!t.path().join("etc").exists());

        let (t, fake, mut inbox) = setup();
        let elsewhere = t.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, t.path().join("inbox")).unwrap();
        fake.add("a.csv", b"1\n");
        assert!(inbox.pass().await.is_err());
        assert!(std::fs::read_dir(&elsewhere).unwrap().next().is_none());
    }

    #[test]
    fn candidate_names() {
        let id = Uuid::nil();
        let c: Vec<String> = candidates("a.csv", id).take(3).collect();
        assert_eq!(c, ["a.csv", "a (2).csv", "a (3).csv"]);
        assert_eq!(candidates("README", id).nth(1).unwrap(), "README (2)");
        assert_eq!(candidates("a.csv", id).last().unwrap(), format!("{}-a.csv", id.simple()));
    }
}
