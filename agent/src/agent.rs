//! The running agent: the tasks that feed the spool (sessions, guard violations), deliver it,
//! send heartbeats and submit the outbox.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use chrono::Utc;
use noexit_crds::agent::{AgentConfig, AgentEvent, EventBatch, EventKind, Heartbeat};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::client::{ApiClient, Backoff, ClientError};
use crate::dlp::DlpError;
use crate::guards;
use crate::outbox::{DEFAULT_MAX_SCAN_BYTES, Outbox, OutboxPolicy};
use crate::sessions::{self, IdleTracker, utmp::WtmpFollower};
use crate::spool::{Spool, SpoolError};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Knobs not in the operator-written config (paths for tests, limits for small guests).
#[derive(Debug, Clone)]
pub struct Options {
    pub wtmp: PathBuf,
    pub utmp: PathBuf,
    pub spool_max_bytes: u64,
    pub idle_after: Duration,
    /// Root under which hardening edits desktop settings.
    pub root: PathBuf,
    pub outbox_interval: Duration,
    /// Owner and mode of the outbox directory (VM: the researcher's account).
    pub outbox_policy: OutboxPolicy,
    pub guard_interval: Duration,
    /// Between polls of the API for output decisions and approved inbox files.
    pub poll_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Dlp(#[from] DlpError),
}

type SharedSpool = Arc<Mutex<Spool>>;

/// Run until the process is stopped.
pub async fn run(cfg: AgentConfig, opts: Options) -> Result<(), AgentError> {
    let spool_dir = cfg.spool.clone();
    let spool: SharedSpool = Arc::new(Mutex::new(Spool::open(&spool_dir, opts.spool_max_bytes)?));
    let client = ApiClient::new(&cfg.control_plane)?;
    let detectors = crate::dlp::detectors(&cfg.dlp)?;
    let spooled = Arc::new(Notify::new());
    let guards = guards::start(&cfg, opts.root.clone(), opts.guard_interval);
    tracing::info!(workspace = %cfg.workspace.uri(), version = VERSION, depth = depth(&spool), "agent started");

    tokio::spawn(record_violations(guards.violations, spool.clone(), spooled.clone()));
    tokio::spawn(watch_sessions(opts.clone(), spool_dir.clone(), spool.clone(), spooled.clone()));
    tokio::spawn(deliver(client.clone(), spool.clone(), spooled.clone()));
    let outbox = Outbox::new(
        &cfg.outbox,
        &spool_dir.join("outbox-state"),
        opts.outbox_policy,
        detectors,
        cfg.dlp.max_scan_bytes.unwrap_or(DEFAULT_MAX_SCAN_BYTES),
        client.clone(),
        spool.clone(),
        spooled.clone(),
    );
    tokio::spawn(outbox.run(opts.outbox_interval));
    tokio::spawn(crate::decisions::Decisions::new(&cfg.outbox).run(client.clone(), opts.poll_interval));
    let inbox = crate::inbox::Inbox::new(&cfg.inbox, &spool_dir.join("inbox-state"), client.clone());
    tokio::spawn(inbox.run(opts.poll_interval));
    heartbeats(cfg, opts, client, spool, guards.egress, guards.hardening).await;
    Ok(())
}

/// Run a spool operation off the async threads (it fsyncs).
async fn with_spool<T: Send + 'static>(
    spool: &SharedSpool,
    f: impl FnOnce(&mut Spool) -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, String> {
    let s = spool.clone();
    tokio::task::spawn_blocking(move || match s.lock() {
        Ok(mut s) => f(&mut s).map_err(|e| e.to_string()),
        Err(_) => Err("spool lock poisoned".to_owned()),
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
}

fn depth(spool: &SharedSpool) -> u64 {
    spool.lock().map(|s| s.depth()).unwrap_or(0)
}

/// Record an event with a fresh idempotency key (see [`record_event`]).
async fn record(spool: &SharedSpool, spooled: &Notify, kind: EventKind) {
    record_event(spool, spooled, AgentEvent { id: Uuid::now_v7(), at: Utc::now(), kind }).await;
}

/// Record an event, waiting while the spool is full: a full spool holds events back (the
/// sources keep them), it never drops them. Each wait is logged as an error.
async fn record_event(spool: &SharedSpool, spooled: &Notify, event: AgentEvent) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        let ev = event.clone();
        match with_spool(spool, move |s| s.record_event(&ev)).await {
            Ok(()) => {
                spooled.notify_one();
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "event not recorded yet; holding it and retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

async fn record_violations(
    mut rx: tokio::sync::mpsc::Receiver<noexit_crds::agent::Violation>,
    spool: SharedSpool,
    spooled: Arc<Notify>,
) {
    while let Some(v) = rx.recv().await {
        tracing::warn!(kind = ?v.kind, count = v.count, detail = %v.detail, "violation");
        record(&spool, &spooled, EventKind::Violation(v)).await;
    }
}

async fn watch_sessions(opts: Options, spool_dir: PathBuf, spool: SharedSpool, spooled: Arc<Notify>) {
    let mut wtmp = WtmpFollower::new(&opts.wtmp, &spool_dir.join("wtmp.pos"));
    let mut idle = IdleTracker::new(opts.idle_after, &opts.utmp, &spool_dir);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        match wtmp.poll() {
            Ok(events) => {
                for ev in events {
                    record_event(&spool, &spooled, ev).await;
                }
                if let Err(e) = wtmp.commit() {
                    tracing::error!(error = %e, "cannot save the wtmp position");
                }
            }
            Err(e) => tracing::warn!(path = %opts.wtmp.display(), error = %e, "cannot read wtmp"),
        }
        for ev in idle.poll(SystemTime::now()) {
            record(&spool, &spooled, EventKind::Session(ev)).await;
        }
    }
}

/// Events per batch at most (the API takes up to 1000).
const BATCH_EVENTS: usize = 500;
/// Spool bytes per batch: well under the API's 1 MiB JSON limit even with one large last record.
const BATCH_BYTES: u64 = 256 * 1024;

/// Send the spool in batches; an event leaves the spool only once the API acknowledged it.
async fn deliver(client: ApiClient, spool: SharedSpool, spooled: Arc<Notify>) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
    // Halved when the API says a batch is too large, grown back after each success.
    let mut max_events = BATCH_EVENTS;
    loop {
        let batch = with_spool(&spool, move |s| {
            s.refresh()?;
            s.read_batch(max_events, BATCH_BYTES)
        })
        .await;
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the spool");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        if batch.is_empty() {
            // Hook commands append from other processes: look again every second.
            let _ = tokio::time::timeout(Duration::from_secs(1), spooled.notified()).await;
            continue;
        }
        if batch.events.is_empty() {
            // Only unreadable (torn) records: step over them.
            if let Err(e) = with_spool(&spool, move |s| s.ack(&batch)).await {
                tracing::error!(error = %e, "cannot step over unreadable spool records");
            }
            continue;
        }
        let body = EventBatch { events: batch.events.clone() };
        match client.send_events(&body).await {
            Ok(ack) => {
                tracing::debug!(accepted = ack.accepted, duplicates = ack.duplicates, "events delivered");
                if let Err(e) = with_spool(&spool, move |s| s.ack(&batch)).await {
                    // The events will be resent; the API drops them as duplicates.
                    tracing::error!(error = %e, "cannot record the ack");
                }
                backoff.reset();
                max_events = (max_events * 2).min(BATCH_EVENTS);
            }
            Err(e) if e.status() == Some(http::StatusCode::PAYLOAD_TOO_LARGE) && max_events > 1 => {
                max_events = (body.events.len() / 2).max(1);
                tracing::warn!(events = body.events.len(), next = max_events, "batch too large; sending smaller ones");
            }
            Err(e) => {
                let wait = backoff.next_delay();
                if e.retryable() {
                    tracing::warn!(error = %e, retry_in = ?wait, "control plane unavailable; events stay spooled");
                } else {
                    tracing::error!(error = %e, retry_in = ?wait, "control plane refused the events; they stay spooled");
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

async fn heartbeats(
    cfg: AgentConfig,
    opts: Options,
    client: ApiClient,
    spool: SharedSpool,
    egress: tokio::sync::watch::Receiver<noexit_crds::agent::EgressState>,
    hardening: tokio::sync::watch::Receiver<noexit_crds::agent::HardeningState>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(u64::from(cfg.heartbeat_seconds)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    // While the API refuses the certificate itself, every heartbeat is one more refusal in its
    // audit log: slow down (a rotated certificate is picked up on the next try).
    let mut refused = Backoff::new(Duration::from_secs(u64::from(cfg.heartbeat_seconds).max(1)), REFUSED_MAX_WAIT);
    loop {
        tick.tick().await;
        let hb = Heartbeat {
            at: Utc::now(),
            agent_version: VERSION.into(),
            egress: egress.borrow().clone(),
            hardening: hardening.borrow().clone(),
            spool_depth: depth(&spool),
            active_sessions: sessions::active_sessions(&opts.utmp, &cfg.spool),
        };
        match client.heartbeat(&hb).await {
            Ok(()) if failing => {
                tracing::info!("heartbeats reach the control plane again");
                failing = false;
                refused.reset();
            }
            Ok(()) => {}
            Err(e) if certificate_refused(&e) => {
                let wait = refused.next_delay();
                if !failing {
                    tracing::error!(
                        error = %e,
                        "the control plane refuses this agent's certificate (revoked, expired or not trusted); \
                         reports stay spooled until it is replaced"
                    );
                    failing = true;
                }
                tokio::time::sleep(wait).await;
            }
            Err(e) if !failing => {
                tracing::warn!(error = %e, "heartbeat failed");
                failing = true;
            }
            Err(e) => tracing::debug!(error = %e, "heartbeat failed"),
        }
    }
}

/// Longest wait between heartbeats while the certificate is refused.
const REFUSED_MAX_WAIT: Duration = Duration::from_secs(60);

/// The API refused who we are (401/403), not what we sent.
fn certificate_refused(e: &ClientError) -> bool {
    matches!(e.status(), Some(http::StatusCode::UNAUTHORIZED | http::StatusCode::FORBIDDEN))
}
