//! The remote-desktop gateway end to end, with real parts: TigerVNC `Xvnc` (VNC
//! authentication) with a magenta `xterm` as the workspace desktop in its own network
//! namespace, the real `noexit-operator gateway` in another, a test OIDC issuer running the
//! authorization-code + PKCE flow, and headless Chromium (Debian's, driven by playwright-core)
//! as the researcher. The desktop namespace is reachable from the gateway's namespace only.
//!
//!   sudo hack/install-deps.sh
//!   cargo test -p noexit-operator --test gateway -- --nocapture
//!
//! Needs root, iproute2, Xvnc, xterm, xclip, chromium, node and
//! hack/test-support/browser/node_modules; skips with a message otherwise, unless
//! `NOEXIT_CI=1`, where it fails.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use noexit_operator::audit::store::Filter;
use noexit_operator::audit::{Outcome, Store};
use noexit_test_support::netns::{self, End, Netns};
use noexit_test_support::oidc::Issuer;
use noexit_test_support::process::{OnDrop, Proc};
use noexit_test_support::{browser, deps, net, pki, poll, rfb};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_noexit-operator");
const ALICE: &str = "alice@ward7.example";
const BOB: &str = "bob@ward7.example";
const CLIENT_ID: &str = "noexit-gateway";

/// `true` if the test may run; prints why not, or panics under `NOEXIT_CI=1`.
fn ready() -> bool {
    let mut missing = browser::missing();
    missing.extend(deps::missing_as_root(&["ip", "Xvnc", "xterm", "xclip"]));
    deps::ready("gateway e2e", &missing, "run sudo hack/install-deps.sh")
}

/// Two namespaces: `gw` (the gateway) linked to the host, `desk` (the desktop) linked to `gw`
/// only. Deleted on drop.
struct Net {
    gw: Netns,
    desk: Netns,
    host_ip: String,
    gw_ip: String,
    desk_ip: String,
}

impl Net {
    fn new(tag: &str, a: u8, b: u8) -> Net {
        let net = Net {
            gw: Netns::new(format!("nx-gw-{tag}")),
            desk: Netns::new(format!("nx-desk-{tag}")),
            host_ip: format!("10.{a}.{b}.1"),
            gw_ip: format!("10.{a}.{b}.2"),
            desk_ip: format!("10.{a}.{b}.6"),
        };
        let host_if = format!("nxg{tag}");
        let gd_if = format!("nxd{tag}");
        let (host, gw_up) = netns::veth(End::Host(&host_if), End::In(&net.gw, "eth0"));
        let (gw_down, desk) = netns::veth(End::In(&net.gw, &gd_if), End::In(&net.desk, "eth0"));
        for (link, ip) in
            [(&host, &net.host_ip), (&gw_up, &net.gw_ip), (&gw_down, &format!("10.{a}.{b}.5")), (&desk, &net.desk_ip)]
        {
            // No IPv6 link-local addresses: their late arrival makes Chromium abort page loads.
            link.no_link_local().addr(&format!("{ip}/30")).up();
        }
        net
    }
}

// ---- a hostile VNC server -------------------------------------------------------------------

/// Completes a valid RFB 3.8 handshake (accepting any VNC-auth response), reads the gateway's
/// SetPixelFormat, then sends `payload`. Served on `rt`.
fn hostile_server(net: &Net, rt: &tokio::runtime::Runtime, port: u16, payload: Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr: SocketAddr = format!("{}:{port}", net.desk_ip).parse().unwrap();
    let listener = net.desk.enter(move || TcpListener::bind(addr).unwrap());
    listener.set_nonblocking(true).unwrap();
    let init = rfb::ServerInit { width: 64, height: 48, pixel_format: rfb::PIXEL_FORMAT_32, name: b"h".to_vec() };
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        loop {
            let Ok((mut s, _)) = listener.accept().await else { continue };
            let (payload, init) = (payload.clone(), init.clone());
            tokio::spawn(async move {
                let r: std::io::Result<()> = async {
                    rfb::serve_handshake(&mut s, None, &init).await?;
                    let mut b = [0u8; 64];
                    s.read_exact(&mut b[..20]).await?;
                    s.write_all(&payload).await?;
                    // Keep the connection until the gateway closes it.
                    while s.read(&mut b).await? > 0 {}
                    Ok(())
                }
                .await;
                drop(r);
            });
        }
    });
}

// ---- the pieces wired together ---------------------------------------------------------------

struct World {
    net: Net,
    dir: tempfile::TempDir,
    issuer: Issuer,
    display: u32,
    spki: String,
    db_url: String,
    rt: tokio::runtime::Runtime,
    xvnc: Option<Proc>,
    xterm: Option<Proc>,
    gateway: Option<Proc>,
}

impl World {
    fn gateway_url(&self) -> String {
        format!("https://{}:8443", self.net.gw_ip)
    }

    fn directory_path(&self) -> PathBuf {
        self.dir.path().join("directory.yaml")
    }

    /// Write the directory: project ward-7 with `members`, paste-in per `paste`.
    fn write_directory(&self, members: &[&str], paste: bool) {
        let pw = self.dir.path().join("vnc-password");
        let desk = &self.net.desk_ip;
        let yaml = format!(
            r#"projects:
- name: ward-7
  members: {members:?}
  approved: true
  expires: "2099-01-01T00:00:00Z"
  desktop: {{clipboardIn: {paste}, pasteMaxBytes: 4096, requireMfa: true}}
workspaces:
- {{project: ward-7, name: alice, owner: "{ALICE}", running: true, desktop: "{desk}:5901", vncPasswordFile: "{pw}"}}
- {{project: ward-7, name: bob, owner: "{BOB}", running: true, desktop: "{desk}:5901", vncPasswordFile: "{pw}"}}
- {{project: ward-7, name: stopped, owner: "{ALICE}", running: false, desktop: "{desk}:5901", vncPasswordFile: "{pw}"}}
- {{project: ward-7, name: hostile-length, owner: "{ALICE}", running: true, desktop: "{desk}:5902", vncPassword: "x"}}
- {{project: ward-7, name: hostile-type, owner: "{ALICE}", running: true, desktop: "{desk}:5903", vncPassword: "x"}}
"#,
            pw = pw.display()
        );
        let tmp = self.dir.path().join("directory.yaml.new");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.directory_path()).unwrap();
    }

    fn x(&self, args: &[&str]) -> Vec<String> {
        let mut v: Vec<String> =
            ["ip", "netns", "exec", self.net.desk.name(), "env", &format!("DISPLAY=:{}", self.display)]
                .into_iter()
                .map(str::to_owned)
                .collect();
        v.extend(args.iter().map(|s| s.to_string()));
        v
    }

    /// Run one browser scenario; `on_line` sees progress lines. Returns the result object.
    fn browser(&self, scenario: &str, extra: Value, on_line: impl FnMut(&Value)) -> Value {
        let profile = tempfile::tempdir().unwrap();
        let mut opts = json!({
            "scenario": scenario, "gateway": self.gateway_url(), "spki": self.spki,
            "profile": profile.path(), "metricsUrl": format!("http://{}:9090/metrics", self.net.gw_ip),
            "workspace": "ward-7/alice",
            "screenshot": self.dir.path().join(format!("{scenario}.png")),
        });
        for (k, v) in extra.as_object().unwrap() {
            opts[k] = v.clone();
        }
        browser::scenario("gateway-e2e.mjs", &opts, on_line)
    }

    fn start() -> World {
        let id = uuid::Uuid::new_v4();
        let tag = id.simple().to_string()[..6].to_owned();
        let bytes = id.as_bytes();
        let net = Net::new(&tag, 200 + bytes[6] % 50, bytes[7]);
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let issuer = rt.block_on(Issuer::builder().host(&net.host_ip).signing_in(ALICE).start());
        let dir = tempfile::tempdir().unwrap();

        // The gateway's certificate, and the SPKI pin Chromium is given instead of a CA.
        let cert = pki::self_signed(&[&net.gw_ip]);
        cert.write(dir.path(), "tls.crt", "tls.key");
        let spki = cert.spki_pin();

        // The desktop: Xvnc with VNC authentication, a magenta xterm.
        std::fs::write(dir.path().join("vnc-password"), "vnc-pw-1").unwrap();
        let vnc_file = dir.path().join("vnc-passwd");
        std::fs::write(&vnc_file, noexit_gateway::rfb::handshake::password_file(b"vnc-pw-1")).unwrap();
        let display = (200..900)
            .map(|n| n + u32::from(bytes[8]) % 100)
            .find(|n| {
                !Path::new(&format!("/tmp/.X11-unix/X{n}")).exists() && !Path::new(&format!("/tmp/.X{n}-lock")).exists()
            })
            .unwrap();
        let db_url = format!("sqlite:{}", dir.path().join("noexit.db").display());
        let mut world = World { net, dir, issuer, display, spki, db_url, rt, xvnc: None, xterm: None, gateway: None };
        let xvnc = world
            .net
            .desk
            .exec(["Xvnc", &format!(":{display}"), "-geometry", "1024x768", "-depth", "24", "-rfbport", "5901"])
            .args(["-SecurityTypes", "VncAuth", "-PasswordFile"])
            .arg(&vnc_file)
            .args(["-nolisten", "tcp", "-desktop", "noexit-e2e", "-AcceptCutText=1", "-SendCutText=1"])
            .stdout(Stdio::null())
            .stderr(File::create(world.dir.path().join("xvnc.log")).unwrap())
            .spawn()
            .unwrap();
        world.xvnc = Some(Proc::new(xvnc).on_drop(OnDrop::Terminate));
        poll::blocking("Xvnc's X socket", Duration::from_secs(20), || {
            Path::new(&format!("/tmp/.X11-unix/X{display}")).exists().then_some(())
        });
        let x = world.x(&[
            "xterm",
            "-geometry",
            "80x24+0+0",
            "-bg",
            "#ff00ff",
            "-fg",
            "#ff00ff",
            "-T",
            "noexit-e2e-window",
        ]);
        let xterm = Command::new(&x[0]).args(&x[1..]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        world.xterm = Some(Proc::new(xterm).on_drop(OnDrop::Terminate));

        hostile_server(&world.net, &world.rt, 5902, [vec![3, 0, 0, 0], 0x7fff_ff00u32.to_be_bytes().to_vec()].concat());
        hostile_server(&world.net, &world.rt, 5903, vec![0xEE, 1, 2, 3]);
        world.write_directory(&[ALICE, BOB], true);

        let d = world.dir.path();
        let gateway = world
            .net
            .gw
            .exec([BIN])
            .args(["gateway", "--listen", &format!("{}:8443", world.net.gw_ip)])
            .args(["--metrics-listen", &format!("{}:9090", world.net.gw_ip)])
            .arg("--tls-cert")
            .arg(d.join("tls.crt"))
            .arg("--tls-key")
            .arg(d.join("tls.key"))
            .args([
                "--public-url",
                &world.gateway_url(),
                "--oidc-issuer",
                &world.issuer.url,
                "--oidc-client-id",
                CLIENT_ID,
            ])
            .arg("--directory")
            .arg(world.directory_path())
            .args(["--recheck-seconds", "2", "--database-url", &world.db_url])
            .env("RUST_LOG", "info,noexit_gateway=debug")
            .stdout(Stdio::null())
            .stderr(File::create(d.join("gateway.log")).unwrap())
            .spawn()
            .unwrap();
        world.gateway = Some(Proc::new(gateway).on_drop(OnDrop::Terminate));
        let addr: SocketAddr = format!("{}:8443", world.net.gw_ip).parse().unwrap();
        net::wait_for_listen("the gateway", addr, Duration::from_secs(30));
        world
    }

    fn audit(&self) -> Vec<(String, String, Option<String>, Value)> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let store = Store::open_read_only(&self.db_url).await.unwrap();
            let entries = store.query(&Filter::default()).await.unwrap();
            entries
                .into_iter()
                .map(|e| {
                    let refused = match e.event.outcome {
                        Outcome::Refused(r) => Some(r),
                        Outcome::Allowed => None,
                    };
                    (e.event.action, e.event.object, refused, e.event.detail)
                })
                .collect()
        })
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for p in [&mut self.gateway, &mut self.xterm, &mut self.xvnc].into_iter().flatten() {
            p.terminate();
        }
        if std::thread::panicking() {
            for log in ["gateway.log", "xvnc.log"] {
                let text = std::fs::read_to_string(self.dir.path().join(log)).unwrap_or_default();
                eprintln!("---- {log} (last lines) ----");
                for line in text.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

#[test]
fn researcher_opens_their_desktop_and_nothing_leaves_through_the_clipboard() {
    if !ready() {
        return;
    }
    let world = World::start();

    let marker = format!("CLIPBOARD-OUT-{}", uuid::Uuid::new_v4().simple());
    let clipboard = |paste: &str, expected: bool| {
        json!({
            "clipboardSet": world.x(&["xclip", "-quiet", "-selection", "clipboard"]),
            "clipboardGet": world.x(&["xclip", "-o", "-selection", "clipboard"]),
            "clipMarker": marker, "paste": paste, "pasteExpected": expected,
        })
    };

    // Paste allowed by the project.
    let r = world.browser("desktop", clipboard("PASTE-IN-ALLOWED-1", true), |_| {});
    assert_eq!(r["user"], json!(ALICE));
    assert!(r["magenta"].as_u64().unwrap() > 2000, "the desktop's window is not on the canvas: {r}");
    assert!(r["serverCutTextDrops"].as_u64().unwrap() >= 1);
    assert_eq!(r["pasted"], json!(true), "allowed paste did not reach the desktop");
    assert_eq!(r["markerInFrames"], json!(false), "desktop clipboard reached the browser");
    assert_eq!(r["clipboardEvents"], json!([]));
    assert!(!r["pageClipboard"].as_str().unwrap_or_default().contains(&marker));
    // Tight sends the solid window in a few hundred bytes.
    assert!(r["bytesReceived"].as_u64().unwrap() > 100, "the browser received no framebuffer");
    let watermark = r["watermark"].as_str().unwrap();
    assert!(
        watermark.contains(ALICE) && watermark.contains("ward-7/alice") && watermark.contains("UTC"),
        "{watermark}"
    );
    assert_eq!(r["watermarkVisible"], json!(true));
    assert_eq!(r["watermarkOverCanvas"], json!(true));
    assert!(world.dir.path().join("desktop.png").exists());

    // Paste refused by the project.
    world.write_directory(&[ALICE, BOB], false);
    let r = world.browser("desktop", clipboard("PASTE-IN-REFUSED-2", false), |_| {});
    assert_eq!(r["pasted"], json!(false), "refused paste reached the desktop");
    assert_eq!(r["markerInFrames"], json!(false), "desktop clipboard reached the browser");

    // Sign-in refusals: no second factor, an expired ID token.
    world.issuer.sign_in_as(ALICE, &["pwd"], 600);
    let r = world.browser("signin", json!({}), |_| {});
    assert_eq!(r["refused"], json!("mfaRequired"), "{r}");
    world.issuer.sign_in_as(ALICE, &["pwd", "otp"], -600);
    let r = world.browser("signin", json!({}), |_| {});
    assert_eq!(r["refused"], json!("tokenExpired"), "{r}");
    world.issuer.sign_in_as(ALICE, &["pwd", "otp"], 600);

    // Connect refusals, hostile peers, sign-out and a replayed cookie.
    let r = world.browser(
        "refusals",
        json!({
            "wrongWorkspace": "ward-7/bob", "stoppedWorkspace": "ward-7/stopped",
            "hostileServers": {"hostileLength": "ward-7/hostile-length", "hostileType": "ward-7/hostile-type"},
        }),
        |_| {},
    );
    for case in ["noSession", "forged", "wrongOwner", "stopped", "replayed"] {
        assert_eq!(r[case]["opened"], json!(false), "{case} was let in: {r}");
    }
    for case in ["hostileClient", "hostileClient2"] {
        assert_eq!(r[case]["stage"], json!(4), "{case}: handshake did not complete: {r}");
        assert_eq!(r[case]["code"], json!(1008), "{case} not closed as a violation: {r}");
    }
    for case in ["hostileLength", "hostileType"] {
        assert_eq!(r[case]["code"], json!(1008), "{case} not closed as a violation: {r}");
    }
    assert_eq!(r["meAfterReplay"], json!(401));

    // A member removed while connected is cut within the re-check interval.
    let mut cut_at = None;
    let r = world.browser("cut", json!({}), |line| {
        if line["event"] == json!("connected") {
            world.write_directory(&[BOB], false);
            cut_at = Some(Instant::now());
        }
    });
    let took = cut_at.expect("never connected").elapsed();
    assert!(took < Duration::from_secs(30), "removed member stayed connected for {took:?}");
    assert!(r["status"].as_str().unwrap().contains("not a member"), "{r}");
    assert_eq!(world.issuer.pkce_failures(), 0);

    // Everything refused is in the audit log, and the sessions are in the session table.
    let mut world = world;
    if let Some(mut g) = world.gateway.take() {
        g.terminate();
    }
    let audit = world.audit();
    let has = |action: &str, pred: &dyn Fn(&Option<String>, &Value) -> bool| {
        audit.iter().any(|(a, _, refused, detail)| a == action && pred(refused, detail))
    };
    let code = |c: &'static str| move |r: &Option<String>, d: &Value| r.is_some() && d["code"] == json!(c);
    for (action, c) in [
        ("gateway.connect", "noSession"),
        ("gateway.connect", "unknownSession"),
        ("gateway.connect", "notOwner"),
        ("gateway.connect", "workspaceStopped"),
        ("gateway.signin", "mfaRequired"),
        ("gateway.signin", "tokenExpired"),
    ] {
        assert!(has(action, &code(c)), "no audited {action} refusal {c}");
    }
    let forged_and_replayed = audit
        .iter()
        .filter(|(a, _, r, d)| a == "gateway.connect" && r.is_some() && d["code"] == json!("unknownSession"))
        .count();
    assert!(forged_and_replayed >= 2, "forged and replayed cookies: {forged_and_replayed} refusals audited");
    let violation = |cat: &'static str| move |r: &Option<String>, d: &Value| r.is_some() && d["category"] == json!(cat);
    assert!(has("gateway.disconnect", &violation("unknown_message")), "hostile peers' unknown messages not audited");
    assert!(has("gateway.disconnect", &violation("oversized")), "oversized lengths not audited");
    assert!(
        has("gateway.disconnect", &|r, _| r.as_deref().is_some_and(|r| r.contains("access withdrawn"))),
        "live cut not audited"
    );
    assert!(has("gateway.drop", &|_, d| d["reason"] == json!("server_cut_text")), "clipboard drop not audited");
    assert!(has("gateway.drop", &|_, d| d["reason"] == json!("paste_refused")), "refused paste not audited");
    assert!(has("gateway.signin", &|r, _| r.is_none()));
    assert!(has("gateway.connect", &|r, _| r.is_none()));

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let sessions = rt.block_on(async {
        let store = Store::open_read_only(&world.db_url).await.unwrap();
        noexit_operator::api::ApiStore::new(store.pool().clone()).sessions("ward-7", 100).await.unwrap()
    });
    assert!(sessions.iter().any(|s| s.action == "desktopConnect" && s.username == ALICE), "{sessions:?}");
    assert!(sessions.iter().any(|s| s.action == "desktopDisconnect"), "{sessions:?}");
}
