//! The webhook's serving certificate. The **controller** issues it from the operator's CA
//! (Secret `noexit-ca`, which only the controller reads) into a `kubernetes.io/tls` Secret
//! (`tls.crt`, `tls.key`, `ca.crt`) that the webhook pod mounts read-only, renews it when a
//! third of its validity is left, and keeps the `caBundle` of the ValidatingWebhookConfiguration
//! set to the CA. The webhook only reads its certificate files ([`super::tls`] re-reads them
//! when the kubelet updates the mount): a compromised webhook holds no key that could sign
//! agent or operator certificates.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

use noexit_common::pki::{CA_CERT_KEY, Ca, CertInfo, IssuedCert, TLS_CERT_KEY, TLS_KEY_KEY};

/// Validity of an issued serving certificate; renewed when a third is left.
pub const SERVING_DAYS: i64 = 90;
/// Annotation on the serving Secret: the DNS names the certificate was issued for.
pub const DNS_NAMES_ANNOTATION: &str = "noexit.io/dns-names";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("issuing the serving certificate: {0}")]
    Pki(noexit_common::pki::PkiError),
    #[error("writing {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

/// Issues the webhook's serving certificate into a Secret (run by the controller).
#[derive(Clone)]
pub struct ServingIssuer {
    pub client: Client,
    pub namespace: String,
    /// The `kubernetes.io/tls` Secret the webhook mounts.
    pub secret: String,
    /// DNS names for the certificate (the webhook Service).
    pub dns_names: Vec<String>,
    pub ca: Arc<Ca>,
}

impl ServingIssuer {
    /// Issue a certificate into the Secret unless the one there is still good. Returns whether
    /// a new one was written. Another replica writing at the same time wins (409), harmlessly.
    pub async fn ensure(&self, now: DateTime<Utc>) -> Result<bool, CertError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let live = api.get_opt(&self.secret).await?;
        if live.as_ref().is_some_and(|s| !needs_reissue(s, self.ca.cert_pem(), &self.dns_names, now)) {
            return Ok(false);
        }
        let issued =
            self.ca.issue_server(&self.dns_names, chrono::Duration::days(SERVING_DAYS)).map_err(CertError::Pki)?;
        let mut secret = serving_secret(&self.secret, &self.namespace, self.ca.cert_pem(), &self.dns_names, &issued);
        let written = match live {
            Some(live) => {
                secret.metadata.resource_version = live.metadata.resource_version;
                api.replace(&self.secret, &PostParams::default(), &secret).await.map(|_| ())
            }
            None => api.create(&PostParams::default(), &secret).await.map(|_| ()),
        };
        match written {
            Ok(()) => {
                tracing::info!(secret = %self.secret, serial = %issued.serial, not_after = %issued.not_after, names = ?self.dns_names, "webhook serving certificate issued");
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Keep the certificate fresh and (when `configuration` is given) the `caBundle` set,
    /// forever: check every `every`, back off on errors.
    pub async fn run(self, configuration: Option<String>, every: Duration) {
        if let Some(name) = configuration {
            tokio::spawn(keep_ca_bundle(self.client.clone(), name, self.ca.cert_pem().to_owned(), every));
        }
        let mut delay = Duration::from_secs(1);
        loop {
            match self.ensure(Utc::now()).await {
                Ok(_) => delay = every,
                Err(e) => {
                    tracing::warn!(secret = %self.secret, error = %e, retry_in = ?delay, "cannot issue the webhook's serving certificate");
                    delay = (delay * 2).min(Duration::from_secs(60));
                }
            }
            tokio::time::sleep(delay).await;
        }
    }
}

/// Renew when less than a third of the validity is left.
pub fn needs_renewal(not_after: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    not_after - now < chrono::Duration::days(SERVING_DAYS / 3)
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    secret.data.as_ref()?.get(key).and_then(|b| String::from_utf8(b.0.clone()).ok())
}

/// The live Secret must be replaced: another CA, other names, unreadable, or due for renewal.
pub fn needs_reissue(live: &Secret, ca_pem: &str, dns_names: &[String], now: DateTime<Utc>) -> bool {
    let names = live.metadata.annotations.as_ref().and_then(|a| a.get(DNS_NAMES_ANNOTATION)).cloned();
    let cert = text(live, TLS_CERT_KEY).and_then(|pem| CertInfo::from_pem(&pem).ok());
    let fresh = cert.is_some_and(|c| now >= c.not_before && !needs_renewal(c.not_after, now));
    !(fresh
        && text(live, TLS_KEY_KEY).is_some()
        && text(live, CA_CERT_KEY).as_deref() == Some(ca_pem)
        && names.as_deref() == Some(dns_names.join(",").as_str()))
}

/// The `kubernetes.io/tls` Secret the webhook mounts: certificate, key, and the CA (no CA key).
pub fn serving_secret(name: &str, namespace: &str, ca_pem: &str, dns_names: &[String], issued: &IssuedCert) -> Secret {
    let b = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/name".to_owned(), "noexit".to_owned()),
                ("app.kubernetes.io/component".to_owned(), "webhook".to_owned()),
                ("app.kubernetes.io/managed-by".to_owned(), "noexit-operator".to_owned()),
            ])),
            annotations: Some(BTreeMap::from([(DNS_NAMES_ANNOTATION.to_owned(), dns_names.join(","))])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            (TLS_CERT_KEY.to_owned(), b(&issued.cert_pem)),
            (TLS_KEY_KEY.to_owned(), b(&issued.key_pem)),
            (CA_CERT_KEY.to_owned(), b(ca_pem)),
        ])),
        type_: Some("kubernetes.io/tls".into()),
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
    fn the_serving_secret_carries_no_ca_key_and_is_reissued_when_it_must_be() {
        let ca = Ca::generate("test CA").expect("ca");
        let names = vec!["noexit-webhook.noexit-system.svc".to_owned()];
        let now = Utc::now();
        let issued = ca.issue_server(&names, chrono::Duration::days(SERVING_DAYS)).expect("issue");
        let secret = serving_secret("noexit-webhook-tls", "noexit-system", ca.cert_pem(), &names, &issued);
        let data = secret.data.as_ref().expect("data");
        assert_eq!(data.keys().map(String::as_str).collect::<Vec<_>>(), ["ca.crt", "tls.crt", "tls.key"]);
        assert!(!data.values().any(|v| v.0 == ca.key_pem().as_bytes()), "the CA key must never leave the controller");
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        assert!(!needs_reissue(&secret, ca.cert_pem(), &names, now));
        // Due for renewal, another CA, other names, a missing key.
        assert!(needs_reissue(&secret, ca.cert_pem(), &names, now + chrono::Duration::days(61)));
        let other = Ca::generate("other CA").expect("ca");
        assert!(needs_reissue(&secret, other.cert_pem(), &names, now));
        assert!(needs_reissue(&secret, ca.cert_pem(), &["localhost".to_owned()], now));
        let mut broken = secret.clone();
        broken.data.as_mut().map(|d| d.remove(TLS_KEY_KEY));
        assert!(needs_reissue(&broken, ca.cert_pem(), &names, now));
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
