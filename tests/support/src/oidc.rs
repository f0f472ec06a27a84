//! A fake OpenID Connect issuer on a local address: the discovery document, a JWKS the test can
//! change (key rotation) with fetches counted, tokens with the claims a test chooses (`amr`,
//! `groups`, `email`, any other), and the authorization-code + PKCE (S256) endpoints a browser
//! signs in through (the gateway, the review pages).
//!
//! ```no_run
//! # async fn demo() {
//! use noexit_test_support::oidc::Issuer;
//! // HTTPS on localhost with its own CA (the API's verifier takes `issuer.ca_pem()`).
//! let issuer = Issuer::builder().https().start().await;
//! let token = issuer.token_with("alice@ward7.example", |c| c["groups"] = serde_json::json!(["ward-7"]));
//! # }
//! ```
//!
//! Tokens are ES256, key id [`KID`], unless a test signs with another [`SigningKey`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Form, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sha2::Digest;

/// Key id of the issuer's own signing key.
pub const KID: &str = "k1";

/// The audience of tokens from [`Issuer::token`]: the control-plane API's default.
pub const API_AUDIENCE: &str = "noexit";

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A key that signs tokens, and its public half as a JWK.
pub struct SigningKey {
    pub alg: Algorithm,
    pub kid: String,
    pub key: EncodingKey,
    pub jwk: Value,
}

impl SigningKey {
    /// A new P-256 key.
    pub fn es256(kid: &str) -> SigningKey {
        let pair = rcgen::KeyPair::generate().expect("P-256 key");
        let raw = pair.public_key_raw();
        let jwk = json!({"kty": "EC", "crv": "P-256", "x": b64url(&raw[1..33]), "y": b64url(&raw[33..65]),
            "kid": kid, "alg": "ES256", "use": "sig"});
        SigningKey { alg: Algorithm::ES256, kid: kid.into(), key: EncodingKey::from_ec_der(&pair.serialize_der()), jwk }
    }

    /// A new 2048-bit RSA key, made by `openssl` (ring cannot generate RSA keys).
    pub fn rs256(kid: &str) -> SigningKey {
        let dir = tempfile::tempdir().expect("temporary directory");
        let pem = dir.path().join("rsa.pem");
        let der = dir.path().join("rsa.der");
        let openssl = |args: &[&std::ffi::OsStr]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl (hack/install-deps.sh installs it)");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let os = |s: &'static str| std::ffi::OsStr::new(s);
        let bits = "rsa_keygen_bits:2048";
        openssl(&[os("genpkey"), os("-algorithm"), os("RSA"), os("-pkeyopt"), os(bits), os("-out"), pem.as_os_str()]);
        let modulus = openssl(&[os("rsa"), os("-noout"), os("-modulus"), os("-in"), pem.as_os_str()]);
        let modulus =
            hex::decode(modulus.trim().strip_prefix("Modulus=").expect("openssl's modulus line")).expect("hex modulus");
        // PKCS#1 DER, as jsonwebtoken's `from_rsa_der` takes it.
        openssl(&[
            os("rsa"),
            os("-traditional"),
            os("-outform"),
            os("DER"),
            os("-in"),
            pem.as_os_str(),
            os("-out"),
            der.as_os_str(),
        ]);
        let jwk = json!({"kty": "RSA", "n": b64url(&modulus), "e": "AQAB", "kid": kid, "alg": "RS256", "use": "sig"});
        let key = EncodingKey::from_rsa_der(&std::fs::read(&der).expect("RSA key DER"));
        SigningKey { alg: Algorithm::RS256, kid: kid.into(), key, jwk }
    }

    /// `claims` as a JWT signed with this key under its key id.
    pub fn sign(&self, claims: &Value) -> String {
        sign(self.alg, &self.kid, &self.key, claims)
    }
}

/// `claims` as a JWT signed with `key` under `alg` and key id `kid` (which need not match the
/// key: tests of confused verifiers).
pub fn sign(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, claims, key).expect("signing a token")
}

/// Who the authorization endpoint signs in next.
#[derive(Clone, Debug)]
pub struct SignIn {
    pub user: String,
    /// The ID token's `amr` (a second factor is `otp`).
    pub amr: Vec<String>,
    /// Seconds from issue to the ID token's expiry (negative: already expired).
    pub lifetime: i64,
    /// Merged into the ID token's claims last (`groups`, or a claim to override).
    pub extra: Value,
}

impl SignIn {
    /// `user` with password and one-time code, for ten minutes.
    pub fn new(user: &str) -> SignIn {
        SignIn { user: user.into(), amr: vec!["pwd".into(), "otp".into()], lifetime: 600, extra: json!({}) }
    }
}

/// An authorization code waiting for its token request.
struct Code {
    challenge: String,
    nonce: String,
    redirect_uri: String,
    client_id: String,
    sign_in: SignIn,
}

struct Shared {
    url: String,
    key: SigningKey,
    jwks: Mutex<Vec<Value>>,
    jwks_fetches: AtomicUsize,
    sign_in: Mutex<Option<SignIn>>,
    /// Audiences ID tokens name after the client id.
    audiences: Vec<String>,
    codes: Mutex<HashMap<String, Code>>,
    pkce_failures: AtomicUsize,
}

/// How to start an [`Issuer`].
pub struct Builder {
    https: bool,
    host: IpAddr,
    audiences: Vec<String>,
    sign_in: Option<SignIn>,
}

impl Builder {
    /// Serve HTTPS with a certificate for `localhost` and `127.0.0.1` from the issuer's own CA
    /// ([`Issuer::ca_pem`]); the URL is `https://localhost:<port>`. Plain HTTP otherwise.
    pub fn https(mut self) -> Builder {
        self.https = true;
        self
    }

    /// Listen on `host` (an address of a test network namespace, say) instead of 127.0.0.1.
    pub fn host(mut self, host: &str) -> Builder {
        self.host = host.parse().unwrap_or_else(|e| panic!("issuer host {host}: {e}"));
        self
    }

    /// ID tokens from the code flow also name `audience` (with `azp` the client id): one sign-in
    /// whose token the gateway relays to the API.
    pub fn also_audience(mut self, audience: &str) -> Builder {
        self.audiences.push(audience.into());
        self
    }

    /// Who signs in through the authorization endpoint until [`Issuer::sign_in`] says otherwise.
    pub fn signing_in(mut self, user: &str) -> Builder {
        self.sign_in = Some(SignIn::new(user));
        self
    }

    /// Binds and starts serving on the current Tokio runtime.
    pub async fn start(self) -> Issuer {
        let listener = tokio::net::TcpListener::bind((self.host, 0)).await.expect("binding the issuer");
        let addr = listener.local_addr().expect("issuer address");
        let (url, tls, ca_pem) = if self.https {
            let ca = crate::pki::Ca::new("fake issuer CA");
            let cert = ca.server(&["localhost", "127.0.0.1"]);
            (format!("https://localhost:{}", addr.port()), Some(cert.server_config()), Some(ca.cert_pem()))
        } else {
            (format!("http://{addr}"), None, None)
        };
        let key = SigningKey::es256(KID);
        let shared = Arc::new(Shared {
            url: url.clone(),
            jwks: Mutex::new(vec![key.jwk.clone()]),
            key,
            jwks_fetches: AtomicUsize::new(0),
            sign_in: Mutex::new(self.sign_in),
            audiences: self.audiences,
            codes: Mutex::default(),
            pkce_failures: AtomicUsize::new(0),
        });
        let router = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/authorize", get(authorize))
            .route("/token", post(token))
            .with_state(shared.clone());
        let task = crate::net::serve(listener, tls, router);
        Issuer { url, ca_pem, shared, task }
    }
}

/// A running fake issuer; stops serving when dropped.
pub struct Issuer {
    /// The issuer URL (`iss`), as a relying party is configured with it.
    pub url: String,
    ca_pem: Option<String>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Issuer {
    /// Plain HTTP on 127.0.0.1, nobody signing in through the authorization endpoint.
    pub fn builder() -> Builder {
        Builder { https: false, host: IpAddr::from([127, 0, 0, 1]), audiences: Vec::new(), sign_in: None }
    }

    /// The CA of the issuer's HTTPS certificate (`None` for plain HTTP).
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// The issuer's own signing key (published in the JWKS at start).
    pub fn key(&self) -> &SigningKey {
        &self.shared.key
    }

    /// The JWKS's keys from now on.
    pub fn publish(&self, keys: Vec<Value>) {
        *self.shared.jwks.lock().unwrap() = keys;
    }

    /// How often the JWKS has been fetched.
    pub fn jwks_fetches(&self) -> usize {
        self.shared.jwks_fetches.load(Ordering::SeqCst)
    }

    /// Claims of a valid token for `user` with audience [`API_AUDIENCE`]: verified email,
    /// password and one-time code, ten minutes left.
    pub fn claims(&self, user: &str) -> Value {
        json!({
            "iss": self.url, "aud": API_AUDIENCE, "email": user, "email_verified": true, "sub": user,
            "exp": chrono::Utc::now().timestamp() + 600, "amr": ["pwd", "otp"],
        })
    }

    /// A valid token for `user` (see [`Issuer::claims`]), signed with the issuer's key.
    pub fn token(&self, user: &str) -> String {
        self.token_with(user, |_| {})
    }

    /// A token for `user` whose claims `edit` changes first (a wrong `aud`, no `amr`, `groups`).
    pub fn token_with(&self, user: &str, edit: impl FnOnce(&mut Value)) -> String {
        let mut claims = self.claims(user);
        edit(&mut claims);
        self.shared.key.sign(&claims)
    }

    /// A valid token's claims for `user` signed with `key` under `alg` and `kid`.
    pub fn token_signed(&self, user: &str, alg: Algorithm, kid: &str, key: &EncodingKey) -> String {
        sign(alg, kid, key, &self.claims(user))
    }

    /// Who the authorization endpoint signs in from now on.
    pub fn sign_in(&self, who: SignIn) {
        *self.shared.sign_in.lock().unwrap() = Some(who);
    }

    /// [`Issuer::sign_in`] with `user`, `amr` and an ID token lifetime in seconds.
    pub fn sign_in_as(&self, user: &str, amr: &[&str], lifetime: i64) {
        self.sign_in(SignIn { amr: amr.iter().map(|s| s.to_string()).collect(), lifetime, ..SignIn::new(user) });
    }

    /// Token requests refused because the PKCE verifier did not match the challenge.
    pub fn pkce_failures(&self) -> usize {
        self.shared.pkce_failures.load(Ordering::SeqCst)
    }
}

type S = State<Arc<Shared>>;

async fn discovery(State(s): S) -> Json<Value> {
    let url = &s.url;
    Json(json!({
        "issuer": url, "authorization_endpoint": format!("{url}/authorize"),
        "token_endpoint": format!("{url}/token"), "jwks_uri": format!("{url}/jwks"),
        "code_challenge_methods_supported": ["S256"],
    }))
}

async fn jwks(State(s): S) -> Json<Value> {
    s.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    Json(json!({"keys": *s.jwks.lock().unwrap()}))
}

/// Signs in whoever [`Issuer::sign_in`] named at once (no login page) and redirects back with
/// a single-use code bound to the PKCE challenge.
async fn authorize(State(s): S, Query(q): Query<HashMap<String, String>>) -> Response {
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    if get("response_type") != "code" || get("code_challenge_method") != "S256" || get("code_challenge").is_empty() {
        return (StatusCode::BAD_REQUEST, "code flow with PKCE S256 only").into_response();
    }
    let Some(sign_in) = s.sign_in.lock().unwrap().clone() else {
        return (StatusCode::FORBIDDEN, "nobody signs in: call Issuer::sign_in first").into_response();
    };
    let code = uuid::Uuid::new_v4().simple().to_string();
    let pending = Code {
        challenge: get("code_challenge"),
        nonce: get("nonce"),
        redirect_uri: get("redirect_uri"),
        client_id: get("client_id"),
        sign_in,
    };
    s.codes.lock().unwrap().insert(code.clone(), pending);
    let query = serde_urlencoded::to_string([("code", code.as_str()), ("state", get("state").as_str())])
        .expect("encoding the redirect's query");
    Redirect::to(&format!("{}?{query}", get("redirect_uri"))).into_response()
}

async fn token(State(s): S, Form(f): Form<HashMap<String, String>>) -> Response {
    let get = |k: &str| f.get(k).cloned().unwrap_or_default();
    let bad = |e: &str| (StatusCode::BAD_REQUEST, Json(json!({"error": e}))).into_response();
    // Codes are single use.
    let Some(code) = s.codes.lock().unwrap().remove(&get("code")) else { return bad("invalid_grant") };
    if get("grant_type") != "authorization_code"
        || get("redirect_uri") != code.redirect_uri
        || get("client_id") != code.client_id
    {
        return bad("invalid_request");
    }
    if b64url(&sha2::Sha256::digest(get("code_verifier").as_bytes())) != code.challenge {
        s.pkce_failures.fetch_add(1, Ordering::SeqCst);
        return bad("invalid_grant");
    }
    let now = chrono::Utc::now().timestamp();
    let who = &code.sign_in;
    let mut claims = json!({"iss": s.url, "aud": code.client_id, "sub": who.user, "email": who.user,
        "email_verified": true, "iat": now, "exp": now + who.lifetime, "nonce": code.nonce, "amr": who.amr});
    if !s.audiences.is_empty() {
        let mut audiences = vec![code.client_id.clone()];
        audiences.extend(s.audiences.iter().cloned());
        claims["aud"] = json!(audiences);
        claims["azp"] = json!(code.client_id);
    }
    if let Some(extra) = who.extra.as_object() {
        for (k, v) in extra {
            claims[k] = v.clone();
        }
    }
    let id_token = s.key.sign(&claims);
    Json(json!({"access_token": "opaque", "token_type": "Bearer", "id_token": id_token})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn discovery_names_the_endpoints_and_the_jwks_fetches_are_counted() {
        let issuer = Issuer::builder().start().await;
        let (status, body) = fetch(&format!("{}/.well-known/openid-configuration", issuer.url)).await;
        assert_eq!(status, 200);
        let doc: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["issuer"], json!(issuer.url));
        assert_eq!(doc["token_endpoint"], json!(format!("{}/token", issuer.url)));
        let (_, body) = fetch(&format!("{}/jwks", issuer.url)).await;
        let jwks: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(jwks["keys"][0]["kid"], json!(KID));
        assert_eq!(issuer.jwks_fetches(), 1);
    }

    #[tokio::test]
    async fn tokens_carry_the_chosen_claims_and_verify_with_the_published_key() {
        let issuer = Issuer::builder().start().await;
        let token = issuer.token_with("alice@ward7.example", |c| c["groups"] = json!(["ward-7"]));
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(issuer.key().jwk.clone()).unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::ES256);
        validation.set_audience(&[API_AUDIENCE]);
        let data =
            jsonwebtoken::decode::<Value>(&token, &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(), &validation)
                .unwrap();
        assert_eq!(data.claims["groups"], json!(["ward-7"]));
        assert_eq!(data.claims["amr"], json!(["pwd", "otp"]));
        assert_eq!(data.header.kid.as_deref(), Some(KID));
    }

    #[tokio::test]
    async fn the_code_flow_checks_pkce_and_signs_in_whoever_was_named() {
        let issuer = Issuer::builder().also_audience(API_AUDIENCE).signing_in("bob@ward7.example").start().await;
        let verifier = "a-verifier-long-enough-for-the-test-0123456789";
        let challenge = b64url(&sha2::Sha256::digest(verifier.as_bytes()));
        let authorize = |challenge: &str| {
            format!(
                "{}/authorize?response_type=code&client_id=gw&redirect_uri=https://gw/callback&state=s1&nonce=n1\
                 &code_challenge_method=S256&code_challenge={challenge}",
                issuer.url
            )
        };
        let code = |head: &str| {
            let location = head.lines().find_map(|l| l.strip_prefix("location: ")).unwrap().to_owned();
            assert!(location.starts_with("https://gw/callback?code="), "{location}");
            assert!(location.ends_with("&state=s1"), "{location}");
            location["https://gw/callback?code=".len()..].split('&').next().unwrap().to_owned()
        };
        let token = |code: &str, verifier: &str| {
            format!(
                "grant_type=authorization_code&code={code}&redirect_uri=https://gw/callback&client_id=gw&code_verifier={verifier}"
            )
        };

        let (status, head) = fetch(&authorize(&challenge)).await;
        assert_eq!(status, 303);
        let (status, body) = post(&format!("{}/token", issuer.url), &token(&code(&head), verifier)).await;
        assert_eq!(status, 200, "{body}");
        let id_token = serde_json::from_str::<Value>(&body).unwrap()["id_token"].as_str().unwrap().to_owned();
        let payload = id_token.split('.').nth(1).unwrap();
        let claims: Value =
            serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert_eq!(claims["email"], json!("bob@ward7.example"));
        assert_eq!(claims["aud"], json!(["gw", API_AUDIENCE]));
        assert_eq!(claims["azp"], json!("gw"));
        assert_eq!(claims["nonce"], json!("n1"));

        // A wrong verifier is refused and counted; the code is spent either way.
        let (_, head) = fetch(&authorize(&challenge)).await;
        let code = code(&head);
        let (status, _) = post(&format!("{}/token", issuer.url), &token(&code, "wrong")).await;
        assert_eq!(status, 400);
        assert_eq!(issuer.pkce_failures(), 1);
        let (status, _) = post(&format!("{}/token", issuer.url), &token(&code, verifier)).await;
        assert_eq!(status, 400, "a code is single use");

        // Without PKCE there is no code.
        let (status, _) = fetch(&authorize("").replace("&code_challenge_method=S256", "")).await;
        assert_eq!(status, 400);
    }

    /// GET over plain HTTP/1.1 on loopback: status and body (the head for a redirect).
    async fn fetch(url: &str) -> (u16, String) {
        request("GET", url, None).await
    }

    /// POST of a form over plain HTTP/1.1 on loopback: status and body.
    async fn post(url: &str, form: &str) -> (u16, String) {
        request("POST", url, Some(form)).await
    }

    async fn request(method: &str, url: &str, form: Option<&str>) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rest = url.strip_prefix("http://").unwrap();
        let (host, path) = rest.split_once('/').unwrap();
        let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
        let mut req = format!("{method} /{path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n");
        if let Some(form) = form {
            req += &format!(
                "content-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\n\r\n{form}",
                form.len()
            );
        } else {
            req += "\r\n";
        }
        s.write_all(req.as_bytes()).await.unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        let status = text[9..12].parse().unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (status, if status == 303 { head.to_owned() } else { body.to_owned() })
    }
}
