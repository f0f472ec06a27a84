//! The HTTPS accept loop (rustls; HTTP/1.1 with upgrades for the WebSocket). The certificate
//! follows its files (`noexit-web`).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::web::Peer;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub use noexit_web::tls::{ReloadingCert, TlsError};

/// The gateway's server TLS: the certificate in `cert`/`key`, served by a resolver that
/// [`noexit_web::tls::watch`] keeps current when the files change.
pub fn tls_config(cert: &Path, key: &Path) -> Result<(Arc<rustls::ServerConfig>, Arc<ReloadingCert>), TlsError> {
    let reloading = Arc::new(ReloadingCert::load(cert, key)?);
    Ok((noexit_web::tls::server_config(reloading.clone())?, reloading))
}

/// Serve `router` over TLS on `listener` until `shutdown` resolves.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    tokio::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            accepted = noexit_web::serve::accept(&listener) => accepted,
            () = &mut shutdown => return,
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%addr, "TLS handshake timed out"),
            };
            let service = router.map_request(move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(Peer(addr));
                req
            });
            let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .http1_only()
                .serve_connection_with_upgrades(TokioIo::new(tls), TowerToHyperService::new(service))
                .await;
            if let Err(e) = conn {
                tracing::debug!(%addr, error = %e, "connection ended with an error");
            }
        });
    }
}
