//! The webhook's serving certificate comes from the operator's CA (Secret `noexit-ca` in the
//! operator namespace, keys `ca.crt`/`ca.key`; created once by whichever component starts
//! first and reused by all). The API server trusts it through the `caBundle` of the
//! ValidatingWebhookConfiguration, which the webhook sets itself, so neither Helm nor an admin
//! ever handles key material.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

use crate::pki::{CA_CERT_KEY, CA_KEY_KEY, Ca, IssuedCert};

/// Validity of an issued serving certificate; renewed when a third is left.
pub const SERVING_DAYS: i64 = 90;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("secret {0} lacks {1}")]
    Incomplete(String, &'static str),
    #[error("CA in secret {0}: {1}")]
    Pki(String, crate::pki::PkiError),
    #[error("writing {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

/// Issues the serving certificate from the CA Secret into two files.
#[derive(Clone)]
pub struct Issuer {
    pub client: Client,
    pub namespace: String,
    pub ca_secret: String,
    pub dns_names: Vec<String>,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

impl Issuer {
    /// Load (or create) the CA, issue a serving certificate, write it. Returns the CA PEM.
    pub async fn ensure(&self) -> Result<String, CertError> {
        let ca = self.load_or_create_ca().await?;
        self.issue(&ca)?;
        Ok(ca.cert_pem().to_owned())
    }

    fn issue(&self, ca: &Ca) -> Result<IssuedCert, CertError> {
        let issued = ca
            .issue_server(&self.dns_names, chrono::Duration::days(SERVING_DAYS))
            .map_err(|e| CertError::Pki(self.ca_secret.clone(), e))?;
        write_pair(&issued, &self.cert_path, &self.key_path)?;
        tracing::info!(serial = %issued.serial, not_after = %issued.not_after, names = ?self.dns_names, "serving certificate issued");
        Ok(issued)
    }

    /// Re-issue before expiry, forever. The TLS layer picks the new files up by itself.
    pub async fn renew_forever(self, every: Duration) {
        let mut not_after = Utc::now() + chrono::Duration::days(SERVING_DAYS);
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if !needs_renewal(not_after, Utc::now()) {
                continue;
            }
            match self.load_or_create_ca().await.and_then(|ca| self.issue(&ca)) {
                Ok(issued) => not_after = issued.not_after,
                Err(e) => tracing::warn!(error = %e, "serving certificate renewal failed; retrying"),
            }
        }
    }

    async fn load_or_create_ca(&self) -> Result<Ca, CertError> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        if let Some(secret) = secrets.get_opt(&self.ca_secret).await? {
            return ca_from_secret(&self.ca_secret, &secret);
        }
        let ca = Ca::generate("noexit operator CA").map_err(|e| CertError::Pki(self.ca_secret.clone(), e))?;
        match secrets.create(&PostParams::default(), &ca_secret(&self.ca_secret, &self.namespace, &ca)).await {
            Ok(_) => {
                tracing::info!(secret = %self.ca_secret, "operator CA created");
                Ok(ca)
            }
            // Another component created it first: use theirs.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let secret = secrets.get(&self.ca_secret).await?;
                ca_from_secret(&self.ca_secret, &secret)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Renew when less than a third of the validity is left.
pub fn needs_renewal(not_after: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    not_after - now < chrono::Duration::days(SERVING_DAYS / 3)
}

fn ca_from_secret(name: &str, secret: &Secret) -> Result<Ca, CertError> {
    let field = |key: &'static str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .ok_or_else(|| CertError::Incomplete(name.to_owned(), key))
    };
    Ca::from_pem(&field(CA_CERT_KEY)?, &field(CA_KEY_KEY)?).map_err(|e| CertError::Pki(name.to_owned(), e))
}

/// The CA Secret as the operator's components create it.
pub fn ca_secret(name: &str, namespace: &str, ca: &Ca) -> Secret {
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/name".to_owned(), "noexit".to_owned()),
                ("app.kubernetes.io/component".to_owned(), "ca".to_owned()),
            ])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            (CA_CERT_KEY.to_owned(), ByteString(ca.cert_pem().as_bytes().to_vec())),
            (CA_KEY_KEY.to_owned(), ByteString(ca.key_pem().as_bytes().to_vec())),
        ])),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// Write key then certificate, each atomically (temp file + rename), the key readable by the
/// owner only. A reader between the two renames sees a mismatched pair, which the TLS reload
/// rejects until the next check.
pub fn write_pair(issued: &IssuedCert, cert_path: &Path, key_path: &Path) -> Result<(), CertError> {
    write_atomic(key_path, issued.key_pem.as_bytes(), 0o600)?;
    write_atomic(cert_path, issued.cert_pem.as_bytes(), 0o644)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| CertError::Write { path: path.display().to_string(), source };
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(err)?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Keep the `caBundle` of the named configuration set, forever: retry with backoff until the
/// configuration exists (a pod may start before Helm creates it), then check every `every`
/// and re-set it if someone replaced the configuration.
pub async fn keep_ca_bundle(client: Client, name: String, ca_pem: String, every: Duration) {
    let mut delay = Duration::from_secs(1);
    loop {
        match ca_bundle_is_set(&client, &name, &ca_pem).await {
            Ok(true) => {
                delay = every;
            }
            Ok(false) => match patch_ca_bundle(&client, &name, &ca_pem).await {
                Ok(()) => delay = every,
                Err(e) => {
                    tracing::warn!(configuration = %name, error = %e, retry_in = ?delay, "cannot set the caBundle");
                    delay = (delay * 2).min(Duration::from_secs(60));
                }
            },
            Err(e) => {
                tracing::warn!(configuration = %name, error = %e, retry_in = ?delay, "cannot read the webhook configuration");
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        }
        tokio::time::sleep(delay).await;
    }
}

async fn ca_bundle_is_set(client: &Client, name: &str, ca_pem: &str) -> Result<bool, CertError> {
    let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let current = api.get(name).await?;
    Ok(bundle_is_set(&current, ca_pem))
}

/// Every webhook of `current` trusts exactly `ca_pem`.
pub fn bundle_is_set(current: &ValidatingWebhookConfiguration, ca_pem: &str) -> bool {
    let hooks = current.webhooks.as_deref().unwrap_or_default();
    !hooks.is_empty()
        && hooks.iter().all(|w| w.client_config.ca_bundle.as_ref().is_some_and(|b| b.0 == ca_pem.as_bytes()))
}

/// Set `caBundle` on every webhook of the named configuration (strategic merge by webhook
/// name, so other fields stay with whoever manages them, e.g. Helm).
pub async fn patch_ca_bundle(client: &Client, name: &str, ca_pem: &str) -> Result<(), CertError> {
    let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let current = api.get(name).await?;
    let patch = ca_bundle_patch(&current, ca_pem);
    api.patch(name, &PatchParams::default(), &Patch::Strategic(patch)).await?;
    tracing::info!(configuration = name, "caBundle set");
    Ok(())
}

/// The strategic merge patch that sets `caBundle` on each webhook of `current`.
pub fn ca_bundle_patch(current: &ValidatingWebhookConfiguration, ca_pem: &str) -> serde_json::Value {
    use base64::Engine;
    let bundle = base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes());
    let webhooks: Vec<serde_json::Value> = current
        .webhooks
        .iter()
        .flatten()
        .map(|w| serde_json::json!({"name": w.name, "clientConfig": {"caBundle": bundle}}))
        .collect();
    serde_json::json!({ "webhooks": webhooks })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::admissionregistration::v1::{ValidatingWebhook, WebhookClientConfig};

    #[test]
    fn renewal_starts_when_a_third_is_left() {
        let now: DateTime<Utc> = "2026-12-01T00:00:00Z".parse().expect("t");
        assert!(!needs_renewal(now + chrono::Duration::days(89), now));
        assert!(!needs_renewal(now + chrono::Duration::days(31), now));
        assert!(needs_renewal(now + chrono::Duration::days(29), now));
        assert!(needs_renewal(now - chrono::Duration::days(1), now));
    }

    #[test]
    fn the_ca_secret_round_trips() {
        let ca = Ca::generate("test CA").expect("ca");
        let secret = ca_secret("noexit-ca", "noexit-system", &ca);
        let again = ca_from_secret("noexit-ca", &secret).expect("load");
        assert_eq!(again.cert_pem(), ca.cert_pem());
        let mut broken = secret.clone();
        broken.data.as_mut().map(|d| d.remove(CA_KEY_KEY));
        assert!(matches!(ca_from_secret("noexit-ca", &broken), Err(CertError::Incomplete(_, "ca.key"))));
    }

    #[test]
    fn the_patch_names_every_webhook() {
        let hook = |name: &str| ValidatingWebhook {
            name: name.into(),
            client_config: WebhookClientConfig::default(),
            admission_review_versions: vec!["v1".into()],
            side_effects: "None".into(),
            ..Default::default()
        };
        let vwc = ValidatingWebhookConfiguration {
            webhooks: Some(vec![hook("a.noexit.io"), hook("b.noexit.io")]),
            ..Default::default()
        };
        let patch = ca_bundle_patch(&vwc, "PEM");
        assert_eq!(patch["webhooks"][1]["name"], "b.noexit.io");
        assert_eq!(patch["webhooks"][0]["clientConfig"]["caBundle"], "UEVN");
    }

    #[test]
    fn a_bundle_is_set_only_when_every_webhook_trusts_the_ca() {
        let hook = |bundle: Option<&str>| ValidatingWebhook {
            name: "a.noexit.io".into(),
            client_config: WebhookClientConfig {
                ca_bundle: bundle.map(|b| ByteString(b.as_bytes().to_vec())),
                ..Default::default()
            },
            admission_review_versions: vec!["v1".into()],
            side_effects: "None".into(),
            ..Default::default()
        };
        let vwc = |hooks| ValidatingWebhookConfiguration { webhooks: Some(hooks), ..Default::default() };
        assert!(bundle_is_set(&vwc(vec![hook(Some("PEM")), hook(Some("PEM"))]), "PEM"));
        assert!(!bundle_is_set(&vwc(vec![hook(Some("PEM")), hook(None)]), "PEM"));
        assert!(!bundle_is_set(&vwc(vec![hook(Some("OLD"))]), "PEM"));
        assert!(!bundle_is_set(&vwc(vec![]), "PEM"));
    }

    #[test]
    fn written_pairs_load_as_tls_and_the_key_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let ca = Ca::generate("test CA").expect("ca");
        let issued = ca.issue_server(&["localhost".into()], chrono::Duration::days(1)).expect("issue");
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        write_pair(&issued, &cert, &key).expect("write");
        super::super::tls::ReloadingCert::load(&cert, &key).expect("loads");
        let mode = std::fs::metadata(&key).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
