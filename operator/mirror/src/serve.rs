//! The HTTP side: attribute each request to a workspace, route it, apply the policy, audit,
//! and stream the answer.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{ACCEPT_RANGES, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, LAST_MODIFIED};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::clients::{ClientId, ClientMap, identity_from_certificate};
use super::conditional::{self, Answer, Validators};
use super::conn::{Busy, IdleTimeout, PerClient};
use super::index::{Rendered, valid_name, valid_version};
use super::policy::{self, PolicyFile};
use super::reload::Watched;
use super::store::{Expect, FetchError, Located, Store};
use noexit_audit::{AuditEvent, AuditSink, Outcome};

pub type Body = BoxBody<Bytes, std::io::Error>;

/// Bytes read from disk per body frame.
const CHUNK: u64 = 256 * 1024;

/// Connection limits.
#[derive(Clone, Debug)]
pub struct Limits {
    pub idle: Duration,
    pub header_read: Duration,
    pub tls_handshake: Duration,
    pub max_connections: usize,
    pub max_per_client: usize,
}

/// What one request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    Health,
    /// `PACKAGES`, `PACKAGES.gz` or `PACKAGES.rds`.
    Index(IndexFile),
    Tarball {
        name: String,
        version: String,
        archived: bool,
    },
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexFile {
    Plain,
    Gz,
    Rds,
}

fn tarball(file: &str) -> Option<(String, String)> {
    let (name, version) = file.strip_suffix(".tar.gz")?.split_once('_')?;
    (valid_name(name) && valid_version(version)).then(|| (name.to_owned(), version.to_owned()))
}

/// Map a request path onto the CRAN layout (pure).
pub fn route(path: &str) -> Route {
    if path == "/healthz" {
        return Route::Health;
    }
    let Some(rest) = path.strip_prefix("/src/contrib/") else { return Route::Unknown };
    match rest {
        "PACKAGES" => return Route::Index(IndexFile::Plain),
        "PACKAGES.gz" => return Route::Index(IndexFile::Gz),
        "PACKAGES.rds" => return Route::Index(IndexFile::Rds),
        _ => {}
    }
    if let Some(archived) = rest.strip_prefix("Archive/") {
        return match archived.split_once('/') {
            Some((dir, file)) => match tarball(file) {
                Some((name, version)) if name == dir => Route::Tarball { name, version, archived: true },
                _ => Route::Unknown,
            },
            None => Route::Unknown,
        };
    }
    match tarball(rest) {
        Some((name, version)) if !rest.contains('/') => Route::Tarball { name, version, archived: false },
        _ => Route::Unknown,
    }
}

/// The client of one connection.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// Workspace named by a verified client certificate.
    pub certified: Option<ClientId>,
}

struct View {
    index_generation: u64,
    policy_generation: u64,
    rendered: Arc<Rendered>,
}

pub struct Mirror {
    pub store: Arc<Store>,
    pub policy: Arc<Watched<PolicyFile>>,
    pub clients: Arc<Watched<ClientMap>>,
    pub audit: Arc<dyn AuditSink>,
    views: Mutex<HashMap<String, View>>,
}

fn text(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    let mut body = message.into();
    body.push('\n');
    let mut resp = Response::new(full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn empty() -> Body {
    full(Bytes::new())
}

impl Mirror {
    pub fn new(
        store: Arc<Store>,
        policy: Arc<Watched<PolicyFile>>,
        clients: Arc<Watched<ClientMap>>,
        audit: Arc<dyn AuditSink>,
    ) -> Self {
        Self { store, policy, clients, audit, views: Mutex::new(HashMap::new()) }
    }

    /// The index files `project` sees, re-rendered only when the index or policy changed.
    fn view(&self, project: &str) -> Arc<Rendered> {
        let index = self.store.index();
        let policy_generation = self.policy.generation();
        let mut views = self.views.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = views.get(project)
            && v.index_generation == index.generation
            && v.policy_generation == policy_generation
        {
            return v.rendered.clone();
        }
        let policy = self.policy.get();
        let rendered = Arc::new(Rendered::new(&index.index.filtered(policy.project(project)), SystemTime::now()));
        views.insert(
            project.to_owned(),
            View { index_generation: index.generation, policy_generation, rendered: rendered.clone() },
        );
        rendered
    }

    async fn record(&self, event: AuditEvent) -> Result<(), String> {
        self.audit.record(event).await.map_err(|e| {
            tracing::error!(error = %e, "audit record failed");
            e.to_string()
        })
    }

    pub async fn handle(&self, req: Request<hyper::body::Incoming>, peer: &Peer) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let route = route(&path);
        if route == Route::Health {
            return text(StatusCode::OK, "ok");
        }
        let clients = self.clients.get();
        let client = peer.certified.as_ref().or_else(|| clients.lookup(peer.addr.ip()));
        let source = || Some(peer.addr.to_string());
        // Entries about a known workspace name its project, so the project's auditor sees them.
        let refuse = |client: Option<&ClientId>, reason: String| AuditEvent {
            actor: client.map_or_else(|| "unknown".to_owned(), |c| format!("workspace:{c}")),
            role: None,
            action: "mirror.request".into(),
            // The path is the client's: keep the record small.
            object: format!("path:{}", truncate(&path, 256)),
            outcome: Outcome::Refused(reason),
            source: source(),
            detail: match client {
                Some(c) => json!({ "method": truncate(req.method().as_str(), 16), "project": c.project }),
                None => json!({ "method": truncate(req.method().as_str(), 16) }),
            },
        };
        let Some(client) = client else {
            tracing::warn!(peer = %peer.addr, path, "request from an unknown client refused");
            let _ = self.record(refuse(None, "unknown client".into())).await;
            return text(StatusCode::FORBIDDEN, "this address is not a known workspace");
        };
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let _ = self
                .record(refuse(Some(client), format!("method {} not allowed", truncate(req.method().as_str(), 16))))
                .await;
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD");
        }
        match route {
            Route::Health => text(StatusCode::OK, "ok"),
            Route::Unknown => {
                let _ = self.record(refuse(Some(client), "not part of the CRAN source layout".into())).await;
                text(StatusCode::NOT_FOUND, "not found: this mirror serves src/contrib only")
            }
            Route::Index(file) => self.serve_index(&req, client, file),
            Route::Tarball { name, version, archived } => {
                let actor = format!("workspace:{client}");
                self.serve_tarball(&req, client, &actor, source(), &name, &version, archived).await
            }
        }
    }

    fn serve_index(&self, req: &Request<hyper::body::Incoming>, client: &ClientId, file: IndexFile) -> Response<Body> {
        let view = self.view(&client.project);
        let (bytes, suffix, content_type) = match file {
            IndexFile::Plain => (view.packages.clone(), "txt", "text/plain; charset=utf-8"),
            IndexFile::Gz => (view.packages_gz.clone(), "gz", "application/gzip"),
            IndexFile::Rds => (view.packages_rds.clone(), "rds", "application/octet-stream"),
        };
        let validators =
            Validators { etag: format!("\"{}-{suffix}\"", view.etag_base), last_modified: view.last_modified };
        let mut resp =
            respond(req.method(), req.headers(), &validators, content_type, bytes.len() as u64, |start, len| {
                let (s, e) = (start as usize, (start + len) as usize);
                full(bytes.slice(s..e))
            });
        // The policy can change at any time; make caches revalidate.
        resp.headers_mut().insert(CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
        resp
    }

    #[allow(clippy::too_many_arguments)]
    async fn serve_tarball(
        &self,
        req: &Request<hyper::body::Incoming>,
        client: &ClientId,
        actor: &str,
        source: Option<String>,
        name: &str,
        version: &str,
        archived: bool,
    ) -> Response<Body> {
        let rel = if archived {
            format!("src/contrib/Archive/{name}/{name}_{version}.tar.gz")
        } else {
            format!("src/contrib/{name}_{version}.tar.gz")
        };
        let event = |outcome: Outcome, mut detail: serde_json::Value| {
            detail["project"] = client.project.clone().into();
            AuditEvent {
                actor: actor.to_owned(),
                role: None,
                action: "mirror.fetch".into(),
                object: format!("package:{name}@{version}"),
                outcome,
                source: source.clone(),
                detail,
            }
        };
        let policy = self.policy.get();
        if let Err(refusal) = policy::decide(policy.project(&client.project), name, version) {
            tracing::info!(workspace = %client, package = name, version, reason = %refusal, "package refused");
            let _ = self.record(event(Outcome::Refused(refusal.to_string()), json!({ "path": rel }))).await;
            return text(StatusCode::FORBIDDEN, format!("refused: {refusal}"));
        }
        let index = self.store.index();
        let entry = index.index.find(name, version);
        let expect = match (entry, archived) {
            (Some(e), _) if e.md5.is_some() || e.sha256.is_some() => {
                Expect::Digest { md5: e.md5.clone(), sha256: e.sha256.clone() }
            }
            (Some(_), _) | (None, true) => Expect::GzipIntact,
            (None, false) => {
                let reason = "not in the index (older versions are under src/contrib/Archive/)";
                let _ = self.record(event(Outcome::Refused(reason.into()), json!({ "path": rel }))).await;
                return text(StatusCode::NOT_FOUND, format!("{name} {version}: {reason}"));
            }
        };
        // Upstream is asked only for what the index lists or an admin pinned: a version string
        // of the client's choosing never reaches it.
        let listed = entry.is_some() || policy::pins(policy.project(&client.project), name, version);
        let located = match self.store.obtain(&rel, expect, listed).await {
            Ok(l) => l,
            Err(e) => {
                let status = match &e {
                    FetchError::NotAvailable
                    | FetchError::NotListed
                    | FetchError::UpstreamStatus { status: 404, .. } => StatusCode::NOT_FOUND,
                    FetchError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
                    _ => StatusCode::BAD_GATEWAY,
                };
                let detail = json!({ "path": rel, "error": e.category(), "status": status.as_u16() });
                let _ = self.record(event(Outcome::Refused(e.to_string()), detail)).await;
                if let FetchError::Io(_) = e {
                    // The cache's own trouble: the detail stays in the log.
                    tracing::error!(file = rel, error = %e, "cache error");
                    return text(status, format!("{name} {version}: the mirror's cache failed; retry later"));
                }
                return text(status, format!("{name} {version}: {e}"));
            }
        };
        let file = match open(&located).await {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(path = %located.path.display(), error = %e, "cannot open a located file");
                return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{name} {version}: the mirror's cache failed"));
            }
        };
        let etag = match entry.and_then(|e| e.md5.as_ref()) {
            Some(md5) => format!("\"md5-{md5}\""),
            None => format!(
                "\"{:x}-{:x}\"",
                located.len,
                located.modified.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
            ),
        };
        let validators = Validators { etag, last_modified: located.modified };
        let resp = respond(req.method(), req.headers(), &validators, "application/gzip", located.len, |start, len| {
            file_body(file.clone(), start, len)
        });
        // Durable before the first byte leaves: a package nobody can account for is never served.
        let detail = json!({
            "path": rel,
            "origin": located.origin,
            "status": resp.status().as_u16(),
            "bytes": resp.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok()),
        });
        if self.record(event(Outcome::Allowed, detail)).await.is_err() {
            // `record` logged the detail; the database's words are not the client's business.
            return text(StatusCode::SERVICE_UNAVAILABLE, "audit log unavailable, not serving; retry later");
        }
        resp
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}

async fn open(located: &Located) -> std::io::Result<Arc<std::fs::File>> {
    let path = located.path.clone();
    tokio::task::spawn_blocking(move || std::fs::File::open(path).map(Arc::new)).await.map_err(std::io::Error::other)?
}

/// Stream `len` bytes of `file` from `start`, one bounded chunk at a time.
fn file_body(file: Arc<std::fs::File>, start: u64, len: u64) -> Body {
    let stream = futures::stream::try_unfold((file, start, len), |(file, offset, left)| async move {
        if left == 0 {
            return Ok(None);
        }
        let n = left.min(CHUNK);
        let f = file.clone();
        let chunk = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; n as usize];
            f.read_exact_at(&mut buf, offset).map(|()| buf)
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(Some((Frame::data(Bytes::from(chunk)), (file, offset + n, left - n))))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

/// Build the response for a representation of `len` bytes: 200, 206, 304 or 416, with
/// validators; `body(start, len)` produces the bytes (not called for HEAD).
fn respond(
    method: &Method,
    headers: &http::HeaderMap,
    v: &Validators,
    content_type: &'static str,
    len: u64,
    body: impl FnOnce(u64, u64) -> Body,
) -> Response<Body> {
    let answer = conditional::answer(headers, v, len);
    let (status, start, count) = match answer {
        Answer::NotModified => (StatusCode::NOT_MODIFIED, 0, 0),
        Answer::Full => (StatusCode::OK, 0, len),
        Answer::Partial { start, end } => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        Answer::RangeNotSatisfiable => (StatusCode::RANGE_NOT_SATISFIABLE, 0, 0),
    };
    let send_body = *method == Method::GET && matches!(status, StatusCode::OK | StatusCode::PARTIAL_CONTENT);
    let mut resp = Response::new(if send_body { body(start, count) } else { empty() });
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    let value = |s: String| http::HeaderValue::from_str(&s).unwrap_or(http::HeaderValue::from_static(""));
    h.insert(ETAG, value(v.etag.clone()));
    h.insert(LAST_MODIFIED, value(conditional::http_date(v.last_modified)));
    h.insert(ACCEPT_RANGES, http::HeaderValue::from_static("bytes"));
    match status {
        StatusCode::OK | StatusCode::PARTIAL_CONTENT => {
            h.insert(CONTENT_TYPE, http::HeaderValue::from_static(content_type));
            h.insert(CONTENT_LENGTH, value(count.to_string()));
            if status == StatusCode::PARTIAL_CONTENT {
                h.insert(CONTENT_RANGE, value(format!("bytes {start}-{}/{len}", start + count - 1)));
            }
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            h.insert(CONTENT_RANGE, value(format!("bytes */{len}")));
        }
        _ => {}
    }
    resp
}

/// Accept connections until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    mirror: Arc<Mirror>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let per_client = PerClient::default();
    tokio::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            () = &mut shutdown => return,
            accepted = noexit_common::serving::accept(&listener) => accepted,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(peer = %addr, "connection limit reached; closing");
            continue;
        };
        let Some(slot) = per_client.acquire(addr.ip(), limits.max_per_client) else {
            tracing::warn!(peer = %addr, "per-client connection limit reached; closing");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (mirror, tls, limits) = (mirror.clone(), tls.clone(), limits.clone());
        tokio::spawn(async move {
            let _held = (permit, slot);
            match tls {
                None => {
                    let peer = Peer { addr, certified: None };
                    let busy = Busy::default();
                    serve_io(IdleTimeout::new(stream, limits.idle, busy.clone()), busy, peer, mirror, &limits).await;
                }
                Some(acceptor) => {
                    let tls_stream = match tokio::time::timeout(limits.tls_handshake, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => return tracing::info!(peer = %addr, error = %e, "TLS handshake failed"),
                        Err(_) => return tracing::info!(peer = %addr, "TLS handshake timed out"),
                    };
                    let certified = tls_stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .and_then(|c| identity_from_certificate(c.as_ref()));
                    let peer = Peer { addr, certified };
                    let busy = Busy::default();
                    serve_io(IdleTimeout::new(tls_stream, limits.idle, busy.clone()), busy, peer, mirror, &limits)
                        .await;
                }
            }
        });
    }
}

async fn serve_io<I>(io: I, busy: Busy, peer: Peer, mirror: Arc<Mirror>, limits: &Limits)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer = Arc::new(peer);
    let service = hyper::service::service_fn(move |req| {
        let (mirror, peer, busy) = (mirror.clone(), peer.clone(), busy.clone());
        async move {
            let _working = busy.enter();
            Ok::<_, Infallible>(mirror.handle(req, &peer).await)
        }
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .keep_alive(true)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, cause = ?std::error::Error::source(&e), "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_only_the_cran_source_layout() {
        assert_eq!(route("/src/contrib/PACKAGES.gz"), Route::Index(IndexFile::Gz));
        assert_eq!(route("/src/contrib/PACKAGES.rds"), Route::Index(IndexFile::Rds));
        assert_eq!(route("/src/contrib/PACKAGES"), Route::Index(IndexFile::Plain));
        assert_eq!(
            route("/src/contrib/data.table_1.15.4.tar.gz"),
            Route::Tarball { name: "data.table".into(), version: "1.15.4".into(), archived: false }
        );
        assert_eq!(
            route("/src/contrib/Archive/dplyr/dplyr_0.8.0-1.tar.gz"),
            Route::Tarball { name: "dplyr".into(), version: "0.8.0-1".into(), archived: true }
        );
        for bad in [
            "/",
            "/src/contrib/",
            "/src/contrib/../etc/passwd",
            "/src/contrib/x/../y_1.tar.gz",
            "/src/contrib/Archive/other/dplyr_1.0.tar.gz",
            "/src/contrib/Archive/dplyr/../../x_1.tar.gz",
            "/src/contrib/dplyr_1.0.zip",
            "/bin/windows/contrib/4.2/PACKAGES",
            "/src/contrib/PACKAGES.xz",
            "/src/contrib/a%2F_1.tar.gz",
        ] {
            assert_eq!(route(bad), Route::Unknown, "{bad}");
        }
        assert_eq!(route("/healthz"), Route::Health);
        assert_eq!(truncate("abcdef", 3), "abc");
        assert_eq!(truncate("ab", 3), "ab");
    }

    #[test]
    fn responses_carry_validators_and_ranges() {
        let v = Validators { etag: "\"e\"".into(), last_modified: SystemTime::UNIX_EPOCH };
        let mut h = http::HeaderMap::new();
        h.insert(http::header::RANGE, "bytes=2-4".parse().unwrap());
        let resp = respond(&Method::GET, &h, &v, "application/gzip", 10, |s, l| full(Bytes::from(format!("{s}+{l}"))));
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(resp.headers()[CONTENT_RANGE], "bytes 2-4/10");
        assert_eq!(resp.headers()[CONTENT_LENGTH], "3");
        assert_eq!(resp.headers()[ETAG], "\"e\"");
        let head = respond(&Method::HEAD, &http::HeaderMap::new(), &v, "application/gzip", 10, |_, _| unreachable!());
        assert_eq!(head.status(), StatusCode::OK);
        assert_eq!(head.headers()[CONTENT_LENGTH], "10");
        h.insert(http::header::RANGE, "bytes=20-".parse().unwrap());
        let resp = respond(&Method::GET, &h, &v, "application/gzip", 10, |_, _| unreachable!());
        assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(resp.headers()[CONTENT_RANGE], "bytes */10");
    }
}
