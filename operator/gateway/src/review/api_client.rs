//! The control-plane API's output endpoints, called as the signed-in person (their ID token,
//! kept in the gateway's session store, as the bearer). The gateway decides nothing here: the
//! API checks who may see, read and decide; the gateway shows what it answers.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use noexit_airlock::checks::Report;
use serde::{Deserialize, Deserializer, Serialize};

use crate::oidc::Bearer;

/// Longest wait for the API.
const TIMEOUT: Duration = Duration::from_secs(15);
/// Largest JSON answer read.
const MAX_JSON: usize = 8 << 20;
/// Largest file content read (the review page shows at most this; bigger files are refused).
pub const MAX_CONTENT: usize = 32 << 20;

/// A reviewer's decision, as the API's paths name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Approve,
    Reject,
    RequestChanges,
}

impl Decision {
    pub const ALL: [Decision; 3] = [Decision::Approve, Decision::Reject, Decision::RequestChanges];

    /// The last path segment of the API endpoint and of the review form's action.
    pub fn path(self) -> &'static str {
        match self {
            Decision::Approve => "approve",
            Decision::Reject => "reject",
            Decision::RequestChanges => "request-changes",
        }
    }

    pub fn parse(s: &str) -> Option<Decision> {
        Decision::ALL.into_iter().find(|d| d.path() == s)
    }

    pub fn label(self) -> &'static str {
        match self {
            Decision::Approve => "Approve",
            Decision::Reject => "Reject",
            Decision::RequestChanges => "Request changes",
        }
    }

    /// A rejection or a request for changes must say why (the API refuses it otherwise too).
    pub fn needs_reason(self) -> bool {
        self != Decision::Approve
    }
}

/// One reviewer's decision on an output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReviewEntry {
    pub reviewer: String,
    pub decision: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub at: Option<String>,
}

/// An output request as `GET /v1/projects/{project}/outputs/{id}` answers it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Output {
    #[serde(deserialize_with = "string_or_number")]
    pub id: String,
    pub workspace: String,
    pub file_name: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub sha256: String,
    pub requester: String,
    pub state: String,
    /// The automatic checks (absent until they ran).
    #[serde(default)]
    pub checks: Option<Report>,
    #[serde(default)]
    pub reviews: Vec<ReviewEntry>,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub updated_at: Option<String>,
}

impl Output {
    /// Reviewers may still decide (the API's `checked` and `inReview`).
    pub fn open_for_review(&self) -> bool {
        matches!(self.state.as_str(), "checked" | "inReview")
    }
}

fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        other => Err(serde::de::Error::custom(format!("output id is neither a string nor a number: {other}"))),
    }
}

/// A list answer: a bare array, or `{"items": [...]}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum OutputList {
    Bare(Vec<Output>),
    Wrapped { items: Vec<Output> },
}

/// What went wrong calling the API, as the page shows it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The API answered with a refusal (its `code` and `message`).
    #[error("the API refused ({status}, {code}): {message}")]
    Refused { status: u16, code: String, message: String },
    #[error("cannot reach the API: {0}")]
    Unavailable(String),
    #[error("the API's answer is not what the gateway expects: {0}")]
    Malformed(String),
}

impl ApiError {
    /// HTTP status the page answers with.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::Refused { status, .. } => *status,
            ApiError::Unavailable(_) | ApiError::Malformed(_) => 502,
        }
    }

    pub fn code(&self) -> &str {
        match self {
            ApiError::Refused { code, .. } => code,
            ApiError::Unavailable(_) => "apiUnavailable",
            ApiError::Malformed(_) => "apiMalformed",
        }
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The API's base URL and an HTTP client for it.
#[derive(Clone)]
pub struct ApiClient {
    base: String,
    client: HttpsClient,
}

/// A path segment, percent-encoded (project names and ids are DNS labels and UUIDs, but a
/// request path carries whatever the browser sent).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl ApiClient {
    /// `base` is `https://api.example` (no trailing slash needed); `ca_pem` is the CA bundle
    /// for its certificate (an `http://` URL needs none: in-cluster plain HTTP, or tests).
    pub fn new(base: &str, ca_pem: Option<&[u8]>) -> Result<Self, String> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up for the API: {e}"))?;
        let mut roots = rustls::RootCertStore::empty();
        if let Some(pem) = ca_pem {
            for cert in rustls_pemfile::certs(&mut &pem[..]) {
                let cert = cert.map_err(|e| format!("API CA: {e}"))?;
                roots.add(cert).map_err(|e| format!("API CA: {e}"))?;
            }
        }
        let tls = builder.with_root_certificates(roots).with_no_client_auth();
        let connector =
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build();
        let base = base.trim_end_matches('/').to_owned();
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            return Err(format!("API URL {base:?} is neither https:// nor http://"));
        }
        Ok(Self { base, client: Client::builder(TokioExecutor::new()).build(connector) })
    }

    async fn call(
        &self,
        method: http::Method,
        path: &str,
        bearer: &Bearer,
        body: Option<serde_json::Value>,
        limit: usize,
    ) -> Result<Bytes, ApiError> {
        let url = format!("{}{path}", self.base);
        let mut req = http::Request::builder()
            .method(method)
            .uri(&url)
            .header(http::header::AUTHORIZATION, format!("Bearer {}", bearer.0))
            .header(http::header::ACCEPT, "application/json");
        let body = match body {
            Some(v) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let req = req.body(body).map_err(|e| ApiError::Unavailable(format!("{url}: {e}")))?;
        let response = tokio::time::timeout(TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| ApiError::Unavailable(format!("{url}: no answer in {}s", TIMEOUT.as_secs())))?
            .map_err(|e| ApiError::Unavailable(format!("{url}: {e}")))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), limit)
            .collect()
            .await
            .map_err(|e| ApiError::Unavailable(format!("{url}: reading the answer: {e}")))?
            .to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) if !b.code.is_empty() || !b.message.is_empty() => (b.code, b.message),
            _ => ("httpError".to_owned(), format!("HTTP {status}")),
        };
        Err(ApiError::Refused { status: status.as_u16(), code, message })
    }

    fn json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
        serde_json::from_slice(bytes).map_err(|e| ApiError::Malformed(e.to_string()))
    }

    /// Outputs of `project`, optionally in one state.
    pub async fn list(&self, bearer: &Bearer, project: &str, state: Option<&str>) -> Result<Vec<Output>, ApiError> {
        let query = state.map(|s| format!("?state={}", segment(s))).unwrap_or_default();
        let path = format!("/v1/projects/{}/outputs{query}", segment(project));
        let bytes = self.call(http::Method::GET, &path, bearer, None, MAX_JSON).await?;
        Ok(match Self::json::<OutputList>(&bytes)? {
            OutputList::Bare(v) | OutputList::Wrapped { items: v } => v,
        })
    }

    pub async fn get(&self, bearer: &Bearer, project: &str, id: &str) -> Result<Output, ApiError> {
        let path = format!("/v1/projects/{}/outputs/{}", segment(project), segment(id));
        Self::json(&self.call(http::Method::GET, &path, bearer, None, MAX_JSON).await?)
    }

    /// The file's bytes (checkers only).
    pub async fn content(&self, bearer: &Bearer, project: &str, id: &str) -> Result<Bytes, ApiError> {
        let path = format!("/v1/projects/{}/outputs/{}/content", segment(project), segment(id));
        self.call(http::Method::GET, &path, bearer, None, MAX_CONTENT).await
    }

    /// Relay a decision; the API checks who may decide and audits it.
    pub async fn decide(
        &self,
        bearer: &Bearer,
        project: &str,
        id: &str,
        decision: Decision,
        reason: &str,
    ) -> Result<(), ApiError> {
        let path = format!("/v1/projects/{}/outputs/{}/{}", segment(project), segment(id), decision.path());
        let body = serde_json::json!({"reason": reason});
        self.call(http::Method::POST, &path, bearer, Some(body), MAX_JSON).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_parse_with_numeric_or_string_ids_and_either_list_shape() {
        let one = serde_json::json!({"id": 7, "workspace": "alice", "fileName": "t.csv", "size": 3, "sha256": "ab",
            "requester": "a@x", "state": "checked", "reviews": [{"reviewer": "b@x", "decision": "approve", "at": "t"}]});
        let o: Output = serde_json::from_value(one.clone()).unwrap();
        assert_eq!((o.id.as_str(), o.reviews.len(), o.open_for_review()), ("7", 1, true));
        for list in [serde_json::json!([one.clone()]), serde_json::json!({"items": [one]})] {
            let (OutputList::Bare(v) | OutputList::Wrapped { items: v }) = serde_json::from_value(list).unwrap();
            assert_eq!(v.len(), 1);
        }
    }

    #[test]
    fn path_segments_cannot_climb() {
        assert_eq!(segment("ward-7"), "ward-7");
        assert_eq!(segment("../x?y#z"), "..%2Fx%3Fy%23z");
        assert_eq!(Decision::parse("request-changes"), Some(Decision::RequestChanges));
        assert_eq!(Decision::parse("approve/"), None);
    }
}
