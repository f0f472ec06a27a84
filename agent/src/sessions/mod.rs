//! Sessions: terminal logins from `wtmp`/`utmp`, desktop connections reported by the desktop's
//! hook command (`noexit-agent session connect|disconnect|activity --user U`), and idle time.
//!
//! Desktop connections come from a hook rather than from parsing VNC/xrdp logs: log formats
//! change between versions and are not written for machines, while both desktops run scripts on
//! connect and disconnect. The hook appends straight to the spool (no running agent needed) and
//! keeps `<spool>/desktop/<user>` while the user is connected, for the session count.
//!
//! Idle time is what the system can honestly see: the last input on a user's terminals (the
//! tty's access time, as `w` shows) and the last `session activity` call from the desktop
//! (the desktop session runs it while X reports recent input, e.g. from `xprintidle`).

pub mod utmp;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use chrono::Utc;
use noexit_crds::agent::{AgentEvent, EventKind, SessionAction, SessionEvent};
use uuid::Uuid;

use crate::spool::{self, SpoolError};

/// What the desktop reports through the hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HookAction {
    Connect,
    Disconnect,
    Activity,
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("--user {0:?}: a local account name is 1–32 of a-z, 0-9, '.', '_', '-' (not starting with '-')")]
    User(String),
    #[error("--{field}: at most {MAX_FIELD} bytes")]
    TooLong { field: &'static str },
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("{path}: {source}")]
    State { path: PathBuf, source: io::Error },
}

/// Bound on `--session` / `--source`, so one event never outgrows a delivery batch.
pub const MAX_FIELD: usize = 256;

fn desktop_dir(spool: &Path) -> PathBuf {
    spool.join("desktop")
}

fn activity_file(spool: &Path, user: &str) -> PathBuf {
    desktop_dir(spool).join(format!("{user}.activity"))
}

pub fn valid_user(user: &str) -> bool {
    (1..=32).contains(&user.len())
        && !user.starts_with('-')
        && user.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
        && user != "."
        && user != ".."
}

/// Run one hook call: record the event durably, then update the connection state.
pub fn hook(
    spool_dir: &Path,
    max_bytes: u64,
    action: HookAction,
    user: &str,
    session: Option<String>,
    source: Option<String>,
) -> Result<(), HookError> {
    if !valid_user(user) {
        return Err(HookError::User(user.to_owned()));
    }
    for (field, value) in [("session", &session), ("source", &source)] {
        if value.as_ref().is_some_and(|v| v.len() > MAX_FIELD) {
            return Err(HookError::TooLong { field });
        }
    }
    let dir = desktop_dir(spool_dir);
    fs::create_dir_all(&dir).map_err(|source| HookError::State { path: dir.clone(), source })?;
    let state = dir.join(user);
    let record = |action| {
        let kind = EventKind::Session(SessionEvent {
            action,
            user: user.to_owned(),
            session: session.clone(),
            source: source.clone(),
            idle_seconds: None,
        });
        spool::append(spool_dir, max_bytes, &[AgentEvent { id: Uuid::now_v7(), at: Utc::now(), kind }])
    };
    let state_err = |path: &Path, source| HookError::State { path: path.into(), source };
    match action {
        HookAction::Connect => {
            record(SessionAction::DesktopConnect)?;
            fs::write(&state, session.as_deref().unwrap_or("")).map_err(|e| state_err(&state, e))?;
            touch(&activity_file(spool_dir, user)).map_err(|e| state_err(&state, e))?;
        }
        HookAction::Disconnect => {
            record(SessionAction::DesktopDisconnect)?;
            match fs::remove_file(&state) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(state_err(&state, e)),
            }
        }
        HookAction::Activity => {
            let f = activity_file(spool_dir, user);
            touch(&f).map_err(|e| state_err(&f, e))?;
        }
    }
    Ok(())
}

fn touch(path: &Path) -> io::Result<()> {
    fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)?.set_modified(SystemTime::now())
}

/// Users connected to the desktop, per the hook's state files.
pub fn desktop_users(spool: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(desktop_dir(spool)) else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| valid_user(n) && !n.contains(".activity"))
        .collect()
}

/// Sessions open now: terminal logins plus desktop connections.
pub fn active_sessions(utmp_path: &Path, spool: &Path) -> u32 {
    let terminals = utmp::current_sessions(utmp_path).map(|s| s.len()).unwrap_or(0);
    u32::try_from(terminals + desktop_users(spool).len()).unwrap_or(u32::MAX)
}

/// Emits `idle` once a user has had no input for `threshold`, and `active` when input resumes.
#[derive(Debug)]
pub struct IdleTracker {
    threshold: Duration,
    utmp: PathBuf,
    spool: PathBuf,
    dev: PathBuf,
    idle: BTreeMap<String, bool>,
}

impl IdleTracker {
    pub fn new(threshold: Duration, utmp: &Path, spool: &Path) -> Self {
        Self { threshold, utmp: utmp.into(), spool: spool.into(), dev: "/dev".into(), idle: BTreeMap::new() }
    }

    /// Last input per user with an open session.
    fn last_input(&self) -> BTreeMap<String, SystemTime> {
        let mut last = BTreeMap::<String, SystemTime>::new();
        let mut seen = |user: &str, t: Option<SystemTime>| {
            let e = last.entry(user.to_owned()).or_insert(SystemTime::UNIX_EPOCH);
            if let Some(t) = t {
                *e = (*e).max(t);
            }
        };
        for s in utmp::current_sessions(&self.utmp).unwrap_or_default() {
            let tty = self.dev.join(&s.line);
            seen(&s.user, fs::metadata(tty).and_then(|m| m.accessed()).ok());
        }
        for user in desktop_users(&self.spool) {
            let t = fs::metadata(activity_file(&self.spool, &user)).and_then(|m| m.modified()).ok();
            seen(&user, t);
        }
        last
    }

    pub fn poll(&mut self, now: SystemTime) -> Vec<SessionEvent> {
        let mut out = Vec::new();
        let last = self.last_input();
        self.idle.retain(|user, _| last.contains_key(user));
        for (user, t) in last {
            let idle_for = now.duration_since(t).unwrap_or_default();
            let is_idle = idle_for >= self.threshold;
            let was_idle = self.idle.insert(user.clone(), is_idle).unwrap_or(false);
            if is_idle != was_idle {
                out.push(SessionEvent {
                    action: if is_idle { SessionAction::Idle } else { SessionAction::Active },
                    user,
                    session: None,
                    source: None,
                    idle_seconds: is_idle.then_some(idle_for.as_secs()),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{DEFAULT_MAX_BYTES, Spool};

    #[test]
    fn hook_spools_events_and_tracks_connections() {
        let dir = tempfile::tempdir().unwrap();
        let sp = dir.path();
        hook(sp, DEFAULT_MAX_BYTES, HookAction::Connect, "alice", Some(":1".into()), Some("10.0.0.9".into())).unwrap();
        assert_eq!(desktop_users(sp), ["alice"]);
        assert_eq!(active_sessions(&sp.join("no-utmp"), sp), 1);
        hook(sp, DEFAULT_MAX_BYTES, HookAction::Disconnect, "alice", None, None).unwrap();
        assert!(desktop_users(sp).is_empty());
        let batch = Spool::open(sp, DEFAULT_MAX_BYTES).unwrap().read_batch(10, u64::MAX).unwrap();
        let actions: Vec<_> = batch
            .events
            .iter()
            .map(|e| match &e.kind {
                EventKind::Session(s) => s.action,
                EventKind::Violation(_) => panic!("unexpected"),
            })
            .collect();
        assert_eq!(actions, [SessionAction::DesktopConnect, SessionAction::DesktopDisconnect]);
        let err = hook(sp, DEFAULT_MAX_BYTES, HookAction::Connect, "../root", None, None).unwrap_err();
        assert!(err.to_string().starts_with("--user \"../root\""), "{err}");
        let long = Some("x".repeat(MAX_FIELD + 1));
        let err = hook(sp, DEFAULT_MAX_BYTES, HookAction::Connect, "alice", long, None).unwrap_err();
        assert_eq!(err.to_string(), "--session: at most 256 bytes");
    }

    #[test]
    fn idle_and_active_are_reported_on_change_only() {
        let dir = tempfile::tempdir().unwrap();
        let sp = dir.path();
        hook(sp, DEFAULT_MAX_BYTES, HookAction::Connect, "bob", None, None).unwrap();
        let mut t = IdleTracker::new(Duration::from_secs(600), &sp.join("no-utmp"), sp);
        let now = SystemTime::now();
        assert!(t.poll(now).is_empty(), "fresh connection is active");
        let later = now + Duration::from_secs(900);
        let ev = t.poll(later);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].action, SessionAction::Idle);
        assert!(ev[0].idle_seconds.unwrap() >= 899);
        assert!(t.poll(later).is_empty());
        let f = activity_file(sp, "bob");
        fs::File::options().write(true).open(&f).unwrap().set_modified(later).unwrap();
        let ev = t.poll(later + Duration::from_secs(1));
        assert_eq!(ev.iter().map(|e| e.action).collect::<Vec<_>>(), [SessionAction::Active]);
    }
}
