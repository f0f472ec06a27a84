//! Serving HTTPS with rustls: a certificate and key read from PEM files (a mounted Secret,
//! issued by the operator's CA), re-read when the files change so a rotated certificate is
//! used without a restart, and a graceful accept loop over hyper.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: String },
    #[error("{path}: no PEM private key found")]
    NoKey { path: String },
    #[error("{path}: {message}")]
    Pem { path: String, message: String },
    #[error("certificate {cert} and key {key} do not form a usable pair: {source}")]
    Pair { cert: String, key: String, source: rustls::Error },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The PEM bytes of a certificate chain and its key, as read from disk.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pem {
    cert: Vec<u8>,
    key: Vec<u8>,
}

fn read(cert: &Path, key: &Path) -> Result<Pem, TlsError> {
    let read = |p: &Path| std::fs::read(p).map_err(|source| TlsError::Read { path: p.display().to_string(), source });
    Ok(Pem { cert: read(cert)?, key: read(key)? })
}

fn certified(pem: &Pem, cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_name = cert_path.display().to_string();
    let key_name = key_path.display().to_string();
    let chain = rustls_pemfile::certs(&mut pem.cert.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { path: cert_name.clone(), message: e.to_string() })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: cert_name });
    }
    let key = rustls_pemfile::private_key(&mut pem.key.as_slice())
        .map_err(|e| TlsError::Pem { path: key_name.clone(), message: e.to_string() })?
        .ok_or_else(|| TlsError::NoKey { path: key_name.clone() })?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|source| TlsError::Pair {
        cert: cert_name,
        key: key_name,
        source,
    })
}

/// Hands rustls the current certificate; [`ReloadingCert::reload`] swaps it.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<(Pem, Arc<CertifiedKey>)>,
}

impl ReloadingCert {
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<Self>, TlsError> {
        let pem = read(cert_path, key_path)?;
        let key = Arc::new(certified(&pem, cert_path, key_path)?);
        Ok(Arc::new(Self {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            current: RwLock::new((pem, key)),
        }))
    }

    /// Re-read the files; switch to them when they changed and form a valid pair. Returns
    /// whether the certificate changed. A broken pair (e.g. read between the two writes of a
    /// rotation) is reported and the old certificate kept.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let pem = read(&self.cert_path, &self.key_path)?;
        let unchanged = self.current.read().map(|c| c.0 == pem).unwrap_or(false);
        if unchanged {
            return Ok(false);
        }
        let key = Arc::new(certified(&pem, &self.cert_path, &self.key_path)?);
        if let Ok(mut current) = self.current.write() {
            *current = (pem, key);
        }
        Ok(true)
    }

    /// Poll the files every `every` (Secret volumes are updated by an atomic symlink swap, so
    /// the content, not the mtime, is compared).
    pub fn watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match this.reload() {
                    Ok(true) => tracing::info!(cert = %this.cert_path.display(), "serving certificate reloaded"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "serving certificate not reloaded; keeping the current one"),
                }
            }
        })
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.1.clone())
    }
}

/// A TLS acceptor (TLS 1.2+, HTTP/2 and HTTP/1.1) serving `cert`.
pub fn acceptor(cert: Arc<ReloadingCert>) -> Result<TlsAcceptor, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serve `app` over TLS within `limits` (per-address and total connections, handshake,
/// header-read and idle timeouts) until `shutdown` resolves, then let open connections finish
/// (bounded).
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: axum::Router,
    limits: noexit_common::serving::Limits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let gate = noexit_common::serving::Gate::new(limits);
    let open = Arc::new(tokio::sync::Notify::new());
    let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = noexit_common::serving::accept(&listener) => accepted,
            () = &mut shutdown => break,
        };
        let admitted = match gate.admit(peer) {
            Ok(a) => a,
            Err(turned) => {
                tracing::warn!(%peer, ?turned, "connection limit reached; closing");
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let limits = gate.limits().clone();
        let (open, running) = (open.clone(), running.clone());
        running.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        tokio::spawn(async move {
            let _admitted = admitted;
            let _done = Done(running, open);
            let tls = match tokio::time::timeout(limits.tls_handshake, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            if let Err(e) = noexit_common::serving::serve_connection(tls, app, &limits).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    // Open connections finish their requests (bounded); idle ones end by the idle timeout.
    let drained = async {
        while running.load(std::sync::atomic::Ordering::Acquire) > 0 {
            open.notified().await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), drained).await.is_err() {
        tracing::warn!("connections still open after 10 s; closing");
    }
}

/// Counts a connection task down when it ends.
struct Done(Arc<std::sync::atomic::AtomicUsize>, Arc<tokio::sync::Notify>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.1.notify_waiters();
    }
}
