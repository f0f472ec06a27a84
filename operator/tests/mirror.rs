//! `noexit-operator mirror` end to end: real R source packages (`R CMD build`), a fake
//! upstream CRAN (an HTTPS server in this test with its own CA, in its own network namespace
//! for the R test),
//! the real mirror binary, and R in a "workspace" namespace whose only route is the mirror.
//!
//! Needs R (`Rscript`), `curl`; the namespace test also needs root and `ip`. Missing tools
//! skip with a message, unless `NOEXIT_CI=1`, where they fail.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use md5::{Digest, Md5};
use noexit_test_support::netns::{self, End, Netns};
use noexit_test_support::process::{run, run_ok};
use noexit_test_support::{deps, poll};

// ---------------------------------------------------------------------------------------------
// Tools and skipping

/// `true` if the test may run; prints why not, or panics under `NOEXIT_CI=1`.
fn ready(needs_netns: bool) -> bool {
    let mut missing = deps::missing_tools(&["Rscript", "curl"]);
    if needs_netns {
        missing.extend(deps::missing_as_root(&["ip"]));
    }
    deps::ready("mirror test", &missing, "hack/install-deps.sh")
}

// ---------------------------------------------------------------------------------------------
// Real R packages, built once per test binary

struct Repo {
    /// A CRAN layout: `src/contrib/{PACKAGES,PACKAGES.gz,PACKAGES.rds,*.tar.gz}`.
    root: PathBuf,
    md5: HashMap<String, String>,
}

fn skeleton(dir: &Path, name: &str, version: &str, imports: Option<&str>, body: &str, exports: &str) {
    let pkg = dir.join(name);
    std::fs::create_dir_all(pkg.join("R")).unwrap();
    let imports = imports.map(|i| format!("Imports: {i}\n")).unwrap_or_default();
    std::fs::write(
        pkg.join("DESCRIPTION"),
        format!(
            "Package: {name}\nVersion: {version}\nTitle: Test Package {name}\nDescription: A package for the noexit mirror tests.\n\
             Authors@R: person(\"No\", \"Exit\", email = \"noexit@example.org\", role = c(\"aut\", \"cre\"))\n\
             License: MIT + file LICENSE\nEncoding: UTF-8\n{imports}"
        ),
    )
    .unwrap();
    std::fs::write(pkg.join("LICENSE"), "YEAR: 2026\nCOPYRIGHT HOLDER: noexit\n").unwrap();
    std::fs::write(pkg.join("NAMESPACE"), exports).unwrap();
    std::fs::write(pkg.join("R").join(format!("{name}.R")), body).unwrap();
}

fn repo() -> &'static Repo {
    static REPO: OnceLock<Repo> = OnceLock::new();
    REPO.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("mirror-repo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let src = root.join("skeletons");
        let contrib = root.join("src/contrib");
        std::fs::create_dir_all(&contrib).unwrap();
        skeleton(&src, "nxdep", "0.1.0", None, "nxdep_value <- function() 42L\n", "export(nxdep_value)\n");
        skeleton(
            &src,
            "nxallowed",
            "1.0",
            Some("nxdep"),
            "hello <- function() nxdep_value() + 1L\n",
            "importFrom(nxdep, nxdep_value)\nexport(hello)\n",
        );
        skeleton(&src, "nxdenied", "2.0", None, "secret <- function() 1L\n", "export(secret)\n");
        skeleton(&src, "nxcorrupt", "1.0", None, "x <- function() 1L\n", "export(x)\n");
        skeleton(&src, "nxother", "1.0", None, "y <- function() 2L\n", "export(y)\n");
        for pkg in ["nxdep", "nxallowed", "nxdenied", "nxcorrupt", "nxother"] {
            run_ok(
                Command::new("R")
                    .args(["CMD", "build", "--no-manual", "--no-build-vignettes"])
                    .arg(src.join(pkg))
                    .current_dir(&contrib)
                    .env("LANG", "C"),
            );
        }
        // R writes the index (PACKAGES, .gz, .rds) with the MD5sums, as CRAN does.
        run_ok(
            Command::new("Rscript").arg("-e").arg("tools::write_PACKAGES('.', type = 'source')").current_dir(&contrib),
        );
        let mut md5 = HashMap::new();
        for entry in std::fs::read_dir(&contrib).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".tar.gz") {
                md5.insert(name, hex::encode(Md5::digest(std::fs::read(&path).unwrap())));
            }
        }
        // Upstream now serves a tarball that does not match its index entry (same length).
        let corrupt = contrib.join("nxcorrupt_1.0.tar.gz");
        let mut bytes = std::fs::read(&corrupt).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&corrupt, bytes).unwrap();
        Repo { root, md5 }
    })
}

// ---------------------------------------------------------------------------------------------
// The fake upstream: serves the repo, counts requests per path, can hold a path until released

#[derive(Default)]
struct UpstreamState {
    hits: Mutex<HashMap<String, usize>>,
    held: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

struct Upstream {
    addr: SocketAddr,
    tls: bool,
    state: Arc<UpstreamState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The CA of every fake upstream's HTTPS certificate (the mirror gets it as --upstream-ca).
fn upstream_ca() -> &'static noexit_operator::pki::Ca {
    static CA: OnceLock<noexit_operator::pki::Ca> = OnceLock::new();
    CA.get_or_init(|| noexit_operator::pki::Ca::generate("fake upstream CA").unwrap())
}

fn upstream_tls(addr: SocketAddr) -> tokio_rustls::TlsAcceptor {
    let cert = upstream_ca().issue_server(&[addr.ip().to_string()], chrono::Duration::days(1)).unwrap();
    let chain = rustls_pemfile::certs(&mut cert.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
    let key = rustls_pemfile::private_key(&mut cert.key_pem.as_bytes()).unwrap().unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

impl Upstream {
    /// Over HTTPS, with a certificate from [`upstream_ca`].
    fn start(listener: TcpListener, root: PathBuf) -> Self {
        Self::start_tls(listener, root, true)
    }

    /// Plain HTTP (only the refusal of an http:// upstream needs it).
    fn start_plain(listener: TcpListener, root: PathBuf) -> Self {
        Self::start_tls(listener, root, false)
    }

    fn url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }

    fn start_tls(listener: TcpListener, root: PathBuf, tls: bool) -> Self {
        use http_body_util::Full;
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tls.then(|| upstream_tls(addr));
        let state = Arc::new(UpstreamState::default());
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let mut conns = tokio::task::JoinSet::new();
                loop {
                    let (stream, _) = tokio::select! {
                        _ = &mut stopped => break,
                        a = listener.accept() => a.unwrap(),
                    };
                    let (st, root, acceptor) = (st.clone(), root.clone(), acceptor.clone());
                    conns.spawn(async move {
                        let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                            let (st, root) = (st.clone(), root.clone());
                            async move {
                                let path = req.uri().path().trim_start_matches('/').to_owned();
                                *st.hits.lock().unwrap().entry(path.clone()).or_default() += 1;
                                let gate = st.held.lock().unwrap().get(&path).cloned();
                                if let Some(gate) = gate {
                                    let _ = gate.acquire().await.unwrap();
                                }
                                let resp = match std::fs::read(root.join(&path)) {
                                    Ok(b) if !path.contains("..") => {
                                        hyper::Response::new(Full::new(bytes::Bytes::from(b)))
                                    }
                                    _ => {
                                        let mut r = hyper::Response::new(Full::new(bytes::Bytes::from_static(b"no")));
                                        *r.status_mut() = hyper::StatusCode::NOT_FOUND;
                                        r
                                    }
                                };
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        });
                        let http = hyper::server::conn::http1::Builder::new();
                        match acceptor {
                            Some(acceptor) => {
                                let Ok(stream) = acceptor.accept(stream).await else { return };
                                let _ = http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await;
                            }
                            None => {
                                let _ = http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await;
                            }
                        }
                    });
                }
                // Stopping means unreachable: drop the listener and every open connection.
                drop(listener);
                conns.abort_all();
            });
        });
        Self { addr, tls, state, stop: Some(stop), thread: Some(thread) }
    }

    fn hits(&self, path: &str) -> usize {
        self.state.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    fn hold(&self, path: &str) -> Arc<tokio::sync::Semaphore> {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        self.state.held.lock().unwrap().insert(path.to_owned(), gate.clone());
        gate
    }

    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// Network namespaces

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Two namespaces, each joined to the host by a veth pair: `up` (the internet, where the fake
/// upstream lives) and `ws` (the workspace). Neither has a default route: the workspace can
/// reach only the host side of its own link, where the mirror listens.
struct Namespaces {
    up: Netns,
    ws: Netns,
    /// Host side addresses of the links, and the namespace side.
    up_ns: String,
    ws_host: String,
    ws_ns: String,
}

impl Namespaces {
    fn create() -> Self {
        let pid = std::process::id();
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        // Subnets from the pid so concurrent test binaries on one machine do not collide.
        let octet = (pid as usize * 4 + n) % 250 + 1;
        let tag = netns::tag();
        let me = Self {
            up: Netns::new(format!("nxm-up-{tag}")),
            ws: Netns::new(format!("nxm-ws-{tag}")),
            up_ns: format!("10.251.{octet}.2"),
            ws_host: format!("10.252.{octet}.1"),
            ws_ns: format!("10.252.{octet}.2"),
        };
        for (ns, host_if, ns_if, host_ip, ns_ip) in [
            (&me.up, format!("nxu{tag}h"), format!("nxu{tag}n"), &format!("10.251.{octet}.1"), &me.up_ns),
            (&me.ws, format!("nxw{tag}h"), format!("nxw{tag}n"), &me.ws_host, &me.ws_ns),
        ] {
            let (host, inside) = netns::veth(End::Host(&host_if), End::In(ns, &ns_if));
            host.addr(&format!("{host_ip}/30")).up();
            inside.addr(&format!("{ns_ip}/30")).up();
        }
        me
    }
}

// ---------------------------------------------------------------------------------------------
// The mirror under test

struct Mirror {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Mirror {
    fn start(upstream: &str, clients: &[(&str, &str)], policy: &str) -> Self {
        Self::start_with(tempfile::tempdir().unwrap(), upstream, clients, policy, &[])
    }

    /// `extra` flags; with `--tls-cert`, health is checked over HTTPS (`dir/ca.pem`).
    fn start_with(
        dir: tempfile::TempDir,
        upstream: &str,
        clients: &[(&str, &str)],
        policy: &str,
        extra: &[String],
    ) -> Self {
        let tls = extra.iter().any(|a| a == "--tls-cert");
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        std::fs::write(dir.path().join("policy.yaml"), policy).unwrap();
        let clients: String = clients.iter().map(|(a, w)| format!("  {a}: {w}\n")).collect();
        std::fs::write(dir.path().join("clients.yaml"), format!("clients:\n{clients}")).unwrap();
        let log = std::fs::File::create(dir.path().join("mirror.log")).unwrap();
        let ca = dir.path().join("upstream-ca.pem");
        std::fs::write(&ca, upstream_ca().cert_pem()).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_noexit-operator"))
            .args(["mirror", "--listen", &format!("0.0.0.0:{port}"), "--upstream", upstream])
            .args(if upstream.starts_with("https://") {
                vec!["--upstream-ca".into(), ca.into_os_string()]
            } else {
                vec![]
            })
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .arg("--policy")
            .arg(dir.path().join("policy.yaml"))
            .arg("--clients")
            .arg(dir.path().join("clients.yaml"))
            .args(if extra.iter().any(|a| a == "--database-url") {
                vec![]
            } else {
                vec!["--audit-file".into(), dir.path().join("audit.jsonl").into_os_string()]
            })
            .args(["--reload-secs", "1", "--upstream-timeout-secs", "5"])
            .args(extra)
            .env("RUST_LOG", "info,noexit_mirror=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut me = Self { child, port, dir };
        poll::blocking("the mirror to answer /healthz", Duration::from_secs(30), || {
            if let Ok(Some(status)) = me.child.try_wait() {
                panic!("mirror exited with {status}:\n{}", me.log());
            }
            if tls {
                let out = run(Command::new("curl")
                    .arg("-sf")
                    .arg("--cacert")
                    .arg(me.dir.path().join("ca.pem"))
                    .arg(format!("https://127.0.0.1:{}/healthz", me.port)));
                out.status.success().then_some(())
            } else {
                get(me.addr(), "/healthz", &[]).ok().filter(|r| r.status == 200).map(|_| ())
            }
        });
        me
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mirror.log")).unwrap_or_default()
    }

    fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    fn write(&self, file: &str, text: &str) {
        let tmp = self.dir.path().join(format!("{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, self.dir.path().join(file)).unwrap();
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// A small HTTP/1.1 client (one request per connection)

struct Resp {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or(std::io::ErrorKind::InvalidData)?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Resp { status, headers, body: raw[split + 4..].to_vec() })
}

fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> std::io::Result<Resp> {
    request(addr, "GET", path, headers)
}

fn text(r: &Resp) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

/// `allowed` or `refused` of an audit line.
fn outcome(e: &serde_json::Value) -> &str {
    e["outcome"]["outcome"].as_str().unwrap_or_default()
}

const POLICY: &str = "projects:\n  ward-7:\n    deny: [{name: nxdenied}]\n";

/// The mirror and upstream on the host, clients on 127.0.0.1 (no namespaces, no root).
fn host_world(policy: &str) -> (Upstream, Mirror) {
    let repo = repo();
    let upstream = Upstream::start(TcpListener::bind("127.0.0.1:0").unwrap(), repo.root.clone());
    let mirror = Mirror::start(&upstream.url(), &[("127.0.0.1", "ward-7/host")], policy);
    (upstream, mirror)
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn r_in_a_workspace_namespace_installs_allowed_packages_only_through_the_mirror() {
    if !ready(true) {
        return;
    }
    let repo = repo();
    let net = Namespaces::create();
    let up_addr = format!("{}:0", net.up_ns);
    let upstream = Upstream::start(net.up.enter(move || TcpListener::bind(up_addr).unwrap()), repo.root.clone());
    let upstream_url = upstream.url();
    let mirror = Mirror::start(&upstream_url, &[(&net.ws_ns, "ward-7/alice")], POLICY);
    let mirror_url = format!("http://{}:{}", net.ws_host, mirror.port);
    let lib = mirror.dir.path().join("rlib");
    std::fs::create_dir_all(&lib).unwrap();
    let rscript = |code: &str| {
        let out = run(net
            .ws
            .exec(["env", "-u", "http_proxy", "-u", "https_proxy", "LANG=C", "Rscript", "-e", code])
            .env("HOME", mirror.dir.path()));
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    let setup = format!(
        "options(repos = c(CRAN = '{mirror_url}')); lib <- '{}'; .libPaths(c(lib, .libPaths()));",
        lib.display()
    );

    // Allowed: installs with its dependency, and loads.
    let (ok, out) = rscript(&format!(
        "{setup} install.packages('nxallowed', lib = lib); library(nxallowed); cat('HELLO', hello(), '\\n')"
    ));
    assert!(ok && out.contains("HELLO 43"), "install of nxallowed failed:\n{out}\n{}", mirror.log());

    // Denied: the index the workspace sees does not list it, so R reports it as unavailable.
    let (_, out) = rscript(&format!("{setup} install.packages('nxdenied', lib = lib)"));
    assert!(out.contains("package 'nxdenied' is not available"), "{out}");
    assert!(!lib.join("nxdenied").exists());
    let (_, out) = rscript(&format!("{setup} cat('AVAIL', rownames(available.packages()), '\\n')"));
    assert!(out.contains("AVAIL") && out.contains("nxallowed") && !out.contains("nxdenied"), "{out}");

    // Asking for the tarball directly is refused and audited.
    let curl = |ns: &Netns, url: &str| {
        let out = run(&mut ns.exec(["curl", "-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}", url]));
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, _) = curl(&net.ws, &format!("{mirror_url}/src/contrib/nxdenied_2.0.tar.gz"));
    assert_eq!(code, "403");

    // The upstream itself is out of reach from the workspace.
    let (code, err) = curl(&net.ws, &format!("{upstream_url}/src/contrib/PACKAGES"));
    assert_eq!(code, "000", "the workspace reached the upstream directly: {err}");
    assert!(err.contains("unreachable") || err.contains("connect"), "{err}");

    let audit = mirror.audit();
    let fetched = |object: &str| {
        audit.iter().any(|e| {
            e["action"] == "mirror.fetch"
                && e["object"] == object
                && outcome(e) == "allowed"
                && e["actor"] == "workspace:ward-7/alice"
        })
    };
    assert!(fetched("package:nxallowed@1.0") && fetched("package:nxdep@0.1.0"), "{audit:#?}");
    assert!(audit.iter().any(|e| e["object"] == "package:nxdenied@2.0" && outcome(e) == "refused"), "{audit:#?}");
    assert_eq!(upstream.hits("src/contrib/nxdenied_2.0.tar.gz"), 0, "a denied package is never fetched");
}

#[test]
fn corrupt_upstream_tarball_is_never_served_or_cached() {
    if !ready(false) {
        return;
    }
    let (upstream, mirror) = host_world(POLICY);
    for _ in 0..2 {
        let r = get(mirror.addr(), "/src/contrib/nxcorrupt_1.0.tar.gz", &[]).unwrap();
        assert_eq!(r.status, 502, "{}", text(&r));
        assert!(text(&r).contains("failed verification") && text(&r).contains("MD5"), "{}", text(&r));
    }
    assert_eq!(upstream.hits("src/contrib/nxcorrupt_1.0.tar.gz"), 2, "not cached: fetched again");
    assert!(!mirror.cache().join("src/contrib/nxcorrupt_1.0.tar.gz").exists());
    let leftovers = std::fs::read_dir(mirror.cache().join(".tmp")).unwrap().count();
    assert_eq!(leftovers, 0, "temporary download removed");
    let audit = mirror.audit();
    let refusals: Vec<_> = audit.iter().filter(|e| e["object"] == "package:nxcorrupt@1.0").collect();
    assert_eq!(refusals.len(), 2);
    assert!(refusals.iter().all(|e| outcome(e) == "refused" && e["detail"]["error"] == "corrupt"), "{refusals:#?}");
    assert!(mirror.log().contains("upstream fetch failed"), "{}", mirror.log());
}

#[test]
fn concurrent_misses_make_exactly_one_upstream_fetch() {
    if !ready(false) {
        return;
    }
    let (upstream, mirror) = host_world(POLICY);
    let path = "src/contrib/nxdep_0.1.0.tar.gz";
    let gate = upstream.hold(path);
    let addr = mirror.addr();
    let clients: Vec<_> =
        (0..20).map(|_| std::thread::spawn(move || get(addr, &format!("/{path}"), &[]).unwrap())).collect();
    // Hold upstream until 19 requests have joined the first one's fetch.
    poll::blocking("19 requests joined the in-flight fetch", Duration::from_secs(30), || {
        (mirror.log().matches("joined in-flight fetch").count() >= 19).then_some(())
    });
    gate.add_permits(1000);
    let want = &repo().md5["nxdep_0.1.0.tar.gz"];
    for c in clients {
        let r = c.join().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(&hex::encode(Md5::digest(&r.body)), want);
    }
    assert_eq!(upstream.hits(path), 1);
    let served =
        mirror.audit().iter().filter(|e| e["object"] == "package:nxdep@0.1.0" && outcome(e) == "allowed").count();
    assert_eq!(served, 20, "every request is audited");
}

#[test]
fn upstream_down_cached_content_still_served_and_misses_get_502() {
    if !ready(false) {
        return;
    }
    let (mut upstream, mirror) = host_world(POLICY);
    let r = get(mirror.addr(), "/src/contrib/nxdep_0.1.0.tar.gz", &[]).unwrap();
    assert_eq!(r.status, 200);
    upstream.stop();
    let r = get(mirror.addr(), "/src/contrib/nxdep_0.1.0.tar.gz", &[]).unwrap();
    assert_eq!(r.status, 200, "cached content keeps serving");
    assert_eq!(&hex::encode(Md5::digest(&r.body)), &repo().md5["nxdep_0.1.0.tar.gz"]);
    let r = get(mirror.addr(), "/src/contrib/PACKAGES.gz", &[]).unwrap();
    assert_eq!(r.status, 200, "index keeps serving");
    let r = get(mirror.addr(), "/src/contrib/nxother_1.0.tar.gz", &[]).unwrap();
    assert_eq!(r.status, 502);
    assert!(text(&r).contains("upstream unreachable"), "{}", text(&r));
}

#[test]
fn http_semantics_index_views_and_attribution() {
    if !ready(false) {
        return;
    }
    let (_upstream, mirror) = host_world(POLICY);
    let a = mirror.addr();
    let path = "/src/contrib/nxallowed_1.0.tar.gz";
    let full = get(a, path, &[]).unwrap();
    assert_eq!(full.status, 200);
    let etag = full.headers["etag"].clone();
    let last_modified = full.headers["last-modified"].clone();
    assert_eq!(etag, format!("\"md5-{}\"", repo().md5["nxallowed_1.0.tar.gz"]));

    let head = request(a, "HEAD", path, &[]).unwrap();
    assert_eq!((head.status, head.body.len()), (200, 0));
    assert_eq!(head.headers["content-length"], full.body.len().to_string());

    let part = get(a, path, &[("Range", "bytes=10-19")]).unwrap();
    assert_eq!(part.status, 206);
    assert_eq!(part.body, full.body[10..20]);
    assert_eq!(part.headers["content-range"], format!("bytes 10-19/{}", full.body.len()));
    let stale = get(a, path, &[("Range", "bytes=10-19"), ("If-Range", "\"md5-old\"")]).unwrap();
    assert_eq!((stale.status, stale.body.len()), (200, full.body.len()));
    assert_eq!(get(a, path, &[("Range", "bytes=999999-")]).unwrap().status, 416);
    assert_eq!(get(a, path, &[("If-None-Match", &etag)]).unwrap().status, 304);
    assert_eq!(get(a, path, &[("If-Modified-Since", &last_modified)]).unwrap().status, 304);

    // The index is this project's view, in all three forms R reads.
    let plain = text(&get(a, "/src/contrib/PACKAGES", &[]).unwrap());
    assert!(plain.contains("Package: nxallowed") && !plain.contains("nxdenied"), "{plain}");
    let rds = get(a, "/src/contrib/PACKAGES.rds", &[]).unwrap();
    assert_eq!(rds.status, 200);
    let rds_file = mirror.dir.path().join("PACKAGES.rds");
    std::fs::write(&rds_file, &rds.body).unwrap();
    let out = run_ok(Command::new("Rscript").arg("-e").arg(format!(
        "m <- readRDS('{}'); stopifnot(is.character(m), is.matrix(m)); cat(sort(m[, 'Package']), m[m[, 'Package'] == 'nxallowed', 'Imports'], sep = ' ')",
        rds_file.display()
    )));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "nxallowed nxcorrupt nxdep nxother nxdep");
    let gz = get(a, "/src/contrib/PACKAGES.gz", &[]).unwrap();
    let mut unzipped = String::new();
    flate2::read::GzDecoder::new(gz.body.as_slice()).read_to_string(&mut unzipped).unwrap();
    assert_eq!(unzipped, plain);
    let gz_etag = gz.headers["etag"].clone();
    assert_eq!(get(a, "/src/contrib/PACKAGES.gz", &[("If-None-Match", &gz_etag)]).unwrap().status, 304);

    // Anything outside the layout: 404, audited.
    assert_eq!(get(a, "/bin/windows/contrib/4.2/PACKAGES", &[]).unwrap().status, 404);
    assert_eq!(request(a, "POST", "/src/contrib/PACKAGES", &[]).unwrap().status, 405);
    // A client the operator did not map: 403, audited.
    let out = run(Command::new("curl").args([
        "-sS",
        "--interface",
        "127.0.0.2",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://{a}/src/contrib/PACKAGES.gz"),
    ]));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
    let audit = mirror.audit();
    let refused = |actor: &str, reason: &str| {
        audit.iter().any(|e| {
            e["actor"] == actor
                && outcome(e) == "refused"
                && e["outcome"]["reason"].as_str().is_some_and(|r| r.contains(reason))
        })
    };
    assert!(refused("workspace:ward-7/host", "not part of the CRAN source layout"), "{audit:#?}");
    assert!(refused("workspace:ward-7/host", "method POST"), "{audit:#?}");
    assert!(refused("unknown", "unknown client"), "{audit:#?}");
}

#[test]
fn policy_and_clients_reload_and_policy_check() {
    if !ready(false) {
        return;
    }
    let (_upstream, mirror) = host_world(POLICY);
    let a = mirror.addr();
    let listed =
        |name: &str| text(&get(a, "/src/contrib/PACKAGES", &[]).unwrap()).contains(&format!("Package: {name}\n"));
    assert!(listed("nxallowed"));
    mirror.write("policy.yaml", "projects:\n  ward-7:\n    deny: [{name: nxdenied}, {name: nxallowed}]\n");
    poll::blocking("the new policy to hide nxallowed", Duration::from_secs(20), || {
        (!listed("nxallowed")).then_some(())
    });
    assert_eq!(get(a, "/src/contrib/nxallowed_1.0.tar.gz", &[]).unwrap().status, 403);
    // A broken edit keeps the previous policy.
    mirror.write("policy.yaml", "projects: [not, a, map]\n");
    poll::blocking("the mirror to reject the broken policy", Duration::from_secs(20), || {
        mirror.log().contains("invalid; keeping the previous version").then_some(())
    });
    assert!(!listed("nxallowed") && listed("nxdep"));
    // Moving the workspace away from this address: refused from then on.
    mirror.write("clients.yaml", "clients:\n  10.9.9.9: ward-7/host\n");
    poll::blocking("the clients reload", Duration::from_secs(20), || {
        (get(a, "/src/contrib/PACKAGES", &[]).unwrap().status == 403).then_some(())
    });

    // --check-policy: nxallowed is allowed but its dependency nxdep is not.
    let policy = mirror.dir.path().join("check.yaml");
    std::fs::write(&policy, "projects:\n  ward-7:\n    allow: [{name: nxallowed}]\n").unwrap();
    let out = run(Command::new(env!("CARGO_BIN_EXE_noexit-operator"))
        .args(["mirror", "--check-policy", "--snapshot"])
        .arg(&repo().root)
        .arg("--policy")
        .arg(&policy));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        stdout.contains("project ward-7: nxallowed 1.0 needs nxdep, which the project's mirror policy does not allow"),
        "{stdout}"
    );
}

#[test]
fn client_certificates_from_the_operator_ca_name_the_workspace() {
    if !ready(false) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = noexit_operator::pki::Ca::generate("noexit test CA").unwrap();
    let server = ca.issue_server(&["localhost".into(), "127.0.0.1".into()], chrono::Duration::days(1)).unwrap();
    let ws = noexit_crds::agent::WorkspaceIdentity { project: "ward-7".into(), name: "alice-vm".into() };
    let client = ca.issue_workspace_client(&ws, chrono::Duration::days(1)).unwrap();
    let other_ca = noexit_operator::pki::Ca::generate("someone else").unwrap();
    let forged = other_ca.issue_workspace_client(&ws, chrono::Duration::days(1)).unwrap();
    let files = [
        ("ca.pem", ca.cert_pem()),
        ("server.pem", server.cert_pem.as_str()),
        ("server.key", server.key_pem.as_str()),
        ("client.pem", client.cert_pem.as_str()),
        ("client.key", client.key_pem.as_str()),
        ("forged.pem", forged.cert_pem.as_str()),
        ("forged.key", forged.key_pem.as_str()),
    ];
    for (name, pem) in files {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    let root = dir.path().to_owned();
    let path = |f: &str| root.join(f).display().to_string();
    let extra = [
        "--tls-cert".into(),
        path("server.pem"),
        "--tls-key".into(),
        path("server.key"),
        "--client-ca".into(),
        path("ca.pem"),
    ];
    let upstream = Upstream::start(TcpListener::bind("127.0.0.1:0").unwrap(), repo().root.clone());
    // No address is mapped: only the certificate can name the workspace.
    let mirror = Mirror::start_with(dir, &upstream.url(), &[], POLICY, &extra);
    let url = format!("https://127.0.0.1:{}/src/contrib/nxdep_0.1.0.tar.gz", mirror.port);
    let curl = |cert: Option<&str>| {
        let mut c = Command::new("curl");
        c.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", &path("ca.pem")]);
        if let Some(name) = cert {
            c.args(["--cert", &path(&format!("{name}.pem")), "--key", &path(&format!("{name}.key"))]);
        }
        String::from_utf8_lossy(&run(c.arg(&url)).stdout).into_owned()
    };
    assert_eq!(curl(Some("client")), "200");
    assert_eq!(curl(None), "403", "no certificate and an unmapped address");
    assert_ne!(curl(Some("forged")), "200", "a certificate from another CA is refused");
    let audit = mirror.audit();
    assert!(
        audit.iter().any(|e| e["actor"] == "workspace:ward-7/alice-vm"
            && e["object"] == "package:nxdep@0.1.0"
            && outcome(e) == "allowed"),
        "{audit:#?}"
    );
    assert!(audit.iter().any(|e| e["actor"] == "unknown" && outcome(e) == "refused"), "{audit:#?}");
}

#[test]
fn stalled_clients_are_cut_off_and_do_not_starve_others() {
    if !ready(false) {
        return;
    }
    // A snapshot with one large package (larger than the socket buffers can hide).
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("snapshot");
    let contrib = snapshot.join("src/contrib");
    std::fs::create_dir_all(&contrib).unwrap();
    let big: Vec<u8> = (0..16u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(contrib.join("nxbig_1.0.tar.gz"), &big).unwrap();
    let md5 = hex::encode(Md5::digest(&big));
    std::fs::write(contrib.join("PACKAGES"), format!("Package: nxbig\nVersion: 1.0\nMD5sum: {md5}\n")).unwrap();
    let extra = ["--snapshot".into(), snapshot.display().to_string(), "--idle-timeout-secs".into(), "2".into()];
    let upstream = Upstream::start(TcpListener::bind("127.0.0.1:0").unwrap(), repo().root.clone());
    let mirror = Mirror::start_with(dir, &upstream.url(), &[("127.0.0.1", "ward-7/host")], POLICY, &extra);

    // Ten clients ask for the big file and never read.
    let stalled: Vec<TcpStream> = (0..10)
        .map(|_| {
            let mut s = TcpStream::connect(mirror.addr()).unwrap();
            s.write_all(b"GET /src/contrib/nxbig_1.0.tar.gz HTTP/1.1\r\nHost: m\r\n\r\n").unwrap();
            s
        })
        .collect();
    // Everyone else is served meanwhile.
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(get(mirror.addr(), "/src/contrib/PACKAGES.gz", &[]).unwrap().status, 200);
    }
    assert!(started.elapsed() < Duration::from_secs(5), "served while others stall: {:?}", started.elapsed());
    // The stalled connections are closed after the idle timeout, their transfers unfinished.
    poll::blocking("the mirror to close the stalled connections", Duration::from_secs(30), || {
        (mirror.log().matches("connection ended with an error").count() >= 10).then_some(())
    });
    for mut s in stalled {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        assert!(got.len() < big.len(), "a stalled client got the whole file");
    }
}

#[test]
fn fetches_are_recorded_in_the_shared_tamper_evident_log() {
    if !ready(false) {
        return;
    }
    let repo = repo();
    let upstream = Upstream::start(TcpListener::bind("127.0.0.1:0").unwrap(), repo.root.clone());
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("noexit.db").display());
    let (key, public) = (dir.path().join("mirror.pem"), dir.path().join("mirror.pub"));
    let mirror_key = noexit_operator::audit::keys::write_key_pair(&key, &public).unwrap();
    let mirror = Mirror::start_with(
        dir,
        &upstream.url(),
        &[("127.0.0.1", "ward-7/host")],
        POLICY,
        &["--database-url".into(), url.clone(), "--audit-key".into(), key.display().to_string()],
    );
    assert_eq!(get(mirror.addr(), "/src/contrib/nxdep_0.1.0.tar.gz", &[]).unwrap().status, 200);
    assert_eq!(get(mirror.addr(), "/src/contrib/nxdenied_2.0.tar.gz", &[]).unwrap().status, 403);

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = rt.block_on(noexit_operator::audit::Store::open_read_only(&url)).unwrap();
    let entries = poll::blocking("both fetches in the audit log", Duration::from_secs(10), || {
        let entries = rt.block_on(store.tail(100)).unwrap();
        let has = |object: &str, refused: bool| {
            entries.iter().any(|e| {
                e.event.object == object
                    && e.event.actor == "workspace:ward-7/host"
                    && matches!(e.event.outcome, noexit_operator::audit::Outcome::Refused(_)) == refused
            })
        };
        (has("package:nxdep@0.1.0", false) && has("package:nxdenied@2.0", true)).then_some(entries)
    });
    assert!(entries.iter().all(|e| e.event.action.starts_with("mirror.")), "{entries:?}");
    // Each entry names its writer and project, so the project's auditor sees it.
    assert!(entries.iter().all(|e| e.writer.as_deref() == Some("mirror")), "{entries:?}");
    let q = noexit_operator::api::AuditQuery { project: "ward-7".into(), ..Default::default() };
    assert!(entries.iter().all(|e| q.matches(&e.event)), "{entries:?}");
    let mut writers = noexit_operator::audit::writers::WriterKeys::new();
    writers.add("mirror", mirror_key);
    let options = noexit_operator::audit::verify::VerifyOptions { writers: Some(writers), ..Default::default() };
    let report = rt.block_on(noexit_operator::audit::verify::verify(&store, &options)).unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.entries_authenticated, report.entries, "{report:?}");
}

#[test]
fn unlisted_versions_are_404_without_any_upstream_request() {
    if !ready(false) {
        return;
    }
    // nxother 0.9 is pinned by the policy: an admin chose it, so upstream may be asked.
    let policy = "projects:\n  ward-7:\n    allow: [{name: nxdep}, {name: nxother, versions: [\"1.0\", \"0.9\"]}]\n";
    let (upstream, mirror) = host_world(policy);
    let cases = [
        // Archived versions the index does not list: a channel out through upstream's logs.
        ("/src/contrib/Archive/nxdep/nxdep_0.0.1.tar.gz", "src/contrib/Archive/nxdep/nxdep_0.0.1.tar.gz"),
        ("/src/contrib/Archive/nxdep/nxdep_31337.0.tar.gz", "src/contrib/Archive/nxdep/nxdep_31337.0.tar.gz"),
        // Current layout, unlisted version.
        ("/src/contrib/nxdep_0.2.0.tar.gz", "src/contrib/nxdep_0.2.0.tar.gz"),
        // Versions out of bounds: too long, or not R's form.
        (
            "/src/contrib/Archive/nxdep/nxdep_1.2.3.4.5.6.7.8.9.10.11.12.13.14.15.tar.gz",
            "src/contrib/Archive/nxdep/nxdep_1.2.3.4.5.6.7.8.9.10.11.12.13.14.15.tar.gz",
        ),
        ("/src/contrib/Archive/nxdep/nxdep_1..2.tar.gz", "src/contrib/Archive/nxdep/nxdep_1..2.tar.gz"),
        ("/src/contrib/Archive/nxdep/nxdep_1.0-.tar.gz", "src/contrib/Archive/nxdep/nxdep_1.0-.tar.gz"),
    ];
    for (path, upstream_path) in cases {
        let r = get(mirror.addr(), path, &[]).unwrap();
        assert_eq!(r.status, 404, "{path}: {}", text(&r));
        assert_eq!(upstream.hits(upstream_path), 0, "{path} reached upstream");
    }
    let r = get(mirror.addr(), "/src/contrib/Archive/nxdep/nxdep_0.0.1.tar.gz", &[]).unwrap();
    assert!(text(&r).contains("not in the index"), "{}", text(&r));
    let refused = mirror
        .audit()
        .into_iter()
        .filter(|e| e["object"] == "package:nxdep@0.0.1" && e["detail"]["error"] == "not_listed")
        .count();
    assert_eq!(refused, 2, "every refusal is audited: {:#?}", mirror.audit());
    // The pinned archived version is asked for (upstream has no Archive/ here: 404 from it).
    let r = get(mirror.addr(), "/src/contrib/Archive/nxother/nxother_0.9.tar.gz", &[]).unwrap();
    assert_eq!(r.status, 404, "{}", text(&r));
    assert_eq!(upstream.hits("src/contrib/Archive/nxother/nxother_0.9.tar.gz"), 1);
    // Listed versions still come through.
    let r = get(mirror.addr(), "/src/contrib/nxdep_0.1.0.tar.gz", &[]).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(upstream.hits("src/contrib/nxdep_0.1.0.tar.gz"), 1);
}

#[test]
fn an_http_upstream_is_refused_unless_allowed_on_loopback() {
    if !ready(false) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), POLICY).unwrap();
    let refuse = |upstream: &str, extra: &[&str]| {
        let out = run(Command::new(env!("CARGO_BIN_EXE_noexit-operator"))
            .args(["mirror", "--listen", "127.0.0.1:0", "--upstream", upstream, "--clients", "/dev/null"])
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .arg("--policy")
            .arg(dir.path().join("policy.yaml"))
            .arg("--audit-file")
            .arg(dir.path().join("audit.jsonl"))
            .args(extra));
        assert!(!out.status.success(), "{upstream} {extra:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refuse("http://cloud.r-project.org", &[]);
    assert!(err.contains("--upstream \"http://cloud.r-project.org\" is not https://"), "{err}");
    let err = refuse("http://192.0.2.1:8080", &["--allow-http-upstream"]);
    assert!(err.contains("is not https://"), "{err}");
    let err = refuse("http://127.0.0.1:9", &[]);
    assert!(err.contains("is not https://") && err.contains("--allow-http-upstream"), "{err}");
    // The development flag on loopback works end to end.
    let upstream = Upstream::start_plain(TcpListener::bind("127.0.0.1:0").unwrap(), repo().root.clone());
    let extra = vec!["--allow-http-upstream".to_string()];
    let mirror = Mirror::start_with(
        tempfile::tempdir().unwrap(),
        &upstream.url(),
        &[("127.0.0.1", "ward-7/host")],
        POLICY,
        &extra,
    );
    let r = get(mirror.addr(), "/src/contrib/nxdep_0.1.0.tar.gz", &[]).unwrap();
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(upstream.hits("src/contrib/nxdep_0.1.0.tar.gz"), 1);
}
