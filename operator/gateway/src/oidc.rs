//! OIDC sign-in for people: authorization code flow with PKCE (S256), `state` and `nonce`,
//! the ID token checked against the issuer's JWKS (asymmetric algorithms only), then issuer,
//! audience (our client id), expiry and nonce. `amr` is kept for the MFA rule.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};
use rand::RngCore;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use noexit_web::oidc::ALLOWED_ALGORITHMS as ALLOWED;

/// `amr` values that count as a second factor (shared with the API).
pub use noexit_web::oidc::MFA_METHODS;

const MIN_REFRESH: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct OidcSettings {
    pub issuer: String,
    pub client_id: String,
    pub client_secret: Option<String>,
    /// `https://gateway.example/callback`.
    pub redirect_uri: String,
    /// Claim naming the user as Project members are written.
    pub user_claim: String,
    /// CA bundle for the issuer (system roots when `None`).
    pub ca_pem: Option<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("cannot reach the OIDC issuer: {0}")]
    Unavailable(String),
    #[error("{code}: {message}")]
    Rejected { code: &'static str, message: String },
    #[error("TLS set-up for the issuer: {0}")]
    Tls(String),
}

impl OidcError {
    pub fn code(&self) -> &'static str {
        match self {
            OidcError::Unavailable(_) => "issuerUnavailable",
            OidcError::Rejected { code, .. } => code,
            OidcError::Tls(_) => "issuerTls",
        }
    }
}

fn reject(code: &'static str, message: impl Into<String>) -> OidcError {
    OidcError::Rejected { code, message: message.into() }
}

/// Who signed in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedIn {
    pub user: String,
    pub amr: Vec<String>,
    /// The ID token's expiry: the gateway session ends then.
    pub expires: chrono::DateTime<chrono::Utc>,
    /// The verified ID token, kept server side to call the API as this person (review pages).
    pub bearer: Bearer,
}

/// A bearer token that never shows in logs or `Debug` output.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Bearer(pub String);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bearer(<redacted>)")
    }
}

impl SignedIn {
    pub fn has_mfa(&self) -> bool {
        noexit_web::oidc::has_mfa(&self.amr)
    }
}

/// What the browser is sent to the issuer with, kept server side until the callback.
#[derive(Clone, Debug)]
pub struct Pending {
    pub verifier: String,
    pub nonce: String,
    pub created: Instant,
}

#[derive(Deserialize, Clone, Debug)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
}

#[derive(Deserialize)]
struct TokenResponse {
    id_token: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

pub struct OidcClient {
    settings: OidcSettings,
    client: HttpsClient,
    discovery: Mutex<Option<Discovery>>,
    keys: Mutex<(HashMap<String, DecodingKey>, Option<Instant>)>,
}

/// A random URL-safe token of `bytes` bytes of entropy.
pub fn random_token(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}

/// PKCE S256 challenge of a verifier.
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

impl OidcClient {
    pub fn new(settings: OidcSettings) -> Result<Self, OidcError> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| OidcError::Tls(e.to_string()))?;
        let mut roots = rustls::RootCertStore::empty();
        if let Some(pem) = &settings.ca_pem {
            for cert in rustls_pemfile::certs(&mut &pem[..]) {
                let cert = cert.map_err(|e| OidcError::Tls(format!("issuer CA: {e}")))?;
                roots.add(cert).map_err(|e| OidcError::Tls(format!("issuer CA: {e}")))?;
            }
        }
        let tls = builder.with_root_certificates(roots).with_no_client_auth();
        let connector =
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self { settings, client, discovery: Mutex::new(None), keys: Mutex::new((HashMap::new(), None)) })
    }

    pub fn settings(&self) -> &OidcSettings {
        &self.settings
    }

    async fn send(&self, req: http::Request<Full<Bytes>>) -> Result<(http::StatusCode, Bytes), OidcError> {
        let uri = req.uri().to_string();
        let response = tokio::time::timeout(Duration::from_secs(10), self.client.request(req))
            .await
            .map_err(|_| OidcError::Unavailable(format!("{uri}: timed out")))?
            .map_err(|e| OidcError::Unavailable(format!("{uri}: {e}")))?;
        let status = response.status();
        let body =
            response.into_body().collect().await.map_err(|e| OidcError::Unavailable(format!("{uri}: {e}")))?.to_bytes();
        Ok((status, body))
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, OidcError> {
        let req = http::Request::get(url)
            .body(Full::new(Bytes::new()))
            .map_err(|e| OidcError::Unavailable(format!("{url}: {e}")))?;
        let (status, body) = self.send(req).await?;
        if !status.is_success() {
            return Err(OidcError::Unavailable(format!("{url}: HTTP {status}")));
        }
        serde_json::from_slice(&body).map_err(|e| OidcError::Unavailable(format!("{url}: {e}")))
    }

    async fn discovery(&self) -> Result<Discovery, OidcError> {
        let mut cached = self.discovery.lock().await;
        if let Some(d) = cached.as_ref() {
            return Ok(d.clone());
        }
        let issuer = self.settings.issuer.trim_end_matches('/');
        let d: Discovery = self.get_json(&format!("{issuer}/.well-known/openid-configuration")).await?;
        if d.issuer.trim_end_matches('/') != issuer {
            return Err(OidcError::Unavailable(format!("discovery names issuer {:?}, expected {issuer:?}", d.issuer)));
        }
        *cached = Some(d.clone());
        Ok(d)
    }

    /// Where to send the browser, and what to keep until it comes back.
    pub async fn begin(&self, state: &str) -> Result<(String, Pending), OidcError> {
        let d = self.discovery().await?;
        let pending = Pending { verifier: random_token(32), nonce: random_token(16), created: Instant::now() };
        let query = serde_urlencoded::to_string([
            ("response_type", "code"),
            ("client_id", self.settings.client_id.as_str()),
            ("redirect_uri", self.settings.redirect_uri.as_str()),
            ("scope", "openid email profile"),
            ("state", state),
            ("nonce", pending.nonce.as_str()),
            ("code_challenge", pkce_challenge(&pending.verifier).as_str()),
            ("code_challenge_method", "S256"),
        ])
        .map_err(|e| OidcError::Unavailable(e.to_string()))?;
        let sep = if d.authorization_endpoint.contains('?') { '&' } else { '?' };
        Ok((format!("{}{sep}{query}", d.authorization_endpoint), pending))
    }

    /// Exchange the code and verify the ID token.
    pub async fn finish(&self, code: &str, pending: &Pending) -> Result<SignedIn, OidcError> {
        let d = self.discovery().await?;
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", self.settings.redirect_uri.as_str()),
            ("client_id", self.settings.client_id.as_str()),
            ("code_verifier", pending.verifier.as_str()),
        ];
        if let Some(secret) = &self.settings.client_secret {
            form.push(("client_secret", secret.as_str()));
        }
        let body = serde_urlencoded::to_string(&form).map_err(|e| OidcError::Unavailable(e.to_string()))?;
        let req = http::Request::post(&d.token_endpoint)
            .header(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| OidcError::Unavailable(e.to_string()))?;
        let (status, body) = self.send(req).await?;
        let response: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| OidcError::Unavailable(format!("token endpoint answered HTTP {status}, not JSON: {e}")))?;
        if let Some(error) = response.error {
            return Err(reject(
                "codeRejected",
                format!("issuer refused the code: {error} {}", response.error_description.unwrap_or_default()),
            ));
        }
        let token = response.id_token.ok_or_else(|| reject("noIdToken", "token response has no id_token"))?;
        self.verify(&d, &token, &pending.nonce).await
    }

    async fn key_for(&self, d: &Discovery, kid: &str) -> Result<DecodingKey, OidcError> {
        let mut keys = self.keys.lock().await;
        if let Some(k) = keys.0.get(kid) {
            return Ok(k.clone());
        }
        if keys.1.is_none_or(|t| t.elapsed() >= MIN_REFRESH) {
            let set: JwkSet = self.get_json(&d.jwks_uri).await?;
            keys.0 = set
                .keys
                .iter()
                .filter_map(|j| Some((j.common.key_id.clone()?, DecodingKey::from_jwk(j).ok()?)))
                .collect();
            keys.1 = Some(Instant::now());
        }
        keys.0.get(kid).cloned().ok_or_else(|| {
            reject("unknownSigningKey", format!("ID token signed with key {kid:?}, which the issuer does not publish"))
        })
    }

    async fn verify(&self, d: &Discovery, token: &str, nonce: &str) -> Result<SignedIn, OidcError> {
        use jsonwebtoken::errors::ErrorKind;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| reject("malformedToken", format!("ID token is not a JWT: {e}")))?;
        if !ALLOWED.contains(&header.alg) {
            return Err(reject("unsupportedAlgorithm", format!("ID token algorithm {:?} is not accepted", header.alg)));
        }
        let kid = header.kid.ok_or_else(|| reject("malformedToken", "ID token header has no key id"))?;
        let key = self.key_for(d, &kid).await?;
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[self.settings.issuer.as_str()]);
        v.set_audience(&[self.settings.client_id.as_str()]);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        v.leeway = 30;
        let data =
            jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key, &v).map_err(|e| match e
                .kind()
            {
                ErrorKind::InvalidSignature => reject("invalidSignature", "ID token signature does not verify"),
                ErrorKind::ExpiredSignature => reject("tokenExpired", "ID token has expired"),
                ErrorKind::InvalidIssuer => {
                    reject("wrongIssuer", format!("ID token issuer is not {:?}", self.settings.issuer))
                }
                ErrorKind::InvalidAudience => reject("wrongAudience", "ID token audience is not this gateway"),
                other => reject("malformedToken", format!("ID token rejected: {other:?}")),
            })?;
        let claims = data.claims;
        if claims.get("nonce").and_then(|n| n.as_str()) != Some(nonce) {
            return Err(reject("nonceMismatch", "ID token nonce does not match this sign-in"));
        }
        let user = claims
            .get(&self.settings.user_claim)
            .and_then(|u| u.as_str())
            .filter(|u| !u.is_empty())
            .ok_or_else(|| reject("malformedToken", format!("ID token has no {:?} claim", self.settings.user_claim)))?
            .to_owned();
        let amr = claims
            .get("amr")
            .and_then(|a| a.as_array())
            .map(|a| a.iter().filter_map(|m| m.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        let exp = claims.get("exp").and_then(|e| e.as_i64()).unwrap_or(0);
        let expires = chrono::DateTime::from_timestamp(exp, 0).unwrap_or(chrono::DateTime::UNIX_EPOCH);
        Ok(SignedIn { user, amr, expires, bearer: Bearer(token.to_owned()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_matches_rfc7636_appendix_b() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        assert_ne!(random_token(32), random_token(32));
    }
}
