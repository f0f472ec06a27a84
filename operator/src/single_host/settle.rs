//! Reading the manifests only once they have stopped changing.
//!
//! An editor or a shell's `>` truncates a file before it writes the new text. A pass that read
//! the file in between would take the empty or half-written file for what the admin wants, and
//! every workspace missing from it would be deleted with its disks. So the files are read only
//! once none of them has changed for [`SETTLE`], and read again if one changed while being read.
//! A file that never settles is refused for this pass (what runs stays as it is).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How long a manifest must have been left alone before a pass believes it.
pub const SETTLE: Duration = Duration::from_secs(1);

/// Waits (or re-reads) before a file that keeps changing is refused for this pass.
const ATTEMPTS: u32 = 5;

/// What tells one version of a file from the next: a rename brings a new inode, an in-place
/// write a new time or length.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: SystemTime,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Result<Stamp, String> {
    let m = std::fs::metadata(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let modified = m.modified().map_err(|e| format!("{}: cannot read its modification time: {e}", path.display()))?;
    Ok(Stamp { modified, len: m.len(), inode: m.ino() })
}

fn stamps(paths: &[PathBuf]) -> Result<Vec<Stamp>, Vec<String>> {
    every(paths.iter().map(|p| stamp(p)))
}

/// All the values, or every problem (not just the first: an admin fixes them in one go).
pub fn every<T>(results: impl IntoIterator<Item = Result<T, String>>) -> Result<Vec<T>, Vec<String>> {
    let (mut values, mut problems) = (Vec::new(), Vec::new());
    for r in results {
        match r {
            Ok(v) => values.push(v),
            Err(e) => problems.push(e),
        }
    }
    if problems.is_empty() { Ok(values) } else { Err(problems) }
}

/// How long until the most recently changed file is `settle` old; zero when all are. A time in
/// the future (a clock step) counts as now.
pub fn unsettled_for(now: SystemTime, modified: impl IntoIterator<Item = SystemTime>, settle: Duration) -> Duration {
    modified
        .into_iter()
        .map(|m| settle.saturating_sub(now.duration_since(m).unwrap_or(Duration::ZERO)))
        .max()
        .unwrap_or(Duration::ZERO)
}

/// Each file's text, read once the files have settled. Problems name the file. Blocks the
/// thread while it waits (at most `ATTEMPTS` × `settle`).
pub fn read_settled(paths: &[PathBuf], settle: Duration) -> Result<Vec<(PathBuf, String)>, Vec<String>> {
    let mut last = Vec::new();
    for _ in 0..ATTEMPTS {
        let before = stamps(paths)?;
        let wait = unsettled_for(SystemTime::now(), before.iter().map(|s| s.modified), settle);
        if !wait.is_zero() {
            // Waiting for the admin's editor to finish, not for anything of ours.
            std::thread::sleep(wait);
            last = before;
            continue;
        }
        let texts = every(paths.iter().map(|p| {
            std::fs::read_to_string(p).map(|t| (p.clone(), t)).map_err(|e| format!("{}: cannot read: {e}", p.display()))
        }))?;
        let after = stamps(paths)?;
        if after == before {
            return Ok(texts);
        }
        last = after;
    }
    // Name the files still changing; when each settled in turn but one changed while read,
    // all of them.
    let now = SystemTime::now();
    let young: Vec<&PathBuf> = paths
        .iter()
        .zip(&last)
        .filter(|(_, s)| !unsettled_for(now, [s.modified], settle).is_zero())
        .map(|(p, _)| p)
        .collect();
    let named = if young.is_empty() { paths.iter().collect() } else { young };
    Err(named
        .into_iter()
        .map(|p| {
            format!(
                "{}: still being written (changed again within {settle:?}, {ATTEMPTS} times); not applied this pass",
                p.display()
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: SystemTime = SystemTime::UNIX_EPOCH;
    const S: Duration = Duration::from_secs(1);

    fn at(ms: u64) -> SystemTime {
        T0 + Duration::from_millis(ms)
    }

    #[test]
    fn waits_until_the_newest_file_is_settle_old() {
        assert_eq!(unsettled_for(at(5_000), [at(1_000), at(4_700)], S), Duration::from_millis(700));
        assert_eq!(unsettled_for(at(5_000), [at(1_000), at(4_000)], S), Duration::ZERO);
        assert_eq!(unsettled_for(at(5_000), [], S), Duration::ZERO);
        // A modification time ahead of the clock is taken as just now.
        assert_eq!(unsettled_for(at(5_000), [at(9_000)], S), S);
    }

    fn file(dir: &Path, name: &str, text: &str, age: Duration) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::File::options().write(true).open(&p).unwrap().set_modified(SystemTime::now() - age).unwrap();
        p
    }

    #[test]
    fn settled_files_are_read_at_once() {
        let d = tempfile::tempdir().unwrap();
        let a = file(d.path(), "a.yaml", "a: 1\n", Duration::from_secs(60));
        let b = file(d.path(), "b.yaml", "", Duration::from_secs(60));
        let start = std::time::Instant::now();
        let got = read_settled(&[a.clone(), b.clone()], Duration::from_secs(30)).unwrap();
        assert_eq!(got, vec![(a, "a: 1\n".to_owned()), (b, String::new())]);
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_file_just_written_is_read_once_settled() {
        let d = tempfile::tempdir().unwrap();
        let a = file(d.path(), "a.yaml", "a: 1\n", Duration::ZERO);
        let settle = Duration::from_millis(200);
        let start = std::time::Instant::now();
        assert_eq!(read_settled(std::slice::from_ref(&a), settle).unwrap()[0].1, "a: 1\n");
        assert!(start.elapsed() >= settle);
    }

    #[test]
    fn a_file_that_never_settles_is_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        let old = file(d.path(), "old.yaml", "", Duration::from_secs(60));
        // Modified "in an hour": it never looks settled.
        let new = d.path().join("new.yaml");
        std::fs::write(&new, "").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&new)
            .unwrap()
            .set_modified(SystemTime::now() + Duration::from_secs(3600))
            .unwrap();
        let e = read_settled(&[old, new], Duration::from_millis(10)).unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("new.yaml: still being written"), "{e:?}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let d = tempfile::tempdir().unwrap();
        let e = read_settled(&[d.path().join("gone.yaml")], S).unwrap_err();
        assert!(e[0].contains("gone.yaml: cannot read"), "{e:?}");
    }
}
