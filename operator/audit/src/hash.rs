//! The canonical encoding of entries and checkpoints, and the Merkle tree over entry hashes.
//!
//! Everything here is pure and shared by the writer (which computes) and `verify` (which
//! recomputes). Changing any byte of the encoding breaks every existing log: version it instead.
//!
//! Entry hash (v1) = SHA-256 over, in order:
//! `"noexit-audit-entry-v1"`, seq (u64 BE), time_us (i64 BE), actor, role?, action, object,
//! outcome (one byte: 0 allowed, 1 refused), reason?, source?, detail (JSON text), idempotency
//! key?, prev_hash (32 bytes). A string is its length (u32 BE) then its UTF-8 bytes; an optional
//! string (`?`) is one byte 0 when absent, or 1 followed by the string.
//!
//! Merkle root (RFC 6962 shape): leaf = SHA-256(0x00 ‖ entry hash), node = SHA-256(0x01 ‖ left ‖
//! right); a range of n leaves splits at the largest power of two below n.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// The hash that the first entry names as its predecessor.
pub const GENESIS: Hash = [0; 32];

const ENTRY_DOMAIN: &[u8] = b"noexit-audit-entry-v1";
const CHECKPOINT_DOMAIN: &[u8] = b"noexit-audit-checkpoint-v1";

/// The columns of one entry as stored, borrowed so that verifying allocates nothing per row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryFields<'a> {
    pub seq: i64,
    pub time_us: i64,
    pub actor: &'a str,
    pub role: Option<&'a str>,
    pub action: &'a str,
    pub object: &'a str,
    /// `true` when refused.
    pub refused: bool,
    pub reason: Option<&'a str>,
    pub source: Option<&'a str>,
    pub detail: &'a str,
    pub idempotency_key: Option<&'a str>,
}

/// The same columns as raw bytes, as `verify` reads them off the wire (no UTF-8 check needed:
/// the hash covers bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryBytes<'a> {
    pub seq: i64,
    pub time_us: i64,
    pub actor: &'a [u8],
    pub role: Option<&'a [u8]>,
    pub action: &'a [u8],
    pub object: &'a [u8],
    pub refused: bool,
    pub reason: Option<&'a [u8]>,
    pub source: Option<&'a [u8]>,
    pub detail: &'a [u8],
    pub idempotency_key: Option<&'a [u8]>,
}

impl<'a> EntryFields<'a> {
    pub fn as_bytes(&self) -> EntryBytes<'a> {
        EntryBytes {
            seq: self.seq,
            time_us: self.time_us,
            actor: self.actor.as_bytes(),
            role: self.role.map(str::as_bytes),
            action: self.action.as_bytes(),
            object: self.object.as_bytes(),
            refused: self.refused,
            reason: self.reason.map(str::as_bytes),
            source: self.source.map(str::as_bytes),
            detail: self.detail.as_bytes(),
            idempotency_key: self.idempotency_key.map(str::as_bytes),
        }
    }
}

fn put(h: &mut Sha256, s: &[u8]) {
    // Entries are bounded far below 4 GiB by the API's body limit; saturate rather than wrap.
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    h.update(len.to_be_bytes());
    h.update(s);
}

fn put_opt(h: &mut Sha256, s: Option<&[u8]>) {
    match s {
        None => h.update([0u8]),
        Some(s) => {
            h.update([1u8]);
            put(h, s);
        }
    }
}

/// Hash of an entry whose predecessor has hash `prev`.
pub fn entry_hash(e: &EntryFields<'_>, prev: &Hash) -> Hash {
    entry_hash_bytes(&e.as_bytes(), prev)
}

/// [`entry_hash`] over raw column bytes.
pub fn entry_hash_bytes(e: &EntryBytes<'_>, prev: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update(ENTRY_DOMAIN);
    h.update((e.seq as u64).to_be_bytes());
    h.update(e.time_us.to_be_bytes());
    put(&mut h, e.actor);
    put_opt(&mut h, e.role);
    put(&mut h, e.action);
    put(&mut h, e.object);
    h.update([u8::from(e.refused)]);
    put_opt(&mut h, e.reason);
    put_opt(&mut h, e.source);
    put(&mut h, e.detail);
    put_opt(&mut h, e.idempotency_key);
    h.update(prev);
    h.finalize().into()
}

fn leaf(entry: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(entry);
    h.finalize().into()
}

fn node(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Builds a Merkle root incrementally from a stream of entry hashes, in O(log n) memory.
///
/// The stack holds roots of perfect subtrees with strictly decreasing sizes; folding it from the
/// right gives exactly the RFC 6962 root for any number of leaves.
#[derive(Debug, Default, Clone)]
pub struct MerkleBuilder {
    stack: Vec<(u64, Hash)>,
    leaves: u64,
}

impl MerkleBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, entry: &Hash) {
        let mut cur = (1u64, leaf(entry));
        while let Some(&(size, ref top)) = self.stack.last() {
            if size != cur.0 {
                break;
            }
            cur = (size * 2, node(top, &cur.1));
            self.stack.pop();
        }
        self.stack.push(cur);
        self.leaves += 1;
    }

    pub fn len(&self) -> u64 {
        self.leaves
    }

    pub fn is_empty(&self) -> bool {
        self.leaves == 0
    }

    /// The root of everything pushed so far (the empty tree is SHA-256 of nothing), and a reset.
    pub fn finish(&mut self) -> Hash {
        let mut acc: Option<Hash> = None;
        while let Some((_, h)) = self.stack.pop() {
            acc = Some(match acc {
                None => h,
                Some(right) => node(&h, &right),
            });
        }
        self.leaves = 0;
        acc.unwrap_or_else(|| Sha256::digest([]).into())
    }
}

/// Root over a slice of entry hashes.
pub fn merkle_root(entries: &[Hash]) -> Hash {
    let mut b = MerkleBuilder::new();
    entries.iter().for_each(|e| b.push(e));
    b.finish()
}

/// What a checkpoint signs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointBody {
    pub id: i64,
    pub first_seq: i64,
    pub last_seq: i64,
    pub time_us: i64,
    pub merkle_root: Hash,
    /// Hash of entry `last_seq`: binds the checkpoint to the chain, not only to the range.
    pub head_hash: Hash,
}

impl CheckpointBody {
    /// The exact bytes signed with ed25519.
    pub fn message(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 32 + 64);
        m.extend_from_slice(CHECKPOINT_DOMAIN);
        m.extend_from_slice(&(self.id as u64).to_be_bytes());
        m.extend_from_slice(&(self.first_seq as u64).to_be_bytes());
        m.extend_from_slice(&(self.last_seq as u64).to_be_bytes());
        m.extend_from_slice(&self.time_us.to_be_bytes());
        m.extend_from_slice(&self.merkle_root);
        m.extend_from_slice(&self.head_hash);
        m
    }
}

/// A stored 32-byte hash column; anything else is corrupt.
pub fn to_hash(bytes: &[u8]) -> Option<Hash> {
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(seq: i64) -> EntryFields<'static> {
        EntryFields {
            seq,
            time_us: 1_700_000_000_000_000,
            actor: "user:alice@example.org",
            role: Some("admin"),
            action: "request.approve",
            object: "workspacerequest:ward-7/r-42",
            refused: false,
            reason: None,
            source: Some("10.0.0.7"),
            detail: "{}",
            idempotency_key: None,
        }
    }

    /// Recursive RFC 6962 definition, to check the incremental builder against.
    fn reference_root(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => Sha256::digest([]).into(),
            1 => leaf(&leaves[0]),
            n => {
                let mut k = 1;
                while k * 2 < n {
                    k *= 2;
                }
                node(&reference_root(&leaves[..k]), &reference_root(&leaves[k..]))
            }
        }
    }

    #[test]
    fn incremental_merkle_matches_the_recursive_definition() {
        let hashes: Vec<Hash> = (0..70u8).map(|i| [i; 32]).collect();
        for n in 0..hashes.len() {
            assert_eq!(merkle_root(&hashes[..n]), reference_root(&hashes[..n]), "n = {n}");
        }
    }

    #[test]
    fn every_field_and_the_predecessor_change_the_hash() {
        let base = fields(7);
        let h = entry_hash(&base, &GENESIS);
        let variants = [
            EntryFields { seq: 8, ..base },
            EntryFields { time_us: base.time_us + 1, ..base },
            EntryFields { actor: "user:mallory", ..base },
            EntryFields { role: None, ..base },
            EntryFields { action: "request.deny", ..base },
            EntryFields { object: "x", ..base },
            EntryFields { refused: true, ..base },
            EntryFields { reason: Some(""), ..base },
            EntryFields { source: None, ..base },
            EntryFields { detail: "{\"a\":1}", ..base },
            EntryFields { idempotency_key: Some("k"), ..base },
        ];
        for v in variants {
            assert_ne!(entry_hash(&v, &GENESIS), h, "{v:?}");
        }
        assert_ne!(entry_hash(&base, &[1; 32]), h);
    }

    #[test]
    fn length_prefixes_keep_fields_apart() {
        let a = EntryFields { actor: "ab", action: "c", ..fields(1) };
        let b = EntryFields { actor: "a", action: "bc", ..fields(1) };
        assert_ne!(entry_hash(&a, &GENESIS), entry_hash(&b, &GENESIS));
    }
}
