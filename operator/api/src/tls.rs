//! TLS for the API: the server certificate (reloaded when its files change, so rotation needs
//! no restart: [`ReloadingCert`], from `noexit-web`, tested there), client-certificate
//! verification against the operator's CA (expired or foreign certificates fail the
//! handshake), and rustls client configs for callers (CLI, OIDC, tests).

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};

pub use noexit_web::tls::{ReloadingCert, TlsError, parse_certs, parse_key, provider};

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
