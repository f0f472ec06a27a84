//! Revocation of a workspace agent's certificate when its Workspace is deleted. The list of
//! revoked serials lives in the control-plane API (outside the cluster's objects), which is why
//! the Workspace carries a finalizer: the object stays until the API has confirmed.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use noexit_common::pki::{Ca, PkiError};

/// Path of the API endpoint that records revocations (200 on success, idempotent).
pub const REVOCATIONS_PATH: &str = "/v1/operator/revocations";

/// One certificate to revoke.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// `<project>/<name>`.
    pub workspace: String,
    /// Lower-case hex serial.
    pub serial: String,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error("cannot revoke certificate {serial} of workspace {workspace}: {message}")]
    Failed { workspace: String, serial: String, message: String },
    #[error("cannot prepare the operator's client certificate: {0}")]
    Pki(#[from] PkiError),
}

impl RevokeError {
    fn failed(r: &Revocation, message: impl Into<String>) -> Self {
        RevokeError::Failed { workspace: r.workspace.clone(), serial: r.serial.clone(), message: message.into() }
    }
}

/// Something that revokes certificates. Object-safe so the controller holds a `dyn Revoker`.
pub trait Revoker: Send + Sync {
    fn revoke<'a>(&'a self, revocation: &'a Revocation) -> BoxFuture<'a, Result<(), RevokeError>>;
}

/// POSTs `{"workspace","serial","reason"}` as JSON to `<api-url>/v1/operator/revocations` over
/// mutual TLS: the operator presents a client certificate with URI SAN `noexit://operator`
/// issued by the CA, and trusts only that CA for the API's server certificate.
pub struct HttpRevoker {
    url: http::Uri,
    ca: Arc<Ca>,
    validity: chrono::Duration,
    tls: Mutex<Option<(Arc<rustls::ClientConfig>, DateTime<Utc>)>>,
}

impl HttpRevoker {
    pub fn new(api_url: &str, ca: Arc<Ca>) -> Result<Self, String> {
        let url: http::Uri = format!("{}{REVOCATIONS_PATH}", api_url.trim_end_matches('/'))
            .parse()
            .map_err(|e| format!("--api-url {api_url:?}: {e}"))?;
        if url.scheme_str() != Some("https") || url.host().is_none() {
            return Err(format!("--api-url {api_url:?} must be an https:// URL"));
        }
        Ok(Self { url, ca, validity: chrono::Duration::days(1), tls: Mutex::new(None) })
    }

    /// TLS configuration with a client certificate, re-issued when half its life is gone.
    fn tls(&self) -> Result<Arc<rustls::ClientConfig>, RevokeError> {
        let now = Utc::now();
        let mut slot = self.tls.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((config, refresh_at)) = slot.as_ref()
            && now < *refresh_at
        {
            return Ok(config.clone());
        }
        let cert = self.ca.issue_operator_client(self.validity)?;
        let config = Arc::new(client_config(self.ca.cert_pem(), &cert.cert_pem, &cert.key_pem)?);
        *slot = Some((config.clone(), now + self.validity / 2));
        Ok(config)
    }

    async fn post(&self, r: &Revocation) -> Result<(), RevokeError> {
        let tls = self.tls()?;
        let host = self.url.host().unwrap_or_default().to_owned();
        let port = self.url.port_u16().unwrap_or(443);
        let server_name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| RevokeError::failed(r, format!("bad host {host:?}: {e}")))?;
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| RevokeError::failed(r, format!("connect to {host}:{port}: {e}")))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(server_name, tcp)
            .await
            .map_err(|e| RevokeError::failed(r, format!("TLS with {host}:{port}: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| RevokeError::failed(r, format!("HTTP with {host}:{port}: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "revocation connection closed");
            }
        });
        let body = serde_json::to_vec(r).map_err(|e| RevokeError::failed(r, e.to_string()))?;
        let request = http::Request::post(self.url.path())
            .header(http::header::HOST, format!("{host}:{port}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes::Bytes::from(body)))
            .map_err(|e| RevokeError::failed(r, e.to_string()))?;
        let response = tokio::time::timeout(std::time::Duration::from_secs(10), sender.send_request(request))
            .await
            .map_err(|_| RevokeError::failed(r, "the API did not answer within 10 s"))?
            .map_err(|e| RevokeError::failed(r, format!("request failed: {e}")))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let text = String::from_utf8_lossy(&text[..text.len().min(300)]).into_owned();
        Err(RevokeError::failed(r, format!("the API answered {status}: {text}")))
    }
}

impl Revoker for HttpRevoker {
    fn revoke<'a>(&'a self, revocation: &'a Revocation) -> BoxFuture<'a, Result<(), RevokeError>> {
        Box::pin(self.post(revocation))
    }
}

fn client_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<rustls::ClientConfig, PkiError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |e: &dyn std::fmt::Display| PkiError::Parse(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    let chain =
        CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().map_err(|e| bad(&e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| bad(&e))?;
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad(&e))
}

/// A revoker for tests: records every call and fails the next `n` calls on request.
#[derive(Default)]
pub struct RecordingRevoker {
    calls: Mutex<Vec<Revocation>>,
    failures: Mutex<u32>,
}

impl RecordingRevoker {
    pub fn calls(&self) -> Vec<Revocation> {
        self.calls.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The next `n` calls fail (and are still recorded).
    pub fn fail_next(&self, n: u32) {
        *self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = n;
    }
}

impl Revoker for RecordingRevoker {
    fn revoke<'a>(&'a self, revocation: &'a Revocation) -> BoxFuture<'a, Result<(), RevokeError>> {
        self.calls.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(revocation.clone());
        let mut failures = self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let result = if *failures > 0 {
            *failures -= 1;
            Err(RevokeError::failed(revocation, "the API answered 503 Service Unavailable (injected)"))
        } else {
            Ok(())
        };
        Box::pin(std::future::ready(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot TLS server that requires a client certificate from the CA, reads one request,
    /// and answers 200. Returns what it read and the client's URI SANs.
    async fn serve_once(ca: &Ca, listener: tokio::net::TcpListener) -> (String, Vec<String>) {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let server = ca.issue_server(&["localhost".into()], chrono::Duration::days(1)).expect("server cert");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).expect("ca")).expect("root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .expect("verifier");
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(server.cert_pem.as_bytes()).expect("cert")],
                PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).expect("key"),
            )
            .expect("config");
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut tls = tokio_rustls::TlsAcceptor::from(Arc::new(config)).accept(tcp).await.expect("handshake");
        let peer = tls.get_ref().1.peer_certificates().expect("client cert")[0].clone();
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, peer.as_ref())
        );
        let uris = noexit_common::pki::CertInfo::from_pem(&pem).expect("peer").uris;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        // Read until the JSON body is complete (it ends with '}').
        while !buf.ends_with(b"}") {
            let n = tls.read(&mut chunk).await.expect("read");
            assert!(n > 0, "client closed early");
            buf.extend_from_slice(&chunk[..n]);
        }
        tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.expect("write");
        tls.flush().await.expect("flush");
        (String::from_utf8_lossy(&buf).into_owned(), uris)
    }

    #[tokio::test]
    async fn http_revoker_posts_json_over_mutual_tls() {
        let ca = Arc::new(Ca::generate("test CA").expect("ca"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server_ca = Ca::from_pem(ca.cert_pem(), ca.key_pem()).expect("ca copy");
        let server = tokio::spawn(async move { serve_once(&server_ca, listener).await });
        let revoker = HttpRevoker::new(&format!("https://localhost:{port}/"), ca).expect("revoker");
        let r = Revocation { workspace: "ward-7/alice".into(), serial: "0a1b".into(), reason: "deleted".into() };
        revoker.revoke(&r).await.expect("revoked");
        let (request, uris) = server.await.expect("server");
        assert!(request.starts_with("POST /v1/operator/revocations HTTP/1.1"), "{request}");
        assert!(request.contains(r#"{"workspace":"ward-7/alice","serial":"0a1b","reason":"deleted"}"#), "{request}");
        assert_eq!(uris, [noexit_common::pki::OPERATOR_URI]);
    }

    #[test]
    fn only_https_urls_are_accepted() {
        let ca = Arc::new(Ca::generate("test CA").expect("ca"));
        assert!(HttpRevoker::new("http://noexit-api:8443", ca.clone()).is_err());
        assert!(HttpRevoker::new("https://noexit-api.noexit-system.svc:8443", ca).is_ok());
    }

    #[tokio::test]
    async fn recording_revoker_fails_on_request_then_succeeds() {
        let r = RecordingRevoker::default();
        r.fail_next(1);
        let rev = Revocation { workspace: "p/w".into(), serial: "01".into(), reason: "deleted".into() };
        assert!(r.revoke(&rev).await.is_err());
        assert!(r.revoke(&rev).await.is_ok());
        assert_eq!(r.calls().len(), 2);
    }
}
