//! HTTPS client for the control-plane API's agent endpoints, authenticated with the workspace's
//! client certificate (mTLS) and trusting only the control-plane CA from the config.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use noexit_crds::agent::{
    ControlPlane, EventBatch, EventBatchAck, Heartbeat, InboxDelivered, InboxItem, OutboxAck, OutboxManifest,
    OutputDecision,
};
use rand::Rng;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, ReadBuf};
use uuid::Uuid;

pub const EVENTS_PATH: &str = "/v1/agent/events";
pub const HEARTBEAT_PATH: &str = "/v1/agent/heartbeat";
pub const OUTBOX_PATH: &str = "/v1/agent/outbox";
pub const OUTPUTS_PATH: &str = "/v1/agent/outputs";
pub const INBOX_PATH: &str = "/v1/agent/inbox";

const JSON_TIMEOUT: Duration = Duration::from_secs(30);
/// Uploads get longer; a stalled one is retried from the start.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{file}: {problem}")]
    Tls { file: PathBuf, problem: String },
    #[error("control plane {url}: {problem}")]
    Config { url: String, problem: String },
    #[error("{method} {path}: connection failed: {source}")]
    Transport { method: Method, path: String, source: Box<dyn std::error::Error + Send + Sync> },
    #[error("{method} {path}: timed out after {0:?}", timeout)]
    Timeout { method: Method, path: String, timeout: Duration },
    #[error("{method} {path}: the API answered {status}: {body}")]
    Status { method: Method, path: String, status: StatusCode, body: String },
    #[error("{method} {path}: unreadable answer: {problem}")]
    Decode { method: Method, path: String, problem: String },
    #[error("{path}: {source}")]
    File { path: PathBuf, source: io::Error },
}

impl ClientError {
    /// Worth trying again later (network trouble, overload, server errors). A 4xx other than
    /// 408/429 means the request itself is wrong and would fail again.
    pub fn retryable(&self) -> bool {
        match self {
            ClientError::Transport { .. } | ClientError::Timeout { .. } | ClientError::File { .. } => true,
            ClientError::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    || *status == StatusCode::REQUEST_TIMEOUT
            }
            ClientError::Tls { .. } | ClientError::Config { .. } | ClientError::Decode { .. } => false,
        }
    }

    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Fixed label for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            ClientError::Tls { .. } => "tls",
            ClientError::Config { .. } => "config",
            ClientError::Transport { .. } => "transport",
            ClientError::Timeout { .. } => "timeout",
            ClientError::Status { .. } => "status",
            ClientError::Decode { .. } => "decode",
            ClientError::File { .. } => "file",
        }
    }
}

type ReqBody = BoxBody<Bytes, io::Error>;

type Http = Client<HttpsConnector<HttpConnector>, ReqBody>;

#[derive(Clone, Debug)]
pub struct ApiClient {
    base: String,
    control_plane: ControlPlane,
    /// The HTTP client and the state of the files its TLS settings were read from.
    loaded: Arc<std::sync::Mutex<(FilesStamp, Http)>>,
}

/// Modification time and length of the CA, certificate and key files: the operator rotates the
/// certificate before it expires by rewriting them (a mounted Secret is updated in place).
type FilesStamp = Vec<Option<(std::time::SystemTime, u64)>>;

fn files_stamp(cp: &ControlPlane) -> FilesStamp {
    [&cp.ca_file, &cp.cert_file, &cp.key_file]
        .into_iter()
        .map(|f| std::fs::metadata(f).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}

fn http_client(cp: &ControlPlane) -> Result<Http, ClientError> {
    let tls = tls_config(cp)?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_only().enable_http1().build();
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(2)
        .build(connector))
}

impl ApiClient {
    pub fn new(cp: &ControlPlane) -> Result<Self, ClientError> {
        let stamp = files_stamp(cp);
        let http = http_client(cp)?;
        let base = cp.url.trim_end_matches('/').to_owned();
        if !base.starts_with("https://") {
            return Err(ClientError::Config { url: base, problem: "must be https://".into() });
        }
        Ok(Self { base, control_plane: cp.clone(), loaded: Arc::new(std::sync::Mutex::new((stamp, http))) })
    }

    /// The HTTP client, rebuilt first if the certificate, key or CA file changed since it was
    /// made. A half-written rotation (new certificate, old key) keeps the previous client and
    /// is tried again on the next request.
    fn http(&self) -> Http {
        let stamp = files_stamp(&self.control_plane);
        let mut loaded = self.loaded.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if loaded.0 != stamp {
            match http_client(&self.control_plane) {
                Ok(http) => {
                    tracing::info!(cert = %self.control_plane.cert_file.display(), "client certificate reloaded");
                    *loaded = (stamp, http);
                }
                Err(e) => tracing::warn!(error = %e, "changed TLS files not usable yet; keeping the previous ones"),
            }
        }
        loaded.1.clone()
    }

    pub async fn send_events(&self, batch: &EventBatch) -> Result<EventBatchAck, ClientError> {
        self.json(Method::POST, EVENTS_PATH, batch).await
    }

    pub async fn heartbeat(&self, hb: &Heartbeat) -> Result<(), ClientError> {
        let _: serde_json::Value = self.json(Method::POST, HEARTBEAT_PATH, hb).await?;
        Ok(())
    }

    pub async fn submit_manifest(&self, manifest: &OutboxManifest) -> Result<OutboxAck, ClientError> {
        self.json(Method::POST, OUTBOX_PATH, manifest).await
    }

    /// Stream the file as the content of submission `id`. The API checks size and SHA-256
    /// against the manifest, so a file changed since it was scanned is refused.
    /// `file` is an open handle (positioned at the start) the caller has checked: the outbox is
    /// the researcher's, so a path could lead somewhere else by now.
    pub async fn put_content(&self, id: Uuid, file: std::fs::File, size: u64) -> Result<OutboxAck, ClientError> {
        let path = format!("{OUTBOX_PATH}/{id}/content");
        let f = tokio::fs::File::from_std(file);
        let body = FileBody { file: f, buf: vec![0; 64 * 1024].into_boxed_slice(), remaining: size }.boxed();
        let req = self.request(Method::PUT, &path, "application/octet-stream", body)?;
        self.send(Method::PUT, &path, req, UPLOAD_TIMEOUT).await
    }

    /// Decisions on this workspace's output requests.
    pub async fn outputs(&self) -> Result<Vec<OutputDecision>, ClientError> {
        self.get_json(OUTPUTS_PATH).await
    }

    /// Approved ingress files not delivered yet.
    pub async fn inbox(&self) -> Result<Vec<InboxItem>, ClientError> {
        self.get_json(INBOX_PATH).await
    }

    /// The content of inbox item `id`: at most `max` bytes (more is an error, not a truncation).
    pub async fn inbox_content(&self, id: Uuid, max: u64) -> Result<Bytes, ClientError> {
        let path = format!("{INBOX_PATH}/{id}/content");
        let body = Full::new(Bytes::new()).map_err(|never| match never {}).boxed();
        let req = self.request(Method::GET, &path, "application/octet-stream", body)?;
        let (status, body) = self.send_raw(Method::GET, &path, req, UPLOAD_TIMEOUT, max).await?;
        check_status(Method::GET, &path, status, &body)?;
        Ok(body)
    }

    pub async fn inbox_delivered(&self, id: Uuid, delivered: &InboxDelivered) -> Result<(), ClientError> {
        let path = format!("{INBOX_PATH}/{id}/delivered");
        let _: serde_json::Value = self.json(Method::POST, &path, delivered).await?;
        Ok(())
    }

    async fn get_json<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        let body = Full::new(Bytes::new()).map_err(|never| match never {}).boxed();
        let req = self.request(Method::GET, path, "application/json", body)?;
        self.send(Method::GET, path, req, JSON_TIMEOUT).await
    }

    async fn json<T: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &T,
    ) -> Result<R, ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Decode {
            method: method.clone(),
            path: path.into(),
            problem: e.to_string(),
        })?;
        let body = Full::new(Bytes::from(bytes)).map_err(|never| match never {}).boxed();
        let req = self.request(method.clone(), path, "application/json", body)?;
        self.send(method, path, req, JSON_TIMEOUT).await
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: ReqBody,
    ) -> Result<Request<ReqBody>, ClientError> {
        Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(header::CONTENT_TYPE, content_type)
            .header(header::USER_AGENT, concat!("noexit-agent/", env!("CARGO_PKG_VERSION")))
            .body(body)
            .map_err(|e| ClientError::Config { url: self.base.clone(), problem: e.to_string() })
    }

    async fn send<R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        req: Request<ReqBody>,
        timeout: Duration,
    ) -> Result<R, ClientError> {
        let (status, body) = self.send_raw(method.clone(), path, req, timeout, MAX_JSON_ANSWER).await?;
        check_status(method.clone(), path, status, &body)?;
        let body = if body.is_empty() { Bytes::from_static(b"{}") } else { body };
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode {
            method,
            path: path.into(),
            problem: e.to_string(),
        })
    }

    /// Send and read the whole answer, at most `max` bytes of it.
    async fn send_raw(
        &self,
        method: Method,
        path: &str,
        req: Request<ReqBody>,
        timeout: Duration,
        max: u64,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let call = async {
            let resp = self.http().request(req).await.map_err(|e| ClientError::Transport {
                method: method.clone(),
                path: path.into(),
                source: Box::new(e),
            })?;
            let status = resp.status();
            let limit = usize::try_from(max).unwrap_or(usize::MAX);
            let body = http_body_util::Limited::new(resp.into_body(), limit).collect().await.map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    ClientError::Decode {
                        method: method.clone(),
                        path: path.into(),
                        problem: format!("the answer is larger than {max} bytes"),
                    }
                } else {
                    ClientError::Transport { method: method.clone(), path: path.into(), source: e }
                }
            })?;
            Ok::<_, ClientError>((status, body.to_bytes()))
        };
        tokio::time::timeout(timeout, call).await.map_err(|_| ClientError::Timeout {
            method: method.clone(),
            path: path.into(),
            timeout,
        })?
    }
}

/// Largest JSON answer read.
const MAX_JSON_ANSWER: u64 = 16 << 20;

fn check_status(method: Method, path: &str, status: StatusCode, body: &[u8]) -> Result<(), ClientError> {
    if status.is_success() {
        return Ok(());
    }
    let body = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
    Err(ClientError::Status { method, path: path.into(), status, body })
}

fn tls_config(cp: &ControlPlane) -> Result<rustls::ClientConfig, ClientError> {
    let tls_err = |file: &Path, problem: String| ClientError::Tls { file: file.into(), problem };
    let read = |file: &Path| std::fs::read(file).map_err(|e| tls_err(file, format!("cannot read: {e}")));
    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = read(&cp.ca_file)?;
    for cert in rustls_pemfile::certs(&mut ca_pem.as_slice()) {
        let cert = cert.map_err(|e| tls_err(&cp.ca_file, format!("bad PEM: {e}")))?;
        roots.add(cert).map_err(|e| tls_err(&cp.ca_file, format!("bad CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(tls_err(&cp.ca_file, "no CA certificate in the file".into()));
    }
    let cert_pem = read(&cp.cert_file)?;
    let chain = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(&cp.cert_file, format!("bad PEM: {e}")))?;
    if chain.is_empty() {
        return Err(tls_err(&cp.cert_file, "no certificate in the file".into()));
    }
    let key_pem = read(&cp.key_file)?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| tls_err(&cp.key_file, format!("bad PEM: {e}")))?
        .ok_or_else(|| tls_err(&cp.key_file, "no private key in the file".into()))?;
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(&cp.cert_file, e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| tls_err(&cp.key_file, format!("certificate and key do not match: {e}")))
}

/// Streams exactly `remaining` bytes of a file; a file that shrank is an error, not a short body.
struct FileBody {
    file: tokio::fs::File,
    buf: Box<[u8]>,
    remaining: u64,
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let want = this.buf.len().min(usize::try_from(this.remaining).unwrap_or(usize::MAX));
        let mut rb = ReadBuf::new(&mut this.buf[..want]);
        ready!(Pin::new(&mut this.file).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        if n == 0 {
            return Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while uploading"))));
        }
        this.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::copy_from_slice(rb.filled())))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Exponential backoff with jitter: each wait is drawn from the upper half of
/// `min(max, base · 2^attempt)`, so many agents recovering together spread out.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self { base, max, attempt: 0 }
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.base.saturating_mul(1u32 << self.attempt.min(16)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=half)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[3] >= Duration::from_millis(400) && delays[3] <= Duration::from_millis(800));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[7] >= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn missing_tls_files_are_named() {
        let cp = ControlPlane {
            url: "https://api:8443".into(),
            ca_file: "/nonexistent/ca.crt".into(),
            cert_file: "/nonexistent/tls.crt".into(),
            key_file: "/nonexistent/tls.key".into(),
        };
        let e = ApiClient::new(&cp).unwrap_err().to_string();
        assert!(e.starts_with("/nonexistent/ca.crt: cannot read"), "{e}");
    }

    #[test]
    fn only_transient_failures_are_retried() {
        let status = |s: u16| ClientError::Status {
            method: Method::POST,
            path: "/x".into(),
            status: StatusCode::from_u16(s).unwrap(),
            body: String::new(),
        };
        assert!(status(503).retryable());
        assert!(status(429).retryable());
        assert!(!status(400).retryable());
        assert!(!status(409).retryable());
    }
}
