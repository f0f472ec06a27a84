//! The signed release receipt: what left a workspace, who decided, and when, signed with the
//! control plane's audit signing key so anyone holding the public key can check it offline.
//!
//! # Format
//!
//! A receipt file (`FILE.receipt.json`) is a [`SignedReceipt`]:
//!
//! ```json
//! {"receipt": {...}, "keyId": "3f2a…", "publicKey": "base64…", "signature": "base64…"}
//! ```
//!
//! `signature` is an ed25519 signature (64 bytes, standard base64 with padding) over the
//! ASCII bytes `noexit-release-receipt-v1` ([`SIGNING_CONTEXT`], no separator, so the audit
//! key's signatures on receipts can never be taken for its signatures on audit checkpoints or
//! entries) followed by the **canonical bytes** of the `receipt` member ([`canonical_bytes`]):
//!
//! - JSON with no whitespace between tokens;
//! - object members sorted by key (byte order; every key in a receipt is ASCII, so this is also
//!   the UTF-16 order of RFC 8785);
//! - strings escaped the way RFC 8785 (JCS) and `serde_json` both do: `"` `\` and the C0
//!   controls only (`\b \f \n \r \t`, else `\u00xx` with lower-case hex); everything else is
//!   written as raw UTF-8;
//! - numbers as integers (a receipt holds no fractions; should one ever appear it is written as
//!   `serde_json` writes it, the shortest form that reads back to the same `f64`).
//!
//! For receipts this is exactly RFC 8785, so an auditor can verify one with any JCS library:
//! `msg = b"noexit-release-receipt-v1" + jcs(receipt_json["receipt"]);
//! ed25519_verify(pubkey, msg, b64decode(sig))`,
//! then compare the file's size and SHA-256 with `receipt.size` and `receipt.sha256`.
//!
//! `keyId` is the first 8 bytes of the SHA-256 of the raw 32-byte ed25519 public key, in hex
//! ([`key_id`]) — the same name the audit log gives its checkpoint signing key, so the public
//! key an auditor already holds for `noexit audit verify` verifies receipts too. It appears
//! inside the signed receipt (so it cannot be swapped) and beside it (so a verifier can pick
//! the key before parsing further); the two must agree. `publicKey` (the raw 32-byte key,
//! standard base64) is a convenience for a quick self-check ([`SignedReceipt::embedded_key`]):
//! anyone can sign a receipt with a key of their own, so only a check against the site's
//! published key (`noexit outputs verify-receipt --key`) shows the control plane signed it.

use std::io::Read;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::checks::Report;

/// The receipt format this crate writes and verifies.
pub const RECEIPT_VERSION: u32 = 1;

/// Prefix of every signed message: separates receipt signatures from the other things the
/// audit key signs.
pub const SIGNING_CONTEXT: &[u8] = b"noexit-release-receipt-v1";

/// What a reviewer decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ReviewDecision {
    Approved,
    Rejected,
    ChangesRequested,
}

/// One reviewer's decision on the output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReceiptReview {
    pub reviewer: String,
    pub decision: ReviewDecision,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at: DateTime<Utc>,
}

/// The signed content of a release receipt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Receipt {
    /// [`RECEIPT_VERSION`].
    pub version: u32,
    pub project: String,
    pub workspace: String,
    /// The researcher who asked for the release.
    pub requester: String,
    /// The output's file name as submitted (base name, no directories).
    pub file_name: String,
    /// Size of the released file in bytes.
    pub size: u64,
    /// SHA-256 of the released file, lower-case hex.
    pub sha256: String,
    /// The control plane's automatic checks, as reviewers saw them.
    pub checks: Report,
    /// Every reviewer's decision, oldest first.
    pub reviews: Vec<ReceiptReview>,
    pub released_at: DateTime<Utc>,
    /// [`key_id`] of the key that signed this receipt (set by [`sign`]).
    pub key_id: String,
}

/// A receipt with its signature: the JSON written to `FILE.receipt.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignedReceipt {
    pub receipt: Receipt,
    /// [`key_id`] of the signing key; equal to `receipt.keyId`.
    pub key_id: String,
    /// The signing key's raw 32 bytes, standard base64 (not a trust anchor: see the module
    /// documentation).
    pub public_key: String,
    /// ed25519 signature over [`canonical_bytes`] of `receipt`, standard base64.
    pub signature: String,
}

/// Why a receipt does not vouch for a file. Each variant names what failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReceiptError {
    #[error("the receipt is not valid receipt JSON: {0}")]
    Malformed(String),
    #[error("receipt version {found} is not supported (this noexit reads version {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("the receipt names signing key {in_receipt} but is labelled {outside} beside the signature")]
    KeyIdInconsistent { in_receipt: String, outside: String },
    #[error("the receipt was signed by key {receipt_key}, not by the key given ({given_key})")]
    WrongKey { receipt_key: String, given_key: String },
    #[error("the signature is not a base64 ed25519 signature: {0}")]
    SignatureEncoding(String),
    #[error("the receipt's publicKey is not a base64 ed25519 public key: {0}")]
    PublicKeyEncoding(String),
    #[error("the signature does not match the receipt: the receipt was altered after signing")]
    BadSignature,
    #[error("size differs: the receipt says {receipt} bytes, the file has {file} bytes")]
    SizeMismatch { receipt: u64, file: u64 },
    #[error("SHA-256 differs: the receipt says {receipt}, the file has {file}")]
    HashMismatch { receipt: String, file: String },
}

/// Size and SHA-256 of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileDigest {
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
}

impl FileDigest {
    pub fn of(bytes: &[u8]) -> Self {
        Self { size: bytes.len() as u64, sha256: hex::encode(Sha256::digest(bytes)) }
    }

    /// Digest of everything `reader` yields, without holding it in memory.
    pub fn from_reader(mut reader: impl Read) -> std::io::Result<Self> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut size = 0u64;
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        Ok(Self { size, sha256: hex::encode(hasher.finalize()) })
    }
}

/// Short, stable name of a public key: hex of the first 8 bytes of SHA-256 of its 32 raw
/// bytes. The audit log names its keys with this same function (`audit::keys::key_id`).
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// The bytes that are signed: see the module documentation for the rules.
pub fn canonical_bytes(receipt: &Receipt) -> Vec<u8> {
    // A Receipt has only string keys and serialisable fields, so this cannot fail; should it
    // ever, `null` signs nothing useful and verification of a real receipt fails closed.
    let value = serde_json::to_value(receipt).unwrap_or(Value::Null);
    let mut out = Vec::with_capacity(1024);
    write_canonical(&value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(k, out);
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        Value::String(s) => write_string(s, out),
        // null, booleans and numbers: serde_json's compact form (integers as digits).
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

fn write_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if (c as u32) < 0x20 => out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes()),
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out.push(b'"');
}

/// The exact bytes the signature covers: [`SIGNING_CONTEXT`] then [`canonical_bytes`].
pub fn signed_message(receipt: &Receipt) -> Vec<u8> {
    let mut msg = SIGNING_CONTEXT.to_vec();
    msg.extend_from_slice(&canonical_bytes(receipt));
    msg
}

/// Sign `receipt` with `key`: its `keyId` is set to the key's, then its canonical bytes are
/// signed.
pub fn sign(receipt: &Receipt, key: &SigningKey) -> SignedReceipt {
    let id = key_id(&key.verifying_key());
    let mut receipt = receipt.clone();
    receipt.key_id = id.clone();
    let signature = key.sign(&signed_message(&receipt));
    SignedReceipt {
        receipt,
        key_id: id,
        public_key: BASE64.encode(key.verifying_key().as_bytes()),
        signature: BASE64.encode(signature.to_bytes()),
    }
}

impl SignedReceipt {
    /// Parse a receipt file.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ReceiptError> {
        serde_json::from_slice(bytes).map_err(|e| ReceiptError::Malformed(e.to_string()))
    }

    /// The public key the receipt carries, once its id matches `keyId`. It shows who signed,
    /// not that the control plane did: compare it with the site's key.
    pub fn embedded_key(&self) -> Result<VerifyingKey, ReceiptError> {
        let raw = BASE64.decode(self.public_key.trim()).map_err(|e| ReceiptError::PublicKeyEncoding(e.to_string()))?;
        let raw: [u8; 32] = raw
            .try_into()
            .map_err(|v: Vec<u8>| ReceiptError::PublicKeyEncoding(format!("{} bytes, not 32", v.len())))?;
        let key = VerifyingKey::from_bytes(&raw).map_err(|e| ReceiptError::PublicKeyEncoding(e.to_string()))?;
        let id = key_id(&key);
        if id != self.key_id {
            return Err(ReceiptError::KeyIdInconsistent { in_receipt: self.key_id.clone(), outside: id });
        }
        Ok(key)
    }

    /// The receipt file's text (pretty JSON; the signature does not depend on the layout).
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// Check that `signed` was signed by `key` and vouches for `file` (size and SHA-256).
pub fn verify(signed: &SignedReceipt, file: &[u8], key: &VerifyingKey) -> Result<(), ReceiptError> {
    verify_digest(signed, &FileDigest::of(file), key)
}

/// [`verify`] against a digest computed elsewhere (large files, streamed).
pub fn verify_digest(signed: &SignedReceipt, file: &FileDigest, key: &VerifyingKey) -> Result<(), ReceiptError> {
    verify_signature(signed, key)?;
    let r = &signed.receipt;
    if r.size != file.size {
        return Err(ReceiptError::SizeMismatch { receipt: r.size, file: file.size });
    }
    if !r.sha256.eq_ignore_ascii_case(&file.sha256) {
        return Err(ReceiptError::HashMismatch { receipt: r.sha256.clone(), file: file.sha256.clone() });
    }
    Ok(())
}

/// Check only that `signed` is a receipt `key` signed, unaltered.
pub fn verify_signature(signed: &SignedReceipt, key: &VerifyingKey) -> Result<(), ReceiptError> {
    let r = &signed.receipt;
    if r.version != RECEIPT_VERSION {
        return Err(ReceiptError::UnsupportedVersion { found: r.version, supported: RECEIPT_VERSION });
    }
    if r.key_id != signed.key_id {
        return Err(ReceiptError::KeyIdInconsistent { in_receipt: r.key_id.clone(), outside: signed.key_id.clone() });
    }
    let given = key_id(key);
    if r.key_id != given {
        return Err(ReceiptError::WrongKey { receipt_key: r.key_id.clone(), given_key: given });
    }
    let raw = BASE64.decode(signed.signature.trim()).map_err(|e| ReceiptError::SignatureEncoding(e.to_string()))?;
    let raw: [u8; 64] =
        raw.try_into().map_err(|v: Vec<u8>| ReceiptError::SignatureEncoding(format!("{} bytes, not 64", v.len())))?;
    key.verify(&signed_message(r), &Signature::from_bytes(&raw)).map_err(|_| ReceiptError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::{Cell, CheckResult, Verdict};

    const FILE: &[u8] = b"ward,count\nA,12\nB,15\n";

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn receipt() -> Receipt {
        let d = FileDigest::of(FILE);
        Receipt {
            version: RECEIPT_VERSION,
            project: "ward-7".into(),
            workspace: "alice-r".into(),
            requester: "alice@ward7.example".into(),
            file_name: "summary.csv".into(),
            size: d.size,
            sha256: d.sha256,
            checks: Report {
                verdict: Verdict::Pass,
                results: vec![CheckResult {
                    check: "minCellCount".into(),
                    verdict: Verdict::Pass,
                    message: "every count is at least 10".into(),
                    cells: vec![],
                }],
                acro: vec![],
            },
            reviews: vec![
                ReceiptReview {
                    reviewer: "olive@ward7.example".into(),
                    decision: ReviewDecision::Approved,
                    reason: None,
                    at: at("2026-12-07T10:00:00Z"),
                },
                ReceiptReview {
                    reviewer: "oscar@ward7.example".into(),
                    decision: ReviewDecision::Approved,
                    reason: Some("aggregate only".into()),
                    at: at("2026-12-07T10:05:30.250Z"),
                },
            ],
            released_at: at("2026-12-07T11:00:00Z"),
            key_id: String::new(),
        }
    }

    #[test]
    fn a_signed_receipt_verifies_after_a_round_trip_through_its_file() {
        let sk = key(7);
        let signed = sign(&receipt(), &sk);
        assert_eq!(signed.key_id, key_id(&sk.verifying_key()));
        assert_eq!(signed.receipt.key_id, signed.key_id);
        let text = signed.to_json_pretty();
        let back = SignedReceipt::from_json(text.as_bytes()).unwrap();
        assert_eq!(back, signed);
        assert_eq!(verify(&back, FILE, &sk.verifying_key()), Ok(()));
        let streamed = FileDigest::from_reader(FILE).unwrap();
        assert_eq!(streamed, FileDigest::of(FILE));
        assert_eq!(verify_digest(&back, &streamed, &sk.verifying_key()), Ok(()));
        assert_eq!(back.embedded_key(), Ok(sk.verifying_key()));
        // The signature covers the context prefix: the bare canonical bytes do not verify.
        let raw: [u8; 64] = BASE64.decode(&back.signature).unwrap().try_into().unwrap();
        let sig = Signature::from_bytes(&raw);
        assert!(sk.verifying_key().verify(&signed_message(&back.receipt), &sig).is_ok());
        assert!(sk.verifying_key().verify(&canonical_bytes(&back.receipt), &sig).is_err());
    }

    #[test]
    fn canonical_bytes_are_sorted_compact_and_escaped_like_jcs() {
        let mut r = receipt();
        r.file_name = "a\"b\\c\n\u{1}é.csv".into();
        r.reviews.truncate(1);
        let text = String::from_utf8(canonical_bytes(&r)).unwrap();
        assert!(text.starts_with(r#"{"checks":{"results":[{"check":"minCellCount","message":"every count is at least 10","verdict":"pass"}],"verdict":"pass"},"fileName":"a\"b\\c\n\u0001é.csv","keyId":"","project":"ward-7","releasedAt":"2026-12-07T11:00:00Z","requester":"alice@ward7.example","reviews":[{"at":"2026-12-07T10:00:00Z","decision":"approved","reviewer":"olive@ward7.example"}],"sha256":""#), "{text}");
        assert!(text.ends_with(r#"","size":21,"version":1,"workspace":"alice-r"}"#), "{text}");
        // The same receipt always gives the same bytes, whatever order its JSON came in.
        let reordered: Receipt = serde_json::from_str(&serde_json::to_string_pretty(&r).unwrap()).unwrap();
        assert_eq!(canonical_bytes(&reordered), canonical_bytes(&r));
    }

    #[test]
    fn the_key_id_is_the_audit_logs_name_for_the_key() {
        // hex(sha256(raw public key)[..8]), the audit log's key id too (audit::keys re-exports it).
        let vk = key(7).verifying_key();
        assert_eq!(key_id(&vk), hex::encode(&Sha256::digest(vk.as_bytes())[..8]));
        assert_eq!(key_id(&vk).len(), 16);
    }

    /// Every field of the receipt, changed after signing, breaks the signature.
    #[test]
    fn tampering_with_any_field_is_refused() {
        let sk = key(7);
        let vk = sk.verifying_key();
        let signed = sign(&receipt(), &sk);
        type Tamper = fn(&mut Receipt);
        let tamperings: &[(&str, Tamper)] = &[
            ("project", |r| r.project = "ward-8".into()),
            ("workspace", |r| r.workspace = "bob-r".into()),
            ("requester", |r| r.requester = "mallory@ward7.example".into()),
            ("fileName", |r| r.file_name = "other.csv".into()),
            ("checks.verdict", |r| r.checks.verdict = Verdict::Fail),
            ("checks.results.message", |r| r.checks.results[0].message.push('!')),
            ("checks.results.cells", |r| r.checks.results[0].cells.push(Cell { row: 2, column: 2 })),
            ("checks.acro", |r| r.checks.acro = r.checks.results.clone()),
            ("reviews.reviewer", |r| r.reviews[1].reviewer = "alice@ward7.example".into()),
            ("reviews.decision", |r| r.reviews[0].decision = ReviewDecision::Rejected),
            ("reviews.reason", |r| r.reviews[1].reason = None),
            ("reviews.at", |r| r.reviews[0].at = at("2026-12-07T09:00:00Z")),
            ("reviews (one dropped)", |r| {
                r.reviews.pop();
            }),
            ("releasedAt", |r| r.released_at = at("2026-12-08T11:00:00Z")),
        ];
        for (field, tamper) in tamperings {
            let mut t = signed.clone();
            tamper(&mut t.receipt);
            assert_ne!(t.receipt, signed.receipt, "{field}: the tampering changed nothing");
            assert_eq!(verify(&t, FILE, &vk), Err(ReceiptError::BadSignature), "{field}");
        }
        // Size and hash changed together to match another file: still the signature.
        let other = b"ward,count\nA,7\n";
        let mut t = signed.clone();
        let d = FileDigest::of(other);
        (t.receipt.size, t.receipt.sha256) = (d.size, d.sha256);
        assert_eq!(verify(&t, other, &vk), Err(ReceiptError::BadSignature));
        // Version: refused before the signature is looked at.
        let mut t = signed.clone();
        t.receipt.version = 2;
        assert_eq!(verify(&t, FILE, &vk), Err(ReceiptError::UnsupportedVersion { found: 2, supported: 1 }));
        // Key ids: inside vs beside must agree, and must name the key given.
        let mut t = signed.clone();
        t.receipt.key_id = "0000000000000000".into();
        assert!(matches!(verify(&t, FILE, &vk), Err(ReceiptError::KeyIdInconsistent { .. })));
        let mut t = signed.clone();
        t.key_id = "0000000000000000".into();
        assert!(matches!(verify(&t, FILE, &vk), Err(ReceiptError::KeyIdInconsistent { .. })));
        // Signature bytes.
        let mut t = signed.clone();
        let mut raw = BASE64.decode(&t.signature).unwrap();
        raw[0] ^= 1;
        t.signature = BASE64.encode(&raw);
        assert_eq!(verify(&t, FILE, &vk), Err(ReceiptError::BadSignature));
        let mut t = signed.clone();
        t.signature = "not base64!".into();
        assert!(matches!(verify(&t, FILE, &vk), Err(ReceiptError::SignatureEncoding(_))));
        let mut t = signed.clone();
        t.signature = BASE64.encode([0u8; 32]);
        assert_eq!(verify(&t, FILE, &vk), Err(ReceiptError::SignatureEncoding("32 bytes, not 64".into())));
    }

    #[test]
    fn a_receipt_signed_by_another_key_is_refused() {
        let signed = sign(&receipt(), &key(7));
        let other = key(8).verifying_key();
        let e = verify(&signed, FILE, &other).unwrap_err();
        assert_eq!(
            e,
            ReceiptError::WrongKey { receipt_key: key_id(&key(7).verifying_key()), given_key: key_id(&other) }
        );
        // Claiming the other key's id does not help: the signature is still key 7's.
        let mut t = signed.clone();
        (t.key_id, t.receipt.key_id) = (key_id(&other), key_id(&other));
        assert_eq!(verify(&t, FILE, &other), Err(ReceiptError::BadSignature));
        // An embedded key that is not the one named is refused.
        let mut t = signed.clone();
        t.public_key = BASE64.encode(other.as_bytes());
        assert!(matches!(t.embedded_key(), Err(ReceiptError::KeyIdInconsistent { .. })));
        t.public_key = "AAAA".into();
        assert!(matches!(t.embedded_key(), Err(ReceiptError::PublicKeyEncoding(_))));
    }

    #[test]
    fn a_different_file_is_refused_with_what_differs() {
        let sk = key(7);
        let signed = sign(&receipt(), &sk);
        let vk = sk.verifying_key();
        let e = verify(&signed, b"ward,count\nA,12\nB,15\n\n", &vk).unwrap_err();
        assert_eq!(e, ReceiptError::SizeMismatch { receipt: 21, file: 22 });
        // Same size, one byte changed.
        let e = verify(&signed, b"ward,count\nA,12\nB,16\n", &vk).unwrap_err();
        assert!(matches!(e, ReceiptError::HashMismatch { .. }), "{e}");
        assert!(e.to_string().starts_with("SHA-256 differs: the receipt says "), "{e}");
    }

    #[test]
    fn malformed_receipt_files_are_refused_with_a_reason() {
        for text in ["", "{}", "[1]", r#"{"receipt":{},"keyId":"x","signature":"y"}"#] {
            assert!(matches!(SignedReceipt::from_json(text.as_bytes()), Err(ReceiptError::Malformed(_))), "{text}");
        }
        // An unknown member is refused rather than silently dropped from what is verified.
        let mut v = serde_json::to_value(sign(&receipt(), &key(7))).unwrap();
        v["receipt"]["extra"] = "x".into();
        let e = SignedReceipt::from_json(v.to_string().as_bytes()).unwrap_err();
        assert!(e.to_string().contains("unknown field `extra`"), "{e}");
    }
}
