//! TLS for the API: the server certificate (reloaded when its files change, so rotation needs
//! no restart), client-certificate verification against the operator's CA (expired or foreign
//! certificates fail the handshake), and rustls client configs for callers (CLI, OIDC, tests).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0}: no certificate found")]
    NoCertificate(String),
    #[error("{0}: no private key found")]
    NoKey(String),
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
}

/// The one crypto provider noexit uses (ring), chosen explicitly so no process-wide default is
/// needed.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn parse_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid { what: what.into(), message: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what.into()));
    }
    Ok(certs)
}

pub fn parse_key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| TlsError::Invalid { what: what.into(), message: e.to_string() })?
        .ok_or_else(|| TlsError::NoKey(what.into()))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

pub fn roots(ca_pem: &[u8], what: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(ca_pem, what)? {
        roots.add(cert).map_err(|e| TlsError::Invalid { what: what.into(), message: e.to_string() })?;
    }
    Ok(roots)
}

/// A rustls client config trusting `ca_pem` (or the system roots when `None`), presenting
/// `identity` (certificate chain PEM, key PEM) if given.
pub fn client_config(
    ca_pem: Option<&[u8]>,
    identity: Option<(&[u8], &[u8])>,
) -> Result<rustls::ClientConfig, TlsError> {
    let roots = match ca_pem {
        Some(pem) => roots(pem, "CA bundle")?,
        None => {
            let mut store = RootCertStore::empty();
            for cert in rustls_native_certs_or_empty() {
                let _ = store.add(cert);
            }
            store
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid { what: "TLS versions".into(), message: e.to_string() })?
        .with_root_certificates(roots);
    match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(parse_certs(cert, "client certificate")?, parse_key(key, "client key")?)
            .map_err(|e| TlsError::Invalid { what: "client certificate".into(), message: e.to_string() }),
        None => Ok(builder.with_no_client_auth()),
    }
}

fn rustls_native_certs_or_empty() -> Vec<CertificateDer<'static>> {
    // System roots are only a fallback for an OIDC issuer on the internet; errors leave the
    // store empty, and the caller then fails with a clear certificate error.
    let mut certs = Vec::new();
    for path in ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"] {
        if let Ok(pem) = std::fs::read(path)
            && let Ok(found) = parse_certs(&pem, path)
        {
            certs.extend(found);
            break;
        }
    }
    certs
}

/// Serves the certificate in `cert_file`/`key_file`, re-reading them when either changes.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, Option<SystemTime>)>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load_certified(cert_file: &Path, key_file: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = parse_certs(&read(cert_file)?, &cert_file.display().to_string())?;
    let key = parse_key(&read(key_file)?, &key_file.display().to_string())?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Invalid { what: key_file.display().to_string(), message: e.to_string() })?;
    Ok(Arc::new(CertifiedKey::new(certs, signing)))
}

impl ReloadingCert {
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, TlsError> {
        let key = load_certified(cert_file, key_file)?;
        let stamp = newest(cert_file, key_file);
        Ok(Self { cert_file: cert_file.into(), key_file: key_file.into(), current: RwLock::new((key, stamp)) })
    }

    /// Re-read the files if they changed since the last load. `Ok(true)` if a new certificate is
    /// now served; on error the old one stays.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let stamp = newest(&self.cert_file, &self.key_file);
        let unchanged = self.current.read().map(|c| c.1 == stamp).unwrap_or(false);
        if unchanged {
            return Ok(false);
        }
        let key = load_certified(&self.cert_file, &self.key_file)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = (key, stamp);
        Ok(true)
    }
}

fn newest(a: &Path, b: &Path) -> Option<SystemTime> {
    modified(a).max(modified(b))
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.0.clone())
    }
}

/// The server's TLS: the rustls config, and the verifier that judges client certificates.
#[derive(Clone)]
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    /// Chain and validity check against the client CA, run by the accept loop after the
    /// handshake so a bad certificate gets a JSON 401 naming the problem.
    pub clients: Arc<dyn ClientCertVerifier>,
}

/// Why a presented client certificate is not acceptable: a stable code and a message.
pub fn describe_cert_error(e: &rustls::Error) -> (&'static str, String) {
    use rustls::CertificateError as C;
    let code = match e {
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => "certificateExpired",
        rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => "certificateNotYetValid",
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => "untrustedCertificate",
        _ => "invalidCertificate",
    };
    (code, format!("client certificate refused: {e}"))
}

/// Accepts any client certificate whose holder proves the private key during the handshake;
/// whether the certificate is valid (chain to our CA, dates) is decided right after, by the
/// accept loop with the real verifier. Signatures are always checked here.
#[derive(Debug)]
struct DeferredVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for DeferredVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Server TLS: our certificate, and client certificates checked against `client_ca_pem` when
/// presented (people use bearer tokens and present none; certificate endpoints then refuse).
pub fn server_config(cert: Arc<ReloadingCert>, client_ca_pem: &[u8]) -> Result<ServerTls, TlsError> {
    let roots = Arc::new(roots(client_ca_pem, "client CA")?);
    let clients = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Invalid { what: "client CA".into(), message: e.to_string() })?;
    let deferred = Arc::new(DeferredVerifier { inner: clients.clone() });
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid { what: "TLS versions".into(), message: e.to_string() })?
        .with_client_cert_verifier(deferred)
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(ServerTls { config: Arc::new(config), clients })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Ca;

    #[test]
    fn reloads_when_the_files_change_and_keeps_the_old_cert_on_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("t").unwrap();
        let write = |c: &crate::pki::IssuedCert| {
            std::fs::write(dir.path().join("tls.crt"), &c.cert_pem).unwrap();
            std::fs::write(dir.path().join("tls.key"), &c.key_pem).unwrap();
        };
        let first = ca.issue_server(&["localhost".into()], chrono::Duration::days(1)).unwrap();
        write(&first);
        let cert = ReloadingCert::load(&dir.path().join("tls.crt"), &dir.path().join("tls.key")).unwrap();
        assert!(!cert.reload_if_changed().unwrap());
        let second = ca.issue_server(&["localhost".into()], chrono::Duration::days(1)).unwrap();
        write(&second);
        // Force a different mtime even on coarse file systems.
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options().write(true).open(dir.path().join("tls.crt")).unwrap().set_modified(later).unwrap();
        assert!(cert.reload_if_changed().unwrap());
        let served = cert.current.read().unwrap().0.cert[0].clone();
        assert_eq!(served, parse_certs(second.cert_pem.as_bytes(), "x").unwrap()[0]);
        std::fs::write(dir.path().join("tls.crt"), "garbage").unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(10);
        std::fs::File::options().write(true).open(dir.path().join("tls.crt")).unwrap().set_modified(later).unwrap();
        assert!(cert.reload_if_changed().is_err());
        assert_eq!(cert.current.read().unwrap().0.cert[0], served);
    }
}
