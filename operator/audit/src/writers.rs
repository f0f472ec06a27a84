//! Who may write which entries. Every component that appends to the log is a *writer* with a
//! name, an ed25519 key that signs each of its entries, and (on PostgreSQL) a database role of its
//! own. Each action prefix belongs to exactly one writer; `verify` and the database trigger
//! (`0003_audit_writers.sql`) enforce the same table, [`WRITERS`].

use std::collections::HashMap;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

use super::hash::Hash;

/// One writer of the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriterRule {
    pub name: &'static str,
    /// Actions it owns (`mirror.`); `None`: every action no other writer owns.
    pub prefix: Option<&'static str>,
    /// The PostgreSQL role `noexit-operator audit-roles` creates for it by default.
    pub default_role: &'static str,
}

/// The control-plane API: people's and agents' actions, and the checkpoints.
pub const API: &str = "api";
/// The package mirror: `mirror.*`.
pub const MIRROR: &str = "mirror";
/// The admission webhook: kubectl changes to noexit resources, `admission.*`.
pub const WEBHOOK: &str = "webhook";
/// The workspace DNS server: `dns.*`.
pub const DNS: &str = "dns";
/// The browser remote-desktop gateway: sign-ins, connects, refusals, relayed reviews, `gateway.*`.
pub const GATEWAY: &str = "gateway";

pub const WRITERS: [WriterRule; 5] = [
    WriterRule { name: API, prefix: None, default_role: "noexit_api" },
    WriterRule { name: MIRROR, prefix: Some("mirror."), default_role: "noexit_mirror" },
    WriterRule { name: WEBHOOK, prefix: Some("admission."), default_role: "noexit_webhook" },
    WriterRule { name: DNS, prefix: Some("dns."), default_role: "noexit_dns" },
    WriterRule { name: GATEWAY, prefix: Some("gateway."), default_role: "noexit_gateway" },
];

/// The writer that owns `action`.
pub fn owner_of(action: &[u8]) -> &'static str {
    WRITERS.iter().find(|w| w.prefix.is_some_and(|p| action.starts_with(p.as_bytes()))).map_or(API, |w| w.name)
}

const SIGNATURE_DOMAIN: &[u8] = b"noexit-audit-entry-signature-v1";

/// The bytes a writer signs for an entry: domain, writer name (u32 BE length, bytes) and the
/// entry hash, which covers the entry's position, content and predecessor.
pub fn signed_message(writer: &[u8], entry_hash: &Hash) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNATURE_DOMAIN.len() + 4 + writer.len() + 32);
    m.extend_from_slice(SIGNATURE_DOMAIN);
    m.extend_from_slice(&u32::try_from(writer.len()).unwrap_or(u32::MAX).to_be_bytes());
    m.extend_from_slice(writer);
    m.extend_from_slice(entry_hash);
    m
}

/// A writer's identity as the store uses it.
#[derive(Clone)]
pub struct Writer {
    pub name: String,
    pub key: SigningKey,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("name", &self.name)
            .field("key_id", &super::keys::key_id(&self.key.verifying_key()))
            .finish()
    }
}

impl Writer {
    pub fn new(name: impl Into<String>, key: SigningKey) -> Self {
        Self { name: name.into(), key }
    }

    /// Loads the writer's private key (PKCS#8 PEM).
    pub fn load(name: &str, path: &std::path::Path) -> Result<Self, super::keys::KeyError> {
        Ok(Self::new(name, super::keys::load_signing_key(path)?))
    }

    pub fn sign(&self, entry_hash: &Hash) -> [u8; 64] {
        self.key.sign(&signed_message(self.name.as_bytes(), entry_hash)).to_bytes()
    }
}

/// What `verify` concluded about who wrote one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryAuth {
    /// Signed by the writer it names, which owns the action.
    Good,
    /// No writer or no signature.
    Unsigned,
    /// The named writer does not own this action (or is not a writer at all).
    WrongWriter,
    /// The signature does not verify with the named writer's keys.
    BadSignature,
    /// The writer owns the action but no public key of it was given: not authenticated.
    NoKey,
}

/// The public keys of the writers (several per writer after a rotation), and which actions
/// each may write (by default [`WRITERS`]).
#[derive(Clone, Debug)]
pub struct WriterKeys {
    keys: HashMap<String, Vec<VerifyingKey>>,
    /// Writer and the action prefix it owns; `None`: every action no other writer owns.
    rules: Vec<(String, Option<String>)>,
}

impl Default for WriterKeys {
    fn default() -> Self {
        let rules = WRITERS.iter().map(|w| (w.name.to_owned(), w.prefix.map(str::to_owned))).collect();
        Self { keys: HashMap::new(), rules }
    }
}

impl WriterKeys {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the actions `writer` owns: a prefix (`mirror.`), or `None` for every action no
    /// other writer owns.
    pub fn set_actions(&mut self, writer: &str, prefix: Option<&str>) {
        self.rules.retain(|(w, _)| w != writer);
        self.rules.push((writer.to_owned(), prefix.map(str::to_owned)));
    }

    /// The writer that owns `action` under these rules.
    pub fn owner_of(&self, action: &[u8]) -> Option<&str> {
        self.rules
            .iter()
            .find(|(_, p)| p.as_ref().is_some_and(|p| action.starts_with(p.as_bytes())))
            .or_else(|| self.rules.iter().find(|(_, p)| p.is_none()))
            .map(|(w, _)| w.as_str())
    }

    pub fn add(&mut self, writer: &str, key: VerifyingKey) {
        self.keys.entry(writer.to_owned()).or_default().push(key);
    }

    pub fn has(&self, writer: &str) -> bool {
        self.keys.contains_key(writer)
    }

    /// Judges one entry from its stored columns.
    pub fn check(&self, writer: Option<&[u8]>, signature: Option<&[u8]>, action: &[u8], hash: &Hash) -> EntryAuth {
        let (Some(writer), Some(signature)) = (writer, signature) else { return EntryAuth::Unsigned };
        if self.owner_of(action).map(str::as_bytes) != Some(writer) {
            return EntryAuth::WrongWriter;
        }
        let Some(keys) = std::str::from_utf8(writer).ok().and_then(|w| self.keys.get(w)) else {
            return EntryAuth::NoKey;
        };
        let Ok(signature) = Signature::from_slice(signature) else { return EntryAuth::BadSignature };
        let message = signed_message(writer, hash);
        if keys.iter().any(|k| k.verify(&message, &signature).is_ok()) {
            EntryAuth::Good
        } else {
            EntryAuth::BadSignature
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_action_has_one_owner() {
        assert_eq!(owner_of(b"request.approve"), API);
        assert_eq!(owner_of(b"mirror.fetch"), MIRROR);
        assert_eq!(owner_of(b"admission.update"), WEBHOOK);
        assert_eq!(owner_of(b"dns.refused"), DNS);
        assert_eq!(owner_of(b"gateway.connect"), GATEWAY);
        assert_eq!(owner_of(b"gateway.review.approve"), GATEWAY);
        assert_eq!(owner_of(b"mirrorx"), API, "a prefix includes its dot");
    }

    #[test]
    fn signatures_bind_writer_action_and_hash() {
        let mirror = Writer::new(MIRROR, SigningKey::from_bytes(&[1; 32]));
        let api = Writer::new(API, SigningKey::from_bytes(&[2; 32]));
        let mut keys = WriterKeys::new();
        keys.add(MIRROR, mirror.key.verifying_key());
        keys.add(API, api.key.verifying_key());
        let h = [9; 32];
        let sig = mirror.sign(&h);
        assert_eq!(keys.check(Some(b"mirror"), Some(&sig), b"mirror.fetch", &h), EntryAuth::Good);
        assert_eq!(keys.check(Some(b"mirror"), Some(&sig), b"request.approve", &h), EntryAuth::WrongWriter);
        assert_eq!(keys.check(Some(b"mirror"), Some(&sig), b"mirror.fetch", &[8; 32]), EntryAuth::BadSignature);
        assert_eq!(keys.check(Some(b"api"), Some(&sig), b"request.approve", &h), EntryAuth::BadSignature);
        assert_eq!(keys.check(None, None, b"request.approve", &h), EntryAuth::Unsigned);
        assert_eq!(keys.check(Some(b"webhook"), Some(&sig), b"admission.create", &h), EntryAuth::NoKey);
        // The gateway's entries are its own: the API's key does not make them good.
        let gateway = Writer::new(GATEWAY, SigningKey::from_bytes(&[3; 32]));
        keys.add(GATEWAY, gateway.key.verifying_key());
        assert_eq!(keys.check(Some(b"gateway"), Some(&gateway.sign(&h)), b"gateway.signin", &h), EntryAuth::Good);
        assert_eq!(keys.check(Some(b"api"), Some(&api.sign(&h)), b"gateway.signin", &h), EntryAuth::WrongWriter);
        assert_eq!(
            keys.check(Some(b"gateway"), Some(&gateway.sign(&h)), b"request.approve", &h),
            EntryAuth::WrongWriter
        );
        // The auditor may say which actions a writer owns.
        keys.set_actions(MIRROR, Some("cran."));
        assert_eq!(keys.owner_of(b"cran.fetch"), Some(MIRROR));
        assert_eq!(keys.owner_of(b"mirror.fetch"), Some(API));
        assert_eq!(keys.check(Some(b"mirror"), Some(&sig), b"mirror.fetch", &h), EntryAuth::WrongWriter);
    }
}
