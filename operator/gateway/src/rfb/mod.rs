//! RFB 3.8 (the VNC protocol, RFC 6143) as the gateway needs it: the two handshakes and a
//! message-by-message filter for each direction. Everything here is pure: the filters are fed
//! the bytes received so far and say what to do with a prefix of them, so they are tested and
//! fuzzed without sockets.
//!
//! The filter is an allow list. The gateway fixes the pixel format (32 bits per pixel, depth
//! 24, true colour, the one noVNC asks for), narrows `SetEncodings` to the encodings it can
//! find the end of (Raw, CopyRect, RRE, Hextile, Tight and a few pseudo-encodings), and closes
//! the connection on any message or rectangle it does not know. Server→client `ServerCutText`
//! (copy out of the workspace) is always dropped, in both its plain and its extended
//! (negative length) form; client→server `ClientCutText` (paste in) passes only when the
//! project allows it and under a size cap.

pub mod client;
pub mod handshake;
pub mod harness;
pub mod server;

pub use client::{ClientFilter, PastePolicy};
pub use server::ServerFilter;

/// Bytes per pixel of the one pixel format the gateway lets through.
pub const BYTES_PER_PIXEL: u64 = 4;
/// Largest framebuffer side the gateway accepts from a desktop.
pub const MAX_FRAMEBUFFER_SIDE: u16 = 16384;
/// Largest `ServerCutText` the gateway skips over (it is dropped in any case); a longer one is
/// treated as hostile and closes the connection.
pub const MAX_SERVER_CUT_TEXT: u64 = 16 * 1024 * 1024;
/// Largest desktop name accepted (ServerInit and the DesktopName pseudo-encoding).
pub const MAX_NAME: u64 = 4096;
/// Largest number of encodings a client may list in `SetEncodings`.
pub const MAX_ENCODINGS: u16 = 512;
/// Largest cursor side accepted in a Cursor pseudo-rectangle.
pub const MAX_CURSOR_SIDE: u16 = 1024;

/// Encodings (and pseudo-encodings) the gateway lets a client ask for. Anything else is
/// stripped from `SetEncodings`, so the desktop never sends it.
pub mod encoding {
    pub const RAW: i32 = 0;
    pub const COPY_RECT: i32 = 1;
    pub const RRE: i32 = 2;
    pub const HEXTILE: i32 = 5;
    pub const TIGHT: i32 = 7;
    pub const DESKTOP_SIZE: i32 = -223;
    pub const LAST_RECT: i32 = -224;
    pub const CURSOR: i32 = -239;
    pub const QEMU_EXTENDED_KEY: i32 = -258;
    pub const DESKTOP_NAME: i32 = -307;
    pub const EXTENDED_DESKTOP_SIZE: i32 = -308;
    /// The extended clipboard: carries clipboard text, compressed, both ways. Never allowed.
    pub const EXTENDED_CLIPBOARD: i32 = 0xC0A1_E5CEu32 as i32;

    /// JPEG quality (-32..=-23) and zlib level (-256..=-247) hints: no data of their own.
    pub fn is_level_hint(e: i32) -> bool {
        (-32..=-23).contains(&e) || (-256..=-247).contains(&e)
    }

    /// May a client ask for `e`?
    pub fn allowed(e: i32) -> bool {
        matches!(
            e,
            RAW | COPY_RECT
                | RRE
                | HEXTILE
                | TIGHT
                | DESKTOP_SIZE
                | LAST_RECT
                | CURSOR
                | QEMU_EXTENDED_KEY
                | DESKTOP_NAME
                | EXTENDED_DESKTOP_SIZE
        ) || is_level_hint(e)
    }
}

/// What the filter decided about a prefix of the buffered bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing can be decided until the buffer holds at least this many bytes.
    Need(usize),
    /// Send the first `len` bytes on. `input` is true when they are (part of) a person's
    /// input (key, pointer, paste), which resets the idle timer.
    Forward { len: usize, input: bool },
    /// Discard the first `len` bytes.
    Drop { len: usize, reason: DropReason },
    /// Discard the first `consumed` bytes and send `with` instead (a narrowed `SetEncodings`).
    Replace { consumed: usize, with: Vec<u8>, stripped: u32 },
}

/// Why bytes were dropped. A fixed set: these are metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Desktop clipboard (copy out), plain form.
    ServerCutText,
    /// Desktop clipboard in the extended-clipboard (negative length) form.
    ServerExtendedCutText,
    /// Paste in while the project does not allow it.
    PasteRefused,
    /// Paste in larger than the cap.
    PasteTooLarge,
    /// Encodings removed from a client's `SetEncodings`.
    EncodingStripped,
}

impl DropReason {
    pub const ALL: [DropReason; 5] = [
        DropReason::ServerCutText,
        DropReason::ServerExtendedCutText,
        DropReason::PasteRefused,
        DropReason::PasteTooLarge,
        DropReason::EncodingStripped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::ServerCutText => "server_cut_text",
            DropReason::ServerExtendedCutText => "server_extended_cut_text",
            DropReason::PasteRefused => "paste_refused",
            DropReason::PasteTooLarge => "paste_too_large",
            DropReason::EncodingStripped => "encoding_stripped",
        }
    }
}

/// Which way a message was going.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    ClientToServer,
    ServerToClient,
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::ClientToServer => "browser→desktop",
            Direction::ServerToClient => "desktop→browser",
        })
    }
}

/// A protocol violation: the connection is closed (fail closed) and the event audited.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RfbError {
    #[error("{direction}: unknown message type {message_type}")]
    UnknownMessage { direction: Direction, message_type: u8 },
    #[error("{direction}: rectangle with encoding {encoding} that was not negotiated")]
    UnknownEncoding { direction: Direction, encoding: i32 },
    #[error("{direction}: {what} of {len} exceeds the limit of {max}")]
    Oversized { direction: Direction, what: &'static str, len: u64, max: u64 },
    #[error("{direction}: malformed {what}: {detail}")]
    Malformed { direction: Direction, what: &'static str, detail: String },
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("desktop refused authentication: {0}")]
    AuthFailed(String),
}

impl RfbError {
    /// A fixed label for metrics and audit detail.
    pub fn category(&self) -> &'static str {
        match self {
            RfbError::UnknownMessage { .. } => "unknown_message",
            RfbError::UnknownEncoding { .. } => "unknown_encoding",
            RfbError::Oversized { .. } => "oversized",
            RfbError::Malformed { .. } => "malformed",
            RfbError::Handshake(_) => "handshake",
            RfbError::AuthFailed(_) => "auth_failed",
        }
    }

    /// Which side broke the protocol, if known.
    pub fn direction(&self) -> Option<Direction> {
        match self {
            RfbError::UnknownMessage { direction, .. }
            | RfbError::UnknownEncoding { direction, .. }
            | RfbError::Oversized { direction, .. }
            | RfbError::Malformed { direction, .. } => Some(*direction),
            RfbError::Handshake(_) | RfbError::AuthFailed(_) => None,
        }
    }
}

/// A streamed part of a message whose bytes the filter does not need to look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Skip {
    pub left: u64,
    pub drop: Option<DropReason>,
    pub input: bool,
}

impl Skip {
    /// Consume what of `buf` belongs to the skipped part.
    pub(crate) fn step(&mut self, available: usize) -> Step {
        let len = usize::try_from(self.left).unwrap_or(usize::MAX).min(available);
        self.left -= len as u64;
        match self.drop {
            Some(reason) => Step::Drop { len, reason },
            None => Step::Forward { len, input: self.input },
        }
    }
}

pub(crate) fn u16_at(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

pub(crate) fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// The pixel format in ServerInit and SetPixelFormat (16 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PixelFormat {
    pub bits_per_pixel: u8,
    pub depth: u8,
    pub big_endian: bool,
    pub true_colour: bool,
    pub red_max: u16,
    pub green_max: u16,
    pub blue_max: u16,
    pub red_shift: u8,
    pub green_shift: u8,
    pub blue_shift: u8,
}

impl PixelFormat {
    /// What noVNC asks for and what the gateway makes the desktop send: 32 bpp, depth 24,
    /// little-endian, true colour, red in the low byte.
    pub const GATEWAY: PixelFormat = PixelFormat {
        bits_per_pixel: 32,
        depth: 24,
        big_endian: false,
        true_colour: true,
        red_max: 255,
        green_max: 255,
        blue_max: 255,
        red_shift: 0,
        green_shift: 8,
        blue_shift: 16,
    };

    pub fn parse(b: &[u8; 16]) -> Self {
        PixelFormat {
            bits_per_pixel: b[0],
            depth: b[1],
            big_endian: b[2] != 0,
            true_colour: b[3] != 0,
            red_max: u16::from_be_bytes([b[4], b[5]]),
            green_max: u16::from_be_bytes([b[6], b[7]]),
            blue_max: u16::from_be_bytes([b[8], b[9]]),
            red_shift: b[10],
            green_shift: b[11],
            blue_shift: b[12],
        }
    }

    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0] = self.bits_per_pixel;
        b[1] = self.depth;
        b[2] = u8::from(self.big_endian);
        b[3] = u8::from(self.true_colour);
        b[4..6].copy_from_slice(&self.red_max.to_be_bytes());
        b[6..8].copy_from_slice(&self.green_max.to_be_bytes());
        b[8..10].copy_from_slice(&self.blue_max.to_be_bytes());
        b[10] = self.red_shift;
        b[11] = self.green_shift;
        b[12] = self.blue_shift;
        b
    }

    /// Formats whose pixels are 4 bytes and whose Tight "TPIXEL" is 3 bytes, so the filter can
    /// size every rectangle. Shifts and byte order may vary.
    pub fn acceptable(&self) -> bool {
        self.bits_per_pixel == 32
            && self.depth == 24
            && self.true_colour
            && self.red_max == 255
            && self.green_max == 255
            && self.blue_max == 255
    }
}

/// The `SetPixelFormat` message the gateway sends to the desktop right after the handshake.
pub fn set_pixel_format(format: &PixelFormat) -> [u8; 20] {
    let mut m = [0u8; 20];
    m[4..].copy_from_slice(&format.encode());
    m
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    /// What [`drive`] saw: forwarded bytes, drops, whether input went by.
    pub type Driven = (Vec<u8>, Vec<(DropReason, usize)>, bool);

    /// Run a filter over `input` delivered in chunks of `chunk` bytes, the way a proxy does;
    /// returns (forwarded bytes, drops, input seen) or the error.
    pub fn drive(
        mut step: impl FnMut(&[u8]) -> Result<Step, RfbError>,
        input: &[u8],
        chunk: usize,
    ) -> Result<Driven, RfbError> {
        let mut buf: Vec<u8> = Vec::new();
        let mut out = Vec::new();
        let mut drops = Vec::new();
        let mut saw_input = false;
        let mut fed = 0;
        loop {
            match step(&buf)? {
                Step::Need(n) => {
                    assert!(n > buf.len(), "Need({n}) with {} bytes buffered", buf.len());
                    if fed == input.len() {
                        return Ok((out, drops, saw_input));
                    }
                    let next = (fed + chunk.max(1)).min(input.len());
                    buf.extend_from_slice(&input[fed..next]);
                    fed = next;
                }
                Step::Forward { len, input } => {
                    assert!(len > 0 && len <= buf.len());
                    saw_input |= input;
                    out.extend(buf.drain(..len));
                }
                Step::Drop { len, reason } => {
                    assert!(len > 0 && len <= buf.len());
                    buf.drain(..len);
                    drops.push((reason, len));
                }
                Step::Replace { consumed, with, stripped } => {
                    assert!(consumed > 0 && consumed <= buf.len());
                    buf.drain(..consumed);
                    out.extend(with);
                    drops.push((DropReason::EncodingStripped, stripped as usize));
                }
            }
        }
    }
}
