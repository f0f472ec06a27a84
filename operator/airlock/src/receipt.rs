//! STAND-IN for branch `outcli`'s `noexit_airlock::receipt` (to be replaced by theirs when it
//! lands; the API glue in `operator/src/api/outputs.rs` is the only user). A release receipt:
//! what left, who decided, when; signed with the API's audit key (ed25519) over canonical bytes.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::checks::Report;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReviewRecord {
    pub reviewer: String,
    pub decision: String,
    #[serde(default)]
    pub reason: String,
    /// RFC 3339.
    pub at: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Receipt {
    pub id: String,
    pub project: String,
    pub workspace: String,
    pub requester: String,
    pub file_name: String,
    pub size: u64,
    pub sha256: String,
    pub checks: Report,
    pub reviews: Vec<ReviewRecord>,
    /// RFC 3339.
    pub released_at: String,
}

/// A receipt with its signature (hex) and the signer's public key (hex).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignedReceipt {
    pub receipt: Receipt,
    pub signature: String,
    pub public_key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    #[error("receipt signature is not valid for the given key")]
    BadSignature,
    #[error("receipt signature is malformed: {0}")]
    Malformed(String),
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

impl Receipt {
    /// The bytes signed: JSON with keys sorted (serde_json's map is a BTreeMap), no spaces.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let value = serde_json::to_value(self).unwrap_or_default();
        serde_json::to_vec(&value).unwrap_or_default()
    }

    pub fn sign(self, key: &SigningKey) -> SignedReceipt {
        let signature = key.sign(&self.canonical_bytes());
        SignedReceipt {
            receipt: self,
            signature: hex(&signature.to_bytes()),
            public_key: hex(key.verifying_key().as_bytes()),
        }
    }
}

impl SignedReceipt {
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), ReceiptError> {
        let bytes = unhex(&self.signature).ok_or_else(|| ReceiptError::Malformed("not hex".into()))?;
        let sig = Signature::from_slice(&bytes).map_err(|e| ReceiptError::Malformed(e.to_string()))?;
        key.verify(&self.receipt.canonical_bytes(), &sig).map_err(|_| ReceiptError::BadSignature)
    }
}
