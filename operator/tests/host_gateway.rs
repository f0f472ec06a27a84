//! End to end, single-host mode's remote-desktop gateway: `noexit-operator up` with
//! `--oidc-issuer` runs the gateway in its process; a person signs in at a test OIDC issuer
//! (authorization code + PKCE, `noexit-test-support`'s fake), opens the desktop
//! WebSocket, and completes the RFB handshake through the gateway to QEMU's VNC console of the
//! tiny VM (libvirt, `qemu:///system`, TCG), which authenticates the gateway with the
//! workspace's own password; a FramebufferUpdate comes back. A non-member is refused and the
//! refusal is in the audit log (which `noexit audit verify` authenticates); a stopped workspace
//! loses its console and a deleted one leaves the directory.
//!
//! Needs root, libvirtd + virtlogd (started here if not running; never stopped), qemu, xorriso,
//! nft, ip, noVNC (`/usr/share/novnc`) and the tiny image (`images/vm/build.sh tiny`). Missing
//! parts skip with a message, unless `NOEXIT_CI=1`, where they fail. Everything is named with a
//! random per-run tag and removed.
//!
//!   cargo test -p noexit-operator --test host_gateway -- --nocapture

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use noexit_operator::audit::store::Filter;
use noexit_operator::audit::{Outcome, Store};
use noexit_test_support::net::free_port;
use noexit_test_support::oidc::{Issuer, SignIn};
use noexit_test_support::poll;
use noexit_test_support::rfb::{self, Viewer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod support;

use support::libvirt::{Cleanup, URI, daemons, have, image_dir, rand_u32, skip_or_fail, tiny_image};

const BIN: &str = env!("CARGO_BIN_EXE_noexit-operator");
const CLI: &str = env!("CARGO_BIN_EXE_noexit");
const OWNER: &str = "r@x";
const OUTSIDER: &str = "mallory@x";

/// `up`, stopped with SIGTERM on drop; its output is printed if the test fails.
struct Up {
    child: Child,
    log: PathBuf,
}

impl Drop for Up {
    fn drop(&mut self) {
        // SAFETY: SIGTERM to the child this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- up's output ----\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

// ---- a browser without a browser: HTTP/1.1 by hand, the WebSocket through tungstenite -------

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The value a `Set-Cookie` gives `name`.
    fn cookie(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
            .filter_map(|(_, v)| v.split(';').next()?.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_owned())
    }
}

async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    host: &str,
    path: &str,
    cookie: &str,
) -> Reply {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().into(), v.trim().into())).collect();
    Reply { status, headers, body: body.to_owned() }
}

struct Browser {
    gateway: SocketAddr,
    origin: String,
    ca_pem: Vec<u8>,
    tls: tokio_rustls::TlsConnector,
}

impl Browser {
    /// Trusts the single-host CA only, as a person's browser would after importing it.
    fn new(ca: &Path, gateway: SocketAddr) -> Browser {
        let ca_pem = std::fs::read(ca).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rfb::roots(&ca_pem))
            .with_no_client_auth();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
        Browser { gateway, origin: format!("https://localhost:{}", gateway.port()), ca_pem, tls }
    }

    async fn connect_tls(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.gateway).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        self.tls.connect(name, tcp).await.expect("the gateway's certificate from the single-host CA")
    }

    async fn get(&self, path: &str, cookie: &str) -> Reply {
        let host = format!("localhost:{}", self.gateway.port());
        exchange(self.connect_tls().await, &host, path, cookie).await
    }

    /// The whole sign-in: the gateway's /login, the issuer, back to /callback. The session cookie.
    async fn sign_in(&self, issuer: &Issuer, user: &str) -> String {
        issuer.sign_in(SignIn::new(user));
        let login = self.get("/login", "").await;
        assert_eq!(login.status, 303, "/login: {}", login.body);
        let state = login.cookie("noexit-gateway-login").expect("login cookie");
        let authorize = login.header("location").unwrap().to_owned();
        let rest = authorize.strip_prefix("http://").unwrap();
        let (host, path) = rest.split_at(rest.find('/').unwrap());
        let at_issuer = exchange(TcpStream::connect(host).await.unwrap(), host, path, "").await;
        assert_eq!(at_issuer.status, 303, "issuer: {}", at_issuer.body);
        let back = at_issuer.header("location").unwrap();
        let callback = back.strip_prefix(&self.origin).expect("redirect to the public URL");
        let done = self.get(callback, &format!("noexit-gateway-login={state}")).await;
        assert_eq!(done.status, 200, "/callback: {}", done.body);
        done.cookie("__Host-noexit-gateway").expect("session cookie")
    }

    /// Open a desktop's WebSocket; `Err(status)` when refused.
    async fn open(&self, session: &str, project: &str, workspace: &str) -> Result<rfb::Wss, u16> {
        let path = format!("/ws/{project}/{workspace}");
        rfb::open(self.gateway, rfb::roots(&self.ca_pem), &path, &format!("__Host-noexit-gateway={session}")).await
    }
}

/// The browser's side of RFB through the gateway: the handshake (the gateway offers "None": it
/// authenticated to the console itself), then one full-screen FramebufferUpdateRequest; returns
/// (width, height, desktop name, first rectangle's header) and the live session.
async fn handshake_and_update(ws: rfb::Wss) -> (u16, u16, String, Vec<u8>, Viewer) {
    let mut c = Viewer::new(ws);
    let init = c.handshake().await.expect("the RFB handshake through the gateway");
    let (w, h) = (init.width, init.height);
    let name = String::from_utf8_lossy(&init.name).into_owned();
    let [w0, w1] = w.to_be_bytes();
    let [h0, h1] = h.to_be_bytes();
    c.send(&[3, 0, 0, 0, 0, 0, w0, w1, h0, h1]).await;
    let head = c.read(4).await.expect("the session closed before an update");
    assert_eq!(head[0], 0, "expected a FramebufferUpdate, got message type {}", head[0]);
    assert!(u16::from_be_bytes([head[2], head[3]]) >= 1, "an update without rectangles");
    let rect = c.read(12).await.expect("the session closed in an update");
    (w, h, name, rect, c)
}

fn manifests(path: &Path, tag: &str, image: &Path, workspace: Option<bool>) {
    let p = format!("g{tag}");
    let mut text = format!(
        "apiVersion: noexit.io/v1alpha1\nkind: Project\nmetadata: {{name: {p}}}\nspec:\n  displayName: test\n  members: [{{user: \"{OWNER}\", roles: [researcher, admin]}}]\n  approval: {{reference: T-1, expires: \"2099-01-01\"}}\n"
    );
    if let Some(running) = workspace {
        text.push_str(&format!(
            "---\napiVersion: noexit.io/v1alpha1\nkind: Workspace\nmetadata: {{name: w1, namespace: noexit-{p}}}\nspec:\n  project: {p}\n  owner: \"{OWNER}\"\n  runtime: vm\n  image: {}\n  resources: {{cpu: \"1\", memory: 256Mi, homeSize: 64Mi}}\n  lifecycle: {{running: {running}}}\n",
            image.display()
        ));
    }
    // Atomic, so a pass never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The directory entry of the workspace: (running, desktop), or `None` when it is not listed.
fn listed(directory: &Path) -> Option<Option<(bool, Option<String>)>> {
    let text = std::fs::read_to_string(directory).ok()?;
    let v: serde_yaml::Value = serde_yaml::from_str(&text).ok()?;
    let ws = v.get("workspaces")?.as_sequence()?;
    Some(ws.iter().find(|w| w.get("name").and_then(|n| n.as_str()) == Some("w1")).map(|w| {
        (
            w.get("running").and_then(|r| r.as_bool()).unwrap_or(false),
            w.get("desktop").and_then(|d| d.as_str()).map(str::to_owned),
        )
    }))
}

/// Poll (bounded) the audit log for `user`'s refused desktop connect whose reason has `why`.
async fn refused(db: &str, user: &str, why: &str) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let store = Store::open_read_only(db).await.expect("the audit log");
        let entries = store.query(&Filter { refused: Some(true), ..Default::default() }).await.unwrap();
        store.pool_close().await;
        let found = entries.iter().any(|e| {
            e.event.actor == format!("user:{user}")
                && e.event.action == "gateway.connect"
                && matches!(&e.event.outcome, Outcome::Refused(r) if r.contains(why))
        });
        if found {
            return;
        }
        assert!(Instant::now() < until, "no audited refusal of {user} with {why:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_host_gateway_end_to_end() {
    if unsafe { libc::geteuid() } != 0 {
        skip_or_fail("needs root (libvirt system daemon, nftables)");
        return;
    }
    for tool in ["libvirtd", "virtlogd", "virsh", "qemu-system-x86_64", "qemu-img", "xorriso", "nft", "ip"] {
        if !have(tool) {
            skip_or_fail(&format!("{tool} is not installed (hack/install-deps.sh)"));
            return;
        }
    }
    if !Path::new("/usr/share/novnc/core/rfb.js").exists() {
        skip_or_fail("noVNC is not installed (Debian package novnc; hack/install-deps.sh)");
        return;
    }
    let Some(tiny) = tiny_image() else {
        skip_or_fail("the tiny VM image cannot be built (images/vm/build.sh tiny)");
        return;
    };
    daemons();
    let started = Instant::now();
    let tag: String = format!("{:06x}", rand_u32() & 0xff_ffff);
    let _cleanup = Cleanup(tag.clone());
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let image = image_dir(&tiny, dir.path(), "console=ttyS0");
    let file = dir.path().join("manifests.yaml");
    manifests(&file, &tag, &image, Some(true));
    let project = format!("g{tag}");

    let issuer = Issuer::builder().start().await;
    let gateway: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let base = Ipv4Addr::new(10, 100 + (rand_u32() % 100) as u8, 0, 0);
    let api_port = free_port();
    let log = dir.path().join("up.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(BIN)
        .arg("up")
        .args(["--state-dir", state.to_str().unwrap(), "--libvirt-uri", URI, "--virt-type", "qemu"])
        .args(["--api-port", &api_port.to_string(), "--mirror-port", &free_port().to_string()])
        .args(["--dns-port", &free_port().to_string(), "--subnet-base", &base.to_string(), "--interval", "1"])
        .args(["--oidc-issuer", &issuer.url, "--gateway-listen", &gateway.to_string()])
        .args(["--gateway-metrics-listen", "127.0.0.1:0"])
        .arg("-f")
        .arg(&file)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let mut up = Up { child, log: log.clone() };

    // The directory: the owner's running workspace with its console on 127.0.0.1, file 0600.
    let directory = state.join("services/gateway-directory.yaml");
    let desktop =
        poll::eventually("the workspace's console in the gateway's directory", Duration::from_secs(120), || {
            std::future::ready({
                if let Some(code) = up.child.try_wait().unwrap() {
                    panic!("`up` exited ({code})");
                }
                listed(&directory).flatten().and_then(|(running, d)| d.filter(|_| running))
            })
        })
        .await;
    // A unix socket in libvirt's private directory for the domain: no TCP port, and a directory
    // only root and QEMU's user may enter (no other local user reaches the console).
    let socket = desktop.strip_prefix("unix:").unwrap_or_else(|| panic!("not a console socket: {desktop}"));
    let parent = Path::new(socket).parent().unwrap();
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(parent).unwrap();
    assert_eq!(meta.mode() & 0o007, 0, "{} is open to other users: {:o}", parent.display(), meta.mode());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&directory).unwrap().permissions().mode() & 0o777, 0o600);
    let printed = std::fs::read_to_string(&log).unwrap();
    assert!(printed.contains(&format!("gateway: https://localhost:{}", gateway.port())), "{printed}");
    poll::eventually("the gateway listening", Duration::from_secs(30), || {
        std::future::ready(std::net::TcpStream::connect_timeout(&gateway, Duration::from_millis(200)).ok())
    })
    .await;
    let status = Command::new(BIN).args(["status", "--state-dir", state.to_str().unwrap()]).output().unwrap();
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    eprintln!("$ noexit-operator status\n{status}");
    assert!(status.contains(&format!("gateway: https://localhost:{}", gateway.port())), "{status}");

    // The console asks for the password: VNC authentication (2) is the only security type.
    let mut direct = tokio::net::UnixStream::connect(socket).await.unwrap();
    let mut hello = [0u8; 12];
    direct.read_exact(&mut hello).await.unwrap();
    direct.write_all(rfb::VERSION_3_8).await.unwrap();
    let mut types = [0u8; 2];
    direct.read_exact(&mut types).await.unwrap();
    assert_eq!(types, [1, rfb::SECURITY_VNC_AUTH], "the console offers other security types");
    drop(direct);
    // The tiny kernel is running in the domain.
    let console_log = state.join(format!("workspaces/{project}/w1/console.log"));
    poll::eventually("the tiny kernel on the serial console", Duration::from_secs(120), || {
        std::future::ready(std::fs::read_to_string(&console_log).ok().filter(|t| t.contains("Linux version")))
    })
    .await;

    // ---- The owner signs in and reaches QEMU's console through the gateway. ----
    let browser = Browser::new(&state.join("pki/ca.crt"), gateway);
    let session = browser.sign_in(&issuer, OWNER).await;
    let ws = browser.open(&session, &project, "w1").await.expect("the owner's desktop");
    let (w, h, name, rect, mut live) = tokio::time::timeout(Duration::from_secs(60), handshake_and_update(ws))
        .await
        .expect("RFB through the gateway within 60 s");
    eprintln!("desktop {name:?} {w}x{h}; first rectangle {rect:?}; after {:?}", started.elapsed());
    assert!(w > 0 && h > 0);
    // The connect is in the API's session list (what `noexit sessions` shows).
    let db = format!("sqlite:{}", state.join("api.db").display());
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let store = Store::open_read_only(&db).await.expect("the API's database");
        let sessions = noexit_operator::api::ApiStore::new(store.pool().clone()).sessions(&project, 10).await.unwrap();
        store.pool_close().await;
        if !sessions.is_empty() {
            eprintln!("sessions: {sessions:?}");
            break;
        }
        assert!(Instant::now() < until, "no session recorded for {project}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // ---- The same people use the `noexit` CLI against the local API (same issuer). ----
    let cli = |user: &str| {
        let out = Command::new(CLI)
            .env("NOEXIT_API", format!("https://127.0.0.1:{api_port}"))
            .env("NOEXIT_CA", state.join("pki/ca.crt"))
            .env("NOEXIT_TOKEN", issuer.token(user))
            .args(["sessions", "--project", &project])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, sessions) = cli(OWNER);
    eprintln!("$ noexit sessions --project {project}  # as {OWNER}\n{sessions}");
    assert!(ok && sessions.contains("w1"), "the project admin lists the desktop session: {sessions}");
    let (ok, refused_cli) = cli(OUTSIDER);
    assert!(!ok, "a non-member lists nothing: {refused_cli}");

    // ---- A non-member is refused, and the refusal is audited. ----
    let mallory = browser.sign_in(&issuer, OUTSIDER).await;
    assert_eq!(browser.open(&mallory, &project, "w1").await.err(), Some(403));
    refused(&db, OUTSIDER, &format!("{OUTSIDER} is not a member of project {project}")).await;
    // The owner's connect is there too, and the log authenticates with the writers' keys
    // (the command `up` prints: the gateway's entries are signed as the gateway's).
    let verify = Command::new(CLI).args(noexit_operator::single_host::audit::verify_args(&state)).output().unwrap();
    let report = String::from_utf8_lossy(&verify.stdout).into_owned() + &String::from_utf8_lossy(&verify.stderr);
    eprintln!("{report}");
    assert!(verify.status.success() && report.contains("audit log intact"), "{report}");
    assert!(report.contains("gateway "), "the gateway's entries are its own writer's: {report}");

    // ---- Stopped: no console offered, a connect refused. Deleted: gone from the directory. ----
    manifests(&file, &tag, &image, Some(false));
    poll::eventually("the stopped workspace without a console", Duration::from_secs(60), || {
        std::future::ready(listed(&directory).flatten().filter(|(running, d)| !running && d.is_none()))
    })
    .await;
    // The owner's session, open all along, has ended (console gone, or the next re-check).
    let end = tokio::time::timeout(Duration::from_secs(30), live.closed()).await.expect("the session ended");
    eprintln!("the open session, after the stop: {end:?}");
    assert_eq!(browser.open(&session, &project, "w1").await.err(), Some(403));
    refused(&db, OWNER, &format!("workspace {project}/w1 is not running")).await;
    manifests(&file, &tag, &image, None);
    poll::eventually("the deleted workspace to leave the directory", Duration::from_secs(60), || {
        std::future::ready(listed(&directory).filter(Option::is_none))
    })
    .await;
    assert_eq!(browser.open(&session, &project, "w1").await.err(), Some(403));
    refused(&db, OWNER, &format!("no workspace {project}/w1")).await;
    drop(up);
    eprintln!("---- up's output ----\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    eprintln!("done after {:?}", started.elapsed());
}
