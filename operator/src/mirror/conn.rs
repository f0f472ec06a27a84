//! Connection-level protection: a connection that makes no progress (neither reads nor
//! writes) for the idle timeout, while no request of it is being worked on, is closed, and each client address may hold only a few
//! connections. A slow client therefore holds at most its own few connections, never a
//! worker: every connection is its own task and waits without blocking others.

use std::collections::HashMap;
use std::net::IpAddr;
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
