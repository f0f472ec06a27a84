//! The operator's CA in the cluster: Secret `noexit-ca` in the operator namespace, created once
//! (the first operator to create it wins a race; the others load the winner's) and reused.
//! Also the reuse-or-rotate decision for a workspace agent's certificate.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::{Api, Client};
use noexit_crds::agent::WorkspaceIdentity;
use tokio::sync::OnceCell;

use crate::error::{Error, is_conflict};
use crate::workspace::AgentCredentials;
use crate::workspace::build::SERIAL_ANNOTATION;
use noexit_common::pki::{self, Ca, CertInfo, PkiError};

/// Name of the Secret holding the CA certificate and key.
pub const CA_SECRET: &str = "noexit-ca";

/// Loads the CA from its Secret on first use, creating it if absent, then keeps it in memory.
pub struct CaStore {
    client: Client,
    namespace: String,
    ca: OnceCell<Arc<Ca>>,
}

impl CaStore {
    pub fn new(client: Client, namespace: impl Into<String>) -> Self {
        Self { client, namespace: namespace.into(), ca: OnceCell::new() }
    }

    pub async fn get(&self) -> Result<Arc<Ca>, Error> {
        self.ca.get_or_try_init(|| self.load_or_create()).await.cloned()
    }

    async fn load_or_create(&self) -> Result<Arc<Ca>, Error> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let object = format!("Secret {}/{CA_SECRET}", self.namespace);
        if let Some(secret) = api.get_opt(CA_SECRET).await.map_err(|e| Error::kube("read", &object, e))? {
            return from_secret(&secret).map(Arc::new);
        }
        let ca = Ca::generate("noexit operator CA")?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(CA_SECRET.into()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([
                    ("app.kubernetes.io/managed-by".to_owned(), "noexit-operator".to_owned()),
                    ("app.kubernetes.io/part-of".to_owned(), "noexit".to_owned()),
                ])),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([
                (pki::CA_CERT_KEY.to_owned(), ByteString(ca.cert_pem().as_bytes().to_vec())),
                (pki::CA_KEY_KEY.to_owned(), ByteString(ca.key_pem().as_bytes().to_vec())),
            ])),
            ..Secret::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(secret = %object, "created the operator CA");
                Ok(Arc::new(ca))
            }
            // Another replica created it between our read and our create: use theirs.
            Err(e) if is_conflict(&e) => {
                let secret = api.get(CA_SECRET).await.map_err(|e| Error::kube("read", &object, e))?;
                from_secret(&secret).map(Arc::new)
            }
            Err(e) => Err(Error::kube("create", &object, e)),
        }
    }
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    secret.data.as_ref()?.get(key).and_then(|b| String::from_utf8(b.0.clone()).ok())
}

fn from_secret(secret: &Secret) -> Result<Ca, Error> {
    let (Some(cert), Some(key)) = (text(secret, pki::CA_CERT_KEY), text(secret, pki::CA_KEY_KEY)) else {
        return Err(Error::Pki(PkiError::Parse(format!(
            "Secret {CA_SECRET} lacks {} or {}",
            pki::CA_CERT_KEY,
            pki::CA_KEY_KEY
        ))));
    };
    Ok(Ca::from_pem(&cert, &key)?)
}

/// The credentials in the live agent Secret, if they may be used again: issued by the current
/// CA, for this workspace, with the recorded serial, and less than two thirds of the way
/// through their validity.
pub fn reusable(live: &Secret, ca_pem: &str, id: &WorkspaceIdentity, now: DateTime<Utc>) -> Option<AgentCredentials> {
    let ca_in_secret = text(live, pki::CA_CERT_KEY)?;
    let cert_pem = text(live, pki::TLS_CERT_KEY)?;
    let key_pem = text(live, pki::TLS_KEY_KEY)?;
    let serial = live.metadata.annotations.as_ref()?.get(SERIAL_ANNOTATION)?;
    if ca_in_secret != ca_pem {
        return None;
    }
    let info = CertInfo::from_pem(&cert_pem).ok()?;
    let lifetime = info.not_after - info.not_before;
    let rotate_at = info.not_before + lifetime * 2 / 3;
    let fresh = now >= info.not_before && now < rotate_at;
    (fresh && info.serial == *serial && info.uris == [id.uri()]).then(|| AgentCredentials {
        cert_pem,
        key_pem,
        ca_pem: ca_in_secret,
        serial: info.serial,
        not_after: rfc3339(info.not_after),
    })
}

/// Whole seconds, as the certificate stores them: the annotation must not change on reuse.
fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Reuse the live credentials or issue new ones. Returns whether a new certificate was issued.
pub fn credentials(
    ca: &Ca,
    live: Option<&Secret>,
    id: &WorkspaceIdentity,
    validity: chrono::Duration,
    now: DateTime<Utc>,
) -> Result<(AgentCredentials, bool), PkiError> {
    if let Some(creds) = live.and_then(|s| reusable(s, ca.cert_pem(), id, now)) {
        return Ok((creds, false));
    }
    let cert = ca.issue_workspace_client(id, validity)?;
    let creds = AgentCredentials {
        cert_pem: cert.cert_pem,
        key_pem: cert.key_pem,
        ca_pem: ca.cert_pem().to_owned(),
        serial: cert.serial,
        not_after: rfc3339(cert.not_after),
    };
    Ok((creds, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret_with(creds: &AgentCredentials) -> Secret {
        let b = |s: &str| ByteString(s.as_bytes().to_vec());
        Secret {
            metadata: ObjectMeta {
                annotations: Some(BTreeMap::from([(SERIAL_ANNOTATION.to_owned(), creds.serial.clone())])),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([
                (pki::CA_CERT_KEY.to_owned(), b(&creds.ca_pem)),
                (pki::TLS_CERT_KEY.to_owned(), b(&creds.cert_pem)),
                (pki::TLS_KEY_KEY.to_owned(), b(&creds.key_pem)),
            ])),
            ..Secret::default()
        }
    }

    #[test]
    fn a_fresh_certificate_is_reused_and_rotated_after_two_thirds() {
        let ca = Ca::generate("test").expect("ca");
        let id = WorkspaceIdentity { project: "ward-7".into(), name: "alice".into() };
        let days = chrono::Duration::days(30);
        let now = Utc::now();
        let (first, issued) = credentials(&ca, None, &id, days, now).expect("issue");
        assert!(issued);
        let live = secret_with(&first);
        let (again, issued) = credentials(&ca, Some(&live), &id, days, now + chrono::Duration::days(10)).expect("r");
        assert!(!issued);
        assert_eq!(again, first);
        let (rotated, issued) = credentials(&ca, Some(&live), &id, days, now + chrono::Duration::days(21)).expect("r");
        assert!(issued);
        assert_ne!(rotated.serial, first.serial);
    }

    #[test]
    fn a_certificate_from_another_ca_or_for_another_workspace_is_not_reused() {
        let ca = Ca::generate("test").expect("ca");
        let other = Ca::generate("other").expect("ca");
        let id = WorkspaceIdentity { project: "ward-7".into(), name: "alice".into() };
        let now = Utc::now();
        let (creds, _) = credentials(&other, None, &id, chrono::Duration::days(30), now).expect("issue");
        assert!(reusable(&secret_with(&creds), ca.cert_pem(), &id, now).is_none());
        let (creds, _) = credentials(&ca, None, &id, chrono::Duration::days(30), now).expect("issue");
        let bob = WorkspaceIdentity { project: "ward-7".into(), name: "bob".into() };
        assert!(reusable(&secret_with(&creds), ca.cert_pem(), &bob, now).is_none());
        let mut tampered = secret_with(&creds);
        tampered.metadata.annotations = Some(BTreeMap::from([(SERIAL_ANNOTATION.to_owned(), "00".to_owned())]));
        assert!(reusable(&tampered, ca.cert_pem(), &id, now).is_none());
    }
}
