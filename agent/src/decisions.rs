//! The researcher sees what became of their outputs: for each output request of the workspace
//! the agent writes `<outbox>/.decisions/<fileName>.txt` (state and the reviewers' reasons, for
//! people) and `<fileName>.json` (the same, for scripts).
//!
//! The outbox is the researcher's and the names come from the API, so both sides are treated as
//! hostile: `.decisions` must be a directory the agent owns that no one else may write (anything
//! else there is set aside and replaced); every file is written under a temporary name and
//! renamed into place through the directory handle (never following a symlink); names are
//! escaped so no name the API sends can leave the directory; a file whose content is unchanged
//! is not rewritten.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use noexit_crds::agent::OutputDecision;
use rustix::fs::FileType;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::client::{ApiClient, Backoff, ClientError};
use crate::outbox::fsx;

pub const DECISIONS_DIR: &str = ".decisions";
/// Longest name written (bytes), below the usual 255-byte limit of file systems.
pub const MAX_NAME: usize = 200;
/// Largest decision file compared before rewriting (anything larger is rewritten).
const MAX_COMPARE: u64 = 1 << 20;

/// Where decisions come from (the API client, or a fake in tests).
pub trait DecisionSource: Send + Sync {
    fn decisions(&self) -> impl Future<Output = Result<Vec<OutputDecision>, ClientError>> + Send;
}

impl DecisionSource for ApiClient {
    async fn decisions(&self) -> Result<Vec<OutputDecision>, ClientError> {
        self.outputs().await
    }
}

/// A name from the API made safe as one directory entry: `/`, `\`, `%`, control characters
/// and a leading `.` are percent-escaped (so distinct names stay distinct), and a name longer
/// than [`MAX_NAME`] is cut and given a hash of the whole so it stays unique.
pub fn safe_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, c) in name.chars().enumerate() {
        match c {
            '/' | '\\' | '%' => push_escaped(&mut out, c),
            '.' if i == 0 => push_escaped(&mut out, c),
            c if c.is_control() => push_escaped(&mut out, c),
            c => out.push(c),
        }
    }
    if out.is_empty() {
        out.push_str("%00");
    }
    if out.len() > MAX_NAME {
        let hash = hex::encode(&Sha256::digest(name.as_bytes())[..6]);
        let mut cut = MAX_NAME - hash.len() - 1;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('~');
        out.push_str(&hash);
    }
    out
}

fn push_escaped(out: &mut String, c: char) {
    let mut buf = [0u8; 4];
    for b in c.encode_utf8(&mut buf).bytes() {
        let _ = write!(out, "%{b:02X}");
    }
}

/// Text shown to people: control characters other than newline and tab become `?` (no
/// terminal escapes from the API reach the researcher's terminal).
fn printable(s: &str) -> String {
    s.chars().map(|c| if c.is_control() && c != '\n' && c != '\t' { '?' } else { c }).collect()
}

/// The human-readable decision file (pure).
pub fn render_text(d: &OutputDecision) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "noexit output request: {}", printable(&d.file_name));
    let _ = writeln!(t, "id:      {}", printable(&d.id));
    let _ = writeln!(t, "state:   {}", printable(&d.state));
    let _ = writeln!(t, "updated: {}", d.updated_at.to_rfc3339());
    if d.reasons.is_empty() {
        t.push_str("\nNo reviewer has decided yet.\n");
    } else {
        t.push_str("\nReviewers:\n");
        for r in &d.reasons {
            let reason = if r.reason.trim().is_empty() { String::new() } else { format!(": {}", printable(&r.reason)) };
            let reason = reason.replace('\n', "\n    ");
            let _ =
                writeln!(t, "- {} {} ({}){reason}", printable(&r.reviewer), printable(&r.decision), r.at.to_rfc3339());
        }
    }
    t
}

/// The files to write for a list of decisions (pure): name → content. When several requests
/// share a file name (a file submitted again), the most recently updated one wins.
pub fn plan(decisions: &[OutputDecision]) -> BTreeMap<String, Vec<u8>> {
    let mut latest: BTreeMap<String, &OutputDecision> = BTreeMap::new();
    for d in decisions {
        let name = safe_name(&d.file_name);
        let newer = latest.get(&name).is_none_or(|prev| (prev.updated_at, &prev.id) < (d.updated_at, &d.id));
        if newer {
            latest.insert(name, d);
        }
    }
    let mut files = BTreeMap::new();
    for (name, d) in latest {
        let mut json = serde_json::to_vec_pretty(d).unwrap_or_default();
        json.push(b'\n');
        files.insert(format!("{name}.txt"), render_text(d).into_bytes());
        files.insert(format!("{name}.json"), json);
    }
    files
}

/// What a pass did (tests and logs).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    pub written: Vec<String>,
    pub unchanged: usize,
    /// `.decisions` was not the agent's directory and was set aside under this name.
    pub set_aside: Option<String>,
}

/// Writes decisions into the outbox.
pub struct Decisions {
    outbox: PathBuf,
}

impl Decisions {
    pub fn new(outbox: &Path) -> Self {
        Self { outbox: outbox.into() }
    }

    /// Write the files for `decisions` (see [`plan`]). The outbox itself must exist (the
    /// outbox task makes it); `.decisions` is made here.
    pub fn write(&self, decisions: &[OutputDecision]) -> io::Result<PassReport> {
        let mut report = PassReport::default();
        let files = plan(decisions);
        if files.is_empty() {
            return Ok(report);
        }
        let outbox = fsx::open_dir(&self.outbox)?;
        let dir = decisions_dir(&outbox, &mut report)?;
        for (name, content) in files {
            if same_content(&dir, &name, &content) {
                report.unchanged += 1;
                continue;
            }
            replace(&dir, &name, &content)?;
            report.written.push(name);
        }
        Ok(report)
    }

    /// Poll the API every `interval` and write what it says.
    pub async fn run(self, source: impl DecisionSource, interval: Duration) {
        let mut backoff = Backoff::new(interval, Duration::from_secs(300));
        let mut last_error: Option<String> = None;
        loop {
            let wait = match source.decisions().await {
                Ok(list) => {
                    let outbox = self.outbox.clone();
                    let this = Decisions { outbox };
                    match tokio::task::spawn_blocking(move || this.write(&list)).await {
                        Ok(Ok(r)) => {
                            if !r.written.is_empty() {
                                tracing::info!(files = ?r.written, "output decisions written to the outbox");
                            }
                            if let Some(aside) = r.set_aside {
                                tracing::warn!(%aside, "outbox .decisions was not the agent's; set aside and recreated");
                            }
                            last_error = None;
                        }
                        Ok(Err(e)) => log_once(&mut last_error, format!("cannot write output decisions: {e}")),
                        Err(e) => log_once(&mut last_error, format!("decision writer failed: {e}")),
                    }
                    backoff.reset();
                    interval
                }
                Err(e) => {
                    log_once(&mut last_error, format!("cannot fetch output decisions: {e}"));
                    backoff.next_delay()
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

fn log_once(last: &mut Option<String>, message: String) {
    if last.as_ref() != Some(&message) {
        tracing::warn!("{message}");
        *last = Some(message);
    }
}

/// `.decisions`, created if missing: a real directory owned by the agent that no one else can
/// write. Anything else under that name (a symlink, a file, the researcher's directory) is
/// renamed aside and a new one made.
fn decisions_dir(outbox: &OwnedFd, report: &mut PassReport) -> io::Result<OwnedFd> {
    for _ in 0..2 {
        match fsx::mkdir_at(outbox, DECISIONS_DIR, 0o755) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        match fsx::open_dir_at(outbox, DECISIONS_DIR) {
            Ok(fd) => {
                let (uid, _, mode) = fsx::gid_of(&fd)?;
                if uid == fsx::euid() && mode & 0o022 == 0 {
                    return Ok(fd);
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::ENOTDIR) => {}
            Err(e) => return Err(e),
        }
        let aside = format!("{DECISIONS_DIR}.set-aside-{}", Uuid::new_v4().simple());
        fsx::rename_noreplace_at(outbox, DECISIONS_DIR, outbox, &aside)?;
        report.set_aside = Some(aside);
    }
    Err(io::Error::other(format!("{DECISIONS_DIR} keeps being replaced")))
}

/// Whether `name` in `dir` is a regular file holding exactly `content` (read without
/// following a symlink or blocking on a FIFO).
fn same_content(dir: &OwnedFd, name: &str, content: &[u8]) -> bool {
    let Ok(mut f) = fsx::open_file_at(dir, name) else { return false };
    let Ok(st) = fsx::stat_fd(&f) else { return false };
    if st.kind != FileType::RegularFile || st.len != content.len() as u64 || st.len > MAX_COMPARE {
        return false;
    }
    let mut buf = Vec::with_capacity(content.len());
    Read::by_ref(&mut f).take(MAX_COMPARE).read_to_end(&mut buf).is_ok() && buf == content
}

/// Write `content` as `name` in `dir`: a new file under a temporary name, synced, renamed over
/// whatever had the name (a rename replaces a symlink, it never follows it).
fn replace(dir: &OwnedFd, name: &str, content: &[u8]) -> io::Result<()> {
    let tmp = format!(".tmp-{}", Uuid::new_v4().simple());
    let mut f = fsx::create_new_at(dir, &tmp, 0o644)?;
    let result = f
        .write_all(content)
        .and_then(|()| fsx::chmod_fd(&f, 0o644))
        .and_then(|()| f.sync_all())
        .and_then(|()| fsx::rename_at(dir, &tmp, dir, name));
    if result.is_err() {
        let _ = fsx::unlink_at(dir, &tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use noexit_crds::agent::ReviewReason;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn decision(name: &str, state: &str, minute: u32) -> OutputDecision {
        OutputDecision {
            id: Uuid::from_u128(u128::from(minute) + 1).to_string(),
            file_name: name.into(),
            state: state.into(),
            reasons: vec![ReviewReason {
                reviewer: "bob@x".into(),
                decision: "reject".into(),
                reason: "cell of 7".into(),
                at: Utc.with_ymd_and_hms(2026, 12, 7, 1, minute, 0).unwrap(),
            }],
            updated_at: Utc.with_ymd_and_hms(2026, 12, 7, 1, minute, 0).unwrap(),
        }
    }

    fn setup() -> (tempfile::TempDir, PathBuf, Decisions) {
        let tmp = tempfile::tempdir().unwrap();
        let outbox = tmp.path().join("outbox");
        std::fs::create_dir(&outbox).unwrap();
        let d = Decisions::new(&outbox);
        (tmp, outbox, d)
    }

    fn ls(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    }

    #[test]
    fn the_wire_format_of_the_api_parses() {
        let text = r#"[{"id":"0190c4d2-8a1e-7000-8000-000000000001","fileName":"table.csv","state":"approved",
            "reasons":[{"reviewer":"bob@x","decision":"reject","reason":"cell of 7","at":"2026-12-07T01:00:00Z"}],
            "updatedAt":"2026-12-07T01:05:00Z","extra":1}]"#;
        let list: Vec<OutputDecision> = serde_json::from_str(text).unwrap();
        assert_eq!(list[0].file_name, "table.csv");
        assert_eq!(list[0].reasons[0].reason, "cell of 7");
    }

    #[test]
    fn decisions_are_written_as_text_and_json_next_to_the_outbox() {
        let (_t, outbox, d) = setup();
        let r = d.write(&[decision("table.csv", "rejected", 1)]).unwrap();
        assert_eq!(r.written, ["table.csv.json", "table.csv.txt"]);
        let dir = outbox.join(DECISIONS_DIR);
        let text = std::fs::read_to_string(dir.join("table.csv.txt")).unwrap();
        assert!(text.contains("state:   rejected"), "{text}");
        assert!(text.contains("- bob@x reject (2026-12-07T01:01:00+00:00): cell of 7"), "{text}");
        let json: OutputDecision = serde_json::from_slice(&std::fs::read(dir.join("table.csv.json")).unwrap()).unwrap();
        assert_eq!(json, decision("table.csv", "rejected", 1));
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!(meta.uid(), fsx::euid());
        assert_eq!(meta.permissions().mode() & 0o777, 0o755);
        assert_eq!(ls(&dir), ["table.csv.json", "table.csv.txt"], "no temporary file left");
    }

    #[test]
    fn unchanged_decisions_are_not_rewritten_and_changed_ones_are() {
        let (_t, outbox, d) = setup();
        d.write(&[decision("table.csv", "inReview", 1)]).unwrap();
        let path = outbox.join(DECISIONS_DIR).join("table.csv.txt");
        let ino = std::fs::metadata(&path).unwrap().ino();
        let r = d.write(&[decision("table.csv", "inReview", 1)]).unwrap();
        assert!(r.written.is_empty(), "{r:?}");
        assert_eq!(r.unchanged, 2);
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino, "an unchanged file was rewritten");
        let r = d.write(&[decision("table.csv", "approved", 2)]).unwrap();
        assert_eq!(r.written.len(), 2);
        assert_ne!(std::fs::metadata(&path).unwrap().ino(), ino);
        assert!(std::fs::read_to_string(&path).unwrap().contains("state:   approved"));
        // An older request for the same file name does not overwrite the newer one.
        d.write(&[decision("table.csv", "approved", 2), decision("table.csv", "rejected", 0)]).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().contains("state:   approved"));
    }

    #[test]
    fn hostile_names_stay_inside_the_directory() {
        let (t, outbox, d) = setup();
        let hostile = [
            "../../escape.csv",
            "/etc/passwd",
            "..",
            ".",
            "",
            "a\\b",
            ".bashrc",
            "x\n\x1b[31m.csv",
            "%2e%2e%2fx",
            &"é".repeat(300),
        ];
        let list: Vec<_> = hostile.iter().enumerate().map(|(i, n)| decision(n, "approved", i as u32)).collect();
        d.write(&list).unwrap();
        let dir = outbox.join(DECISIONS_DIR);
        let names = ls(&dir);
        assert_eq!(names.len(), hostile.len() * 2, "{names:?}");
        for n in &names {
            assert!(!n.starts_with('.') && !n.contains('/') && n.len() <= MAX_NAME + 5, "{n:?}");
        }
        assert!(names.contains(&"%2E.%2F..%2Fescape.csv.txt".to_owned()), "{names:?}");
        assert!(names.contains(&"%2Fetc%2Fpasswd.txt".to_owned()), "{names:?}");
        // Nothing appeared outside.
        assert_eq!(ls(t.path()), ["outbox"]);
        assert_eq!(ls(&outbox), [DECISIONS_DIR]);
        // Escaping is one to one: names differing only in an escape stay different.
        assert_ne!(safe_name("a/b"), safe_name("a%2Fb"));
        // Terminal escapes from the API never reach the text.
        let text = std::fs::read_to_string(dir.join(format!("{}.txt", safe_name("x\n\x1b[31m.csv")))).unwrap();
        assert!(!text.contains('\x1b'), "{text:?}");
    }

    #[test]
    fn a_symlinked_or_foreign_decisions_dir_is_set_aside_and_nothing_is_written_through_it() {
        let (t, outbox, d) = setup();
        let elsewhere = t.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, outbox.join(DECISIONS_DIR)).unwrap();
        let r = d.write(&[decision("table.csv", "approved", 1)]).unwrap();
        let aside = r.set_aside.expect("the symlink was set aside");
        assert!(std::fs::symlink_metadata(outbox.join(&aside)).unwrap().file_type().is_symlink());
        assert!(ls(&elsewhere).is_empty(), "written through the symlink");
        assert!(std::fs::symlink_metadata(outbox.join(DECISIONS_DIR)).unwrap().is_dir());
        assert_eq!(ls(&outbox.join(DECISIONS_DIR)), ["table.csv.json", "table.csv.txt"]);

        // A directory others can write is not the agent's either.
        let (_t2, outbox2, d2) = setup();
        let open = outbox2.join(DECISIONS_DIR);
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let r = d2.write(&[decision("table.csv", "approved", 1)]).unwrap();
        assert!(r.set_aside.is_some());
        assert_eq!(std::fs::metadata(&open).unwrap().permissions().mode() & 0o777, 0o755);
    }

    #[test]
    fn a_symlink_planted_as_a_decision_file_is_replaced_not_followed() {
        let (t, outbox, d) = setup();
        d.write(&[decision("table.csv", "inReview", 1)]).unwrap();
        let target = t.path().join("victim");
        std::fs::write(&target, b"keep").unwrap();
        let path = outbox.join(DECISIONS_DIR).join("table.csv.txt");
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        d.write(&[decision("table.csv", "approved", 2)]).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
    }
}
