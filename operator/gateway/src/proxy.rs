//! One desktop session: the gateway authenticates to the desktop (VNC authentication with the
//! workspace's password), offers the browser security type None (the person signed in to the
//! gateway already), then relays both ways through the RFB filters until either side closes,
//! the person is idle or over the maximum session length, a re-check of their access fails, or
//! the session is taken over or signed out.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::directory::{self, Grant};
use crate::rfb::handshake::{self, ServerInit};
use crate::rfb::{ClientFilter, DropReason, PastePolicy, PixelFormat, RfbError, ServerFilter, Step};
use crate::state::{Gateway, LiveKey};

/// Time allowed for the desktop's TCP connect and RFB handshake.
const DESKTOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for the browser's RFB handshake.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(20);
const READ_CHUNK: usize = 64 * 1024;

/// A byte stream to a desktop.
trait DesktopStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> DesktopStream for T {}

/// Connects to a desktop: `host:port` over TCP, or `unix:<path>` (a VM console's socket on this
/// host, which only the gateway's user can open).
async fn connect(address: &str) -> std::io::Result<Box<dyn DesktopStream>> {
    match address.strip_prefix("unix:") {
        Some(path) => Ok(Box::new(tokio::net::UnixStream::connect(path).await?)),
        None => {
            let tcp = tokio::net::TcpStream::connect(address).await?;
            let _ = tcp.set_nodelay(true);
            Ok(Box::new(tcp))
        }
    }
}

/// Authenticate to the desktop and read its ServerInit; afterwards the desktop is told the
/// gateway's pixel format, so every rectangle can be sized.
pub async fn desktop_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    password: &[u8],
) -> Result<ServerInit, RfbError> {
    let io = |e: std::io::Error| RfbError::Handshake(format!("desktop: {e}"));
    let mut version = [0u8; 12];
    s.read_exact(&mut version).await.map_err(io)?;
    handshake::check_server_version(&version)?;
    s.write_all(handshake::VERSION_3_8).await.map_err(io)?;
    let count = s.read_u8().await.map_err(io)?;
    if count == 0 {
        let len = s.read_u32().await.map_err(io)?.min(1024);
        let mut reason = vec![0u8; len as usize];
        s.read_exact(&mut reason).await.map_err(io)?;
        return Err(RfbError::Handshake(format!("desktop refused: {}", String::from_utf8_lossy(&reason))));
    }
    let mut types = vec![0u8; usize::from(count)];
    s.read_exact(&mut types).await.map_err(io)?;
    let chosen = handshake::choose_security(&types)?;
    s.write_all(&[chosen]).await.map_err(io)?;
    let mut challenge = [0u8; 16];
    s.read_exact(&mut challenge).await.map_err(io)?;
    s.write_all(&handshake::vnc_auth_response(password, &challenge)).await.map_err(io)?;
    if s.read_u32().await.map_err(io)? != 0 {
        let len = s.read_u32().await.unwrap_or(0).min(1024);
        let mut reason = vec![0u8; len as usize];
        let _ = s.read_exact(&mut reason).await;
        return Err(RfbError::AuthFailed(String::from_utf8_lossy(&reason).into_owned()));
    }
    // ClientInit: not shared, so no other viewer stays connected to the desktop.
    s.write_all(&[0]).await.map_err(io)?;
    let mut head = vec![0u8; 24];
    s.read_exact(&mut head).await.map_err(io)?;
    let total = match ServerInit::parse(&head)? {
        Ok((init, _)) => return finish_init(s, init).await,
        Err(total) => total,
    };
    head.resize(total, 0);
    s.read_exact(&mut head[24..]).await.map_err(io)?;
    match ServerInit::parse(&head)? {
        Ok((init, _)) => finish_init(s, init).await,
        Err(_) => Err(RfbError::Handshake("ServerInit incomplete".into())),
    }
}

async fn finish_init<S: AsyncWrite + Unpin>(s: &mut S, init: ServerInit) -> Result<ServerInit, RfbError> {
    s.write_all(&crate::rfb::set_pixel_format(&PixelFormat::GATEWAY))
        .await
        .map_err(|e| RfbError::Handshake(format!("desktop: {e}")))?;
    Ok(init)
}

/// Bytes arriving as WebSocket binary messages, read as a stream during the handshake.
struct WsReader<'a> {
    rx: &'a mut futures::stream::SplitStream<WebSocket>,
    buf: Vec<u8>,
}

impl WsReader<'_> {
    async fn read_exact(&mut self, n: usize) -> Result<Vec<u8>, RfbError> {
        while self.buf.len() < n {
            match self.rx.next().await {
                Some(Ok(Message::Binary(b))) => self.buf.extend_from_slice(&b),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Err(RfbError::Handshake("browser sent a text frame; RFB travels in binary frames".into()));
                }
                Some(Ok(Message::Close(_))) | None => return Err(RfbError::Handshake("browser closed".into())),
                Some(Err(e)) => return Err(RfbError::Handshake(format!("browser: {e}"))),
            }
        }
        Ok(self.buf.drain(..n).collect())
    }
}

/// Why a session ended; `code()` is a metric label and audit detail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    BrowserClosed,
    DesktopClosed,
    Idle,
    MaxLength,
    /// Access re-check failed (member removed, project expired, workspace stopped).
    AccessLost(String),
    /// Taken over by another connection, or the person signed out.
    Cancelled(String),
    Violation(RfbError),
    DesktopUnreachable(String),
    Io(String),
}

impl End {
    pub fn code(&self) -> &'static str {
        match self {
            End::BrowserClosed => "browser_closed",
            End::DesktopClosed => "desktop_closed",
            End::Idle => "idle",
            End::MaxLength => "max_length",
            End::AccessLost(_) => "access_lost",
            End::Cancelled(_) => "cancelled",
            End::Violation(_) => "violation",
            End::DesktopUnreachable(_) => "desktop_unreachable",
            End::Io(_) => "io",
        }
    }

    pub fn message(&self) -> String {
        match self {
            End::BrowserClosed => "browser closed the connection".into(),
            End::DesktopClosed => "desktop closed the connection".into(),
            End::Idle => "no input for the project's idle limit (spec.desktop.idleTimeoutMinutes)".into(),
            End::MaxLength => "maximum session length reached".into(),
            End::AccessLost(r) => format!("access withdrawn: {r}"),
            End::Cancelled(r) => r.clone(),
            End::Violation(e) => format!("protocol violation: {e}"),
            End::DesktopUnreachable(e) => format!("desktop unreachable: {e}"),
            End::Io(e) => e.clone(),
        }
    }
}

/// Everything a running session needs.
pub struct Session {
    pub id: uuid::Uuid,
    pub user: String,
    pub has_mfa: bool,
    pub source: String,
    pub grant: Grant,
    pub cancel: watch::Receiver<Option<String>>,
}

/// Run the filters over `buf`, appending what passes to `out`. Returns whether a person's
/// input went by; the consumed prefix is removed from `buf`.
fn filter(
    mut step: impl FnMut(&[u8]) -> Result<Step, RfbError>,
    buf: &mut Vec<u8>,
    out: &mut Vec<u8>,
    dropped: &mut Vec<(DropReason, usize)>,
) -> Result<bool, RfbError> {
    let mut pos = 0;
    let mut input = false;
    let result = loop {
        match step(&buf[pos..]) {
            Err(e) => break Err(e),
            Ok(Step::Need(_)) => break Ok(()),
            Ok(Step::Forward { len, input: i }) => {
                out.extend_from_slice(&buf[pos..pos + len]);
                input |= i;
                pos += len;
            }
            Ok(Step::Drop { len, reason }) => {
                dropped.push((reason, len));
                pos += len;
            }
            Ok(Step::Replace { consumed, with, stripped }) => {
                out.extend_from_slice(&with);
                dropped.push((DropReason::EncodingStripped, stripped as usize));
                pos += consumed;
            }
        }
    };
    buf.drain(..pos);
    result.map(|()| input)
}

/// Connect to the desktop, do both handshakes, relay until the session ends. `ended` runs
/// before the browser is told (so the session list already says why when the page asks).
pub async fn run(gw: Arc<Gateway>, socket: WebSocket, mut session: Session, ended: impl FnOnce(&End)) -> End {
    let (mut tx, mut rx) = socket.split();
    let end = relay(&gw, &mut tx, &mut rx, &mut session).await;
    ended(&end);
    let code = match &end {
        End::Violation(_) => 1008,
        End::BrowserClosed => 1000,
        _ => 4000,
    };
    let mut reason = end.message();
    reason.truncate(120);
    let _ = tx.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
    end
}

async fn relay(
    gw: &Arc<Gateway>,
    tx: &mut futures::stream::SplitSink<WebSocket, Message>,
    rx: &mut futures::stream::SplitStream<WebSocket>,
    session: &mut Session,
) -> End {
    let grant = session.grant.clone();
    let mut tcp = match tokio::time::timeout(DESKTOP_TIMEOUT, connect(&grant.address)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return End::DesktopUnreachable(format!("{}: {e}", grant.address)),
        Err(_) => return End::DesktopUnreachable(format!("{}: connect timed out", grant.address)),
    };
    let init = match tokio::time::timeout(DESKTOP_TIMEOUT, desktop_handshake(&mut tcp, &grant.password)).await {
        Ok(Ok(init)) => init,
        Ok(Err(e)) => return End::Violation(e),
        Err(_) => return End::DesktopUnreachable("desktop handshake timed out".into()),
    };
    // The browser's handshake: version, security None, ClientInit, then our ServerInit.
    let mut reader = WsReader { rx, buf: Vec::new() };
    let browser = async {
        tx.send(Message::Binary(handshake::VERSION_3_8.to_vec().into()))
            .await
            .map_err(|e| RfbError::Handshake(e.to_string()))?;
        let version: [u8; 12] = reader.read_exact(12).await?.try_into().unwrap_or([0; 12]);
        handshake::check_client_version(&version)?;
        tx.send(Message::Binary(vec![1, handshake::SECURITY_NONE].into()))
            .await
            .map_err(|e| RfbError::Handshake(e.to_string()))?;
        let chosen = reader.read_exact(1).await?;
        if chosen[0] != handshake::SECURITY_NONE {
            return Err(RfbError::Handshake(format!("browser chose security type {}", chosen[0])));
        }
        tx.send(Message::Binary(vec![0, 0, 0, 0].into())).await.map_err(|e| RfbError::Handshake(e.to_string()))?;
        reader.read_exact(1).await?;
        let shown = ServerInit {
            format: PixelFormat::GATEWAY,
            name: format!("{}/{}", grant.project, grant.workspace).into_bytes(),
            ..init.clone()
        };
        tx.send(Message::Binary(shown.encode().into())).await.map_err(|e| RfbError::Handshake(e.to_string()))?;
        Ok(())
    };
    match tokio::time::timeout(BROWSER_TIMEOUT, browser).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return End::Violation(e),
        Err(_) => return End::Violation(RfbError::Handshake("browser handshake timed out".into())),
    }
    let mut cbuf = std::mem::take(&mut reader.buf);
    let rx = reader.rx;

    let mut server = ServerFilter::new(init.width, init.height);
    let mut client =
        ClientFilter::new(PastePolicy { allowed: grant.policy.clipboard_in, max_bytes: grant.policy.paste_max_bytes });
    let (mut tcp_r, mut tcp_w) = tokio::io::split(tcp);
    let mut sbuf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut audited: HashSet<DropReason> = HashSet::new();
    let idle = Duration::from_secs(u64::from(grant.policy.idle_timeout_seconds.max(1)));
    let end_by = Instant::now() + Duration::from_secs(u64::from(grant.policy.max_session_seconds.max(1)));
    let mut last_input = Instant::now();
    let mut recheck = tokio::time::interval(gw.config.recheck);
    recheck.tick().await;

    loop {
        let deadline = (last_input + idle).min(end_by);
        let mut out = Vec::new();
        let mut dropped = Vec::new();
        tokio::select! {
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    cbuf.extend_from_slice(&b);
                    match filter(|b| client.step(b), &mut cbuf, &mut out, &mut dropped) {
                        Ok(input) => if input { last_input = Instant::now() },
                        Err(e) => return End::Violation(e),
                    }
                    if !out.is_empty() {
                        if let Err(e) = tcp_w.write_all(&out).await {
                            return End::Io(format!("desktop: {e}"));
                        }
                        gw.metrics.bytes_to_desktop.inc_by(out.len() as u64);
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return End::Violation(RfbError::Malformed {
                        direction: crate::rfb::Direction::ClientToServer,
                        what: "WebSocket frame",
                        detail: "text frame; RFB travels in binary frames".into(),
                    });
                }
                Some(Ok(Message::Close(_))) | None => return End::BrowserClosed,
                Some(Err(e)) => return End::Io(format!("browser: {e}")),
            },
            read = tcp_r.read(&mut chunk) => match read {
                Ok(0) => return End::DesktopClosed,
                Ok(n) => {
                    sbuf.extend_from_slice(&chunk[..n]);
                    if let Err(e) = filter(|b| server.step(b), &mut sbuf, &mut out, &mut dropped) {
                        return End::Violation(e);
                    }
                    if !out.is_empty() {
                        let len = out.len() as u64;
                        if let Err(e) = tx.send(Message::Binary(out.into())).await {
                            return End::Io(format!("browser: {e}"));
                        }
                        gw.metrics.bytes_to_browser.inc_by(len);
                    }
                }
                Err(e) => return End::Io(format!("desktop: {e}")),
            },
            _ = recheck.tick() => {
                if let Err(refusal) = directory::resolve(
                    gw.directory.as_ref(), &session.user, session.has_mfa, &grant.project, &grant.workspace,
                ).await {
                    return End::AccessLost(refusal.to_string());
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                return if Instant::now() >= end_by { End::MaxLength } else { End::Idle };
            }
            changed = session.cancel.changed() => {
                let why = if changed.is_ok() { session.cancel.borrow().clone() } else { None };
                return End::Cancelled(why.unwrap_or_else(|| "gateway shutting down".into()));
            }
        }
        for (reason, bytes) in dropped {
            gw.metrics.drops.get_or_create(&crate::metrics::ReasonLabels { reason: reason.as_str() }).inc();
            gw.metrics
                .dropped_bytes
                .get_or_create(&crate::metrics::ReasonLabels { reason: reason.as_str() })
                .inc_by(bytes as u64);
            gw.count_drop(session.id, reason);
            if audited.insert(reason) {
                gw.audit_drop(session, reason).await;
            }
        }
    }
}

impl Gateway {
    async fn audit_drop(&self, session: &Session, reason: DropReason) {
        let event = crate::record::GatewayEvent {
            actor: format!("user:{}", session.user),
            action: "gateway.drop".into(),
            object: format!("workspace:{}/{}", session.grant.project, session.grant.workspace),
            refused: Some(format!("RFB filter dropped {} (first in this session)", reason.as_str())),
            source: Some(session.source.clone()),
            detail: serde_json::json!({"session": session.id, "reason": reason.as_str()}),
        };
        self.audit(event).await;
    }
}

/// The key of the one live session a workspace may have.
pub fn live_key(grant: &Grant) -> LiveKey {
    (grant.project.clone(), grant.workspace.clone())
}
