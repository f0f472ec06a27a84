//! The workspace's files on the host: the home disk (qcow2, `qemu-img`), the seed ISO
//! (`xorriso`), and checks that the images and dataset files a manifest names exist.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::render::seed::{LABEL, SeedFile};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{what} {path}: {message}")]
    Io { what: &'static str, path: PathBuf, message: String },
    #[error("{program} failed for {path}: {message}")]
    Tool { program: &'static str, path: PathBuf, message: String },
}

fn io(what: &'static str, path: &Path) -> impl Fn(std::io::Error) -> FileError {
    let path = path.to_owned();
    move |e| FileError::Io { what, path: path.clone(), message: e.to_string() }
}

fn tool(program: &'static str, path: &Path, args: &[&std::ffi::OsStr]) -> Result<(), FileError> {
    let out = Command::new(program).args(args).output().map_err(|e| FileError::Tool {
        program,
        path: path.to_owned(),
        message: format!("cannot run {program}: {e}"),
    })?;
    if !out.status.success() {
        return Err(FileError::Tool {
            program,
            path: path.to_owned(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Create the home disk if it does not exist (never touches an existing one).
pub fn ensure_home(path: &Path, size_bytes: u64) -> Result<bool, FileError> {
    if path.exists() {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    }
    let size = size_bytes.to_string();
    tool(
        "qemu-img",
        path,
        &["create".as_ref(), "-q".as_ref(), "-f".as_ref(), "qcow2".as_ref(), path.as_os_str(), size.as_ref()],
    )?;
    Ok(true)
}

/// The backing file a qcow2 image was made on (`qemu-img info`; `-U`: a running VM holds it).
pub fn backing_file(path: &Path) -> Result<Option<PathBuf>, FileError> {
    let out = Command::new("qemu-img").args(["info", "-U", "--output=json"]).arg(path).output().map_err(|e| {
        FileError::Tool { program: "qemu-img", path: path.to_owned(), message: format!("cannot run qemu-img: {e}") }
    })?;
    if !out.status.success() {
        return Err(FileError::Tool {
            program: "qemu-img",
            path: path.to_owned(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| FileError::Tool {
        program: "qemu-img",
        path: path.to_owned(),
        message: format!("unreadable `info` output: {e}"),
    })?;
    Ok(info.get("backing-filename").and_then(|b| b.as_str()).map(PathBuf::from))
}

/// A qcow2 overlay on a base image (the workspace's root disk): made if missing, and made again
/// if it was made on another base (a new image), because an overlay reads its base's blocks and
/// on any other base reads garbage. The root holds nothing of the researcher's (that is the home
/// disk), so starting it afresh from the new image loses nothing meant to be kept. Returns
/// whether it made one.
pub fn ensure_overlay(path: &Path, base: &Path) -> Result<bool, FileError> {
    if path.exists() {
        if backing_file(path)?.as_deref() == Some(base) {
            return Ok(false);
        }
        std::fs::remove_file(path).map_err(io("removing the overlay on the old image", path))?;
    }
    tool(
        "qemu-img",
        path,
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "qcow2".as_ref(),
            "-b".as_ref(),
            base.as_os_str(),
            path.as_os_str(),
        ],
    )?;
    Ok(true)
}

/// Write the seed ISO (ISO9660 with Rock Ridge, label [`LABEL`]) atomically: a temporary file
/// renamed over the old one.
pub fn write_seed(path: &Path, files: &[SeedFile]) -> Result<(), FileError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let staging = dir.join(".seed-staging");
    let _ = std::fs::remove_dir_all(&staging);
    for f in files {
        let p = staging.join(f.path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
        }
        std::fs::write(&p, &f.content).map_err(io("writing", &p))?;
    }
    let tmp = dir.join(".seed.iso.tmp");
    let _ = std::fs::remove_file(&tmp);
    let r = tool(
        "xorriso",
        path,
        &[
            "-as".as_ref(),
            "mkisofs".as_ref(),
            "-quiet".as_ref(),
            "-R".as_ref(),
            "-V".as_ref(),
            LABEL.as_ref(),
            "-o".as_ref(),
            tmp.as_os_str(),
            staging.as_os_str(),
        ],
    );
    let _ = std::fs::remove_dir_all(&staging);
    r?;
    std::fs::rename(&tmp, path).map_err(io("renaming the seed to", path))
}

/// Remove a workspace's directory (home, seed, console log).
pub fn remove_workspace_dir(dir: &Path) -> Result<(), FileError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("removing", dir)(e)),
    }
}

/// Remove a workspace's directory, and its project's directory (`workspaces/<project>/`) when
/// that was the project's last workspace: a deleted project leaves nothing behind.
pub fn remove_workspace(dir: &Path) -> Result<(), FileError> {
    remove_workspace_dir(dir)?;
    let Some(project) = dir.parent() else { return Ok(()) };
    match std::fs::remove_dir(project) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::DirectoryNotEmpty) => Ok(()),
        Err(e) => Err(io("removing", project)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_workspace_takes_its_project_dir_along() {
        let root = tempfile::tempdir().unwrap();
        let (a, b) = (root.path().join("ward-7/a"), root.path().join("ward-7/b"));
        for d in [&a, &b] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("home.qcow2"), "x").unwrap();
        }
        remove_workspace(&a).unwrap();
        assert!(!a.exists() && b.exists(), "the other workspace stays");
        remove_workspace(&b).unwrap();
        assert!(!root.path().join("ward-7").exists(), "an empty workspaces/<project>/ is left behind");
        assert!(root.path().exists());
        remove_workspace(&b).unwrap(); // gone already: fine
    }

    #[test]
    fn an_overlay_is_made_again_on_a_new_base() {
        if Command::new("qemu-img").arg("--version").output().is_err() {
            assert!(std::env::var_os("NOEXIT_CI").is_none(), "qemu-img missing (hack/install-deps.sh installs it)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (old, new, overlay) =
            (dir.path().join("old.qcow2"), dir.path().join("new.qcow2"), dir.path().join("root.qcow2"));
        for base in [&old, &new] {
            ensure_home(base, 1 << 20).unwrap();
        }
        assert!(ensure_overlay(&overlay, &old).unwrap(), "made");
        assert_eq!(backing_file(&overlay).unwrap(), Some(old.clone()));
        assert!(!ensure_overlay(&overlay, &old).unwrap(), "the same base: kept");
        assert!(ensure_overlay(&overlay, &new).unwrap(), "a new base: made again");
        assert_eq!(backing_file(&overlay).unwrap(), Some(new));
        assert_eq!(backing_file(&old).unwrap(), None);
    }

    #[test]
    fn seed_iso_has_the_label_and_files() {
        if Command::new("xorriso").arg("-version").output().is_err() {
            assert!(std::env::var_os("NOEXIT_CI").is_none(), "xorriso missing (hack/install-deps.sh installs it)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let iso = dir.path().join("seed.iso");
        let files = crate::render::seed::files("a: 1\n", "CA", "CERT", "KEY", None);
        write_seed(&iso, &files).unwrap();
        let out =
            Command::new("xorriso").args(["-indev"]).arg(&iso).args(["-find", "/", "-type", "f"]).output().unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(listing.contains("'/tls/client.key'"), "{listing}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Volume id    : 'NOEXITSEED'"), "{err}");
    }
}
