//! The pieces of the two RFB 3.8 handshakes: the gateway is a client to the desktop (VNC
//! authentication with the workspace's password) and a server to the browser (security type
//! None: the person has already signed in to the gateway).

use des::Des;
use des::cipher::{BlockEncrypt, KeyInit, generic_array::GenericArray};

use super::{MAX_FRAMEBUFFER_SIDE, MAX_NAME, PixelFormat, RfbError, u16_at, u32_at};

/// The only protocol version the gateway speaks, both ways.
pub const VERSION_3_8: &[u8; 12] = b"RFB 003.008\n";
/// Security types.
pub const SECURITY_NONE: u8 = 1;
pub const SECURITY_VNC_AUTH: u8 = 2;

fn fail(message: impl Into<String>) -> RfbError {
    RfbError::Handshake(message.into())
}

/// Parse a `RFB xxx.yyy\n` version line.
pub fn parse_version(line: &[u8; 12]) -> Result<(u16, u16), RfbError> {
    let bad = || fail(format!("not an RFB version line: {:?}", String::from_utf8_lossy(line)));
    if &line[..4] != b"RFB " || line[7] != b'.' || line[11] != b'\n' {
        return Err(bad());
    }
    let num = |b: &[u8]| -> Result<u16, RfbError> {
        if !b.iter().all(u8::is_ascii_digit) {
            return Err(bad());
        }
        std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()).ok_or_else(bad)
    };
    Ok((num(&line[4..7])?, num(&line[8..11])?))
}

/// The desktop's version must be 3.8 or later (the gateway then speaks 3.8).
pub fn check_server_version(line: &[u8; 12]) -> Result<(), RfbError> {
    let (major, minor) = parse_version(line)?;
    if (major, minor) < (3, 8) {
        return Err(fail(format!("desktop speaks RFB {major}.{minor}; 3.8 or later is required")));
    }
    Ok(())
}

/// The browser must answer 3.8 exactly.
pub fn check_client_version(line: &[u8; 12]) -> Result<(), RfbError> {
    if line != VERSION_3_8 {
        return Err(fail(format!("browser asked for {:?}; only RFB 003.008 is served", String::from_utf8_lossy(line))));
    }
    Ok(())
}

/// Choose VNC authentication from the desktop's list; anything else (including None) is
/// refused, so a desktop without a password is never used.
pub fn choose_security(types: &[u8]) -> Result<u8, RfbError> {
    if types.contains(&SECURITY_VNC_AUTH) {
        Ok(SECURITY_VNC_AUTH)
    } else {
        Err(fail(format!("desktop offers security types {types:?}, not VNC authentication (2)")))
    }
}

/// The VNC authentication response: the challenge DES-encrypted with the password (at most 8
/// bytes, zero-padded) as key, each key byte bit-reversed, as every VNC implementation does.
pub fn vnc_auth_response(password: &[u8], challenge: &[u8; 16]) -> [u8; 16] {
    let cipher = vnc_des(password);
    let mut out = *challenge;
    for block in out.chunks_exact_mut(8) {
        cipher.encrypt_block(GenericArray::from_mut_slice(block));
    }
    out
}

/// DES keyed the VNC way: the first 8 bytes, zero-padded, each bit-reversed.
fn vnc_des(password: &[u8]) -> Des {
    let mut key = [0u8; 8];
    for (k, p) in key.iter_mut().zip(password.iter()) {
        *k = p.reverse_bits();
    }
    Des::new(GenericArray::from_slice(&key))
}

/// The fixed key VNC servers obfuscate stored passwords with (`vncpasswd -f` files).
const PASSWORD_FILE_KEY: [u8; 8] = [23, 82, 107, 6, 35, 78, 88, 7];

/// The 8-byte password file TigerVNC's `-PasswordFile`/`-rfbauth` reads (what `vncpasswd -f`
/// writes), so the operator and tests need no `vncpasswd` binary.
pub fn password_file(password: &[u8]) -> [u8; 8] {
    let mut block = [0u8; 8];
    for (b, p) in block.iter_mut().zip(password.iter()) {
        *b = *p;
    }
    vnc_des(&PASSWORD_FILE_KEY).encrypt_block(GenericArray::from_mut_slice(&mut block));
    block
}

/// ServerInit: framebuffer size, pixel format, desktop name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerInit {
    pub width: u16,
    pub height: u16,
    pub format: PixelFormat,
    pub name: Vec<u8>,
}

impl ServerInit {
    /// Parse from the start of `buf`: `Ok(None)` when more bytes are needed (`Err(n)` says how
    /// many in total), `Ok(Some((init, len)))` when complete.
    pub fn parse(buf: &[u8]) -> Result<Result<(ServerInit, usize), usize>, RfbError> {
        if buf.len() < 24 {
            return Ok(Err(24));
        }
        let (width, height) = (u16_at(buf, 0), u16_at(buf, 2));
        if width > MAX_FRAMEBUFFER_SIDE || height > MAX_FRAMEBUFFER_SIDE {
            return Err(fail(format!("framebuffer {width}x{height} is larger than {MAX_FRAMEBUFFER_SIDE}")));
        }
        let mut pf = [0u8; 16];
        pf.copy_from_slice(&buf[4..20]);
        let name_len = u64::from(u32_at(buf, 20));
        if name_len > MAX_NAME {
            return Err(fail(format!("desktop name of {name_len} bytes (limit {MAX_NAME})")));
        }
        let total = 24 + name_len as usize;
        if buf.len() < total {
            return Ok(Err(total));
        }
        let init = ServerInit { width, height, format: PixelFormat::parse(&pf), name: buf[24..total].to_vec() };
        Ok(Ok((init, total)))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(24 + self.name.len());
        v.extend(self.width.to_be_bytes());
        v.extend(self.height.to_be_bytes());
        v.extend(self.format.encode());
        v.extend((self.name.len() as u32).to_be_bytes());
        v.extend(&self.name);
        v
    }
}

/// A failure reason as RFB sends it (length + text).
pub fn reason(text: &str) -> Vec<u8> {
    let mut v = (text.len() as u32).to_be_bytes().to_vec();
    v.extend(text.as_bytes());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert!(check_server_version(b"RFB 003.008\n").is_ok());
        assert!(check_server_version(b"RFB 004.001\n").is_ok());
        assert!(check_server_version(b"RFB 003.003\n").is_err());
        assert!(check_server_version(b"HTTP/1.1 200").is_err());
        assert!(check_client_version(b"RFB 003.007\n").is_err());
        assert!(check_client_version(b"RFB 003.008\n").is_ok());
    }

    #[test]
    fn only_vnc_auth_is_chosen() {
        assert_eq!(choose_security(&[1, 2, 19]).unwrap(), 2);
        assert!(choose_security(&[1]).is_err());
        assert!(choose_security(&[]).is_err());
    }

    #[test]
    fn vnc_auth_encrypts_each_block_with_the_password() {
        // Xvnc accepting this response is checked in the end-to-end test.
        let challenge: [u8; 16] = core::array::from_fn(|i| i as u8);
        let r = vnc_auth_response(b"password", &challenge);
        // Each half is the DES encryption of one challenge block under the same key, so the
        // same block gives the same answer and the key's bit order matters.
        let same = vnc_auth_response(b"password", &[&challenge[..8], &challenge[..8]].concat().try_into().unwrap());
        assert_eq!(same[..8], same[8..]);
        assert_eq!(r[..8], same[..8]);
        assert_ne!(vnc_auth_response(b"passwore", &challenge), r);
        // Only 8 bytes count.
        assert_eq!(vnc_auth_response(b"password-and-more", &challenge), r);
    }

    #[test]
    fn password_file_matches_vncpasswd() {
        // `printf password | vncpasswd -f | xxd -p` with TigerVNC 1.12.
        assert_eq!(password_file(b"password"), [0xdb, 0xd8, 0x3c, 0xfd, 0x72, 0x7a, 0x14, 0x58]);
    }

    #[test]
    fn server_init_round_trips_and_limits() {
        let init = ServerInit { width: 1024, height: 768, format: PixelFormat::GATEWAY, name: b"ws".to_vec() };
        let bytes = init.encode();
        assert_eq!(ServerInit::parse(&bytes[..10]).unwrap(), Err(24));
        assert_eq!(ServerInit::parse(&bytes[..24]).unwrap(), Err(26));
        assert_eq!(ServerInit::parse(&bytes).unwrap(), Ok((init, 26)));
        let mut long = bytes.clone();
        long[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        assert!(ServerInit::parse(&long).is_err());
    }
}
