//! The agent's loop around the lock: apply (retrying until it holds), re-check as soon as the
//! kernel reports an nftables change and on an interval, restore and report tampering, report
//! blocked attempts at a bounded rate.

use std::sync::Arc;
use std::time::Duration;

use noexit_crds::agent::{EgressState, Violation, ViolationKind};
use tokio::sync::{Notify, mpsc, watch as tokio_watch};
use tokio::time::{Instant, MissedTickBehavior};

use super::lock::{BlockedCounts, CheckOutcome, EgressLock, locked_state, not_locked};

/// Blocked attempts are summed and sent at most this often (a busy loop trying to reach the
/// internet must not flood the control plane with one event per packet).
pub const DEFAULT_BLOCKED_REPORT_EVERY: Duration = Duration::from_secs(60);

/// Options of [`watch_with`].
#[derive(Clone, Copy, Debug)]
pub struct WatchOptions {
    /// How often the live table is compared with the plan when nothing changed (a backstop:
    /// changes reported by the kernel are checked at once).
    pub interval: Duration,
    /// Minimum time between two `egressBlocked` violations.
    pub blocked_report_every: Duration,
}

/// Runs until `tx` is closed (the agent is shutting down). The table stays in place after.
pub async fn watch(
    lock: EgressLock,
    interval: Duration,
    tx: mpsc::Sender<Violation>,
    state: tokio_watch::Sender<EgressState>,
) {
    let opts = WatchOptions { interval, blocked_report_every: DEFAULT_BLOCKED_REPORT_EVERY };
    watch_with(lock, opts, tx, state).await
}

/// [`watch`] with every knob.
pub async fn watch_with(
    lock: EgressLock,
    opts: WatchOptions,
    tx: mpsc::Sender<Violation>,
    state: tokio_watch::Sender<EgressState>,
) {
    let lock = Arc::new(lock);
    let changed = Arc::new(Notify::new());
    let monitor = AbortOnDrop(tokio::spawn(super::monitor::run(changed.clone())));
    let mut ticker = tokio::time::interval(opts.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut applied = false;
    let mut blocked = BlockedTally::new(Instant::now());
    // While nft keeps failing, try less often (the wall stays as it is meanwhile: closed).
    let mut failures = 0u32;
    let mut next_try = Instant::now();
    while !tx.is_closed() {
        tokio::select! {
            _ = ticker.tick() => {}
            () = changed.notified() => {}
        }
        if Instant::now() < next_try {
            continue;
        }
        let (step, counts) = {
            let lock = lock.clone();
            let was_applied = applied;
            match tokio::task::spawn_blocking(move || {
                let step =
                    if was_applied { Step::Checked(lock.check_and_restore()) } else { Step::Applied(lock.apply()) };
                (step, lock.blocked_counts().ok())
            })
            .await
            {
                Ok(r) => r,
                Err(e) => (Step::Applied(Err(super::EgressError::Verify(format!("check task failed: {e}")))), None),
            }
        };
        let failed = matches!(step, Step::Applied(Err(_)) | Step::Checked(CheckOutcome::Failed { .. }));
        failures = if failed { failures.saturating_add(1) } else { 0 };
        next_try = Instant::now() + retry_after(opts.interval, failures);
        let mut next = match step {
            Step::Applied(Ok(s)) => {
                applied = true;
                tracing::info!(detail = ?s.detail, "egress lock applied");
                s
            }
            Step::Applied(Err(e)) => {
                tracing::error!(error = %e, "egress lock could not be applied; workspace stays not Ready");
                not_locked(&e)
            }
            Step::Checked(CheckOutcome::Intact) => current_or(&state, "egress table intact"),
            Step::Checked(CheckOutcome::Restored { tamper }) => {
                tracing::warn!(%tamper, "egress table was changed; restored");
                send(&tx, ViolationKind::Tamper, 1, format!("egress table changed and restored: {tamper}")).await;
                blocked.reset_baseline();
                locked_state(format!("egress table restored after tampering: {tamper}"))
            }
            Step::Checked(CheckOutcome::Failed { tamper, error }) => {
                tracing::error!(%error, "egress lock not confirmed");
                if let Some(tamper) = tamper {
                    send(&tx, ViolationKind::Tamper, 1, format!("egress table changed, restore failed: {tamper}"))
                        .await;
                }
                not_locked(&error)
            }
        };
        if let Some(counts) = counts {
            blocked.observe(counts);
        }
        if let Some(n) = blocked.due(Instant::now(), opts.blocked_report_every) {
            let detail = format!(
                "{n} outbound packet(s) to addresses outside the allowlist were blocked (kernel log prefix `{}`)",
                super::plan::LOG_PREFIX.trim()
            );
            send(&tx, ViolationKind::EgressBlocked, n, detail).await;
        }
        next.blocked_since_last = blocked.pending;
        state.send_if_modified(|s| {
            let changed = *s != next;
            *s = next;
            changed
        });
    }
    drop(monitor);
}

/// Stops the monitor task when the watch ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Ceiling of the retry backoff.
const MAX_RETRY: Duration = Duration::from_secs(60);

/// Next attempt after `failures` failures in a row: the interval, then doubling up to a minute.
fn retry_after(interval: Duration, failures: u32) -> Duration {
    if failures <= 1 {
        return Duration::ZERO;
    }
    interval.saturating_mul(1 << (failures - 1).min(16)).min(MAX_RETRY.max(interval))
}

enum Step {
    Applied(Result<EgressState, super::EgressError>),
    Checked(CheckOutcome),
}

fn current_or(state: &tokio_watch::Sender<EgressState>, detail: &str) -> EgressState {
    let s = state.borrow().clone();
    if s.locked { s } else { locked_state(detail.to_string()) }
}

async fn send(tx: &mpsc::Sender<Violation>, kind: ViolationKind, count: u64, detail: String) {
    if tx.send(Violation { kind, count, detail }).await.is_err() {
        tracing::debug!("violation channel closed; agent is stopping");
    }
}

/// Turns the ever-growing (but reset on restore) kernel counter into rate-limited reports.
#[derive(Debug)]
struct BlockedTally {
    last_seen: Option<u64>,
    /// Counted but not reported yet.
    pending: u64,
    last_report: Instant,
}

impl BlockedTally {
    fn new(now: Instant) -> Self {
        Self { last_seen: None, pending: 0, last_report: now }
    }

    fn observe(&mut self, counts: BlockedCounts) {
        let now = counts.outbound;
        let delta = match self.last_seen {
            Some(prev) if now >= prev => now - prev,
            // Counter went backwards: the table was recreated, everything counted is new.
            Some(_) => now,
            // First sight: whatever was counted before this agent started belongs to no one.
            None => 0,
        };
        self.pending += delta;
        self.last_seen = Some(now);
    }

    /// After a restore the counter restarts at zero.
    fn reset_baseline(&mut self) {
        self.last_seen = Some(0);
    }

    fn due(&mut self, now: Instant, every: Duration) -> Option<u64> {
        if self.pending == 0 || now.duration_since(self.last_report) < every {
            return None;
        }
        self.last_report = now;
        Some(std::mem::take(&mut self.pending))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egress::live::tests::listing_of;
    use crate::egress::lock::tests::FakeNft;
    use crate::egress::plan::{plan, tests::config};
    use serde_json::{Value, json};

    fn with_blocked_out(mut listing: Value, packets: u64) -> Value {
        for o in listing["nftables"].as_array_mut().unwrap() {
            if o["counter"]["name"] == "blocked_out" {
                o["counter"]["packets"] = json!(packets);
            }
        }
        listing
    }

    #[tokio::test]
    async fn watch_applies_restores_tamper_and_reports_blocked() {
        let fresh = with_blocked_out(listing_of(&plan(&config()).unwrap()), 0);
        let fake = FakeNft::new(&fresh);
        let (tx, mut rx) = mpsc::channel(8);
        let (state_tx, mut state_rx) = tokio_watch::channel(not_locked(&"starting"));
        let opts = WatchOptions { interval: Duration::from_millis(20), blocked_report_every: Duration::ZERO };
        let task = tokio::spawn(watch_with(fake.lock(), opts, tx, state_tx));
        let bound = Duration::from_secs(10);
        tokio::time::timeout(bound, state_rx.wait_for(|s| s.locked)).await.unwrap().unwrap();

        fake.set("listing.json", &json!({"nftables": []}));
        let v = tokio::time::timeout(bound, rx.recv()).await.unwrap().unwrap();
        assert_eq!(v.kind, ViolationKind::Tamper);
        assert!(v.detail.contains("is gone"), "{}", v.detail);

        fake.set("listing.json", &with_blocked_out(fresh.clone(), 5));
        let v = tokio::time::timeout(bound, rx.recv()).await.unwrap().unwrap();
        assert_eq!((v.kind, v.count), (ViolationKind::EgressBlocked, 5), "{}", v.detail);
        assert!(state_rx.borrow().locked);

        // nft stops working: not locked, with the reason; nothing is reported as tamper.
        std::fs::write(fake.path("fail-list"), "").unwrap();
        let s = tokio::time::timeout(bound, state_rx.wait_for(|s| !s.locked)).await.unwrap().unwrap().clone();
        let detail = s.detail.unwrap();
        assert!(
            detail.contains("listing the ruleset: nft failed: netlink: Error: cache initialization failed"),
            "{detail}"
        );
        assert!(rx.try_recv().is_err(), "a failing nft is not tamper");
        task.abort();
    }

    fn out(n: u64) -> BlockedCounts {
        BlockedCounts { outbound: n, inbound: 0 }
    }

    #[test]
    fn retries_back_off_up_to_a_minute() {
        let i = Duration::from_secs(2);
        let waits: Vec<u64> = (0..9).map(|n| retry_after(i, n).as_secs()).collect();
        assert_eq!(waits, [0, 0, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(retry_after(Duration::from_secs(90), 3), Duration::from_secs(90), "never below the interval");
    }

    #[test]
    fn blocked_attempts_are_summed_and_rate_limited() {
        let t0 = Instant::now();
        let every = Duration::from_secs(60);
        let mut tally = BlockedTally::new(t0);
        tally.observe(out(100)); // counted before we started: not ours to report
        assert_eq!(tally.pending, 0);
        tally.observe(out(103));
        assert_eq!(tally.due(t0 + Duration::from_secs(10), every), None, "too soon");
        tally.observe(out(110));
        assert_eq!(tally.due(t0 + Duration::from_secs(61), every), Some(10));
        assert_eq!(tally.due(t0 + Duration::from_secs(200), every), None, "nothing new");
        tally.observe(out(4)); // table recreated: counter restarted
        assert_eq!(tally.due(t0 + Duration::from_secs(200), every), Some(4));
        tally.reset_baseline();
        tally.observe(out(2));
        assert_eq!(tally.due(t0 + Duration::from_secs(300), every), Some(2));
    }
}
