//! Test support (cargo feature `testing`): a fake API server and a harness that runs the
//! controllers against it with a recording revoker.

pub mod fake_api;

use std::sync::Arc;
use std::time::Duration;

pub use fake_api::{Call, FakeApi, ResourceKey};
use tokio::sync::watch;

use crate::context::{Backoff, Context};
use crate::revoke::RecordingRevoker;
use crate::run::run_controllers;
use crate::site::Site;
use noexit_common::telemetry::Metrics;

/// The controllers running against a fake API.
pub struct Running {
    pub ctx: Arc<Context>,
    pub revoker: Arc<RecordingRevoker>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Start the four controllers with `client` (talking to `api`), short backoffs for tests.
    pub fn start(client: kube::Client, backoff: Backoff, concurrency: u16) -> Self {
        Self::start_observed(client, backoff, concurrency, None)
    }

    /// As `start`, with a reconcile observer (benchmarks).
    pub fn start_observed(
        client: kube::Client,
        backoff: Backoff,
        concurrency: u16,
        observer: Option<crate::context::ReconcileObserver>,
    ) -> Self {
        Self::start_with(client, Site::default(), backoff, concurrency, observer)
    }

    fn start_with(
        client: kube::Client,
        site: Site,
        backoff: Backoff,
        concurrency: u16,
        observer: Option<crate::context::ReconcileObserver>,
    ) -> Self {
        let revoker = Arc::new(RecordingRevoker::default());
        let mut ctx = Context::new(
            client,
            site,
            "noexit-system".into(),
            revoker.clone(),
            Arc::new(Metrics::default()),
            "test".into(),
        );
        ctx.backoff = backoff;
        ctx.observer = observer;
        let ctx = Arc::new(ctx);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run_controllers(ctx.clone(), stop_rx, concurrency));
        Self { ctx, revoker, stop, task }
    }

    /// In-process client, test backoff (50 ms doubling to 1 s).
    pub fn in_process(api: FakeApi) -> Self {
        Self::start(api.client(), Backoff { base: Duration::from_millis(50), max: Duration::from_secs(1) }, 16)
    }

    /// As `in_process`, with a site file other than the default.
    pub fn in_process_with_site(api: FakeApi, site: Site) -> Self {
        let backoff = Backoff { base: Duration::from_millis(50), max: Duration::from_secs(1) };
        Self::start_with(api.client(), site, backoff, 16, None)
    }

    /// Stop the controllers and wait for them (bounded).
    pub async fn stop(self) {
        self.stop.send_replace(true);
        if tokio::time::timeout(Duration::from_secs(10), self.task).await.is_err() {
            tracing::warn!("controllers did not stop within 10 s");
        }
    }
}

/// Poll `check` every 20 ms until it returns `Some`, for at most `within`.
pub async fn eventually<T>(within: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
