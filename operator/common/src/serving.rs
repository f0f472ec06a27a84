//! Pieces every TCP server of the operator (API, webhook, mirror) shares: the accept loop,
//! connection limits (in total and per source address), a header-read timeout and an idle
//! timeout, and a throttle for auditing refusals that an attacker could repeat at will.
//!
//! A connection that makes no progress (neither reads nor writes) for the idle timeout, while
//! no request of it is being worked on, is closed, and each client address may hold only a few
//! connections. A slow client therefore holds at most its own few connections, never a worker:
//! every connection is its own task and waits without blocking others.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Wraps a stream; fails a pending read or write once nothing moved for `idle`.
pub struct IdleTimeout<S> {
    inner: S,
    idle: Duration,
    last_progress: Instant,
    timer: Pin<Box<Sleep>>,
    busy: Busy,
}

/// Requests of one connection being worked on (e.g. waiting for upstream): the connection is
/// not idle then, although no bytes move.
#[derive(Clone, Default)]
pub struct Busy(Arc<AtomicUsize>);

/// Held while a request is being handled.
pub struct BusyGuard(Arc<AtomicUsize>);

impl Busy {
    pub fn enter(&self) -> BusyGuard {
        self.0.fetch_add(1, Ordering::AcqRel);
        BusyGuard(self.0.clone())
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S> IdleTimeout<S> {
    pub fn new(inner: S, idle: Duration, busy: Busy) -> Self {
        let now = Instant::now();
        Self { inner, idle, last_progress: now, timer: Box::pin(tokio::time::sleep_until(now + idle)), busy }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn progressed(&mut self) {
        self.last_progress = Instant::now();
    }

    /// Called when the inner stream is pending: error out if idle too long. The timer is
    /// only moved when it fires early (progress happened since it was set), not on every
    /// byte: resetting a timer per request costs more than the rest of serving an index.
    fn check(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        if self.busy.0.load(Ordering::Acquire) > 0 {
            // Handler at work; the response it produces will poll us again.
            self.progressed();
            return Poll::Pending;
        }
        loop {
            match self.timer.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => {
                    let deadline = self.last_progress + self.idle;
                    if Instant::now() >= deadline {
                        return Poll::Ready(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "connection idle too long",
                        ));
                    }
                    self.timer.as_mut().reset(deadline);
                }
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleTimeout<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.progressed();
                Poll::Ready(r)
            }
            Poll::Pending => this.check(cx).map(Err),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, data) {
            Poll::Ready(r) => {
                this.progressed();
                Poll::Ready(r)
            }
            Poll::Pending => this.check(cx).map(Err),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                this.progressed();
                Poll::Ready(r)
            }
            Poll::Pending => this.check(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => this.check(cx).map(Err),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counts connections per client address.
#[derive(Clone, Default)]
pub struct PerClient {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// Held for the life of one connection.
pub struct Slot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl PerClient {
    /// A slot for `ip`, unless it already holds `max`.
    pub fn acquire(&self, ip: IpAddr, max: usize) -> Option<Slot> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot { counts: self.counts.clone(), ip })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// The accept loop's next connection (shared with the gateway through `noexit-web`).
pub use noexit_web::serve::accept;

/// Connection limits of the API and the webhook (flags shared by both).
#[derive(clap::Args, Debug, Clone)]
pub struct ConnArgs {
    /// Seconds a client may take to send a request's headers (slow clients are cut off).
    #[arg(long, default_value_t = 10)]
    pub header_read_timeout_secs: u64,
    /// Seconds a connection may make no progress before it is closed.
    #[arg(long, default_value_t = 60)]
    pub idle_timeout_secs: u64,
    /// Seconds a client may take to complete the TLS handshake.
    #[arg(long, default_value_t = 10)]
    pub tls_handshake_timeout_secs: u64,
    /// Most open connections from one source address.
    #[arg(long, default_value_t = 64)]
    pub max_connections_per_address: usize,
    /// Most open connections in total.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
}

impl ConnArgs {
    pub fn limits(&self) -> Limits {
        Limits {
            header_read: Duration::from_secs(self.header_read_timeout_secs.max(1)),
            idle: Duration::from_secs(self.idle_timeout_secs.max(1)),
            tls_handshake: Duration::from_secs(self.tls_handshake_timeout_secs.max(1)),
            max_per_address: self.max_connections_per_address.max(1),
            max_connections: self.max_connections.max(1),
        }
    }
}

/// The limits in force.
#[derive(Clone, Debug)]
pub struct Limits {
    pub header_read: Duration,
    pub idle: Duration,
    pub tls_handshake: Duration,
    pub max_per_address: usize,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            tls_handshake: Duration::from_secs(10),
            max_per_address: 64,
            max_connections: 4096,
        }
    }
}

/// Why a connection was turned away before anything was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turned {
    /// The server holds `max_connections`.
    Total,
    /// This address holds `max_per_address`.
    PerAddress,
}

/// Admits connections within the limits; the returned guard frees the place when dropped.
#[derive(Clone)]
pub struct Gate {
    total: Arc<tokio::sync::Semaphore>,
    per_address: PerClient,
    limits: Limits,
}

/// Held for the life of one admitted connection.
pub struct Admitted {
    _total: tokio::sync::OwnedSemaphorePermit,
    _slot: Slot,
}

impl Gate {
    pub fn new(limits: Limits) -> Self {
        Self {
            total: Arc::new(tokio::sync::Semaphore::new(limits.max_connections)),
            per_address: PerClient::default(),
            limits,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn admit(&self, addr: SocketAddr) -> Result<Admitted, Turned> {
        let slot = self.per_address.acquire(addr.ip(), self.limits.max_per_address).ok_or(Turned::PerAddress)?;
        let permit = self.total.clone().try_acquire_owned().map_err(|_| Turned::Total)?;
        Ok(Admitted { _total: permit, _slot: slot })
    }
}

/// Serves one connection with hyper (HTTP/1.1, and HTTP/2 when negotiated): the headers of
/// each HTTP/1 request must arrive within `header_read`, and the connection is closed after
/// `idle` without progress while no request is being handled.
pub async fn serve_connection<I, S, B>(
    io: I,
    service: S,
    limits: &Limits,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let busy = Busy::default();
    let io = IdleTimeout::new(io, limits.idle, busy.clone());
    let service = tower::ServiceExt::map_future(service, move |f| {
        let working = busy.enter();
        async move {
            let r = f.await;
            drop(working);
            r
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(limits.header_read);
    builder.http2().timer(hyper_util::rt::TokioTimer::new()).keep_alive_interval(limits.idle);
    builder
        .serve_connection(hyper_util::rt::TokioIo::new(io), hyper_util::service::TowerToHyperService::new(service))
        .await
}

/// Decides which refusals of one kind are written to the audit log, so that someone who can
/// repeat a refusal at will (failed TLS handshakes, connections over the limit) cannot flood
/// it: the first per source address per `window` is recorded, the rest are counted, and the
/// count is recorded with the next one (or by [`Throttle::expired`]).
pub struct Throttle {
    window: Duration,
    max_tracked: usize,
    state: Mutex<HashMap<IpAddr, Window>>,
}

struct Window {
    start: Instant,
    suppressed: u64,
}

/// What to do with one refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Record it, with the number of refusals from this address not recorded before it.
    Record { suppressed_before: u64 },
    /// Count it only.
    Suppressed,
}

impl Throttle {
    /// Tracks at most `max_tracked` addresses; beyond that all others share one bucket.
    pub fn new(window: Duration, max_tracked: usize) -> Self {
        Self { window, max_tracked: max_tracked.max(1), state: Mutex::new(HashMap::new()) }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    pub fn admit(&self, ip: IpAddr) -> Verdict {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !state.contains_key(&ip) && state.len() >= self.max_tracked {
            state.retain(|_, w| now.duration_since(w.start) < self.window || w.suppressed > 0);
        }
        let key = if state.contains_key(&ip) || state.len() < self.max_tracked {
            ip
        } else {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        };
        match state.get_mut(&key) {
            Some(w) if now.duration_since(w.start) < self.window => {
                w.suppressed += 1;
                Verdict::Suppressed
            }
            Some(w) => {
                let suppressed_before = w.suppressed;
                *w = Window { start: now, suppressed: 0 };
                Verdict::Record { suppressed_before }
            }
            None => {
                state.insert(key, Window { start: now, suppressed: 0 });
                Verdict::Record { suppressed_before: 0 }
            }
        }
    }

    /// Addresses whose window ended with refusals not yet recorded, and how many; they are
    /// forgotten (call every `window`, and at shutdown with `all`).
    pub fn expired(&self, all: bool) -> Vec<(IpAddr, u64)> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        state.retain(|ip, w| {
            let over = all || now.duration_since(w.start) >= self.window;
            if over && w.suppressed > 0 {
                out.push((*ip, w.suppressed));
            }
            !over
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn throttle_records_the_first_per_window_and_counts_the_rest() {
        let t = Throttle::new(Duration::from_millis(300), 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(t.admit(a), Verdict::Record { suppressed_before: 0 });
        for _ in 0..99 {
            assert_eq!(t.admit(a), Verdict::Suppressed);
        }
        assert_eq!(t.admit("10.0.0.2".parse().unwrap()), Verdict::Record { suppressed_before: 0 });
        // A third address shares the overflow bucket.
        assert_eq!(t.admit("10.0.0.3".parse().unwrap()), Verdict::Record { suppressed_before: 0 });
        assert_eq!(t.admit("10.0.0.4".parse().unwrap()), Verdict::Suppressed);
        assert_eq!(t.expired(false), vec![]);
        let mut all = t.expired(true);
        all.sort();
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(all.contains(&(a, 99)));
    }

    #[test]
    fn per_client_limit_frees_slots_on_drop() {
        let pc = PerClient::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = pc.acquire(ip, 2).unwrap();
        let _b = pc.acquire(ip, 2).unwrap();
        assert!(pc.acquire(ip, 2).is_none());
        assert!(pc.acquire("10.0.0.2".parse().unwrap(), 2).is_some());
        drop(a);
        assert!(pc.acquire(ip, 2).is_some());
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_cut_off() {
        let (client, server) = tokio::io::duplex(1024);
        let mut server = IdleTimeout::new(server, Duration::from_millis(200), Busy::default());
        // The client never reads: the write blocks once the pipe is full, then times out.
        let err = server.write_all(&[0u8; 64 * 1024]).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        drop(client);
    }

    #[tokio::test]
    async fn a_connection_waiting_on_its_handler_is_not_idle() {
        let (mut client, server) = tokio::io::duplex(1024);
        let busy = Busy::default();
        let mut server = IdleTimeout::new(server, Duration::from_millis(100), busy.clone());
        let guard = busy.enter();
        let mut buf = [0u8; 8];
        // Nothing arrives for longer than the idle limit while the request is being handled.
        let waited = tokio::time::timeout(Duration::from_millis(400), server.read(&mut buf)).await;
        assert!(waited.is_err(), "the read must still be pending, not failed");
        drop(guard);
        client.write_all(b"x").await.unwrap();
        assert_eq!(server.read(&mut buf).await.unwrap(), 1);
        // Now idle for real.
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn progress_keeps_the_connection_alive() {
        let (mut client, server) = tokio::io::duplex(16);
        let mut server = IdleTimeout::new(server, Duration::from_millis(300), Busy::default());
        // A slow reader (a pause shorter than the idle limit between reads) is never cut off,
        // although the whole transfer takes longer than the limit.
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 16];
            loop {
                tokio::time::sleep(Duration::from_millis(60)).await;
                match client.read(&mut buf).await.unwrap() {
                    0 => break got,
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        server.write_all(&[7u8; 64]).await.unwrap();
        server.shutdown().await.unwrap();
        drop(server);
        assert_eq!(reader.await.unwrap().len(), 64);
    }
}
