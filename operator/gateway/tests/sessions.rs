//! Desktop session limits through the real gateway (in process, over TLS and WebSocket) to a
//! fake desktop that checks the VNC password: the idle timeout, the maximum session length and
//! one live session per workspace (taken over or refused, per the project's policy), each
//! ended, audited and counted. Limits are a few seconds (`idleTimeoutSeconds`,
//! `maxSessionSeconds` in the directory file); waits are polls with a bound.
//!
//!   cargo test -p noexit-gateway --test sessions

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use noexit_gateway::record::{GatewayEvent, MemoryRecorder};
use noexit_gateway::{Gateway, directory::FileDirectory, oidc, state};
use noexit_test_support::rfb::{self, Closed, Viewer};
use noexit_test_support::{pki, poll};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PASSWORD: &str = "s3cretpw";
const USER: &str = "alice@ward7.example";

/// A desktop that refuses a wrong VNC password and answers each FramebufferUpdateRequest with
/// one 1×1 Raw rectangle. Counts authenticated connections.
async fn desktop(listener: TcpListener, connections: Arc<AtomicUsize>) {
    let init = rfb::ServerInit {
        width: 64,
        height: 48,
        pixel_format: noexit_gateway::rfb::PixelFormat::GATEWAY.encode(),
        name: b"fake".to_vec(),
    };
    loop {
        let Ok((mut s, _)) = listener.accept().await else { continue };
        let (connections, init) = (connections.clone(), init.clone());
        tokio::spawn(async move {
            let r: std::io::Result<()> = async {
                if !rfb::serve_security(&mut s, Some(PASSWORD.as_bytes())).await? {
                    return Ok(());
                }
                connections.fetch_add(1, Ordering::SeqCst);
                rfb::serve_init(&mut s, &init).await?;
                let mut b = [0u8; 64];
                loop {
                    s.read_exact(&mut b[..1]).await?;
                    let rest = match b[0] {
                        0 => 19,
                        2 => {
                            s.read_exact(&mut b[..3]).await?;
                            4 * usize::from(u16::from_be_bytes([b[1], b[2]]))
                        }
                        3 => 9,
                        4 => 7,
                        5 => 5,
                        _ => return Ok(()),
                    };
                    let mut skip = vec![0u8; rest];
                    s.read_exact(&mut skip).await?;
                    if b[0] == 3 {
                        let mut update = vec![0u8, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0];
                        update.extend([1, 2, 3, 4]);
                        s.write_all(&update).await?;
                    }
                }
            }
            .await;
            drop(r);
        });
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    directory: std::path::PathBuf,
    addr: SocketAddr,
    cert_pem: Vec<u8>,
    recorder: Arc<MemoryRecorder>,
    gw: Arc<Gateway>,
    connections: Arc<AtomicUsize>,
}

impl Rig {
    /// A gateway for project ward-7 (member and owner alice) with `desktop_policy` (YAML flow
    /// mapping of the directory file's `desktop:`).
    async fn start(desktop_policy: &str) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let cert = pki::self_signed(&["localhost"]);
        cert.write(dir.path(), "tls.crt", "tls.key");

        let desk = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let desk_addr = desk.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        tokio::spawn(desktop(desk, connections.clone()));
        let directory = dir.path().join("directory.yaml");
        std::fs::write(
            &directory,
            format!(
                "projects:\n- name: ward-7\n  members: [\"{USER}\"]\n  desktop: {desktop_policy}\n\
                 workspaces:\n- {{project: ward-7, name: alice, owner: \"{USER}\", running: true, desktop: \"{desk_addr}\", vncPassword: {PASSWORD}}}\n"
            ),
        )
        .unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let oidc = oidc::OidcClient::new(oidc::OidcSettings {
            issuer: "http://127.0.0.1:9".into(),
            client_id: "test".into(),
            client_secret: None,
            redirect_uri: format!("https://localhost:{}/callback", addr.port()),
            user_claim: "email".into(),
            ca_pem: None,
        })
        .unwrap();
        let config = state::Config {
            public_origin: format!("https://localhost:{}", addr.port()),
            recheck: Duration::from_secs(1),
            require_mfa: true,
            max_signin: Duration::from_secs(3600),
            novnc_dir: "/usr/share/novnc".into(),
        };
        let recorder = Arc::new(MemoryRecorder::default());
        let gw = Gateway::new(Arc::new(FileDirectory::new(&directory)), recorder.clone(), oidc, config);
        for i in 0..4 {
            let who = oidc::SignedIn {
                user: USER.into(),
                amr: vec!["pwd".into(), "otp".into()],
                expires: chrono::Utc::now() + chrono::Duration::hours(1),
                bearer: oidc::Bearer::default(),
            };
            let signin = state::SignIn { who, csrf: "x".into(), ends: chrono::Utc::now() + chrono::Duration::hours(1) };
            gw.signins.lock().unwrap().insert(format!("cookie-{i}"), signin);
        }
        let (tls, _cert) =
            noexit_gateway::serve::tls_config(&dir.path().join("tls.crt"), &dir.path().join("tls.key")).unwrap();
        tokio::spawn(noexit_gateway::serve::serve_tls(
            listener,
            tls,
            noexit_gateway::web::router(gw.clone()),
            std::future::pending(),
        ));
        Rig { _dir: dir, directory, addr, cert_pem: cert.cert_pem().into_bytes(), recorder, gw, connections }
    }

    /// Open the WebSocket as sign-in `n`; `Err(status)` when the upgrade is refused.
    async fn open(&self, n: usize) -> Result<rfb::Wss, u16> {
        let cookie = format!("__Host-noexit-gateway=cookie-{n}");
        rfb::open(self.addr, rfb::roots(&self.cert_pem), "/ws/ward-7/alice", &cookie).await
    }

    /// Open and do the browser's side of the RFB handshake.
    async fn connect(&self, n: usize) -> Client {
        let mut c = Viewer::new(self.open(n).await.expect("upgrade"));
        c.handshake().await.expect("the RFB handshake");
        Client(c)
    }

    fn events(&self, action: &str) -> Vec<GatewayEvent> {
        self.recorder.events.lock().unwrap().iter().filter(|e| e.action == action).cloned().collect()
    }

    /// Poll (bounded) for an audited disconnect whose `end` is `end`.
    async fn disconnect_audited(&self, end: &str) -> GatewayEvent {
        let explain = || format!("audited: {:?}", self.events("gateway.disconnect"));
        poll::eventually_explained(
            &format!("an audited disconnect with end {end}"),
            Duration::from_secs(10),
            explain,
            || async { self.events("gateway.disconnect").into_iter().find(|e| e.detail["end"] == end) },
        )
        .await
    }

    fn metric(&self, line_prefix: &str) -> Option<String> {
        self.gw.metrics.encode().lines().find(|l| l.starts_with(line_prefix)).map(str::to_owned)
    }
}

/// The browser's side of a session, with what these tests ask of it.
struct Client(Viewer);

impl std::ops::Deref for Client {
    type Target = Viewer;
    fn deref(&self) -> &Viewer {
        &self.0
    }
}

impl std::ops::DerefMut for Client {
    fn deref_mut(&mut self) -> &mut Viewer {
        &mut self.0
    }
}

impl Client {
    /// One FramebufferUpdateRequest answered (the session works).
    async fn round_trip(&mut self) -> Result<(), Closed> {
        self.try_send(&[3, 1, 0, 0, 0, 0, 0, 1, 0, 1]).await?;
        self.read(20).await.map(drop)
    }

    /// Wait (bounded) for the gateway to close the session.
    async fn closed_within(&mut self, limit: Duration) -> (Closed, Duration) {
        let start = Instant::now();
        match tokio::time::timeout(limit, self.closed()).await {
            Ok(c) => (c, start.elapsed()),
            Err(_) => panic!("session still open after {limit:?}"),
        }
    }
}

/// A live session is cut at the next access re-check (here every second; at most 30 s in
/// production) when the project's approval expires, and the cut is audited as a refusal.
#[tokio::test]
async fn a_project_that_expires_while_connected_is_cut_at_the_next_recheck() {
    let rig = Rig::start("{requireMfa: true}").await;
    let mut c = rig.connect(0).await;
    c.round_trip().await.expect("the session works");
    let text = std::fs::read_to_string(&rig.directory).unwrap();
    let expired = text.replacen("  desktop:", "  expires: \"2020-01-01T00:00:00Z\"\n  desktop:", 1);
    assert_ne!(expired, text);
    std::fs::write(&rig.directory, expired).unwrap();
    let (closed, took) = c.closed_within(Duration::from_secs(30)).await;
    assert!(took < Duration::from_secs(5), "cut after {took:?}");
    assert!(closed.reason.contains("expired"), "{closed:?}");
    let e = rig.disconnect_audited("access_lost").await;
    assert!(e.refused.as_deref().is_some_and(|r| r.contains("approval expired")), "{e:?}");
    // And a new connect is refused.
    assert_eq!(rig.open(1).await.err(), Some(403));
}

/// A pointer event: a person's input.
const POINTER: [u8; 6] = [5, 0, 0, 10, 0, 10];

#[tokio::test]
async fn no_input_for_the_idle_limit_closes_the_session_and_is_audited() {
    let rig = Rig::start("{requireMfa: true, idleTimeoutSeconds: 2, maxSessionSeconds: 3600}").await;
    let mut c = rig.connect(0).await;
    c.round_trip().await.expect("the session works");
    // Input keeps it open past the limit: a pointer event every 400 ms for 3.2 s.
    for _ in 0..8 {
        c.send(&POINTER).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    c.round_trip().await.expect("input kept the session open");
    // Screen updates are not input: requests alone do not keep it.
    let (closed, took) = c.closed_within(Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
    assert_eq!(closed.code, 4000, "{closed:?}");
    assert!(closed.reason.contains("no input"), "{closed:?}");
    let e = rig.disconnect_audited("idle").await;
    assert_eq!(e.object, "workspace:ward-7/alice");
    assert!(
        rig.metric(r#"noexit_gateway_session_ends_total{reason="idle"} 1"#).is_some(),
        "{}",
        rig.gw.metrics.encode()
    );
}

#[tokio::test]
async fn the_maximum_session_length_closes_even_a_busy_session() {
    let rig = Rig::start("{requireMfa: true, idleTimeoutSeconds: 3600, maxSessionSeconds: 2}").await;
    let mut c = rig.connect(0).await;
    let start = Instant::now();
    let closed = loop {
        let step = match c.try_send(&POINTER).await {
            Ok(()) => c.round_trip().await,
            Err(closed) => Err(closed),
        };
        match step {
            Ok(()) => {}
            Err(closed) => break closed,
        }
        assert!(start.elapsed() < Duration::from_secs(10), "still open after {:?}", start.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(1500) && took < Duration::from_secs(5), "closed after {took:?}");
    assert!(closed.reason.contains("maximum session length"), "{closed:?}");
    rig.disconnect_audited("max_length").await;
}

#[tokio::test]
async fn a_second_connect_takes_over_when_the_project_says_takeover() {
    let rig = Rig::start("{requireMfa: true, secondConnect: takeover}").await;
    let mut first = rig.connect(0).await;
    first.round_trip().await.expect("first works");
    let mut second = rig.connect(1).await;
    second.round_trip().await.expect("second works");
    let (closed, _) = first.closed_within(Duration::from_secs(5)).await;
    assert!(closed.reason.contains("taken over"), "{closed:?}");
    second.round_trip().await.expect("second still works");
    let ended = rig.disconnect_audited("cancelled").await;
    let connects = rig.events("gateway.connect");
    assert_eq!(connects.len(), 2);
    assert_eq!(connects[1].detail["tookOver"], ended.detail["session"], "the takeover names the session it ended");
    assert_eq!(rig.gw.live.lock().unwrap().len(), 1);
    assert_eq!(rig.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_second_connect_is_refused_while_the_first_lives_when_the_project_says_refuse() {
    let rig = Rig::start("{requireMfa: true, secondConnect: refuse}").await;
    let mut first = rig.connect(0).await;
    first.round_trip().await.expect("first works");
    assert_eq!(rig.open(1).await.err(), Some(409), "second connect not refused");
    first.round_trip().await.expect("first untouched");
    let refused: Vec<_> = rig.events("gateway.connect").into_iter().filter(|e| e.refused.is_some()).collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].detail["code"], "sessionActive");
    assert!(rig.metric(r#"noexit_gateway_refusals_total{reason="sessionActive"} 1"#).is_some());
    // Once the first has gone, the workspace is free again.
    drop(first);
    poll::until("the first session to end", Duration::from_secs(10), || async {
        rig.gw.live.lock().unwrap().is_empty()
    })
    .await;
    let mut again = rig.connect(2).await;
    again.round_trip().await.expect("connect after the first ended");
}

#[tokio::test]
async fn a_rotated_certificate_is_served_to_new_connections_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let write = |names: &[&str]| {
        let cert = pki::self_signed(names);
        cert.write(dir.path(), "tls.crt.new", "tls.key.new");
        std::fs::rename(dir.path().join("tls.key.new"), dir.path().join("tls.key")).unwrap();
        std::fs::rename(dir.path().join("tls.crt.new"), dir.path().join("tls.crt")).unwrap();
        cert.cert_der().to_vec()
    };
    let first = write(&["localhost"]);
    let (tls, cert) =
        noexit_gateway::serve::tls_config(&dir.path().join("tls.crt"), &dir.path().join("tls.key")).unwrap();
    let reloads = Arc::new(AtomicUsize::new(0));
    let seen = reloads.clone();
    noexit_web::tls::watch(cert, Duration::from_millis(100), move |r| {
        if matches!(r, Ok(true)) {
            seen.fetch_add(1, Ordering::SeqCst);
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
    tokio::spawn(noexit_gateway::serve::serve_tls(listener, tls, router, std::future::pending()));

    /// The certificate the server presents to a new connection.
    async fn presented(addr: SocketAddr) -> Vec<u8> {
        #[derive(Debug)]
        struct Any;
        impl rustls::client::danger::ServerCertVerifier for Any {
            fn verify_server_cert(
                &self,
                _: &rustls::pki_types::CertificateDer<'_>,
                _: &[rustls::pki_types::CertificateDer<'_>],
                _: &rustls::pki_types::ServerName<'_>,
                _: &[u8],
                _: rustls::pki_types::UnixTime,
            ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            fn verify_tls12_signature(
                &self,
                _: &[u8],
                _: &rustls::pki_types::CertificateDer<'_>,
                _: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
                Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
            }
            fn verify_tls13_signature(
                &self,
                _: &[u8],
                _: &rustls::pki_types::CertificateDer<'_>,
                _: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
                Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
            }
            fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
                rustls::crypto::ring::default_provider().signature_verification_algorithms.supported_schemes()
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Any))
            .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    }

    assert_eq!(presented(addr).await, first);
    let second = write(&["localhost", "desktop.example.org"]);
    poll::until("the new certificate to be served", Duration::from_secs(10), || async {
        presented(addr).await == second
    })
    .await;
    assert_eq!(reloads.load(Ordering::SeqCst), 1);
    // Garbage in the files: the last good certificate is still served.
    std::fs::write(dir.path().join("tls.crt"), "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(presented(addr).await, second);
}
