//! RFB 3.8 (VNC) as the tests speak it: the desktop's side of the handshake for fake desktops
//! (VNC authentication with a DES challenge, ServerInit), and the browser's side over the
//! gateway's WebSocket (security type None, ClientInit, ServerInit).
//!
//! Written apart from the gateway's own RFB code on purpose: a test then checks the gateway
//! against a second reading of the protocol, not against itself.

use std::net::SocketAddr;
use std::sync::Arc;

use des::Des;
use des::cipher::{BlockEncrypt, KeyInit, generic_array::GenericArray};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The protocol version line of RFB 3.8.
pub const VERSION_3_8: &[u8; 12] = b"RFB 003.008\n";
/// Security type None.
pub const SECURITY_NONE: u8 = 1;
/// Security type VNC authentication (a DES challenge keyed with the password).
pub const SECURITY_VNC_AUTH: u8 = 2;
/// The challenge fake desktops send: fixed, so a failure is reproducible.
pub const CHALLENGE: [u8; 16] = [7; 16];
/// 32 bits per pixel, depth 24, little-endian true colour, 8 bits a channel (red at bit 16).
pub const PIXEL_FORMAT_32: [u8; 16] = [32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0];

/// The VNC authentication response: each 8-byte half of the challenge DES-encrypted with the
/// password (its first 8 bytes, zero-padded, each byte bit-reversed) as key.
pub fn vnc_auth_response(password: &[u8], challenge: &[u8; 16]) -> [u8; 16] {
    let mut key = [0u8; 8];
    for (k, p) in key.iter_mut().zip(password) {
        *k = p.reverse_bits();
    }
    let cipher = Des::new(GenericArray::from_slice(&key));
    let mut out = *challenge;
    for block in out.chunks_exact_mut(8) {
        cipher.encrypt_block(GenericArray::from_mut_slice(block));
    }
    out
}

/// ServerInit: framebuffer size, pixel format, desktop name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerInit {
    pub width: u16,
    pub height: u16,
    pub pixel_format: [u8; 16],
    pub name: Vec<u8>,
}

impl ServerInit {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(24 + self.name.len());
        v.extend(self.width.to_be_bytes());
        v.extend(self.height.to_be_bytes());
        v.extend(self.pixel_format);
        v.extend(u32::try_from(self.name.len()).expect("a short name").to_be_bytes());
        v.extend(&self.name);
        v
    }
}

// ---- the desktop's side ---------------------------------------------------------------------

/// The desktop's side up to the security result: version 3.8, VNC authentication only, the
/// [`CHALLENGE`]. With `password`, a wrong answer gets a failed result and `Ok(false)`; without
/// one, any answer passes.
pub async fn serve_security<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    password: Option<&[u8]>,
) -> std::io::Result<bool> {
    let mut version = [0u8; 12];
    s.write_all(VERSION_3_8).await?;
    s.read_exact(&mut version).await?;
    s.write_all(&[1, SECURITY_VNC_AUTH]).await?;
    let mut chosen = [0u8; 1];
    s.read_exact(&mut chosen).await?;
    s.write_all(&CHALLENGE).await?;
    let mut answer = [0u8; 16];
    s.read_exact(&mut answer).await?;
    if password.is_some_and(|p| answer != vnc_auth_response(p, &CHALLENGE)) {
        s.write_all(&[0, 0, 0, 1]).await?;
        return Ok(false);
    }
    s.write_all(&[0, 0, 0, 0]).await?;
    Ok(true)
}

/// The desktop's side after authentication: reads ClientInit, sends `init`.
pub async fn serve_init<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, init: &ServerInit) -> std::io::Result<()> {
    let mut shared = [0u8; 1];
    s.read_exact(&mut shared).await?;
    s.write_all(&init.encode()).await
}

/// [`serve_security`] then, when it passed, [`serve_init`]; whether it passed.
pub async fn serve_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    password: Option<&[u8]>,
    init: &ServerInit,
) -> std::io::Result<bool> {
    if !serve_security(s, password).await? {
        return Ok(false);
    }
    serve_init(s, init).await?;
    Ok(true)
}

// ---- the browser's side, over the gateway's WebSocket -----------------------------------------

/// The gateway's desktop WebSocket, over TLS.
pub type Wss = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// Trust anchors from PEM certificates.
pub fn roots(pem: &[u8]) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c.expect("a PEM certificate")).expect("a usable CA certificate");
    }
    roots
}

/// Opens `wss://localhost:<port><path>` on `addr` as a browser on the gateway's page would
/// (its Origin, the session `cookie`), trusting `roots`; `Err(status)` when the upgrade is
/// refused.
pub async fn open(addr: SocketAddr, roots: rustls::RootCertStore, path: &str, cookie: &str) -> Result<Wss, u16> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("a server name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap_or_else(|e| panic!("TLS to {addr} (a certificate for localhost from the CA): {e}"));
    let origin = format!("https://localhost:{}", addr.port());
    let mut req = format!("wss://localhost:{}{path}", addr.port()).into_client_request().expect("a URL");
    req.headers_mut().insert("origin", origin.parse().expect("an origin"));
    req.headers_mut().insert("cookie", cookie.parse().expect("a cookie"));
    match tokio_tungstenite::client_async(req, tls).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("WebSocket: {e}"),
    }
}

/// How a session ended when a read did not get its bytes.
#[derive(Debug)]
pub struct Closed {
    /// The close frame's code; 0 without one.
    pub code: u16,
    pub reason: String,
}

/// The browser's side of RFB over the gateway's WebSocket.
pub struct Viewer {
    ws: Wss,
    buf: Vec<u8>,
}

impl Viewer {
    pub fn new(ws: Wss) -> Viewer {
        Viewer { ws, buf: Vec::new() }
    }

    /// Sends `b` in one binary message; panics if it cannot.
    pub async fn send(&mut self, b: &[u8]) {
        self.ws.send(Message::Binary(b.to_vec().into())).await.expect("send");
    }

    /// Sends `b`, or says how the gateway closed the session.
    pub async fn try_send(&mut self, b: &[u8]) -> Result<(), Closed> {
        match self.ws.send(Message::Binary(b.to_vec().into())).await {
            Ok(()) => Ok(()),
            Err(_) => Err(self.closed().await),
        }
    }

    /// The next `n` bytes, across messages.
    pub async fn read(&mut self, n: usize) -> Result<Vec<u8>, Closed> {
        while self.buf.len() < n {
            match self.ws.next().await {
                Some(Ok(Message::Binary(b))) => self.buf.extend_from_slice(&b),
                Some(Ok(Message::Close(c))) => {
                    return Err(c.map_or(Closed { code: 0, reason: String::new() }, |c| Closed {
                        code: c.code.into(),
                        reason: c.reason.to_string(),
                    }));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(Closed { code: 0, reason: e.to_string() }),
                None => return Err(Closed { code: 0, reason: "ended".into() }),
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Waits for the session to end (use with a timeout), reading past whatever comes first.
    pub async fn closed(&mut self) -> Closed {
        loop {
            self.buf.clear();
            if let Err(closed) = self.read(1 << 20).await {
                return closed;
            }
        }
    }

    /// The handshake a browser does with the gateway: version 3.8, security type None (the
    /// gateway offers only that: it authenticated to the desktop itself), a shared ClientInit.
    /// Fails the test on anything else; the desktop's ServerInit.
    pub async fn handshake(&mut self) -> Result<ServerInit, Closed> {
        assert_eq!(&self.read(12).await?[..], VERSION_3_8, "the gateway's protocol version");
        self.send(VERSION_3_8).await;
        assert_eq!(self.read(2).await?, [1, SECURITY_NONE], "the gateway's security types");
        self.send(&[SECURITY_NONE]).await;
        assert_eq!(self.read(4).await?, [0, 0, 0, 0], "security result");
        self.send(&[1]).await;
        let head = self.read(24).await?;
        let name_len = u32::from_be_bytes([head[20], head[21], head[22], head[23]]) as usize;
        let name = self.read(name_len).await?;
        Ok(ServerInit {
            width: u16::from_be_bytes([head[0], head[1]]),
            height: u16::from_be_bytes([head[2], head[3]]),
            pixel_format: head[4..20].try_into().expect("16 bytes"),
            name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vnc_auth_matches_vncpasswd() {
        // A `vncpasswd -f` file is the password DES-encrypted the same way under a fixed key:
        // `printf password | vncpasswd -f | xxd -p` (TigerVNC 1.12) is dbd83cfd727a1458.
        let fixed_key = [23, 82, 107, 6, 35, 78, 88, 7];
        let two_blocks: [u8; 16] = *b"passwordpassword";
        let file = [0xdb, 0xd8, 0x3c, 0xfd, 0x72, 0x7a, 0x14, 0x58];
        assert_eq!(vnc_auth_response(&fixed_key, &two_blocks).to_vec(), [file, file].concat());
        // Only the first 8 bytes of a password count.
        let c = CHALLENGE;
        assert_eq!(vnc_auth_response(b"password-and-more", &c), vnc_auth_response(b"password", &c));
        assert_ne!(vnc_auth_response(b"passwore", &c), vnc_auth_response(b"password", &c));
    }

    #[tokio::test]
    async fn a_fake_desktop_refuses_a_wrong_password_and_serves_init_to_the_right_one() {
        let init = ServerInit { width: 64, height: 48, pixel_format: PIXEL_FORMAT_32, name: b"fake".to_vec() };
        for (answer_with, passes) in [(&b"right"[..], true), (&b"wrong"[..], false)] {
            let (mut desktop, mut client) = tokio::io::duplex(256);
            let served = init.clone();
            let server = tokio::spawn(async move { serve_handshake(&mut desktop, Some(b"right"), &served).await });
            let mut b = [0u8; 16];
            client.read_exact(&mut b[..12]).await.unwrap();
            assert_eq!(&b[..12], VERSION_3_8);
            client.write_all(VERSION_3_8).await.unwrap();
            client.read_exact(&mut b[..2]).await.unwrap();
            assert_eq!(b[..2], [1, SECURITY_VNC_AUTH]);
            client.write_all(&[SECURITY_VNC_AUTH]).await.unwrap();
            client.read_exact(&mut b).await.unwrap();
            client.write_all(&vnc_auth_response(answer_with, &b)).await.unwrap();
            client.read_exact(&mut b[..4]).await.unwrap();
            assert_eq!(b[..4] == [0, 0, 0, 0], passes);
            if passes {
                client.write_all(&[1]).await.unwrap();
                let mut got = vec![0u8; init.encode().len()];
                client.read_exact(&mut got).await.unwrap();
                assert_eq!(got, init.encode());
            }
            assert_eq!(server.await.unwrap().unwrap(), passes);
        }
    }
}
