//! Where inbox content rests: one file per item under `<data_dir>/inbox/<project>/<workspace>/`,
//! written atomically (temporary file, fsync, rename, directory fsync) through a [`Sealer`].
//!
//! The API seals with the airlock's AEAD ([`AirlockSealer`]: `noexit_airlock::seal`,
//! XChaCha20-Poly1305 in 64 KiB chunks, the key from `--seal-key`); the trait keeps the handlers
//! free of it, and [`Unsealed`] serves tests that look at the stored bytes. Either way the
//! SHA-256 recorded at submission is checked again before anything is sent to an agent.

use std::path::{Path, PathBuf};

use uuid::Uuid;

/// Seals content at rest. `aad` binds the ciphertext to its item (project, workspace, id), so a
/// sealed file copied under another item's name does not open.
pub trait Sealer: Send + Sync + std::fmt::Debug {
    /// Name recorded with the content (`none`, `xchacha20poly1305` …).
    fn scheme(&self) -> &'static str;
    fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, String>;
    fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, String>;
}

/// The airlock's AEAD, with the associated data binding each file to its item.
pub struct AirlockSealer(noexit_airlock::seal::SealKey);

impl AirlockSealer {
    pub fn new(key: noexit_airlock::seal::SealKey) -> Self {
        Self(key)
    }
}

impl std::fmt::Debug for AirlockSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AirlockSealer(xchacha20poly1305-stream)")
    }
}

impl Sealer for AirlockSealer {
    fn scheme(&self) -> &'static str {
        "xchacha20poly1305-stream"
    }
    fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, String> {
        let mut out =
            Vec::with_capacity(usize::try_from(noexit_airlock::seal::sealed_len(plain.len() as u64)).unwrap_or(0));
        noexit_airlock::seal::seal(&self.0, aad, plain, &mut out).map_err(|e| e.to_string())?;
        Ok(out)
    }
    fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(sealed.len());
        noexit_airlock::seal::open(&self.0, aad, sealed, &mut out)
            .map_err(|e| format!("cannot open sealed content: {e}"))?;
        Ok(out)
    }
}

/// No encryption at rest (tests that inspect what is stored).
#[derive(Debug, Default, Clone, Copy)]
pub struct Unsealed;

impl Sealer for Unsealed {
    fn scheme(&self) -> &'static str {
        "none"
    }
    fn seal(&self, _aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, String> {
        Ok(plain.to_vec())
    }
    fn open(&self, _aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, String> {
        Ok(sealed.to_vec())
    }
}

/// The associated data of an item's sealed content.
pub fn aad(project: &str, workspace: &str, id: Uuid) -> Vec<u8> {
    format!("noexit-inbox/v1\0{project}\0{workspace}\0{id}").into_bytes()
}

pub fn item_dir(data_dir: &Path, project: &str, workspace: &str) -> PathBuf {
    data_dir.join("inbox").join(project).join(workspace)
}

/// Seal `plain` and store it as `<dir>/<id>`; returns the path.
pub async fn store(
    sealer: &dyn Sealer,
    data_dir: &Path,
    project: &str,
    workspace: &str,
    id: Uuid,
    plain: &[u8],
) -> Result<PathBuf, String> {
    let sealed = sealer.seal(&aad(project, workspace, id), plain)?;
    let dir = item_dir(data_dir, project, workspace);
    let at = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    tokio::fs::create_dir_all(&dir).await.map_err(|e| at(&dir, e))?;
    let tmp = dir.join(format!(".{id}.{}.part", Uuid::new_v4().simple()));
    let dest = dir.join(id.to_string());
    let written = async {
        use tokio::io::AsyncWriteExt;
        let mut f = tokio::fs::File::create(&tmp).await?;
        f.write_all(&sealed).await?;
        f.sync_all().await?;
        tokio::fs::rename(&tmp, &dest).await
    }
    .await;
    if let Err(e) = written {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(at(&dest, e));
    }
    if let Ok(d) = tokio::fs::File::open(&dir).await {
        let _ = d.sync_all().await;
    }
    Ok(dest)
}

/// Read and open an item's content.
pub async fn load(
    sealer: &dyn Sealer,
    path: &Path,
    project: &str,
    workspace: &str,
    id: Uuid,
) -> Result<Vec<u8>, String> {
    let sealed = tokio::fs::read(path).await.map_err(|e| format!("{}: {e}", path.display()))?;
    sealer.open(&aad(project, workspace, id), &sealed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sealed_content_is_not_plain_on_disk_and_opens_only_for_its_own_item() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = AirlockSealer::new(noexit_airlock::seal::SealKey::generate());
        let id = Uuid::new_v4();
        let plain = b"code,label\n1,admitted\n".repeat(100);
        let path = store(&sealer, dir.path(), "ward-7", "alice-r", id, &plain).await.unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert!(!on_disk.windows(8).any(|w| w == b"admitted"), "plain text on disk");
        assert_eq!(load(&sealer, &path, "ward-7", "alice-r", id).await.unwrap(), plain);
        // The same bytes under another item (or workspace) do not open; nor do tampered ones.
        assert!(load(&sealer, &path, "ward-7", "bob-r", id).await.is_err());
        assert!(load(&sealer, &path, "ward-7", "alice-r", Uuid::new_v4()).await.is_err());
        let mut bad = on_disk.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(load(&sealer, &path, "ward-7", "alice-r", id).await.is_err());
    }

    #[tokio::test]
    async fn stored_content_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let id = Uuid::new_v4();
        let path = store(&Unsealed, dir.path(), "ward-7", "alice-r", id, b"a,b\n").await.unwrap();
        assert_eq!(path, dir.path().join("inbox/ward-7/alice-r").join(id.to_string()));
        assert_eq!(load(&Unsealed, &path, "ward-7", "alice-r", id).await.unwrap(), b"a,b\n");
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }
}
