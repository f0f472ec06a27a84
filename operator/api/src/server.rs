//! The HTTPS accept loop: connection limits per source address and in total, TLS handshake
//! (client certificates verified by rustls), the verified peer handed to the router as
//! [`PeerInfo`], header-read and idle timeouts; failed handshakes and connections over the
//! limit recorded in the audit log (the first per address per minute, with a count of the rest).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use super::AppState;
use super::guard::PeerInfo;
use super::tls::{ServerTls, describe_cert_error};
use noexit_audit::{AuditEvent, Outcome};
use noexit_common::pki::CertInfo;
use noexit_common::serving::{Gate, Limits, Throttle, Turned, Verdict};
use rustls::pki_types::UnixTime;

/// Refusals an anonymous client can repeat at will are recorded once per address per window.
pub const THROTTLE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked by a throttle before the rest share one bucket.
const THROTTLE_ADDRESSES: usize = 10_000;

/// Serve `router` on `listener` with the default [`Limits`] until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    tls: ServerTls,
    state: AppState,
    router: Router,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve_with(listener, tls, state, router, Limits::default(), shutdown).await
}

/// The throttles of one server: failed handshakes, and connections turned away.
struct Throttles {
    handshake: Throttle,
    turned: Throttle,
}

/// Serve `router` on `listener` within `limits` until `shutdown` resolves.
pub async fn serve_with(
    listener: TcpListener,
    tls: ServerTls,
    state: AppState,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls.config.clone());
    let gate = Gate::new(limits);
    let throttles = Arc::new(Throttles {
        handshake: Throttle::new(THROTTLE_WINDOW, THROTTLE_ADDRESSES),
        turned: Throttle::new(THROTTLE_WINDOW, THROTTLE_ADDRESSES),
    });
    let mut flush = tokio::time::interval_at(tokio::time::Instant::now() + THROTTLE_WINDOW, THROTTLE_WINDOW);
    tokio::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            accepted = noexit_common::serving::accept(&listener) => accepted,
            _ = flush.tick() => {
                record_suppressed(&state, &throttles, false).await;
                continue;
            }
            () = &mut shutdown => {
                record_suppressed(&state, &throttles, true).await;
                return Ok(());
            }
        };
        let admitted = match gate.admit(addr) {
            Ok(a) => a,
            Err(turned) => {
                drop(tcp);
                let reason = match turned {
                    Turned::PerAddress => {
                        format!("more than {} open connections from this address", gate.limits().max_per_address)
                    }
                    Turned::Total => format!("more than {} open connections in total", gate.limits().max_connections),
                };
                tracing::warn!(%addr, %reason, "connection refused");
                if let Verdict::Record { suppressed_before } = throttles.turned.admit(addr.ip()) {
                    let state = state.clone();
                    tokio::spawn(async move {
                        record_refusal(&state, "api.connection", addr.to_string(), reason, suppressed_before).await
                    });
                }
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, state, router, clients) = (acceptor.clone(), state.clone(), router.clone(), tls.clients.clone());
        let (limits, throttles) = (gate.limits().clone(), throttles.clone());
        tokio::spawn(async move {
            let _admitted = admitted;
            let deadline = tokio::time::Instant::now() + limits.tls_handshake;
            if closed_before_any_byte(&tcp, deadline).await {
                // A TCP connect-and-close (kubelet and load-balancer TCP probes, the agent's
                // pod-mode wall probe) claims no identity: auditing it would bury real refusals.
                tracing::debug!(%addr, "connection closed before sending anything");
                return;
            }
            let tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return refuse_handshake(&state, &throttles.handshake, addr, e.to_string()).await,
                Err(_) => {
                    return refuse_handshake(&state, &throttles.handshake, addr, "handshake timed out".into()).await;
                }
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
            if let Err(e) = noexit_common::serving::serve_connection(tls, service, &limits).await {
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

/// A refused handshake (expired, foreign or malformed certificate) is a refusal like any other;
/// anyone can repeat it, so it is throttled per address.
async fn refuse_handshake(state: &AppState, throttle: &Throttle, addr: SocketAddr, reason: String) {
    tracing::info!(%addr, %reason, "TLS handshake refused");
    if let Verdict::Record { suppressed_before } = throttle.admit(addr.ip()) {
        record_refusal(state, "tls.handshake", addr.to_string(), reason, suppressed_before).await;
    }
}

async fn record_refusal(state: &AppState, action: &str, source: String, reason: String, suppressed_before: u64) {
    let detail = if suppressed_before > 0 {
        serde_json::json!({ "notRecordedBefore": suppressed_before, "windowSeconds": THROTTLE_WINDOW.as_secs() })
    } else {
        serde_json::Value::Null
    };
    let event = AuditEvent {
        actor: "anonymous".into(),
        role: None,
        action: action.into(),
        object: "api".into(),
        outcome: Outcome::Refused(reason),
        source: Some(source),
        detail,
    };
    if let Err(e) = state.audit.record(event).await {
        tracing::error!(error = %e, action, "cannot record a refusal");
    }
}

/// One entry per address whose refusals in the last window were counted but not recorded.
async fn record_suppressed(state: &AppState, throttles: &Throttles, all: bool) {
    for (action, throttle) in [("tls.handshake", &throttles.handshake), ("api.connection", &throttles.turned)] {
        for (ip, n) in throttle.expired(all) {
            let source = if ip == IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) {
                "many addresses".into()
            } else {
                ip.to_string()
            };
            let reason = format!("{n} more refusals from this source within {} s", throttle.window().as_secs());
            record_refusal(state, action, source, reason, n).await;
        }
    }
}
