//! Encryption at rest for files held by the airlock (outputs waiting for review, inbox files
//! waiting for approval). XChaCha20-Poly1305 in the STREAM construction (Hoang, Reyhanitabar,
//! Rogaway, Vizár 2015), so a file of any size is sealed and opened in fixed-size chunks with
//! bounded memory, and a reordered, truncated or extended file is refused.
//!
//! Format (all integers big-endian):
//! ```text
//! magic "NXSEAL1\n" (8 bytes) | nonce prefix (19 random bytes) | chunk*
//! chunk = ciphertext of up to CHUNK plaintext bytes + 16-byte tag
//! nonce(i) = prefix || u32 counter i || last-flag (1 for the final chunk, else 0)
//! ```
//! Every chunk is exactly `CHUNK + 16` bytes but the last, which is shorter (possibly only a
//! tag, for an empty file or one that is a multiple of `CHUNK`). The caller's `aad` (e.g. the
//! request id) is authenticated with every chunk, so a sealed file moved under another id does
//! not open.
//!
//! The types here do no I/O: [`Sealer`] and [`Opener`] take bytes and append to a `Vec`, so the
//! async API and the sync agent both drive them; [`seal`]/[`open`] are the `Read`/`Write`
//! conveniences.

use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::{Aead, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use std::io::{Read, Write};
use std::path::Path;

/// Plaintext bytes per chunk.
pub const CHUNK: usize = 64 * 1024;
const TAG: usize = 16;
const MAGIC: &[u8; 8] = b"NXSEAL1\n";
const PREFIX: usize = 19;
/// Bytes before the first chunk.
pub const HEADER: usize = MAGIC.len() + PREFIX;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("sealed data does not start with the NXSEAL1 header")]
    NotSealed,
    #[error("sealed data fails authentication at chunk {0} (tampered, truncated or wrong key)")]
    Tampered(u32),
    #[error("sealed data is truncated (no final chunk)")]
    Truncated,
    #[error("sealed data has bytes after its final chunk")]
    TrailingData,
    #[error("file is too large to seal ({0} chunks)")]
    TooLarge(u64),
    #[error("seal key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A 256-bit key. `Debug` does not show it.
#[derive(Clone)]
pub struct SealKey([u8; 32]);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

impl SealKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        OsRng.fill_bytes(&mut k);
        Self(k)
    }

    /// Parse a key file: 64 hex digits (surrounding whitespace ignored) or exactly 32 raw bytes
    /// (how a Kubernetes Secret's `key` mounts when created with `--from-file`).
    pub fn parse(text: &[u8]) -> Result<Self, String> {
        if text.len() == 32 && !text.iter().all(u8::is_ascii_hexdigit) {
            let mut k = [0u8; 32];
            k.copy_from_slice(text);
            return Ok(Self(k));
        }
        let trimmed = std::str::from_utf8(text).map_err(|_| "neither 32 raw bytes nor 64 hex digits".to_string())?;
        let trimmed = trimmed.trim();
        if trimmed.len() != 64 || !trimmed.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("expected 64 hex digits (32 bytes), found {} characters", trimmed.len()));
        }
        let mut k = [0u8; 32];
        for (i, pair) in trimmed.as_bytes().chunks(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16).unwrap_or(0);
            let lo = (pair[1] as char).to_digit(16).unwrap_or(0);
            k[i] = (hi * 16 + lo) as u8;
        }
        Ok(Self(k))
    }

    /// Load the key from `path`.
    pub fn load(path: &Path) -> Result<Self, SealError> {
        let key_err = |reason: String| SealError::Key { path: path.display().to_string(), reason };
        let bytes = std::fs::read(path).map_err(|e| key_err(e.to_string()))?;
        Self::parse(&bytes).map_err(key_err)
    }

    /// Load the key from `path`, or create it there (64 hex digits, mode 0600) if it is missing.
    pub fn load_or_create(path: &Path) -> Result<Self, SealError> {
        if path.exists() {
            return Self::load(path);
        }
        let key = Self::generate();
        let hex: String = key.0.iter().map(|b| format!("{b:02x}")).collect();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut f = options.open(path)?;
        f.write_all(format!("{hex}\n").as_bytes())?;
        f.sync_all()?;
        Ok(key)
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.0).into())
    }
}

fn nonce(prefix: &[u8; PREFIX], counter: u32, last: bool) -> XNonce {
    let mut n = [0u8; 24];
    n[..PREFIX].copy_from_slice(prefix);
    n[PREFIX..PREFIX + 4].copy_from_slice(&counter.to_be_bytes());
    n[23] = u8::from(last);
    n.into()
}

/// Seals a stream pushed in pieces of any size.
pub struct Sealer {
    cipher: XChaCha20Poly1305,
    prefix: [u8; PREFIX],
    aad: Vec<u8>,
    counter: u32,
    pending: Vec<u8>,
    header_written: bool,
}

impl Sealer {
    pub fn new(key: &SealKey, aad: &[u8]) -> Self {
        let mut prefix = [0u8; PREFIX];
        OsRng.fill_bytes(&mut prefix);
        Self {
            cipher: key.cipher(),
            prefix,
            aad: aad.to_vec(),
            counter: 0,
            pending: Vec::with_capacity(CHUNK),
            header_written: false,
        }
    }

    fn header(&mut self, out: &mut Vec<u8>) {
        if !self.header_written {
            out.extend_from_slice(MAGIC);
            out.extend_from_slice(&self.prefix);
            self.header_written = true;
        }
    }

    fn chunk(&mut self, last: bool, out: &mut Vec<u8>) -> Result<(), SealError> {
        let n = nonce(&self.prefix, self.counter, last);
        let sealed = self
            .cipher
            .encrypt(&n, Payload { msg: &self.pending, aad: &self.aad })
            .map_err(|_| SealError::TooLarge(u64::from(self.counter)))?;
        out.extend_from_slice(&sealed);
        self.pending.clear();
        self.counter = self.counter.checked_add(1).ok_or(SealError::TooLarge(u64::from(u32::MAX)))?;
        Ok(())
    }

    /// Seal `data`, appending whole chunks to `out` (a partial chunk waits for more data).
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), SealError> {
        self.header(out);
        while !data.is_empty() {
            // A full chunk is sealed only once more data shows it is not the last one.
            if self.pending.len() == CHUNK {
                self.chunk(false, out)?;
            }
            let take = (CHUNK - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        Ok(())
    }

    /// Seal what is left as the final chunk.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<(), SealError> {
        self.header(out);
        self.chunk(true, out)
    }
}

/// Opens a sealed stream pushed in pieces of any size.
pub struct Opener {
    cipher: XChaCha20Poly1305,
    prefix: Option<[u8; PREFIX]>,
    aad: Vec<u8>,
    counter: u32,
    pending: Vec<u8>,
    done: bool,
}

impl Opener {
    pub fn new(key: &SealKey, aad: &[u8]) -> Self {
        Self {
            cipher: key.cipher(),
            prefix: None,
            aad: aad.to_vec(),
            counter: 0,
            pending: Vec::with_capacity(CHUNK + TAG),
            done: false,
        }
    }

    fn chunk(&mut self, len: usize, last: bool, out: &mut Vec<u8>) -> Result<(), SealError> {
        let prefix = self.prefix.ok_or(SealError::NotSealed)?;
        let n = nonce(&prefix, self.counter, last);
        let plain = self
            .cipher
            .decrypt(&n, Payload { msg: &self.pending[..len], aad: &self.aad })
            .map_err(|_| SealError::Tampered(self.counter))?;
        out.extend_from_slice(&plain);
        self.pending.drain(..len);
        self.counter = self.counter.checked_add(1).ok_or(SealError::TooLarge(u64::from(u32::MAX)))?;
        Ok(())
    }

    /// Open `data`, appending verified plaintext to `out`. Plaintext is only ever appended after
    /// its chunk authenticated; the caller must still call [`Opener::finish`] before trusting
    /// the whole (a truncated file is only detected there).
    pub fn push(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), SealError> {
        if self.done && !data.is_empty() {
            return Err(SealError::TrailingData);
        }
        self.pending.extend_from_slice(data);
        if self.prefix.is_none() {
            let seen = self.pending.len().min(MAGIC.len());
            if self.pending[..seen] != MAGIC[..seen] {
                return Err(SealError::NotSealed);
            }
            if self.pending.len() < HEADER {
                return Ok(());
            }
            if &self.pending[..MAGIC.len()] != MAGIC {
                return Err(SealError::NotSealed);
            }
            let mut prefix = [0u8; PREFIX];
            prefix.copy_from_slice(&self.pending[MAGIC.len()..HEADER]);
            self.prefix = Some(prefix);
            self.pending.drain(..HEADER);
        }
        // A full-size chunk is opened as "not last" only when more bytes follow it.
        while self.pending.len() > CHUNK + TAG {
            self.chunk(CHUNK + TAG, false, out)?;
        }
        Ok(())
    }

    /// Open the final chunk. Errors if the stream was cut short.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<(), SealError> {
        if self.prefix.is_none() {
            let magic = self.pending.len() >= MAGIC.len() && &self.pending[..MAGIC.len()] != MAGIC;
            return Err(if magic { SealError::NotSealed } else { SealError::Truncated });
        }
        if self.pending.len() < TAG {
            return Err(SealError::Truncated);
        }
        let len = self.pending.len();
        self.chunk(len, true, out).map_err(|e| match e {
            // A full chunk that does not open as the last one: the real last chunk is missing.
            SealError::Tampered(i) if len == CHUNK + TAG => {
                let _ = i;
                SealError::Truncated
            }
            e => e,
        })?;
        self.done = true;
        Ok(())
    }
}

/// Seal everything `input` yields into `output`; returns the plaintext length.
pub fn seal(key: &SealKey, aad: &[u8], mut input: impl Read, mut output: impl Write) -> Result<u64, SealError> {
    let mut sealer = Sealer::new(key, aad);
    let mut buf = vec![0u8; CHUNK];
    let mut out = Vec::with_capacity(CHUNK + TAG + HEADER);
    let mut total = 0u64;
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        sealer.push(&buf[..n], &mut out)?;
        output.write_all(&out)?;
        out.clear();
    }
    sealer.finish(&mut out)?;
    output.write_all(&out)?;
    output.flush()?;
    Ok(total)
}

/// Open everything `input` yields into `output`; returns the plaintext length. On an error
/// `output` may hold a verified prefix of the plaintext: write to a temporary place and keep it
/// only on success.
pub fn open(key: &SealKey, aad: &[u8], mut input: impl Read, mut output: impl Write) -> Result<u64, SealError> {
    let mut opener = Opener::new(key, aad);
    let mut buf = vec![0u8; CHUNK + TAG];
    let mut out = Vec::with_capacity(CHUNK);
    let mut total = 0u64;
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        opener.push(&buf[..n], &mut out)?;
        total += out.len() as u64;
        output.write_all(&out)?;
        out.clear();
    }
    opener.finish(&mut out)?;
    total += out.len() as u64;
    output.write_all(&out)?;
    output.flush()?;
    Ok(total)
}

/// Sealed size of a plaintext of `len` bytes.
pub fn sealed_len(len: u64) -> u64 {
    // The last chunk may be full; an empty file is one empty chunk.
    let chunks = len.div_ceil(CHUNK as u64).max(1);
    HEADER as u64 + len + chunks * TAG as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(len: usize, piece: usize) {
        let key = SealKey::generate();
        let plain: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let mut sealed = Vec::new();
        let mut s = Sealer::new(&key, b"id-1");
        for p in plain.chunks(piece.max(1)) {
            s.push(p, &mut sealed).unwrap();
        }
        s.finish(&mut sealed).unwrap();
        assert_eq!(sealed.len() as u64, sealed_len(len as u64), "len {len}");
        assert!(!sealed.windows(plain.len().min(32).max(1)).any(|w| len >= 32 && w == &plain[..32]));
        let mut opened = Vec::new();
        let mut o = Opener::new(&key, b"id-1");
        for p in sealed.chunks(piece.max(1) + 7) {
            o.push(p, &mut opened).unwrap();
        }
        o.finish(&mut opened).unwrap();
        assert_eq!(opened, plain, "len {len} piece {piece}");
    }

    #[test]
    fn round_trips_at_chunk_boundaries_and_piece_sizes() {
        for len in [0, 1, 100, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 5] {
            for piece in [1000, CHUNK, CHUNK + 3, 4 * CHUNK] {
                roundtrip(len, piece);
            }
        }
    }

    fn sealed_of(key: &SealKey, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        seal(key, aad, plain, &mut out).unwrap();
        out
    }

    fn open_all(key: &SealKey, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut out = Vec::new();
        open(key, aad, sealed, &mut out)?;
        Ok(out)
    }

    #[test]
    fn a_flipped_bit_a_wrong_key_or_another_id_is_refused() {
        let key = SealKey::generate();
        let plain = vec![7u8; 2 * CHUNK + 10];
        let sealed = sealed_of(&key, b"a", &plain);
        assert_eq!(open_all(&key, b"a", &sealed).unwrap(), plain);
        for at in [HEADER + 3, HEADER + CHUNK + TAG + 1, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[at] ^= 1;
            assert!(matches!(open_all(&key, b"a", &bad), Err(SealError::Tampered(_))), "flip at {at}");
        }
        assert!(matches!(open_all(&SealKey::generate(), b"a", &sealed), Err(SealError::Tampered(0))));
        assert!(matches!(open_all(&key, b"b", &sealed), Err(SealError::Tampered(0))));
        assert!(matches!(open_all(&key, b"a", b"plain text, never sealed"), Err(SealError::NotSealed)));
    }

    #[test]
    fn truncation_reordering_and_extension_are_refused() {
        let key = SealKey::generate();
        let plain = vec![1u8; 3 * CHUNK];
        let sealed = sealed_of(&key, b"a", &plain);
        assert_eq!(sealed.len(), HEADER + 3 * (CHUNK + TAG));
        // Cut after whole chunks: the last one left does not open as the final one.
        for n in [1, 2] {
            let cut = &sealed[..HEADER + n * (CHUNK + TAG)];
            assert!(matches!(open_all(&key, b"a", cut), Err(SealError::Truncated)), "cut after {n}");
        }
        // Cut inside a chunk.
        assert!(open_all(&key, b"a", &sealed[..sealed.len() - 1]).is_err());
        assert!(matches!(open_all(&key, b"a", &sealed[..HEADER]), Err(SealError::Truncated)));
        assert!(matches!(open_all(&key, b"a", &sealed[..5]), Err(SealError::Truncated)));
        // Swap the first two chunks.
        let mut swapped = sealed[..HEADER].to_vec();
        swapped.extend_from_slice(&sealed[HEADER + CHUNK + TAG..HEADER + 2 * (CHUNK + TAG)]);
        swapped.extend_from_slice(&sealed[HEADER..HEADER + CHUNK + TAG]);
        swapped.extend_from_slice(&sealed[HEADER + 2 * (CHUNK + TAG)..]);
        assert!(matches!(open_all(&key, b"a", &swapped), Err(SealError::Tampered(0))));
        // Bytes after the final chunk.
        let mut extended = sealed.clone();
        extended.extend_from_slice(&[0u8; 20]);
        assert!(open_all(&key, b"a", &extended).is_err());
    }

    #[test]
    fn keys_parse_from_hex_or_raw_bytes_and_are_created_once() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";
        assert_eq!(SealKey::parse(hex.as_bytes()).unwrap().0[1], 0x11);
        assert_eq!(SealKey::parse(&[0xffu8; 32]).unwrap().0, [0xff; 32]);
        assert!(SealKey::parse(b"short").unwrap_err().contains("64 hex digits"));
        let dir = std::env::temp_dir().join(format!("noexit-seal-{}", std::process::id()));
        let path = dir.join("seal.key");
        let _ = std::fs::remove_file(&path);
        let a = SealKey::load_or_create(&path).unwrap();
        let b = SealKey::load_or_create(&path).unwrap();
        assert_eq!(a.0, b.0);
        assert_eq!(format!("{a:?}"), "SealKey(..)");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
