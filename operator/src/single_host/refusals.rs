//! `up`'s refusals in the audit log: a refused manifest set (bad manifest, missing image or
//! dataset file, `pod` workspace, name clash) or an unusable host (libvirt, nftables) is appended
//! to the same hash-chained store the in-process API writes (its SQLite database in the state
//! directory, signed as writer `api` with the API's key), at start and when a later pass refuses
//! an edited file. An auditor then sees what was refused, on what, and why, with
//! `noexit audit query --outcome refused`.
//!
//! What to record is pure ([`refusals_of`], [`events`], [`Dedup`]); [`Recorder`] does the I/O.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::reconcile::PassError;
use crate::audit::{AuditEvent, Store, StoreOptions, keys, writers};

/// A refusal when `up` starts (before anything is made).
pub const ACTION_START: &str = "host.up";
/// A refusal by a later reconcile pass (what runs keeps running).
pub const ACTION_PASS: &str = "host.reconcile";

/// One refused thing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// `workspace:ward-7/alice-vm`, `dataset:icu-2019`, `manifest:/path.yaml`,
    /// `libvirt-domain:noexit-ward-7-alice-vm`, `libvirt:qemu:///system`, `nftables`.
    pub object: String,
    pub reason: String,
}

const KINDS: [&str; 4] = ["project", "dataset", "workspace", "workspacerequest"];

/// The object a checker's problem names: the validators write `<kind> <name>: …`
/// ([`crate::controllers::invalid::describe`]), the file reader `<path>: …`.
pub fn object_of(problem: &str) -> String {
    if let Some((kind, rest)) = problem.split_once(' ')
        && KINDS.contains(&kind)
        && let Some((name, _)) = rest.split_once(':')
        && !name.is_empty()
        && !name.contains(' ')
    {
        return format!("{kind}:{name}");
    }
    if problem.starts_with('/')
        && let Some((path, _)) = problem.split_once(": ")
    {
        return format!("manifest:{path}");
    }
    "manifests".into()
}

/// Every refused thing of a failed pass; `None` for failures that are not refusals (an I/O
/// error halfway through a pass is logged, not audited as a decision).
pub fn refusals_of(e: &PassError) -> Option<Vec<Refusal>> {
    use noexit_host::plan::Clash;
    match e {
        PassError::Refused(problems) => {
            Some(problems.iter().map(|p| Refusal { object: object_of(p), reason: p.clone() }).collect())
        }
        PassError::Clash(clashes) => Some(
            clashes
                .iter()
                .map(|c| {
                    let object = match c {
                        Clash::Domain(n) => format!("libvirt-domain:{n}"),
                        Clash::Network(n) => format!("libvirt-network:{n}"),
                        Clash::Table(n) => format!("nft-table:inet {n}"),
                    };
                    Refusal { object, reason: c.to_string() }
                })
                .collect(),
        ),
        PassError::Other(_) => None,
    }
}

/// The entries for one refusal: one per refused thing, each naming the manifest files.
pub fn events(actor: &str, action: &str, files: &[PathBuf], refusals: &[Refusal]) -> Vec<AuditEvent> {
    let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    refusals
        .iter()
        .map(|r| AuditEvent {
            detail: serde_json::json!({ "files": files, "problems": refusals.len() }),
            ..AuditEvent::refused(actor, action, &r.object, &r.reason)
        })
        .collect()
}

/// A refusal is recorded once, not on every pass that finds the same files still bad: only
/// when it differs from the last one recorded, or after a pass that succeeded.
#[derive(Debug, Default)]
pub struct Dedup {
    last: Option<Vec<Refusal>>,
}

impl Dedup {
    /// Whether `refusals` is new (and remember it).
    pub fn is_new(&mut self, refusals: &[Refusal]) -> bool {
        if self.last.as_deref() == Some(refusals) {
            return false;
        }
        self.last = Some(refusals.to_vec());
        true
    }

    /// A pass went through: the next refusal is news again.
    pub fn passed(&mut self) {
        self.last = None;
    }
}

/// Who ran `up`: the Unix user (and the person behind `sudo`, when there is one).
pub fn actor() -> String {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let name = user_name(uid).unwrap_or_else(|| format!("uid={uid}"));
    match std::env::var("SUDO_USER") {
        Ok(by) if !by.is_empty() && by != name => format!("unix:{name} (sudo by {by})"),
        _ => format!("unix:{name}"),
    }
}

fn user_name(uid: libc::uid_t) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes into `pwd` and `buf`, both live and sized as passed.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points to a NUL-terminated string inside `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

/// Appends `up`'s entries (its refusals, and the services table's changes) to the state
/// directory's audit store.
#[derive(Debug)]
pub struct Recorder {
    state_dir: PathBuf,
    files: Vec<PathBuf>,
    actor: String,
    dedup: Dedup,
}

impl Recorder {
    pub fn new(state_dir: &Path, files: &[PathBuf]) -> Self {
        Self { state_dir: state_dir.to_owned(), files: files.to_vec(), actor: actor(), dedup: Dedup::default() }
    }

    /// Records the refusals now (see [`Self::append`]).
    pub async fn record(&self, action: &str, refusals: &[Refusal]) -> anyhow::Result<()> {
        self.append(events(&self.actor, action, &self.files, refusals)).await
    }

    /// Records what was done to the services table ([`super::wall`]); a failure is logged
    /// (the table is in place either way).
    pub async fn services_table(&self, changes: &[super::wall::Change]) {
        if changes.is_empty() {
            return;
        }
        let entries = changes.iter().map(|c| super::wall::event(&self.actor, c)).collect();
        if let Err(e) = self.append(entries).await {
            tracing::error!(error = %format!("{e:#}"), "the services table change is not in the audit log");
        }
    }

    /// Appends entries now: the store is opened with the API's key (made if this is the first
    /// start), appended to, and closed, which seals the new entries with a checkpoint.
    pub async fn append(&self, entries: Vec<AuditEvent>) -> anyhow::Result<()> {
        super::secure_dir(&self.state_dir)?;
        let key_path = super::audit::key_path(&self.state_dir, writers::API);
        let (key, _) = keys::load_or_create_signing_key(&key_path).context("the audit key")?;
        let options = StoreOptions {
            writer: Some(writers::Writer::new(writers::API, key.clone())),
            signing_key: Some(key),
            ..Default::default()
        };
        let url = super::audit::database_url(&self.state_dir);
        let store = Store::connect_with(&url, options).await.with_context(|| format!("opening {url}"))?;
        let mut result = Ok(());
        for event in entries {
            if let Err(e) = store.append(event).await {
                result = Err(anyhow::Error::from(e).context(format!("appending to {url}")));
                break;
            }
        }
        store.close().await;
        result
    }

    /// At start: record why `up` refuses to run, then give the error back (with a note when it
    /// could not be recorded).
    pub async fn refuse_start(&self, refusals: Vec<Refusal>, error: anyhow::Error) -> anyhow::Error {
        match self.record(ACTION_START, &refusals).await {
            Ok(()) => error,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "the refusal is not in the audit log");
                error.context(format!("(not recorded in the audit log: {e:#})"))
            }
        }
    }

    /// A later pass: record a refusal once (see [`Dedup`]); a pass that went through resets.
    pub async fn pass(&mut self, result: Result<(), &PassError>) {
        let refusals = match result {
            Ok(()) => return self.dedup.passed(),
            Err(e) => match refusals_of(e) {
                Some(r) => r,
                None => return,
            },
        };
        if !self.dedup.is_new(&refusals) {
            return;
        }
        if let Err(e) = self.record(ACTION_PASS, &refusals).await {
            tracing::error!(error = %format!("{e:#}"), "the refusal is not in the audit log");
        }
    }
}

/// A start-up error that is not a manifest refusal, as a refusal of `object`.
pub fn host_refusal(object: impl Into<String>, e: &anyhow::Error) -> Vec<Refusal> {
    vec![Refusal { object: object.into(), reason: format!("{e:#}") }]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Outcome;

    #[test]
    fn objects_come_from_the_checkers_messages() {
        assert_eq!(object_of("workspace ward-7/alice-vm: spec.image: /x does not exist"), "workspace:ward-7/alice-vm");
        assert_eq!(object_of("dataset icu-2019: spec.source.hostPath.path: /d.img does not exist"), "dataset:icu-2019");
        assert_eq!(object_of("project ward-7: defined twice"), "project:ward-7");
        assert_eq!(object_of("/etc/noexit/w.yaml: cannot read: No such file"), "manifest:/etc/noexit/w.yaml");
        assert_eq!(object_of("something else entirely"), "manifests");
    }

    #[test]
    fn one_entry_per_refused_thing_with_the_reason() {
        let e = PassError::Refused(vec!["workspace p/w: spec.runtime: `pod` workspaces need Kubernetes".into()]);
        let r = refusals_of(&e).unwrap();
        let ev = events("unix:root", ACTION_START, &["/m.yaml".into()], &r);
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0].actor.as_str(), ev[0].action.as_str()), ("unix:root", "host.up"));
        assert_eq!(ev[0].object, "workspace:p/w");
        assert_eq!(
            ev[0].outcome,
            Outcome::Refused("workspace p/w: spec.runtime: `pod` workspaces need Kubernetes".into())
        );
        assert_eq!(ev[0].detail["files"][0], "/m.yaml");
        let clash = PassError::Clash(vec![noexit_host::plan::Clash::Domain("noexit-p-w".into())]);
        assert_eq!(refusals_of(&clash).unwrap()[0].object, "libvirt-domain:noexit-p-w");
        assert!(refusals_of(&PassError::Other(anyhow::anyhow!("io"))).is_none());
        // The API's writer owns these actions: `audit verify` authenticates them with its key.
        assert_eq!(writers::owner_of(ACTION_START.as_bytes()), writers::API);
        assert_eq!(writers::owner_of(ACTION_PASS.as_bytes()), writers::API);
    }

    #[test]
    fn the_same_refusal_is_recorded_once_until_a_pass_goes_through() {
        let a = vec![Refusal { object: "dataset:d".into(), reason: "gone".into() }];
        let b = vec![Refusal { object: "dataset:d".into(), reason: "a directory".into() }];
        let mut d = Dedup::default();
        assert!(d.is_new(&a));
        assert!(!d.is_new(&a), "every 5 s the same refusal again");
        assert!(d.is_new(&b), "a different edit is news");
        d.passed();
        assert!(d.is_new(&b), "bad again after a good pass");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn recorded_refusals_verify_with_the_apis_key() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut rec = Recorder::new(&state, &["/m.yaml".into()]);
        let err = rec
            .refuse_start(
                host_refusal("libvirt:qemu:///system", &anyhow::anyhow!("cannot connect")),
                anyhow::anyhow!("cannot connect"),
            )
            .await;
        assert_eq!(err.to_string(), "cannot connect", "recorded: the error is unchanged");
        let bad = PassError::Refused(vec!["dataset d: spec.source.hostPath.path: /d.img does not exist".into()]);
        rec.pass(Err(&bad)).await;
        rec.pass(Err(&bad)).await;
        let store = Store::open_read_only(&crate::single_host::audit::database_url(&state)).await.unwrap();
        let entries = store.tail(10).await.unwrap();
        let seen: Vec<_> = entries.iter().map(|e| (e.event.action.as_str(), e.event.object.as_str())).collect();
        assert_eq!(seen, [("host.up", "libvirt:qemu:///system"), ("host.reconcile", "dataset:d")]);
        let mut wk = crate::audit::writers::WriterKeys::new();
        let public = keys::load_verifying_key(&crate::single_host::audit::public_path(
            &crate::single_host::audit::key_path(&state, writers::API),
        ))
        .unwrap();
        wk.add(writers::API, public);
        let options =
            crate::audit::verify::VerifyOptions { keys: vec![public], writers: Some(wk), ..Default::default() };
        let report = crate::audit::verify::verify(&store, &options).await.unwrap();
        assert!(report.is_intact(), "{report:?}");
        assert_eq!((report.unsealed, report.entries_authenticated), (0, 2), "{report:?}");
    }
}
