//! The HTTPS accept loop: TLS handshake (client certificates verified by rustls), the verified
//! peer handed to the router as [`PeerInfo`], failed handshakes recorded in the audit log.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use super::AppState;
use super::guard::PeerInfo;
use super::tls::{ServerTls, describe_cert_error};
use crate::audit::{AuditEvent, Outcome};
use crate::pki::CertInfo;
use rustls::pki_types::UnixTime;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    tls: ServerTls,
    state: AppState,
    router: Router,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls.config.clone());
    tokio::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            accepted = crate::serving::accept(&listener) => accepted,
            () = &mut shutdown => return Ok(()),
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, state, router, clients) = (acceptor.clone(), state.clone(), router.clone(), tls.clients.clone());
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
            if closed_before_any_byte(&tcp, deadline).await {
                // A TCP connect-and-close (kubelet and load-balancer TCP probes, the agent's
                // pod-mode wall probe) claims no identity: auditing it would bury real refusals.
                tracing::debug!(%addr, "connection closed before sending anything");
                return;
            }
            let tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return refuse_handshake(&state, addr, e.to_string()).await,
                Err(_) => return refuse_handshake(&state, addr, "handshake timed out".into()).await,
            };
            let (cert, cert_error) = match tls.get_ref().1.peer_certificates() {
                Some([end_entity, intermediates @ ..]) => {
                    let verdict = clients.verify_client_cert(end_entity, intermediates, UnixTime::now());
                    let error = verdict.err().map(|e| describe_cert_error(&e));
                    match CertInfo::from_der(end_entity.as_ref()) {
                        Ok(info) => (Some(info), error),
                        Err(e) => (None, Some(("invalidCertificate", format!("client certificate unreadable: {e}")))),
                    }
                }
                _ => (None, None),
            };
            let peer = PeerInfo { addr: Some(addr), cert, cert_error };
            let service = router.map_request(move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(peer.clone());
                req
            });
            let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), TowerToHyperService::new(service))
                .await;
            if let Err(e) = conn {
                tracing::debug!(%addr, error = %e, "connection ended with an error");
            }
        });
    }
}

/// Whether the peer closed (or reset) the connection without sending a byte. Waits at most
/// until `deadline`; a silent open connection is left to the handshake's timeout.
async fn closed_before_any_byte(tcp: &tokio::net::TcpStream, deadline: tokio::time::Instant) -> bool {
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
        Ok(Ok(n)) => n == 0,
        Ok(Err(_)) => true,
        Err(_) => false,
    }
}

/// A refused handshake (expired, foreign or malformed certificate) is a refusal like any other.
async fn refuse_handshake(state: &AppState, addr: std::net::SocketAddr, reason: String) {
    tracing::info!(%addr, %reason, "TLS handshake refused");
    let event = AuditEvent {
        actor: "anonymous".into(),
        role: None,
        action: "tls.handshake".into(),
        object: "api".into(),
        outcome: Outcome::Refused(reason),
        source: Some(addr.to_string()),
        detail: serde_json::Value::Null,
    };
    if let Err(e) = state.audit.record(event).await {
        tracing::error!(error = %e, "cannot record a refused handshake");
    }
}
