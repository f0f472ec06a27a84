//! Loopback listeners: a free port, whether something accepts, waiting for a listener, and
//! serving an axum router over plain HTTP or TLS.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;

/// A TCP port on 127.0.0.1 that was free a moment ago (for a process that takes a port
/// number rather than a listener).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free loopback port").port()
}

/// Whether a TCP connection to `addr` is accepted within 200 ms.
pub fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Waits until `addr` accepts TCP connections; panics after `bound`.
pub fn wait_for_listen(what: &str, addr: SocketAddr, bound: Duration) {
    crate::poll::blocking(&format!("{what} listening on {addr}"), bound, || accepts(addr).then_some(()));
}

/// Serves `router` on `listener`, over TLS with `tls` when given. Aborting the task closes the
/// listener and every open connection.
pub fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: axum::Router,
) -> tokio::task::JoinHandle<()> {
    let Some(tls) = tls else {
        return tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        // Connections live in the set, so aborting this task ends them too.
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let (acceptor, router) = (acceptor.clone(), router.clone());
            connections.spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = TowerToHyperService::new(router);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
            });
            while connections.try_join_next().is_some() {}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_is_seen_and_a_free_port_is_not() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        wait_for_listen("the listener", listener.local_addr().unwrap(), Duration::from_secs(5));
        assert!(!accepts(SocketAddr::from(([127, 0, 0, 1], free_port()))));
    }
}
