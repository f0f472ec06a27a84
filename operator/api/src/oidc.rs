//! OIDC bearer tokens: the signature is checked against the issuer's JWKS (found through
//! `<issuer>/.well-known/openid-configuration`), then issuer, audience, expiry and not-before;
//! when people are named by their `email`, the issuer must also vouch for it
//! (`email_verified: true`). Only asymmetric algorithms are accepted, so a token cannot pick an
//! HMAC "key" out of the public JWKS.
//!
//! Keys: fetched on a timer ([`Oidc::spawn_refresh`]) and again when a token names a key id we
//! do not know (an issuer rotating its keys), at most once per [`OidcConfig::min_refetch`] so a
//! flood of made-up key ids cannot hammer the issuer. Verifying never waits on a lock: the key
//! set is an `Arc` swapped in whole; only fetches are serialised (one in flight, the others
//! wait for its result). A failed fetch keeps the previous keys.
//!
//! The issuer and its JWKS are reached over HTTPS only; `http://` is accepted only with
//! [`OidcConfig::allow_http_loopback`] and only on a loopback address (development, tests).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};
use serde::Deserialize;

use super::error::ApiError;

use noexit_web::oidc::ALLOWED_ALGORITHMS as ALLOWED;

/// Seconds of clock difference tolerated for `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;

/// Longest key id looked up; longer ones are refused without a fetch.
const MAX_KID: usize = 256;

/// Largest discovery document or JWKS read.
const MAX_DOCUMENT: usize = 1 << 20;

/// `amr` values that count as a second factor (shared with the gateway).
pub use noexit_web::oidc::MFA_METHODS;

#[derive(Clone, Debug)]
pub struct OidcConfig {
    /// Issuer URL exactly as in the tokens' `iss`.
    pub issuer: String,
    /// Expected `aud`.
    pub audience: String,
    /// Claim naming the user, as Project members are written (`email` or `sub`). With `email`,
    /// tokens must carry `email_verified: true`.
    pub user_claim: String,
    /// CA bundle for the issuer's HTTPS (system roots when `None`).
    pub ca_pem: Option<Vec<u8>>,
    /// Accept `http://` issuer and JWKS URLs on loopback addresses (development and tests).
    pub allow_http_loopback: bool,
    /// Keys are fetched again this often whatever happens.
    pub refresh_every: Duration,
    /// Fewest time between two fetches caused by tokens naming unknown key ids.
    pub min_refetch: Duration,
}

impl OidcConfig {
    /// Defaults: audience `noexit`, users named by `email`, system roots, HTTPS only, keys
    /// fetched every 10 minutes and at most every 10 seconds for unknown key ids.
    pub fn new(issuer: impl Into<String>) -> Self {
        Self {
            issuer: issuer.into(),
            audience: "noexit".into(),
            user_claim: "email".into(),
            ca_pem: None,
            allow_http_loopback: false,
            refresh_every: Duration::from_secs(600),
            min_refetch: Duration::from_secs(10),
        }
    }
}

/// Why the OIDC verifier cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("{what} {url:?} is not a URL: {message}")]
    BadUrl { what: &'static str, url: String, message: String },
    #[error(
        "{what} {url:?} is not https://: the issuer's keys decide who is logged in and must not travel \
         unauthenticated (http:// is accepted only on a loopback address with --oidc-allow-http-loopback, \
         for development)"
    )]
    NotHttps { what: &'static str, url: String },
    #[error(transparent)]
    Tls(#[from] super::tls::TlsError),
}

/// Check that `url` may be used to reach the issuer: `https://`, or `http://` to a loopback
/// host when `allow_http_loopback` (pure).
pub fn check_url(what: &'static str, url: &str, allow_http_loopback: bool) -> Result<(), OidcError> {
    let uri: http::Uri = url.parse().map_err(|e: http::uri::InvalidUri| OidcError::BadUrl {
        what,
        url: url.into(),
        message: e.to_string(),
    })?;
    let host = uri.host().unwrap_or_default();
    if host.is_empty() {
        return Err(OidcError::BadUrl { what, url: url.into(), message: "no host".into() });
    }
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if allow_http_loopback && is_loopback(host) => Ok(()),
        _ => Err(OidcError::NotHttps { what, url: url.into() }),
    }
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The verified identity a token carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub amr: Vec<String>,
}

impl Identity {
    pub fn has_mfa(&self) -> bool {
        noexit_web::oidc::has_mfa(&self.amr)
    }
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// One fetched key set; replaced whole, never edited.
#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, DecodingKey>,
    /// Bumped by every successful fetch.
    generation: u64,
}

pub struct Oidc {
    config: OidcConfig,
    client: HttpsClient,
    /// Held only to clone or swap the `Arc`.
    keys: RwLock<Arc<KeySet>>,
    /// One fetch at a time; holds when the last one started.
    fetching: tokio::sync::Mutex<Option<Instant>>,
    /// JWKS fetches attempted (metrics, tests).
    fetches: AtomicU64,
}

impl std::fmt::Debug for Oidc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oidc").field("issuer", &self.config.issuer).finish_non_exhaustive()
    }
}

fn unauth(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::unauthenticated(code, message)
}

/// What one call to `refresh` did.
enum Refresh {
    Fetched,
    /// Another caller fetched while this one waited.
    Joined,
    /// The last fetch was too recent.
    RateLimited,
}

impl Oidc {
    /// Refuses an issuer that is not `https://` (see [`check_url`]).
    pub fn new(config: OidcConfig) -> Result<Self, OidcError> {
        check_url("OIDC issuer", &config.issuer, config.allow_http_loopback)?;
        let tls = super::tls::client_config(config.ca_pem.as_deref(), None)?;
        let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls);
        let connector = if config.allow_http_loopback {
            builder.https_or_http().enable_http1().build()
        } else {
            builder.https_only().enable_http1().build()
        };
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            config,
            client,
            keys: RwLock::new(Arc::new(KeySet::default())),
            fetching: tokio::sync::Mutex::new(None),
            fetches: AtomicU64::new(0),
        })
    }

    /// JWKS fetches attempted so far.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// Fetch the keys now and then every `refresh_every`, until the verifier is dropped.
    pub fn spawn_refresh(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        let every = self.config.refresh_every.max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { return };
                let seen = me.current().generation;
                match me.refresh(seen, true).await {
                    Ok(_) => {
                        tracing::debug!(issuer = %me.config.issuer, keys = me.current().by_kid.len(), "OIDC keys fetched")
                    }
                    Err(e) => {
                        tracing::warn!(issuer = %me.config.issuer, error = %e, "cannot fetch the OIDC issuer's keys; keeping the previous ones")
                    }
                }
            }
        })
    }

    fn current(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let fetch = async {
            let response = self.client.get(uri).await.map_err(|e| format!("{url}: {e}"))?;
            if !response.status().is_success() {
                return Err(format!("{url}: HTTP {}", response.status()));
            }
            let body = http_body_util::Limited::new(response.into_body(), MAX_DOCUMENT);
            body.collect().await.map(|b| b.to_bytes()).map_err(|e| format!("{url}: {e}"))
        };
        let body =
            tokio::time::timeout(Duration::from_secs(10), fetch).await.map_err(|_| format!("{url}: timed out"))??;
        serde_json::from_slice(&body).map_err(|e| format!("{url}: {e}"))
    }

    async fn fetch_keys(&self) -> Result<HashMap<String, DecodingKey>, String> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let issuer = self.config.issuer.trim_end_matches('/');
        let discovery: Discovery = self.get_json(&format!("{issuer}/.well-known/openid-configuration")).await?;
        if discovery.issuer.trim_end_matches('/') != issuer {
            return Err(format!("discovery document names issuer {:?}, expected {issuer:?}", discovery.issuer));
        }
        check_url("OIDC jwks_uri", &discovery.jwks_uri, self.config.allow_http_loopback).map_err(|e| e.to_string())?;
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

    /// Fetch the keys unless another caller did since the caller saw generation `seen`, or
    /// (unless `forced`) the last fetch started less than `min_refetch` ago.
    async fn refresh(&self, seen: u64, forced: bool) -> Result<Refresh, String> {
        let mut last = self.fetching.lock().await;
        if self.current().generation != seen {
            return Ok(Refresh::Joined);
        }
        if !forced && last.is_some_and(|t| t.elapsed() < self.config.min_refetch) {
            return Ok(Refresh::RateLimited);
        }
        *last = Some(Instant::now());
        let by_kid = self.fetch_keys().await?;
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let generation = keys.generation + 1;
        *keys = Arc::new(KeySet { by_kid, generation });
        Ok(Refresh::Fetched)
    }

    async fn key_for(&self, kid: &str) -> Result<DecodingKey, ApiError> {
        let unknown =
            || unauth("unknownSigningKey", format!("token signed with key {kid:?}, which the issuer does not publish"));
        let keys = self.current();
        if let Some(key) = keys.by_kid.get(kid) {
            return Ok(key.clone());
        }
        if kid.len() > MAX_KID {
            return Err(unknown());
        }
        match self.refresh(keys.generation, false).await {
            Ok(Refresh::RateLimited) => {
                tracing::debug!(kid, "unknown OIDC key id; keys were fetched moments ago, not fetching again")
            }
            Ok(Refresh::Fetched | Refresh::Joined) => {}
            Err(e) => {
                tracing::warn!(issuer = %self.config.issuer, error = %e, "cannot fetch the OIDC issuer's keys");
                // Keys we hold still verify; an unknown one cannot be checked now.
                return Err(ApiError::Unavailable(format!("cannot fetch the OIDC issuer's keys: {e}")));
            }
        }
        self.current().by_kid.get(kid).cloned().ok_or_else(unknown)
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
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
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
        identity(&data.claims, &self.config.user_claim)
    }
}

/// The identity in verified claims (pure). A user named by `email` needs `email_verified`:
/// otherwise anyone who can put an address in their issuer profile would be that address.
fn identity(claims: &serde_json::Map<String, serde_json::Value>, user_claim: &str) -> Result<Identity, ApiError> {
    let user = claims
        .get(user_claim)
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| unauth("malformedToken", format!("token has no {user_claim:?} claim naming the user")))?
        .to_owned();
    if user_claim == "email" {
        // Some issuers send the boolean as a string.
        let verified = match claims.get("email_verified") {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(serde_json::Value::String(s)) => s == "true",
            _ => false,
        };
        if !verified {
            return Err(unauth(
                "emailNotVerified",
                format!(
                    "the issuer does not vouch for {user:?} (email_verified is not true); people are named by email"
                ),
            ));
        }
    }
    let amr = claims
        .get("amr")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|m| m.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    Ok(Identity { user, amr })
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

    fn claims(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn email_names_need_email_verified_sub_names_do_not() {
        let code = |r: Result<Identity, ApiError>| r.map(|i| i.user).map_err(|e| e.code());
        let email = |extra: serde_json::Value| {
            let mut c = claims(serde_json::json!({"email": "a@x.example", "sub": "s-1"}));
            c.extend(claims(extra));
            c
        };
        assert_eq!(
            code(identity(&email(serde_json::json!({"email_verified": true})), "email")),
            Ok("a@x.example".into())
        );
        assert_eq!(
            code(identity(&email(serde_json::json!({"email_verified": "true"})), "email")),
            Ok("a@x.example".into())
        );
        for bad in [
            serde_json::json!({"email_verified": false}),
            serde_json::json!({}),
            serde_json::json!({"email_verified": "yes"}),
        ] {
            assert_eq!(code(identity(&email(bad.clone()), "email")), Err("emailNotVerified"), "{bad}");
        }
        assert_eq!(code(identity(&email(serde_json::json!({"email_verified": false})), "sub")), Ok("s-1".into()));
    }

    #[test]
    fn only_https_or_explicit_loopback_http() {
        for ok in ["https://id.example", "https://127.0.0.1:8443/realms/x"] {
            assert!(check_url("OIDC issuer", ok, false).is_ok(), "{ok}");
        }
        for (url, flag) in [
            ("http://id.example", false),
            ("http://id.example", true),
            ("http://10.0.0.1:80", true),
            ("http://127.0.0.1:8080", false),
            ("ftp://127.0.0.1", true),
        ] {
            let e = check_url("OIDC issuer", url, flag).unwrap_err();
            assert!(matches!(e, OidcError::NotHttps { .. }), "{url}: {e}");
            assert!(e.to_string().contains(url) && e.to_string().contains("https://"), "{e}");
        }
        for ok in ["http://127.0.0.1:8080", "http://localhost:1", "http://[::1]:9"] {
            assert!(check_url("OIDC issuer", ok, true).is_ok(), "{ok}");
        }
        assert!(matches!(check_url("OIDC issuer", "not a url", true), Err(OidcError::BadUrl { .. })));
        assert!(Oidc::new(OidcConfig::new("http://id.example")).is_err());
    }
}
