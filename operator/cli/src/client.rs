//! The CLI's HTTPS client for the control-plane API: bearer token, the CA to trust, JSON in and
//! out, and errors sorted into what a script needs to tell apart (refused vs unreachable).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

pub use noexit_airlock::receipt::FileDigest;

use noexit_api::tls;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The server answered and said no (4xx), or failed (5xx).
    #[error("{status} {code}: {message}")]
    Refused { status: StatusCode, code: String, message: String },
    /// The server could not be reached or spoke no HTTP/TLS we accept.
    #[error("cannot reach {url}: {message}")]
    Connection { url: String, message: String },
    /// Bad local input: flags, files, configuration.
    #[error("{0}")]
    Usage(String),
    /// A check the CLI made itself failed (a receipt that does not vouch for its file).
    #[error("{0}")]
    Verification(String),
}

impl CliError {
    /// Exit codes documented in `docs/analyst.md`: 1 refused by the server, 2 usage,
    /// 3 connection (or a 5xx: the server could not do it now; retry).
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Refused { status, .. } if status.is_server_error() => 3,
            CliError::Refused { .. } | CliError::Verification(_) => 1,
            CliError::Usage(_) => 2,
            CliError::Connection { .. } => 3,
        }
    }
}

type Https = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

pub struct ApiClient {
    base: String,
    token: Option<String>,
    client: Https,
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

impl ApiClient {
    pub fn new(base: &str, token: Option<String>, ca: Option<&Path>) -> Result<Self, CliError> {
        let ca_pem = match ca {
            Some(p) => {
                Some(std::fs::read(p).map_err(|e| CliError::Usage(format!("cannot read --ca {}: {e}", p.display())))?)
            }
            None => None,
        };
        let config = tls::client_config(ca_pem.as_deref(), None).map_err(|e| CliError::Usage(e.to_string()))?;
        let connector =
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config).https_only().enable_http1().build();
        let base = base.trim_end_matches('/').to_owned();
        if !base.starts_with("https://") {
            return Err(CliError::Usage(format!("--api-url {base:?} must start with https://")));
        }
        Ok(Self { base, token, client: Client::builder(TokioExecutor::new()).build(connector) })
    }

    /// Call `path` and decode the JSON answer.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, CliError> {
        let body = match body {
            Some(b) => Some((
                "application/json",
                Bytes::from(serde_json::to_vec(b).map_err(|e| CliError::Usage(e.to_string()))?),
            )),
            None => None,
        };
        self.call_with(method, path, body).await
    }

    /// Send `bytes` as the raw request body (`application/octet-stream`) and decode the JSON
    /// answer.
    pub async fn call_raw<T: DeserializeOwned>(&self, method: Method, path: &str, bytes: Bytes) -> Result<T, CliError> {
        self.call_with(method, path, Some(("application/octet-stream", bytes))).await
    }

    async fn call_with<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Bytes)>,
    ) -> Result<T, CliError> {
        let url = self.url(path);
        let response = self.send(method, path, "application/json", body).await?;
        let bytes = response.into_body().collect().await.map_err(|e| connection(&url, e.to_string()))?.to_bytes();
        serde_json::from_slice(&bytes)
            .map_err(|e| connection(&url, format!("the answer is not the JSON expected ({e}); is this a noexit API?")))
    }

    /// GET `path` and return at most `limit` bytes of the body (more is an error).
    pub async fn get_bytes(&self, path: &str, limit: usize) -> Result<Bytes, CliError> {
        let url = self.url(path);
        let response = self.send(Method::GET, path, "application/octet-stream", None).await?;
        let limited = http_body_util::Limited::new(response.into_body(), limit);
        match limited.collect().await {
            Ok(b) => Ok(b.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                Err(connection(&url, format!("the answer is larger than {limit} bytes")))
            }
            Err(e) => Err(connection(&url, e.to_string())),
        }
    }

    /// GET `path` and copy the body into `out` as it arrives; returns its size and SHA-256.
    pub async fn download(&self, path: &str, out: &mut impl std::io::Write) -> Result<FileDigest, CliError> {
        let url = self.url(path);
        let mut body = self.send(Method::GET, path, "application/octet-stream", None).await?.into_body();
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| connection(&url, format!("download interrupted: {e}")))?;
            if let Ok(data) = frame.into_data() {
                hasher.update(&data);
                size += data.len() as u64;
                out.write_all(&data).map_err(|e| CliError::Usage(format!("cannot write the download: {e}")))?;
            }
        }
        Ok(FileDigest { size, sha256: hex::encode(hasher.finalize()) })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Send a request; a non-2xx answer becomes [`CliError::Refused`] with the API's error.
    async fn send(
        &self,
        method: Method,
        path: &str,
        accept: &str,
        body: Option<(&str, Bytes)>,
    ) -> Result<http::Response<hyper::body::Incoming>, CliError> {
        let url = self.url(path);
        let mut req = http::Request::builder().method(method).uri(&url).header("accept", accept);
        if let Some(token) = &self.token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let body = match body {
            Some((content_type, bytes)) => {
                req = req.header("content-type", content_type);
                bytes
            }
            None => Bytes::new(),
        };
        let req = req.body(Full::new(body)).map_err(|e| CliError::Usage(format!("{url}: {e}")))?;
        let response = tokio::time::timeout(Duration::from_secs(30), self.client.request(req))
            .await
            .map_err(|_| connection(&url, "no answer within 30 s".into()))?
            .map_err(|e| connection(&url, source_chain(&e)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let limited = http_body_util::Limited::new(response.into_body(), 64 * 1024);
        let bytes = limited.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let parsed: Option<noexit_api::ErrorBody> = serde_json::from_slice(&bytes).ok();
        let (code, message) = match parsed {
            Some(e) => (e.code, e.message),
            None => ("http".into(), String::from_utf8_lossy(&bytes).chars().take(300).collect()),
        };
        Err(CliError::Refused { status, code, message })
    }
}

fn connection(url: &str, message: String) -> CliError {
    CliError::Connection { url: url.to_owned(), message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_separate_refusal_usage_and_connection() {
        let refused = |s: u16| CliError::Refused {
            status: StatusCode::from_u16(s).unwrap(),
            code: "x".into(),
            message: String::new(),
        };
        assert_eq!(refused(403).exit_code(), 1);
        assert_eq!(refused(409).exit_code(), 1);
        assert_eq!(refused(503).exit_code(), 3);
        assert_eq!(CliError::Usage("x".into()).exit_code(), 2);
        assert_eq!(CliError::Connection { url: "u".into(), message: "m".into() }.exit_code(), 3);
        assert!(ApiClient::new("http://plain", None, None).is_err());
    }
}
