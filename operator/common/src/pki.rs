//! The operator's certificate authority: one CA (kept in a Secret, created once and reused)
//! issues each workspace agent's client certificate and the server certificates of the API
//! and the admission webhook.

use chrono::{DateTime, Utc};
use noexit_crds::agent::WorkspaceIdentity;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber, string::Ia5String,
};

/// Secret keys for the CA material.
pub const CA_CERT_KEY: &str = "ca.crt";
pub const CA_KEY_KEY: &str = "ca.key";
/// Secret keys for an issued certificate (the `kubernetes.io/tls` convention).
pub const TLS_CERT_KEY: &str = "tls.crt";
pub const TLS_KEY_KEY: &str = "tls.key";

/// URI SAN of the operator's own client certificate.
pub const OPERATOR_URI: &str = "noexit://operator";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid name {0:?} for a certificate")]
    Name(String),
    #[error("cannot read certificate: {0}")]
    Parse(String),
}

/// What the operator needs to know about a certificate it issued earlier: its serial, validity
/// window and URI SANs (read back from a Secret to decide reuse or rotation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// Lower-case hex serial, as in [`IssuedCert::serial`].
    pub serial: String,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
    pub uris: Vec<String>,
}

impl CertInfo {
    pub fn from_pem(pem: &str) -> Result<Self, PkiError> {
        use x509_parser::extensions::GeneralName;
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| PkiError::Parse(e.to_string()))?;
        let cert = pem.parse_x509().map_err(|e| PkiError::Parse(e.to_string()))?;
        let time = |t: x509_parser::time::ASN1Time| {
            DateTime::<Utc>::from_timestamp(t.timestamp(), 0).ok_or_else(|| PkiError::Parse("time out of range".into()))
        };
        let uris = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::URI(u) => Some((*u).to_owned()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            serial: hex::encode(cert.raw_serial()),
            not_before: time(cert.validity().not_before)?,
            not_after: time(cert.validity().not_after)?,
            uris,
        })
    }
}

impl CertInfo {
    /// [`CertInfo::from_pem`] for one DER certificate (as rustls hands over a peer's).
    pub fn from_der(der: &[u8]) -> Result<Self, PkiError> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::Parse(e.to_string()))?;
        let time = |t: x509_parser::time::ASN1Time| {
            DateTime::<Utc>::from_timestamp(t.timestamp(), 0).ok_or_else(|| PkiError::Parse("time out of range".into()))
        };
        let mut uris = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name {
                    uris.push((*uri).to_owned());
                }
            }
        }
        Ok(Self {
            serial: normalize_serial(&hex::encode(cert.raw_serial())),
            not_before: time(cert.validity().not_before)?,
            not_after: time(cert.validity().not_after)?,
            uris,
        })
    }
}

/// Canonical form of a hex serial: lower case, without leading zero bytes (DER drops them).
pub fn normalize_serial(hex_serial: &str) -> String {
    let lower = hex_serial.trim().to_ascii_lowercase();
    let mut rest = lower.as_str();
    while rest.len() > 2 && rest.starts_with("00") {
        rest = &rest[2..];
    }
    rest.to_owned()
}

/// A certificate should be replaced once two thirds of its lifetime have passed, so a renewal
/// that fails has a third of the lifetime left to be retried.
pub fn needs_rotation(not_before: DateTime<Utc>, not_after: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    if not_after <= not_before {
        return true;
    }
    let lifetime = not_after - not_before;
    now >= not_before + lifetime * 2 / 3
}

/// A CA certificate and its signing key.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

/// A certificate the CA issued, with its private key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
    /// Lower-case hex serial number.
    pub serial: String,
    pub not_after: DateTime<Utc>,
}

impl Ca {
    /// A new CA valid for ten years.
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.distinguished_name.push(DnType::OrganizationName, "noexit");
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(random_serial());
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(3650);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Ok(Self { issuer: Issuer::new(params, key), cert_pem, key_pem })
    }

    /// Load a CA from the PEM pair stored in its Secret.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self { issuer, cert_pem: cert_pem.to_owned(), key_pem: key_pem.to_owned() })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Client certificate for a workspace's agent. The identity is the URI SAN
    /// `noexit://workspace/<project>/<name>`; the CN repeats it for humans.
    pub fn issue_workspace_client(
        &self,
        id: &WorkspaceIdentity,
        validity: chrono::Duration,
    ) -> Result<IssuedCert, PkiError> {
        let uri = id.uri();
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, format!("workspace:{}/{}", id.project, id.name));
        params.distinguished_name.push(DnType::OrganizationName, "noexit");
        params.subject_alt_names =
            vec![SanType::URI(Ia5String::try_from(uri.clone()).map_err(|_| PkiError::Name(uri))?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, validity)
    }

    /// Client certificate the operator presents to the control-plane API (revocations). The
    /// identity is the URI SAN `noexit://operator`.
    pub fn issue_operator_client(&self, validity: chrono::Duration) -> Result<IssuedCert, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, "noexit-operator");
        params.distinguished_name.push(DnType::OrganizationName, "noexit");
        params.subject_alt_names =
            vec![SanType::URI(Ia5String::try_from(OPERATOR_URI).map_err(|_| PkiError::Name(OPERATOR_URI.into()))?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, validity)
    }

    /// Server certificate for `dns_names` (and IP addresses written as names).
    pub fn issue_server(&self, dns_names: &[String], validity: chrono::Duration) -> Result<IssuedCert, PkiError> {
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        let cn = dns_names.first().cloned().unwrap_or_else(|| "noexit".into());
        params.distinguished_name.push(DnType::CommonName, cn);
        params.distinguished_name.push(DnType::OrganizationName, "noexit");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, validity)
    }

    fn sign(&self, mut params: CertificateParams, validity: chrono::Duration) -> Result<IssuedCert, PkiError> {
        let serial = random_serial();
        let serial_hex = hex::encode(serial.to_bytes());
        params.serial_number = Some(serial);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.use_authority_key_identifier_extension = true;
        let now = Utc::now();
        let not_after = now + validity;
        params.not_before = to_offset(now - chrono::Duration::minutes(5));
        params.not_after = to_offset(not_after);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem(), serial: serial_hex, not_after })
    }
}

fn to_offset(t: DateTime<Utc>) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t.timestamp()).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// 16 random bytes with the top bit clear, so the DER integer stays positive, and the first byte
/// non-zero, so the encoding is minimal and the hex serial reads back unchanged.
fn random_serial() -> SerialNumber {
    let mut bytes = *uuid::Uuid::new_v4().as_bytes();
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_round_trips_through_pem_and_issues_distinct_serials() {
        let ca = Ca::generate("noexit test CA").expect("ca");
        let again = Ca::from_pem(ca.cert_pem(), ca.key_pem()).expect("reload");
        let id = WorkspaceIdentity { project: "ward-7".into(), name: "alice".into() };
        let a = again.issue_workspace_client(&id, chrono::Duration::days(30)).expect("client");
        let b = again.issue_workspace_client(&id, chrono::Duration::days(30)).expect("client");
        assert_ne!(a.serial, b.serial);
        assert!(a.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(a.key_pem.contains("PRIVATE KEY"));
        let server =
            ca.issue_server(&["noexit-api.noexit-system.svc".into()], chrono::Duration::days(90)).expect("server");
        assert!(server.not_after > Utc::now() + chrono::Duration::days(89));
    }

    #[test]
    fn issued_certificates_read_back_with_serial_validity_and_identity() {
        let ca = Ca::generate("noexit test CA").expect("ca");
        let id = WorkspaceIdentity { project: "ward-7".into(), name: "alice".into() };
        let issued = ca.issue_workspace_client(&id, chrono::Duration::days(30)).expect("client");
        let info = CertInfo::from_pem(&issued.cert_pem).expect("parse");
        assert_eq!(info.serial, issued.serial);
        assert_eq!(info.not_after.timestamp(), issued.not_after.timestamp());
        assert_eq!(info.uris, [id.uri()]);
        let op = ca.issue_operator_client(chrono::Duration::days(1)).expect("operator");
        assert_eq!(CertInfo::from_pem(&op.cert_pem).expect("parse").uris, [OPERATOR_URI]);
        assert!(CertInfo::from_pem("not a certificate").is_err());
    }

    #[test]
    fn der_and_pem_read_the_same_and_serials_normalise() {
        let ca = Ca::generate("noexit test CA").expect("ca");
        let op = ca.issue_operator_client(chrono::Duration::days(1)).expect("operator");
        let der = rustls_pemfile::certs(&mut op.cert_pem.as_bytes()).next().expect("one").expect("der");
        assert_eq!(CertInfo::from_der(&der).expect("der"), CertInfo::from_pem(&op.cert_pem).expect("pem"));
        assert_eq!(normalize_serial("00AB01"), "ab01");
        assert_eq!(normalize_serial("00"), "00");
    }

    #[test]
    fn rotation_starts_at_two_thirds_of_the_lifetime() {
        let t0 = DateTime::<Utc>::from_timestamp(0, 0).expect("epoch");
        let end = t0 + chrono::Duration::days(90);
        assert!(!needs_rotation(t0, end, t0));
        assert!(!needs_rotation(t0, end, t0 + chrono::Duration::days(59)));
        assert!(needs_rotation(t0, end, t0 + chrono::Duration::days(60)));
        assert!(needs_rotation(t0, end, end + chrono::Duration::days(1)));
        assert!(needs_rotation(end, t0, t0), "an inverted window is always rotated");
    }
}
