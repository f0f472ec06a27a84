//! OIDC bearer tokens: the signature is checked against the issuer's JWKS (found through
//! `<issuer>/.well-known/openid-configuration`, cached, fetched again when a token names a key
//! id we do not know), then issuer, audience and expiry. Only asymmetric algorithms are
//! accepted, so a token cannot pick an HMAC "key" out of the public JWKS.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::Mutex;

use super::error::ApiError;

const ALLOWED: [Algorithm; 7] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// A fresh JWKS fetch happens at most this often, so unknown key ids cannot flood the issuer.
const MIN_REFRESH: Duration = Duration::from_secs(10);

/// `amr` values that count as a second factor.
pub const MFA_METHODS: [&str; 3] = ["mfa", "otp", "hwk"];

#[derive(Clone, Debug)]
pub struct OidcConfig {
    /// Issuer URL exactly as in the tokens' `iss`.
    pub issuer: String,
    /// Expected `aud`.
    pub audience: String,
    /// Claim naming the user, as Project members are written (`email` or `sub`).
    pub user_claim: String,
    /// CA bundle for the issuer's HTTPS (system roots when `None`).
    pub ca_pem: Option<Vec<u8>>,
}

/// The verified identity a token carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub amr: Vec<String>,
}

impl Identity {
    pub fn has_mfa(&self) -> bool {
        self.amr.iter().any(|m| MFA_METHODS.contains(&m.as_str()))
    }
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

struct Keys {
    by_kid: HashMap<String, DecodingKey>,
    fetched: Option<Instant>,
}

pub struct Oidc {
    config: OidcConfig,
    client: HttpsClient,
    keys: Mutex<Keys>,
}

impl std::fmt::Debug for Oidc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oidc").field("issuer", &self.config.issuer).finish_non_exhaustive()
    }
}

fn unauth(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::unauthenticated(code, message)
}

impl Oidc {
    pub fn new(config: OidcConfig) -> Result<Self, super::tls::TlsError> {
        let tls = super::tls::client_config(config.ca_pem.as_deref(), None)?;
        let connector =
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self { config, client, keys: Mutex::new(Keys { by_kid: HashMap::new(), fetched: None }) })
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let response = tokio::time::timeout(Duration::from_secs(10), self.client.get(uri))
            .await
            .map_err(|_| format!("{url}: timed out"))?
            .map_err(|e| format!("{url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("{url}: HTTP {}", response.status()));
        }
        let body = response.into_body().collect().await.map_err(|e| format!("{url}: {e}"))?.to_bytes();
        serde_json::from_slice(&body).map_err(|e| format!("{url}: {e}"))
    }

    async fn fetch_keys(&self) -> Result<HashMap<String, DecodingKey>, String> {
        let issuer = self.config.issuer.trim_end_matches('/');
        let discovery: Discovery = self.get_json(&format!("{issuer}/.well-known/openid-configuration")).await?;
        if discovery.issuer.trim_end_matches('/') != issuer {
            return Err(format!("discovery document names issuer {:?}, expected {issuer:?}", discovery.issuer));
        }
        let set: JwkSet = self.get_json(&discovery.jwks_uri).await?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            // Keys without an id or of a kind we cannot use are skipped, not fatal.
            if let (Some(kid), Ok(key)) = (jwk.common.key_id.clone(), DecodingKey::from_jwk(jwk)) {
                keys.insert(kid, key);
            }
        }
        Ok(keys)
    }

    async fn key_for(&self, kid: &str) -> Result<DecodingKey, ApiError> {
        let mut keys = self.keys.lock().await;
        if let Some(key) = keys.by_kid.get(kid) {
            return Ok(key.clone());
        }
        let may_refresh = keys.fetched.is_none_or(|t| t.elapsed() >= MIN_REFRESH);
        if may_refresh {
            let fetched = self
                .fetch_keys()
                .await
                .map_err(|e| ApiError::Unavailable(format!("cannot fetch the OIDC issuer's keys: {e}")))?;
            keys.by_kid = fetched;
            keys.fetched = Some(Instant::now());
        }
        keys.by_kid.get(kid).cloned().ok_or_else(|| {
            unauth("unknownSigningKey", format!("token signed with key {kid:?}, which the issuer does not publish"))
        })
    }

    /// Verify a bearer token and return who it names.
    pub async fn verify(&self, token: &str) -> Result<Identity, ApiError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| unauth("malformedToken", format!("bearer token is not a JWT: {e}")))?;
        if !ALLOWED.contains(&header.alg) {
            return Err(unauth("unsupportedAlgorithm", format!("token algorithm {:?} is not accepted", header.alg)));
        }
        let kid = header.kid.ok_or_else(|| unauth("malformedToken", "token header has no key id (kid)"))?;
        let key = self.key_for(&kid).await?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[self.config.issuer.as_str()]);
        validation.set_audience(&[self.config.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = 30;
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => unauth("invalidSignature", "token signature does not verify"),
                ErrorKind::ExpiredSignature => unauth("tokenExpired", "token has expired"),
                ErrorKind::ImmatureSignature => unauth("tokenNotYetValid", "token is not valid yet (nbf)"),
                ErrorKind::InvalidIssuer => {
                    unauth("wrongIssuer", format!("token issuer is not {:?}", self.config.issuer))
                }
                ErrorKind::InvalidAudience => {
                    unauth("wrongAudience", format!("token audience does not include {:?}", self.config.audience))
                }
                ErrorKind::MissingRequiredClaim(c) => unauth("malformedToken", format!("token has no {c:?} claim")),
                ErrorKind::InvalidAlgorithm => unauth("unsupportedAlgorithm", "token algorithm does not match its key"),
                other => unauth("malformedToken", format!("token rejected: {other:?}")),
            })?;
        let claims = data.claims;
        let user = claims
            .get(&self.config.user_claim)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                unauth("malformedToken", format!("token has no {:?} claim naming the user", self.config.user_claim))
            })?
            .to_owned();
        let amr = claims
            .get("amr")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|m| m.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        Ok(Identity { user, amr })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mfa_counts_only_second_factors() {
        let id = |amr: &[&str]| Identity { user: "a".into(), amr: amr.iter().map(|s| s.to_string()).collect() };
        assert!(!id(&["pwd"]).has_mfa());
        assert!(id(&["pwd", "otp"]).has_mfa());
        assert!(id(&["hwk"]).has_mfa());
        assert!(!id(&[]).has_mfa());
    }
}
