//! The ed25519 key that signs checkpoints: PKCS#8 PEM private key (a file or a mounted Secret),
//! SPKI PEM public key for auditors.

use std::path::Path;

use ed25519_dalek::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, spki::der::pem::LineEnding,
};
use ed25519_dalek::{SigningKey, VerifyingKey};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cannot write key file {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("{path} is not an ed25519 {kind} key in PEM: {message}")]
    Parse { path: String, kind: &'static str, message: String },
}

/// Short, stable name of a public key, stored with each checkpoint so keys can be rotated. One
/// definition with the release receipts' signer id: a receipt names the audit signing key.
pub use noexit_airlock::receipt::key_id;

/// Reads a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`).
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let pem = read(path)?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|e| KeyError::Parse {
        path: path.display().to_string(),
        kind: "private (PKCS#8)",
        message: e.to_string(),
    })
}

/// Reads a public key: SPKI PEM (`-----BEGIN PUBLIC KEY-----`), or the private key file itself.
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let pem = read(path)?;
    if pem.contains("PRIVATE KEY") {
        return load_signing_key(path).map(|k| k.verifying_key());
    }
    VerifyingKey::from_public_key_pem(&pem).map_err(|e| KeyError::Parse {
        path: path.display().to_string(),
        kind: "public (SPKI)",
        message: e.to_string(),
    })
}

/// A new key pair as (private PKCS#8 PEM, public SPKI PEM).
pub fn generate() -> (String, String) {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let private = key.to_pkcs8_pem(LineEnding::LF).map(|p| p.to_string()).unwrap_or_default();
    let public = key.verifying_key().to_public_key_pem(LineEnding::LF).unwrap_or_default();
    (private, public)
}

/// Writes a new key pair: the private key readable by its owner only.
pub fn write_key_pair(private_path: &Path, public_path: &Path) -> Result<VerifyingKey, KeyError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (private, public) = generate();
    fn err(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
        move |source| KeyError::Write { path: path.display().to_string(), source }
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(private_path)
        .map_err(err(private_path))?;
    f.write_all(private.as_bytes()).map_err(err(private_path))?;
    std::fs::write(public_path, public).map_err(err(public_path))?;
    load_verifying_key(public_path)
}

/// The signing key at `path`, or a new pair (the public key beside it as `<name>.pub.pem`) when
/// the file does not exist yet; `true` when it was created.
pub fn load_or_create_signing_key(path: &Path) -> Result<(SigningKey, bool), KeyError> {
    if path.exists() {
        return Ok((load_signing_key(path)?, false));
    }
    write_key_pair(path, &path.with_extension("pub.pem"))?;
    Ok((load_signing_key(path)?, true))
}

/// `noexit-operator audit-keygen`: writes a new key pair for an audit writer (the API's also
/// signs checkpoints).
#[derive(clap::Args, Debug, Clone)]
pub struct KeygenArgs {
    /// Private key to create (PKCS#8 PEM, mode 0600); it is never overwritten.
    #[arg(long, value_name = "FILE", default_value = "audit-checkpoint.key")]
    pub private: std::path::PathBuf,
    /// Public key to write (SPKI PEM), for auditors' `noexit audit verify --checkpoint-key-pub`.
    #[arg(long, value_name = "FILE", default_value = "audit-checkpoint.pub")]
    pub public: std::path::PathBuf,
}

/// Runs [`KeygenArgs`]; returns the message to print.
pub fn keygen(args: &KeygenArgs) -> Result<String, KeyError> {
    let key = write_key_pair(&args.private, &args.public)?;
    Ok(format!(
        "wrote {} (private, keep it in a Secret) and {} (public, key id {})",
        args.private.display(),
        args.public.display(),
        key_id(&key)
    ))
}

fn read(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|source| KeyError::Read { path: path.display().to_string(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_pair_round_trips_through_files() {
        let dir = tempfile::tempdir().unwrap();
        let (sk, pk) = (dir.path().join("k.pem"), dir.path().join("k.pub"));
        let vk = write_key_pair(&sk, &pk).unwrap();
        assert_eq!(load_signing_key(&sk).unwrap().verifying_key(), vk);
        assert_eq!(load_verifying_key(&sk).unwrap(), vk);
        assert_eq!(key_id(&vk).len(), 16);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&sk).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(write_key_pair(&sk, &pk).is_err(), "never overwrites a key");
    }

    #[test]
    fn garbage_is_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.pem");
        std::fs::write(&p, "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").unwrap();
        let e = load_verifying_key(&p).unwrap_err().to_string();
        assert!(e.contains("bad.pem"), "{e}");
    }
}
