//! Where package files come from: the cache directory (only ever holds verified files), an
//! offline snapshot directory, and the upstream CRAN repository (read-through into the
//! cache). One upstream fetch per file however many clients miss it at once.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use md5::Md5;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::index::Index;

/// The index file names, relative to the repository root.
pub const PACKAGES: &str = "src/contrib/PACKAGES";
/// Largest package file the mirror accepts from upstream.
const MAX_FILE: u64 = 2 << 30;
/// Largest decompressed upstream index.
const MAX_INDEX: u64 = 512 << 20;

/// How a downloaded file is checked before anyone sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Digests from the index (at least one present).
    Digest { md5: Option<String>, sha256: Option<String> },
    /// An archived version the index does not list: the gzip stream must be complete and its
    /// CRC must match (catches truncated and corrupted transfers).
    GzipIntact,
}

/// Why a file could not be served. Cloned to every client waiting on the same fetch.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("not in the offline snapshot and no upstream is configured")]
    NotAvailable,
    #[error(
        "not in the index, and only versions the index lists (or spec.egress.mirror.allow pins) are fetched \
         from upstream"
    )]
    NotListed,
    #[error("upstream {url} answered {status}")]
    UpstreamStatus { url: String, status: u16 },
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    #[error("{file} failed verification: {problem}")]
    Corrupt { file: String, problem: String },
    #[error("cache: {0}")]
    Io(String),
}

impl FetchError {
    /// A stable category for metrics and the audit detail.
    pub fn category(&self) -> &'static str {
        match self {
            Self::NotAvailable => "not_available",
            Self::NotListed => "not_listed",
            Self::UpstreamStatus { status: 404, .. } => "upstream_not_found",
            Self::UpstreamStatus { .. } => "upstream_status",
            Self::Unreachable(_) => "upstream_unreachable",
            Self::Corrupt { .. } => "corrupt",
            Self::Io(_) => "io",
        }
    }
}

/// A file ready to serve.
#[derive(Clone, Debug)]
pub struct Located {
    pub path: PathBuf,
    pub len: u64,
    pub modified: SystemTime,
    /// `cache`, `snapshot` or `upstream` (fetched for this request or one it joined).
    pub origin: &'static str,
}

type Flight = Shared<BoxFuture<'static, Result<Located, FetchError>>>;

/// The upstream repository.
pub struct Upstream {
    base: String,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
    /// Connect + response head; and longest pause between body chunks.
    timeout: Duration,
}

/// Why the upstream cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("--upstream {url:?} is not a URL: {message}")]
    BadUrl { url: String, message: String },
    #[error(
        "--upstream {url:?} is not https://: packages and the index would travel unauthenticated and could \
         be swapped on the way (http:// is accepted only on a loopback address with --allow-http-upstream, \
         for development and tests)"
    )]
    NotHttps { url: String },
    #[error("--upstream-ca: {0}")]
    Roots(String),
}

/// `https://`, or `http://` to a loopback host when `allow_http_loopback` (pure).
pub fn check_upstream_url(url: &str, allow_http_loopback: bool) -> Result<(), UpstreamError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| UpstreamError::BadUrl { url: url.into(), message: e.to_string() })?;
    let host = uri.host().unwrap_or_default();
    if host.is_empty() {
        return Err(UpstreamError::BadUrl { url: url.into(), message: "no host".into() });
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback =
        host.eq_ignore_ascii_case("localhost") || bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if allow_http_loopback && loopback => Ok(()),
        _ => Err(UpstreamError::NotHttps { url: url.into() }),
    }
}

impl Upstream {
    /// `ca_pem`: trust these roots instead of the system's (a site's own CRAN mirror).
    pub fn new(
        base: &str,
        timeout: Duration,
        ca_pem: Option<&[u8]>,
        allow_http_loopback: bool,
    ) -> Result<Self, UpstreamError> {
        check_upstream_url(base, allow_http_loopback)?;
        let provider = rustls::crypto::ring::default_provider();
        let builder = match ca_pem {
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in rustls_pemfile::certs(&mut &pem[..]) {
                    let cert = cert.map_err(|e| UpstreamError::Roots(e.to_string()))?;
                    roots.add(cert).map_err(|e| UpstreamError::Roots(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(UpstreamError::Roots("no certificates in the file".into()));
                }
                let config = rustls::ClientConfig::builder_with_provider(provider.into())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| UpstreamError::Roots(e.to_string()))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
            }
            None => hyper_rustls::HttpsConnectorBuilder::new()
                .with_provider_and_native_roots(provider)
                .map_err(|e| UpstreamError::Roots(format!("system roots: {e}")))?,
        };
        let connector = if allow_http_loopback {
            builder.https_or_http().enable_http1().build()
        } else {
            builder.https_only().enable_http1().build()
        };
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
        Ok(Self { base: base.trim_end_matches('/').to_owned(), client, timeout })
    }

    fn url(&self, rel: &str) -> String {
        format!("{}/{rel}", self.base)
    }

    async fn get(&self, rel: &str) -> Result<hyper::Response<hyper::body::Incoming>, FetchError> {
        let url = self.url(rel);
        let uri: http::Uri = url.parse().map_err(|e| FetchError::Unreachable(format!("bad URL {url}: {e}")))?;
        let req = hyper::Request::get(uri)
            .header(http::header::USER_AGENT, "noexit-mirror")
            .body(Empty::new())
            .map_err(|e| FetchError::Unreachable(e.to_string()))?;
        let resp = tokio::time::timeout(self.timeout, self.client.request(req))
            .await
            .map_err(|_| FetchError::Unreachable(format!("{url}: no answer within {:?}", self.timeout)))?
            .map_err(|e| FetchError::Unreachable(format!("{url}: {}", error_chain(&e))))?;
        if resp.status() != http::StatusCode::OK {
            return Err(FetchError::UpstreamStatus { url, status: resp.status().as_u16() });
        }
        Ok(resp)
    }

    /// Start reading the body of `resp`, at most `max` bytes.
    fn download(&self, rel: &str, resp: hyper::Response<hyper::body::Incoming>, max: u64) -> Download {
        let declared =
            resp.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        Download {
            url: self.url(rel),
            rel: rel.to_owned(),
            body: resp.into_body(),
            declared,
            total: 0,
            max,
            timeout: self.timeout,
        }
    }
}

/// An upstream body being read: each chunk within the timeout, the total bounded and
/// checked against Content-Length at the end.
struct Download {
    url: String,
    rel: String,
    body: hyper::body::Incoming,
    declared: Option<u64>,
    total: u64,
    max: u64,
    timeout: Duration,
}

impl Download {
    async fn next(&mut self) -> Result<Option<Bytes>, FetchError> {
        loop {
            let frame = tokio::time::timeout(self.timeout, self.body.frame())
                .await
                .map_err(|_| FetchError::Unreachable(format!("{}: transfer stalled", self.url)))?;
            let Some(frame) = frame else {
                return match self.declared {
                    Some(n) if n != self.total => Err(FetchError::Corrupt {
                        file: self.rel.clone(),
                        problem: format!("got {} of {n} bytes", self.total),
                    }),
                    _ => Ok(None),
                };
            };
            let frame = frame.map_err(|e| FetchError::Unreachable(format!("{}: {}", self.url, error_chain(&e))))?;
            if let Ok(data) = frame.into_data() {
                self.total += data.len() as u64;
                if self.total > self.max {
                    return Err(FetchError::Corrupt {
                        file: self.rel.clone(),
                        problem: format!("larger than {} bytes", self.max),
                    });
                }
                return Ok(Some(data));
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// The current index and where it came from.
#[derive(Clone, Debug)]
pub struct IndexState {
    pub index: Arc<Index>,
    /// Bumped on every change; the server re-renders per-project views when it moves.
    pub generation: u64,
    pub loaded: SystemTime,
}

pub struct Store {
    cache: Option<PathBuf>,
    snapshot: Option<PathBuf>,
    upstream: Option<Upstream>,
    inflight: Mutex<HashMap<String, Flight>>,
    /// Snapshot files already verified, with the (len, mtime) they had then.
    verified: Mutex<HashSet<(PathBuf, u64, SystemTime)>>,
    snapshot_index: Index,
    upstream_index: RwLock<Option<Arc<Index>>>,
    state: RwLock<Arc<IndexState>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: {source}")]
    Index { path: String, source: super::index::IndexError },
    #[error("--upstream needs --cache-dir (downloads are verified and kept there)")]
    UpstreamWithoutCache,
    #[error("give --upstream, --snapshot, or both")]
    NoSource,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.display().to_string(), source }
}

/// Read `dir/src/contrib/PACKAGES` (or `PACKAGES.gz`).
fn read_index_dir(dir: &Path) -> Result<Option<Index>, StoreError> {
    let plain = dir.join(PACKAGES);
    let gz = dir.join(format!("{PACKAGES}.gz"));
    let text = if plain.is_file() {
        std::fs::read_to_string(&plain).map_err(io_err(&plain))?
    } else if gz.is_file() {
        let file = std::fs::File::open(&gz).map_err(io_err(&gz))?;
        let mut text = String::new();
        flate2::read::GzDecoder::new(file).take(MAX_INDEX).read_to_string(&mut text).map_err(io_err(&gz))?;
        text
    } else {
        return Ok(None);
    };
    let path = if plain.is_file() { plain } else { gz };
    Index::parse(&text).map(Some).map_err(|source| StoreError::Index { path: path.display().to_string(), source })
}

impl Store {
    /// Open the sources. Leftover temporary files in the cache (a crash mid-download) are
    /// removed; everything else in the cache was verified before it was renamed in.
    pub fn open(
        cache: Option<PathBuf>,
        snapshot: Option<PathBuf>,
        upstream: Option<Upstream>,
    ) -> Result<Self, StoreError> {
        if upstream.is_some() && cache.is_none() {
            return Err(StoreError::UpstreamWithoutCache);
        }
        if upstream.is_none() && snapshot.is_none() {
            return Err(StoreError::NoSource);
        }
        if let Some(cache) = &cache {
            let tmp = cache.join(".tmp");
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
            }
            std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        let snapshot_index = match &snapshot {
            Some(dir) => read_index_dir(dir)?.unwrap_or_default(),
            None => Index::default(),
        };
        // The last upstream index we saw, so a restart with upstream down still serves.
        let upstream_index = match (&upstream, &cache) {
            (Some(_), Some(cache)) => read_index_dir(cache)?.map(Arc::new),
            _ => None,
        };
        let store = Self {
            cache,
            snapshot,
            upstream,
            inflight: Mutex::new(HashMap::new()),
            verified: Mutex::new(HashSet::new()),
            snapshot_index,
            upstream_index: RwLock::new(upstream_index),
            state: RwLock::new(Arc::new(IndexState {
                index: Arc::default(),
                generation: 0,
                loaded: SystemTime::now(),
            })),
        };
        store.rebuild_index();
        Ok(store)
    }

    pub fn has_upstream(&self) -> bool {
        self.upstream.is_some()
    }

    pub fn index(&self) -> Arc<IndexState> {
        self.state.read().map(|s| s.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    fn rebuild_index(&self) {
        let upstream = self.upstream_index.read().map(|u| u.clone()).unwrap_or(None);
        let merged = match upstream {
            Some(up) => (*up).clone().merged_with(&self.snapshot_index),
            None => self.snapshot_index.clone(),
        };
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        if *state.index != merged {
            *state = Arc::new(IndexState {
                index: Arc::new(merged),
                generation: state.generation + 1,
                loaded: SystemTime::now(),
            });
        }
    }

    /// Fetch the upstream index and, if it parses, keep it (in memory and in the cache).
    /// On failure the previous index stays in service.
    pub async fn refresh_index(&self) -> Result<usize, String> {
        let Some(up) = &self.upstream else { return Ok(0) };
        let rel = format!("{PACKAGES}.gz");
        let resp = up.get(&rel).await.map_err(|e| e.to_string())?;
        let mut gz = Vec::new();
        let mut download = up.download(&rel, resp, MAX_INDEX);
        while let Some(chunk) = download.next().await.map_err(|e| e.to_string())? {
            gz.extend_from_slice(&chunk);
        }
        let mut text = String::new();
        flate2::read::GzDecoder::new(gz.as_slice())
            .take(MAX_INDEX)
            .read_to_string(&mut text)
            .map_err(|e| format!("upstream {rel} does not decompress: {e}"))?;
        let index = Index::parse(&text).map_err(|e| format!("upstream {rel}: {e}"))?;
        let count = index.entries.len();
        if let Some(cache) = &self.cache {
            let target = cache.join(PACKAGES);
            let text = Bytes::from(text);
            if let Err(e) = write_atomically(cache, &target, &text).await {
                tracing::warn!(error = %e, "cannot keep a copy of the upstream index in the cache");
            }
        }
        *self.upstream_index.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(index));
        self.rebuild_index();
        Ok(count)
    }

    /// The verified file at repository path `rel` (`src/contrib/x_1.0.tar.gz`), from the
    /// cache, the snapshot, or upstream.
    ///
    /// `listed`: whether the file is one the index lists (or the policy pins): only those are
    /// fetched from upstream, so a client cannot make the mirror ask upstream for names of
    /// its choosing (a channel out through upstream's logs).
    pub async fn obtain(self: &Arc<Self>, rel: &str, expect: Expect, listed: bool) -> Result<Located, FetchError> {
        if let Some(found) = self.in_cache(rel).await {
            return Ok(found);
        }
        match self.snapshot_file(rel).await {
            Some((found, true)) => return Ok(found),
            // Verify it once, however many ask at the same time.
            Some((_, false)) => {}
            None if self.upstream.is_none() => return Err(FetchError::NotAvailable),
            None if !listed => return Err(FetchError::NotListed),
            None => {}
        }
        let (flight, joined) = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            match inflight.get(rel) {
                Some(f) => (f.clone(), true),
                None => {
                    let this = self.clone();
                    let key = rel.to_owned();
                    // Spawned, so the download finishes (and is cached) even if every client
                    // waiting for it goes away.
                    let task = tokio::spawn(async move {
                        let result = this.produce(&key, &expect).await;
                        this.inflight.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
                        result
                    });
                    let flight = async move { task.await.unwrap_or_else(|e| Err(FetchError::Io(e.to_string()))) }
                        .boxed()
                        .shared();
                    inflight.insert(rel.to_owned(), flight.clone());
                    (flight, false)
                }
            }
        };
        if joined {
            tracing::debug!(file = rel, "joined in-flight fetch");
        }
        flight.await
    }

    async fn in_cache(&self, rel: &str) -> Option<Located> {
        let path = self.cache.as_ref()?.join(rel);
        let meta = tokio::fs::metadata(&path).await.ok()?;
        meta.is_file().then(|| Located {
            len: meta.len(),
            modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            path,
            origin: "cache",
        })
    }

    /// The snapshot's file at `rel`, and whether it was verified already (as it is now:
    /// same length and modification time).
    async fn snapshot_file(&self, rel: &str) -> Option<(Located, bool)> {
        let path = self.snapshot.as_ref()?.join(rel);
        let meta = tokio::fs::metadata(&path).await.ok().filter(|m| m.is_file())?;
        let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        let known =
            self.verified.lock().unwrap_or_else(|p| p.into_inner()).contains(&(path.clone(), meta.len(), modified));
        Some((Located { path, len: meta.len(), modified, origin: "snapshot" }, known))
    }

    /// Cache, else verified snapshot, else upstream. Runs once per file at a time.
    async fn produce(&self, rel: &str, expect: &Expect) -> Result<Located, FetchError> {
        // A fetch that finished between the caller's cache check and this one.
        if let Some(found) = self.in_cache(rel).await {
            return Ok(found);
        }
        if let Some((found, known)) = self.snapshot_file(rel).await {
            if !known {
                let (p, e, r) = (found.path.clone(), expect.clone(), rel.to_owned());
                tokio::task::spawn_blocking(move || verify_file(&p, &e, &r))
                    .await
                    .map_err(|e| FetchError::Io(e.to_string()))?
                    .inspect_err(|e| tracing::error!(file = rel, error = %e, "snapshot file refused"))?;
                self.verified.lock().unwrap_or_else(|p| p.into_inner()).insert((
                    found.path.clone(),
                    found.len,
                    found.modified,
                ));
            }
            return Ok(found);
        }
        self.fetch(rel, expect).await
    }

    /// Download `rel` into a temporary file, verify, sync, rename into the cache.
    async fn fetch(&self, rel: &str, expect: &Expect) -> Result<Located, FetchError> {
        let (Some(up), Some(cache)) = (&self.upstream, &self.cache) else {
            return Err(FetchError::NotAvailable);
        };
        let io = |e: std::io::Error| FetchError::Io(e.to_string());
        let tmp_path = cache.join(".tmp").join(uuid::Uuid::new_v4().to_string());
        let result = async {
            let resp = up.get(rel).await?;
            let mut file = tokio::fs::File::create(&tmp_path).await.map_err(io)?;
            let (mut md5, mut sha) = (Md5::new(), Sha256::new());
            let mut download = up.download(rel, resp, MAX_FILE);
            while let Some(chunk) = download.next().await? {
                md5.update(&chunk);
                sha.update(&chunk);
                file.write_all(&chunk).await.map_err(io)?;
            }
            file.flush().await.map_err(io)?;
            match expect {
                Expect::Digest { md5: want_md5, sha256: want_sha } => {
                    check_digest(rel, "MD5", want_md5.as_deref(), &hex::encode(md5.finalize()))?;
                    check_digest(rel, "SHA256", want_sha.as_deref(), &hex::encode(sha.finalize()))?;
                }
                Expect::GzipIntact => {
                    let (p, r) = (tmp_path.clone(), rel.to_owned());
                    tokio::task::spawn_blocking(move || verify_file(&p, &Expect::GzipIntact, &r))
                        .await
                        .map_err(|e| FetchError::Io(e.to_string()))??;
                }
            }
            file.sync_all().await.map_err(io)?;
            drop(file);
            let target = cache.join(rel);
            if let Some(parent) = target.parent() {
                tokio::fs::create_dir_all(parent).await.map_err(io)?;
            }
            tokio::fs::rename(&tmp_path, &target).await.map_err(io)?;
            sync_dir(target.parent()).await;
            Ok::<_, FetchError>(())
        }
        .await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&tmp_path).await;
            tracing::error!(file = rel, error = %e, "upstream fetch failed; nothing cached");
            return Err(e);
        }
        let mut found =
            self.in_cache(rel).await.ok_or_else(|| FetchError::Io(format!("{rel} vanished from the cache")))?;
        found.origin = "upstream";
        Ok(found)
    }
}

fn check_digest(rel: &str, kind: &str, want: Option<&str>, got: &str) -> Result<(), FetchError> {
    match want {
        Some(want) if want != got => Err(FetchError::Corrupt {
            file: rel.to_owned(),
            problem: format!("{kind} is {got}, the index says {want}"),
        }),
        _ => Ok(()),
    }
}

/// Check a file on disk (blocking).
fn verify_file(path: &Path, expect: &Expect, rel: &str) -> Result<(), FetchError> {
    let io = |e: std::io::Error| FetchError::Io(format!("{}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(io)?;
    match expect {
        Expect::Digest { md5: want_md5, sha256: want_sha } => {
            let (mut md5, mut sha) = (Md5::new(), Sha256::new());
            let mut reader = std::io::BufReader::with_capacity(256 * 1024, file);
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = reader.read(&mut buf).map_err(io)?;
                if n == 0 {
                    break;
                }
                md5.update(&buf[..n]);
                sha.update(&buf[..n]);
            }
            check_digest(rel, "MD5", want_md5.as_deref(), &hex::encode(md5.finalize()))?;
            check_digest(rel, "SHA256", want_sha.as_deref(), &hex::encode(sha.finalize()))
        }
        Expect::GzipIntact => {
            let mut dec = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file));
            std::io::copy(&mut dec, &mut std::io::sink())
                .map(|_| ())
                .map_err(|e| FetchError::Corrupt { file: rel.to_owned(), problem: format!("gzip stream: {e}") })
        }
    }
}

async fn sync_dir(dir: Option<&Path>) {
    if let Some(dir) = dir
        && let Ok(d) = tokio::fs::File::open(dir).await
    {
        let _ = d.sync_all().await;
    }
}

/// Write `bytes` to `target` via a synced temporary file in the cache and a rename.
async fn write_atomically(cache: &Path, target: &Path, bytes: &Bytes) -> std::io::Result<()> {
    let tmp = cache.join(".tmp").join(uuid::Uuid::new_v4().to_string());
    let mut f = tokio::fs::File::create(&tmp).await?;
    f.write_all(bytes).await?;
    f.sync_all().await?;
    drop(f);
    if let Some(parent) = target.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    tokio::fs::rename(&tmp, target).await?;
    sync_dir(target.parent()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_digests_and_gzip_integrity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.tar.gz");
        let gz = super::super::rds::gzip(b"hello package");
        std::fs::write(&path, &gz).unwrap();
        let md5 = hex::encode(Md5::digest(&gz));
        let sha = hex::encode(Sha256::digest(&gz));
        assert!(verify_file(&path, &Expect::Digest { md5: Some(md5.clone()), sha256: Some(sha) }, "f").is_ok());
        let wrong = Expect::Digest { md5: Some("0".repeat(32)), sha256: None };
        let err = verify_file(&path, &wrong, "f").unwrap_err();
        assert!(matches!(err, FetchError::Corrupt { .. }) && err.to_string().contains(&md5), "{err}");
        assert!(verify_file(&path, &Expect::GzipIntact, "f").is_ok());
        std::fs::write(&path, &gz[..gz.len() - 6]).unwrap();
        assert!(matches!(verify_file(&path, &Expect::GzipIntact, "f"), Err(FetchError::Corrupt { .. })));
    }

    #[tokio::test]
    async fn snapshot_serves_verified_files_and_refuses_corrupt_ones() {
        let dir = tempfile::tempdir().unwrap();
        let contrib = dir.path().join("src/contrib");
        std::fs::create_dir_all(&contrib).unwrap();
        let good = super::super::rds::gzip(b"good");
        std::fs::write(contrib.join("aa_1.tar.gz"), &good).unwrap();
        std::fs::write(contrib.join("bb_1.tar.gz"), b"tampered").unwrap();
        let md5 = hex::encode(Md5::digest(&good));
        std::fs::write(
            contrib.join("PACKAGES"),
            format!("Package: aa\nVersion: 1\nMD5sum: {md5}\n\nPackage: bb\nVersion: 1\nMD5sum: {md5}\n"),
        )
        .unwrap();
        let store = Arc::new(Store::open(None, Some(dir.path().into()), None).unwrap());
        assert_eq!(store.index().index.entries.len(), 2);
        let expect = Expect::Digest { md5: Some(md5), sha256: None };
        let a = store.obtain("src/contrib/aa_1.tar.gz", expect.clone(), true).await.unwrap();
        assert_eq!((a.origin, a.len), ("snapshot", good.len() as u64));
        let b = store.obtain("src/contrib/bb_1.tar.gz", expect.clone(), true).await.unwrap_err();
        assert_eq!(b.category(), "corrupt");
        assert_eq!(store.obtain("src/contrib/cc_1.tar.gz", expect, true).await.unwrap_err(), FetchError::NotAvailable);
    }

    #[test]
    fn upstream_needs_a_cache() {
        let up = Upstream::new("http://127.0.0.1:9", Duration::from_secs(1), None, true).unwrap();
        assert!(matches!(Store::open(None, None, Some(up)), Err(StoreError::UpstreamWithoutCache)));
        assert!(matches!(Store::open(None, None, None), Err(StoreError::NoSource)));
    }

    #[test]
    fn upstream_is_https_unless_loopback_http_is_allowed_explicitly() {
        for (url, allow) in [
            ("http://cloud.r-project.org", false),
            ("http://cloud.r-project.org", true),
            ("http://10.0.0.5:8080/cran", true),
            ("http://127.0.0.1:8080", false),
            ("ftp://127.0.0.1/cran", true),
        ] {
            let e = Upstream::new(url, Duration::from_secs(1), None, allow).err().unwrap();
            assert!(matches!(e, UpstreamError::NotHttps { .. }), "{url}: {e}");
            assert!(e.to_string().contains(url) && e.to_string().contains("https://"), "{e}");
        }
        for (url, allow) in [
            ("https://cloud.r-project.org", false),
            ("https://packagemanager.posit.co/cran/2025-01-15", false),
            ("http://127.0.0.1:8080", true),
            ("http://localhost:8080/cran", true),
            ("http://[::1]:8080", true),
        ] {
            assert!(check_upstream_url(url, allow).is_ok(), "{url}");
        }
        assert!(matches!(check_upstream_url("not a url", true), Err(UpstreamError::BadUrl { .. })));
    }

    #[tokio::test]
    async fn unlisted_files_are_never_fetched_from_upstream() {
        // Upstream is a closed port: any attempt would fail as unreachable, not as not listed.
        let cache = tempfile::tempdir().unwrap();
        let up = Upstream::new("http://127.0.0.1:9", Duration::from_secs(1), None, true).unwrap();
        let store = Arc::new(Store::open(Some(cache.path().into()), None, Some(up)).unwrap());
        let rel = "src/contrib/Archive/aa/aa_0.1.tar.gz";
        assert_eq!(store.obtain(rel, Expect::GzipIntact, false).await.unwrap_err(), FetchError::NotListed);
        assert_eq!(store.obtain(rel, Expect::GzipIntact, true).await.unwrap_err().category(), "upstream_unreachable");
    }
}
