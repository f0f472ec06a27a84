//! Gateway benchmark (not CI): the same framebuffer stream from one fake desktop, read directly
//! over TCP, through websockify (Debian's, TLS) and through the gateway (TLS, signed-in
//! session, RFB filter), in one run. Reports MB/s, the ratio to websockify, per-update latency
//! (p50/p99) and what each proxy adds to the direct p99, then the gateway's memory with 1 and
//! with 200 idle sessions (its own process: `bench serve`).
//!
//!   hack/bench/gateway/run.sh            # SECONDS_EACH=10 SESSIONS=200
//!
//! The fake desktop answers each full FramebufferUpdateRequest with one Raw 256×256 rectangle
//! (256 KiB) whose first 8 bytes are the send time; 4 requests are kept in flight (throughput).
//! An incremental request gets one Raw 8×8 rectangle (272 bytes): the latency part sends one
//! and waits for its answer, one message in flight, alternating direct / websockify / gateway
//! in rounds so all three see the same machine load; "added" is the round-trip time a proxy
//! adds over the direct TCP path (both directions of one message).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use noexit_test_support::rfb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const RECT: u16 = 256;
const UPDATE: usize = 4 + 12 + (RECT as usize) * (RECT as usize) * 4;
const IN_FLIGHT: usize = 4;
const SMALL: u16 = 8;
const SMALL_UPDATE: usize = 4 + 12 + (SMALL as usize) * (SMALL as usize) * 4;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn epoch() -> &'static Instant {
    static E: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    E.get_or_init(Instant::now)
}

/// The fake desktop: VNC auth (any answer accepted), 1024×768, Raw updates on request.
async fn desktop(listener: TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else { continue };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let r: Res<()> = async {
                let init = rfb::ServerInit {
                    width: 1024,
                    height: 768,
                    pixel_format: noexit_gateway::rfb::PixelFormat::GATEWAY.encode(),
                    name: b"fake".to_vec(),
                };
                rfb::serve_handshake(&mut s, None, &init).await?;
                let build = |side: u16, size: usize| {
                    let mut update = vec![0u8, 0, 0, 1];
                    for n in [0u16, 0, side, side] {
                        update.extend(n.to_be_bytes());
                    }
                    update.extend(0i32.to_be_bytes());
                    update.resize(size, 0x55);
                    update
                };
                let (mut update, mut small) = (build(RECT, UPDATE), build(SMALL, SMALL_UPDATE));
                let (mut rd, mut wr) = s.into_split();
                let mut msg = [0u8; 1];
                loop {
                    rd.read_exact(&mut msg).await?;
                    let rest = match msg[0] {
                        0 => 19,
                        2 => {
                            let mut h = [0u8; 3];
                            rd.read_exact(&mut h).await?;
                            4 * usize::from(u16::from_be_bytes([h[1], h[2]]))
                        }
                        3 => 9,
                        4 => 7,
                        5 => 5,
                        other => return Err(format!("desktop got message {other}").into()),
                    };
                    let mut skip = vec![0u8; rest];
                    rd.read_exact(&mut skip).await?;
                    if msg[0] == 3 {
                        let t = epoch().elapsed().as_nanos() as u64;
                        // skip[0] is the request's incremental flag.
                        let out = if skip[0] == 1 { &mut small } else { &mut update };
                        out[16..24].copy_from_slice(&t.to_be_bytes());
                        wr.write_all(out).await?;
                    }
                }
            }
            .await;
            drop(r);
        });
    }
}

/// A byte stream to the desktop, however it is carried.
enum Link {
    Tcp(TcpStream),
    Ws(Box<tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>>, Vec<u8>),
}

impl Link {
    async fn send(&mut self, b: &[u8]) -> Res<()> {
        match self {
            Link::Tcp(s) => Ok(s.write_all(b).await?),
            Link::Ws(ws, _) => Ok(ws.send(Message::Binary(b.to_vec().into())).await?),
        }
    }

    async fn read_exact(&mut self, n: usize) -> Res<Vec<u8>> {
        match self {
            Link::Tcp(s) => {
                let mut v = vec![0u8; n];
                s.read_exact(&mut v).await?;
                Ok(v)
            }
            Link::Ws(ws, buf) => {
                while buf.len() < n {
                    match ws.next().await {
                        Some(Ok(Message::Binary(b))) => buf.extend_from_slice(&b),
                        Some(Ok(Message::Close(c))) => return Err(format!("closed: {c:?}").into()),
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(e.into()),
                        None => return Err("closed".into()),
                    }
                }
                Ok(buf.drain(..n).collect())
            }
        }
    }
}

async fn tls_ws(addr: SocketAddr, path: &str, cert: &[u8], cookie: Option<&str>) -> Res<Link> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &cert[..]) {
        roots.add(c?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
    let mut req = format!("wss://localhost:{}{path}", addr.port()).into_client_request()?;
    req.headers_mut().insert("origin", format!("https://localhost:{}", addr.port()).parse()?);
    if let Some(c) = cookie {
        req.headers_mut().insert("cookie", c.parse()?);
    }
    let (ws, _) = tokio_tungstenite::client_async(req, tls).await?;
    Ok(Link::Ws(Box::new(ws), Vec::new()))
}

/// The client side of the handshake (None or VNC auth, whichever is offered).
async fn handshake(link: &mut Link) -> Res<()> {
    link.read_exact(12).await?;
    link.send(b"RFB 003.008\n").await?;
    let n = link.read_exact(1).await?[0] as usize;
    let types = link.read_exact(n).await?;
    if types.contains(&1) {
        link.send(&[1]).await?;
    } else {
        link.send(&[2]).await?;
        link.read_exact(16).await?;
        link.send(&[0; 16]).await?;
    }
    link.read_exact(4).await?;
    link.send(&[1]).await?;
    let init = link.read_exact(24).await?;
    let name = u32::from_be_bytes([init[20], init[21], init[22], init[23]]) as usize;
    link.read_exact(name).await?;
    link.send(&noexit_gateway::rfb::set_pixel_format(&noexit_gateway::rfb::PixelFormat::GATEWAY)).await?;
    link.send(&[2, 0, 0, 1, 0, 0, 0, 0]).await?;
    Ok(())
}

/// A full request: answered with the 256 KiB rectangle.
const FBUR: [u8; 10] = [3, 0, 0, 0, 0, 0, 1, 0, 1, 0];
/// An incremental request: answered with the 272-byte rectangle.
const FBUR_SMALL: [u8; 10] = [3, 1, 0, 0, 0, 0, 1, 0, 1, 0];

/// `n` round trips of one small update, one in flight: sorted round-trip times in µs.
async fn round_trips(link: &mut Link, n: usize, out: &mut Vec<u64>) -> Res<()> {
    for _ in 0..n {
        let start = Instant::now();
        link.send(&FBUR_SMALL).await?;
        link.read_exact(SMALL_UPDATE).await?;
        out.push(start.elapsed().as_micros() as u64);
    }
    Ok(())
}

/// Stream for `secs`: (MB/s, sorted latencies in µs).
async fn stream(mut link: Link, secs: u64) -> Res<(f64, Vec<u64>)> {
    handshake(&mut link).await?;
    for _ in 0..IN_FLIGHT {
        link.send(&FBUR).await?;
    }
    let start = Instant::now();
    let mut lat = Vec::new();
    let mut bytes = 0usize;
    while start.elapsed() < Duration::from_secs(secs) {
        let u = link.read_exact(UPDATE).await?;
        let sent = u64::from_be_bytes(u[16..24].try_into()?);
        lat.push((epoch().elapsed().as_nanos() as u64 - sent) / 1000);
        bytes += UPDATE;
        link.send(&FBUR).await?;
    }
    let mbps = bytes as f64 / start.elapsed().as_secs_f64() / 1e6;
    lat.sort_unstable();
    Ok((mbps, lat))
}

fn pct(v: &[u64], p: f64) -> u64 {
    v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1))).copied().unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

/// `bench serve <dir> <directory.yaml>`: the gateway alone in this process.
async fn serve(dir: PathBuf, directory: PathBuf, sessions: usize) -> Res<()> {
    use noexit_gateway::{Gateway, directory::FileDirectory, oidc, record::MemoryRecorder, state};
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let oidc = oidc::OidcClient::new(oidc::OidcSettings {
        issuer: "http://127.0.0.1:9".into(),
        client_id: "bench".into(),
        client_secret: None,
        redirect_uri: format!("https://localhost:{}/callback", addr.port()),
        user_claim: "email".into(),
        ca_pem: None,
    })?;
    let config = state::Config {
        public_origin: format!("https://localhost:{}", addr.port()),
        recheck: Duration::from_secs(15),
        require_mfa: true,
        max_signin: Duration::from_secs(3600),
        novnc_dir: "/usr/share/novnc".into(),
    };
    // Audit events stay in memory here; the bench measures the data path.
    let gw = Gateway::new(Arc::new(FileDirectory::new(directory)), Arc::new(MemoryRecorder::default()), oidc, config);
    for i in 0..=sessions {
        let who = oidc::SignedIn {
            user: "bench@example".into(),
            amr: vec!["otp".into()],
            expires: chrono::Utc::now() + chrono::Duration::hours(1),
            bearer: oidc::Bearer::default(),
        };
        let signin = state::SignIn { who, csrf: "x".into(), ends: chrono::Utc::now() + chrono::Duration::hours(1) };
        gw.signins.lock().map_err(|_| "poisoned")?.insert(format!("bench-{i}"), signin);
    }
    let (tls, _cert) = noexit_gateway::serve::tls_config(&dir.join("cert.pem"), &dir.join("key.pem"))?;
    println!("READY {addr}");
    noexit_gateway::serve::serve_tls(listener, tls, noexit_gateway::web::router(gw), std::future::pending()).await;
    Ok(())
}

#[tokio::main]
async fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let sessions: usize = std::env::var("SESSIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
    if args.get(1).map(String::as_str) == Some("serve") {
        return serve(PathBuf::from(&args[2]), PathBuf::from(&args[3]), sessions).await;
    }
    let secs: u64 = std::env::var("SECONDS_EACH").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    epoch();
    let dir = tempfile::tempdir()?;
    let cert = noexit_test_support::pki::self_signed(&["localhost"]);
    cert.write(dir.path(), "cert.pem", "key.pem");
    let cert_pem = cert.cert_pem().into_bytes();

    let desk = TcpListener::bind("127.0.0.1:0").await?;
    let desk_addr = desk.local_addr()?;
    tokio::spawn(desktop(desk));

    let mut yaml = String::from(
        "projects:\n- name: bench\n  members: [bench@example]\n  desktop: {requireMfa: true}\nworkspaces:\n",
    );
    for i in 0..=sessions {
        yaml.push_str(&format!("- {{project: bench, name: ws{i}, owner: bench@example, running: true, desktop: \"{desk_addr}\", vncPassword: x}}\n"));
    }
    let directory = dir.path().join("directory.yaml");
    std::fs::write(&directory, yaml)?;

    // websockify, TLS only, to the same desktop.
    let ws_port = { std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port() };
    let mut websockify = std::process::Command::new("websockify")
        .args(["--ssl-only", "--cert"])
        .arg(dir.path().join("cert.pem"))
        .arg("--key")
        .arg(dir.path().join("key.pem"))
        .arg(format!("127.0.0.1:{ws_port}"))
        .arg(desk_addr.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    // The gateway in its own process.
    let mut gateway = tokio::process::Command::new(&args[0])
        .arg("serve")
        .arg(dir.path())
        .arg(&directory)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut out = tokio::io::BufReader::new(gateway.stdout.take().ok_or("no stdout")?);
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line).await?;
    let gw_addr: SocketAddr = line.trim().strip_prefix("READY ").ok_or("gateway did not start")?.parse()?;
    let gw_pid = gateway.id().ok_or("no pid")?;
    let ws_addr: SocketAddr = format!("127.0.0.1:{ws_port}").parse()?;
    for _ in 0..100 {
        if TcpStream::connect(ws_addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (d_mbps, d_lat) = stream(Link::Tcp(TcpStream::connect(desk_addr).await?), secs).await?;
    let (w_mbps, w_lat) = stream(tls_ws(ws_addr, "/", &cert_pem, None).await?, secs).await?;
    let (g_mbps, g_lat) =
        stream(tls_ws(gw_addr, "/ws/bench/ws0", &cert_pem, Some("__Host-noexit-gateway=bench-0")).await?, secs).await?;
    println!("path        MB/s   updates  p50 µs  p99 µs  added p99 µs");
    for (name, mbps, lat) in [("direct", d_mbps, &d_lat), ("websockify", w_mbps, &w_lat), ("gateway", g_mbps, &g_lat)] {
        println!(
            "{name:<10} {mbps:>7.1} {:>8} {:>7} {:>7} {:>12}",
            lat.len(),
            pct(lat, 0.5),
            pct(lat, 0.99),
            pct(lat, 0.99) as i64 - pct(&d_lat, 0.99) as i64
        );
    }
    println!("throughput gateway/websockify: {:.2}", g_mbps / w_mbps);

    // Per-message latency: one small update in flight, the three paths in alternating rounds.
    let rounds: usize = std::env::var("LATENCY_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let per_round: usize = std::env::var("LATENCY_PER_ROUND").ok().and_then(|s| s.parse().ok()).unwrap_or(500);
    let mut links = [
        Link::Tcp(TcpStream::connect(desk_addr).await?),
        tls_ws(ws_addr, "/", &cert_pem, None).await?,
        tls_ws(gw_addr, "/ws/bench/ws0", &cert_pem, Some("__Host-noexit-gateway=bench-0")).await?,
    ];
    let mut rtts: [Vec<u64>; 3] = Default::default();
    for link in links.iter_mut() {
        handshake(link).await?;
        round_trips(link, 200, &mut Vec::new()).await?; // warm-up
    }
    for _ in 0..rounds {
        for (link, out) in links.iter_mut().zip(rtts.iter_mut()) {
            round_trips(link, per_round, out).await?;
        }
    }
    for r in rtts.iter_mut() {
        r.sort_unstable();
    }
    println!(
        "\nper-message round trip, one {SMALL_UPDATE}-byte update in flight, {} per path in {rounds} alternating rounds:",
        rounds * per_round
    );
    println!("path        p50 µs  p90 µs  p99 µs  added p50 µs  added p99 µs");
    for (name, r) in ["direct", "websockify", "gateway"].iter().zip(rtts.iter()) {
        println!(
            "{name:<10} {:>7} {:>7} {:>7} {:>13} {:>13}",
            pct(r, 0.5),
            pct(r, 0.9),
            pct(r, 0.99),
            pct(r, 0.5) as i64 - pct(&rtts[0], 0.5) as i64,
            pct(r, 0.99) as i64 - pct(&rtts[0], 0.99) as i64
        );
    }
    println!(
        "gateway minus websockify: p50 {} µs, p99 {} µs",
        pct(&rtts[2], 0.5) as i64 - pct(&rtts[1], 0.5) as i64,
        pct(&rtts[2], 0.99) as i64 - pct(&rtts[1], 0.99) as i64
    );
    drop(links);

    // Memory: idle sessions (handshake done, no traffic).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = rss_kib(gw_pid);
    let mut idle = Vec::new();
    for i in 1..=sessions {
        let mut link =
            tls_ws(gw_addr, &format!("/ws/bench/ws{i}"), &cert_pem, Some(&format!("__Host-noexit-gateway=bench-{i}")))
                .await?;
        handshake(&mut link).await?;
        idle.push(link);
        if i == 1 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            println!("gateway RSS: {base} KiB before, {} KiB with 1 idle session", rss_kib(gw_pid));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let full = rss_kib(gw_pid);
    println!(
        "gateway RSS with {sessions} idle sessions: {full} KiB ({:.1} KiB per session)",
        (full.saturating_sub(base)) as f64 / sessions as f64
    );
    drop(idle);
    let _ = websockify.kill();
    let _ = websockify.wait();
    Ok(())
}
