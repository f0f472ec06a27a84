//! A test CA and the certificates tests need: servers named by DNS names or IP addresses,
//! clients named by a URI (a workspace's `noexit://workspace/<project>/<name>`), self-signed
//! certificates with the SPKI pin Chromium takes instead of a CA, and rustls configurations.
//!
//! The product's own CA (`noexit_operator::pki::Ca`) stays what tests of the product's PKI use;
//! this one is for the parts around it (a fake issuer's HTTPS, a fake API's mTLS).

use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Digest;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate authority that lives as long as the test.
pub struct Ca {
    cert: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, KeyPair>,
}

impl Ca {
    /// A new CA whose certificate's common name is `name`.
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca { cert, issuer: rcgen::Issuer::new(params, key) }
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// A root store holding this CA only.
    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert_der()).expect("CA certificate in a root store");
        roots
    }

    /// A server certificate for `names`: each a DNS name, or an IP address (an IP SAN).
    pub fn server(&self, names: &[&str]) -> Leaf {
        let mut params = leaf_params(names);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate whose only name is the URI `uri` (how the API names a workspace's
    /// agent: `noexit://workspace/<project>/<name>`).
    pub fn client(&self, uri: &str) -> Leaf {
        let mut params = leaf_params(&[]);
        params.distinguished_name.push(DnType::CommonName, uri);
        params.subject_alt_names = vec![SanType::URI(uri.try_into().expect("URI SAN"))];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("signing a leaf certificate");
        Leaf { cert, key }
    }

    /// A TLS client trusting this CA, without a client certificate.
    pub fn client_config(&self) -> rustls::ClientConfig {
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(self.roots())
            .with_no_client_auth()
    }

    /// A TLS server presenting `server` that requires a client certificate from this CA.
    pub fn mtls_server_config(&self, server: &Leaf) -> Arc<rustls::ServerConfig> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()), provider())
            .build()
            .expect("client certificate verifier");
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![server.cert_der()], server.key_der())
            .expect("server certificate and key");
        Arc::new(config)
    }
}

fn leaf_params(names: &[&str]) -> CertificateParams {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("certificate names");
    if let Some(first) = names.first() {
        params.distinguished_name.push(DnType::CommonName, *first);
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params
}

/// A self-signed server certificate for `names` (DNS names or IP addresses), for a client that
/// pins its key rather than trusting a CA (Chromium's `--ignore-certificate-errors-spki-list`).
pub fn self_signed(names: &[&str]) -> Leaf {
    let key = KeyPair::generate().expect("key");
    let cert = leaf_params(names).self_signed(&key).expect("self-signed certificate");
    Leaf { cert, key }
}

/// A certificate and its private key.
pub struct Leaf {
    pub cert: rcgen::Certificate,
    pub key: KeyPair,
}

impl Leaf {
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::try_from(self.key.serialize_der()).expect("private key DER")
    }

    /// Base64 of the SHA-256 of the certificate's SubjectPublicKeyInfo: the pin Chromium's
    /// `--ignore-certificate-errors-spki-list` takes.
    pub fn spki_pin(&self) -> String {
        let spki = rcgen::PublicKeyData::subject_public_key_info(&self.key);
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(spki))
    }

    /// Writes the certificate and the key as PEM files `cert` and `key` in `dir`.
    pub fn write(&self, dir: &Path, cert: &str, key: &str) {
        std::fs::write(dir.join(cert), self.cert_pem()).unwrap_or_else(|e| panic!("writing {cert}: {e}"));
        std::fs::write(dir.join(key), self.key_pem()).unwrap_or_else(|e| panic!("writing {key}: {e}"));
    }

    /// A TLS server presenting this certificate, without client authentication.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.cert_der()], self.key_der())
            .expect("server certificate and key");
        Arc::new(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TLS handshake over loopback: `server` presents its certificate, the client trusts `ca`
    /// and presents `client` when given. `Err` when either side refuses.
    async fn handshake(ca: &Ca, server: Arc<rustls::ServerConfig>, client: Option<&Leaf>) -> Result<(), String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let accepted = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            acceptor.accept(tcp).await.map(drop).map_err(|e| e.to_string())
        });
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(ca.roots());
        let config = match client {
            Some(c) => builder.with_client_auth_cert(vec![c.cert_der()], c.key_der()).unwrap(),
            None => builder.with_no_client_auth(),
        };
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let connected = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await;
        let accepted = accepted.await.unwrap();
        connected.map(drop).map_err(|e| e.to_string())?;
        accepted
    }

    #[tokio::test]
    async fn a_server_certificate_from_the_ca_is_trusted_and_a_stranger_is_not() {
        let ca = Ca::new("test CA");
        let server = ca.server(&["localhost", "127.0.0.1"]);
        handshake(&ca, server.server_config(), None).await.unwrap();
        let stranger = Ca::new("another CA").server(&["localhost"]);
        assert!(handshake(&ca, stranger.server_config(), None).await.is_err());
    }

    #[tokio::test]
    async fn mtls_takes_a_client_certificate_from_the_ca_only() {
        let ca = Ca::new("test CA");
        let server = ca.server(&["localhost"]);
        let client = ca.client("noexit://workspace/ward-7/alice-r");
        handshake(&ca, ca.mtls_server_config(&server), Some(&client)).await.unwrap();
        assert!(handshake(&ca, ca.mtls_server_config(&server), None).await.is_err(), "no client certificate");
        let stranger = Ca::new("another CA").client("noexit://workspace/ward-7/alice-r");
        assert!(handshake(&ca, ca.mtls_server_config(&server), Some(&stranger)).await.is_err());
    }

    #[test]
    fn the_spki_pin_is_base64_of_a_sha256() {
        let pin = self_signed(&["127.0.0.1"]).spki_pin();
        assert_eq!(base64::engine::general_purpose::STANDARD.decode(pin).unwrap().len(), 32);
    }
}
