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

use crate::api::tls;

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
}

impl CliError {
    /// Exit codes documented in `docs/analyst.md`: 1 refused by the server, 2 usage,
    /// 3 connection (or a 5xx: the server could not do it now; retry).
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Refused { status, .. } if status.is_server_error() => 3,
            CliError::Refused { .. } => 1,
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
        let url = format!("{}{path}", self.base);
        let mut req = http::Request::builder().method(method).uri(&url).header("accept", "application/json");
        if let Some(token) = &self.token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Bytes::from(serde_json::to_vec(b).map_err(|e| CliError::Usage(e.to_string()))?)
            }
            None => Bytes::new(),
        };
        let req = req.body(Full::new(body)).map_err(|e| CliError::Usage(format!("{url}: {e}")))?;
        let conn = |message: String| CliError::Connection { url: url.clone(), message };
        let response = tokio::time::timeout(Duration::from_secs(30), self.client.request(req))
            .await
            .map_err(|_| conn("no answer within 30 s".into()))?
            .map_err(|e| conn(source_chain(&e)))?;
        let status = response.status();
        let bytes = response.into_body().collect().await.map_err(|e| conn(e.to_string()))?.to_bytes();
        if !status.is_success() {
            let parsed: Option<crate::api::ErrorBody> = serde_json::from_slice(&bytes).ok();
            let (code, message) = match parsed {
                Some(e) => (e.code, e.message),
                None => ("http".into(), String::from_utf8_lossy(&bytes).chars().take(300).collect()),
            };
            return Err(CliError::Refused { status, code, message });
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| conn(format!("the answer is not the JSON expected ({e}); is this a noexit API?")))
    }
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
