//! Server TLS from PEM files, and the certificate that follows them: [`ReloadingCert`] is
//! rustls' certificate resolver, so a rotated certificate (a cert-manager renewal, a Secret
//! update the kubelet writes into the pod) is served to the next handshake without a restart;
//! connections already open keep theirs. [`watch`] looks at the files on a timer (as
//! kubewarden's policy-server does); a pair that cannot be loaded, or whose key does not match
//! the certificate (one file written before the other), is logged and the old pair stays.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
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

/// Serves the certificate in `cert_file`/`key_file`, re-reading them when either changes.
/// Contents are compared, not times: a Secret volume is updated by swapping a symlink.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, Pem)>,
}

/// The certificate and key files' bytes, as last loaded.
type Pem = (Vec<u8>, Vec<u8>);

fn load_certified(cert_file: &Path, key_file: &Path, pem: &Pem) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = parse_certs(&pem.0, &cert_file.display().to_string())?;
    let key = parse_key(&pem.1, &key_file.display().to_string())?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Invalid { what: key_file.display().to_string(), message: e.to_string() })?;
    let certified = CertifiedKey::new(certs, signing);
    // A key for another certificate (the files are written one after the other) is not served.
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(Arc::new(certified)),
        Err(e) => Err(TlsError::Invalid {
            what: format!("{} and {}", cert_file.display(), key_file.display()),
            message: e.to_string(),
        }),
    }
}

fn read_pair(cert_file: &Path, key_file: &Path) -> Result<Pem, TlsError> {
    Ok((read(cert_file)?, read(key_file)?))
}

impl ReloadingCert {
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, TlsError> {
        let pem = read_pair(cert_file, key_file)?;
        let key = load_certified(cert_file, key_file, &pem)?;
        Ok(Self { cert_file: cert_file.into(), key_file: key_file.into(), current: RwLock::new((key, pem)) })
    }

    /// Re-read the files if they changed since the last load. `Ok(true)` if a new certificate is
    /// now served; on error the old one stays.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let pem = read_pair(&self.cert_file, &self.key_file)?;
        let unchanged = self.current.read().map(|c| c.1 == pem).unwrap_or(false);
        if unchanged {
            return Ok(false);
        }
        let key = load_certified(&self.cert_file, &self.key_file, &pem)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = (key, pem);
        Ok(true)
    }

    /// The certificate chain served now.
    pub fn served(&self) -> Vec<CertificateDer<'static>> {
        self.current.read().map(|c| c.0.cert.clone()).unwrap_or_default()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.0.clone())
    }
}

/// Look at the files every `every` and serve a changed pair; runs until the process ends.
/// `on_reload` hears each outcome (a metric, a log line in tests).
pub fn watch(
    cert: Arc<ReloadingCert>,
    every: Duration,
    on_reload: impl Fn(&Result<bool, TlsError>) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let outcome = cert.reload_if_changed();
            match &outcome {
                Ok(true) => tracing::info!(file = %cert.cert_file.display(), "server certificate reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "server certificate changed but cannot be loaded; keeping the old one")
                }
            }
            on_reload(&outcome);
        }
    })
}

/// A server config (no client certificates, HTTP/1.1) serving `cert`.
pub fn server_config(cert: Arc<ReloadingCert>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid { what: "TLS versions".into(), message: e.to_string() })?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue(dir: &Path) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
        std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn reloads_when_the_files_change_and_keeps_the_old_cert_on_garbage_or_a_foreign_key() {
        let dir = tempfile::tempdir().unwrap();
        let (crt, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        issue(dir.path());
        let cert = ReloadingCert::load(&crt, &key).unwrap();
        assert!(!cert.reload_if_changed().unwrap());
        let (second, _) = issue(dir.path());
        assert!(cert.reload_if_changed().unwrap());
        let served = cert.served();
        assert_eq!(served, parse_certs(second.as_bytes(), "x").unwrap());
        std::fs::write(&crt, "garbage").unwrap();
        assert!(cert.reload_if_changed().is_err());
        assert_eq!(cert.served(), served);
        // A new certificate whose key has not been written yet: refused, the old pair stays.
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        let (third, _) = issue(&other);
        std::fs::write(&crt, &third).unwrap();
        let err = cert.reload_if_changed().unwrap_err();
        assert!(err.to_string().contains("tls.key"), "{err}");
        assert_eq!(cert.served(), served);
    }
}
