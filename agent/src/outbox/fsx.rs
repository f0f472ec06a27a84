//! File operations relative to directory handles, for a directory someone else controls.
//!
//! The agent is root in a VM and the outbox is the researcher's. A path such as
//! `/outbox/.submitted/x` is re-resolved by the kernel at every use, so a researcher who swaps a
//! component for a symlink between two calls (`.submitted -> /etc`) steers a root `rename` or
//! `create` anywhere. Here every operation starts from a directory handle opened with
//! `O_DIRECTORY|O_NOFOLLOW` and names one entry in it, never follows a symlink, and opens files
//! with `O_NONBLOCK` (a FIFO must not hang the agent) before checking what it opened.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, RenameFlags};

/// What an outbox entry is, from `fstatat(.., AT_SYMLINK_NOFOLLOW)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: FileType,
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
    pub uid: u32,
    pub len: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl Entry {
    pub fn of(st: &rfs::Stat) -> Self {
        Self {
            kind: FileType::from_raw_mode(st.st_mode),
            dev: st.st_dev,
            ino: st.st_ino,
            nlink: st.st_nlink,
            uid: st.st_uid,
            len: u64::try_from(st.st_size).unwrap_or(0),
            mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec as i64,
            ctime_ns: st.st_ctime * 1_000_000_000 + st.st_ctime_nsec as i64,
        }
    }

    /// Same file, same content as far as the inode tells (size, modification and change time).
    pub fn same_content(&self, other: &Entry) -> bool {
        self.dev == other.dev
            && self.ino == other.ino
            && self.len == other.len
            && self.mtime_ns == other.mtime_ns
            && self.ctime_ns == other.ctime_ns
    }
}

/// Opens a directory without following a symlink at its last component.
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    Ok(rfs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?)
}

/// Opens the directory `name` inside `dir` without following a symlink.
pub fn open_dir_at(dir: impl AsFd, name: &str) -> io::Result<OwnedFd> {
    Ok(rfs::openat(dir, name, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?)
}

/// Entries of a directory handle (without `.` and `..`), at most `max`.
pub fn list(dir: impl AsFd, max: usize) -> io::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for entry in rfs::Dir::read_from(dir)? {
        let entry = entry?;
        let name: &CStr = entry.file_name();
        let bytes = name.to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        if out.len() == max {
            break;
        }
        out.push(bytes.to_vec());
    }
    Ok(out)
}

/// `fstatat` without following a symlink.
pub fn stat_at(dir: impl AsFd, name: &str) -> io::Result<Entry> {
    Ok(Entry::of(&rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?))
}

pub fn stat_fd(fd: impl AsFd) -> io::Result<Entry> {
    Ok(Entry::of(&rfs::fstat(fd)?))
}

/// Opens `name` in `dir` for reading: never through a symlink (`ELOOP`), never blocking on a
/// FIFO, never becoming a controlling terminal. The caller checks what it got with [`stat_fd`].
pub fn open_file_at(dir: impl AsFd, name: &str) -> io::Result<File> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    Ok(File::from(rfs::openat(dir, name, flags, Mode::empty())?))
}

/// Creates `name` in `dir`; fails if anything (a symlink included) already has that name.
pub fn create_new_at(dir: impl AsFd, name: &str, mode: u32) -> io::Result<File> {
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(File::from(rfs::openat(dir, name, flags, Mode::from_raw_mode(mode))?))
}

pub fn mkdir(path: &Path, mode: u32) -> io::Result<()> {
    Ok(rfs::mkdir(path, Mode::from_raw_mode(mode))?)
}

pub fn mkdir_at(dir: impl AsFd, name: &str, mode: u32) -> io::Result<()> {
    Ok(rfs::mkdirat(dir, name, Mode::from_raw_mode(mode))?)
}

/// Renames one entry to another, both relative to directory handles. The kernel never follows
/// a symlink at either last component.
pub fn rename_at(from_dir: impl AsFd, from: &str, to_dir: impl AsFd, to: &str) -> io::Result<()> {
    Ok(rfs::renameat(from_dir, from, to_dir, to)?)
}

/// As [`rename_at`], but fails with `EEXIST` instead of replacing an existing `to`.
pub fn rename_noreplace_at(from_dir: impl AsFd, from: &str, to_dir: impl AsFd, to: &str) -> io::Result<()> {
    Ok(rfs::renameat_with(from_dir, from, to_dir, to, RenameFlags::NOREPLACE)?)
}

pub fn unlink_at(dir: impl AsFd, name: &str) -> io::Result<()> {
    Ok(rfs::unlinkat(dir, name, AtFlags::empty())?)
}

pub fn chown_fd(fd: impl AsFd, uid: u32, gid: u32) -> io::Result<()> {
    let (uid, gid) = (rfs::Uid::from_raw(uid), rfs::Gid::from_raw(gid));
    Ok(rfs::fchown(fd, Some(uid), Some(gid))?)
}

pub fn chmod_fd(fd: impl AsFd, mode: u32) -> io::Result<()> {
    Ok(rfs::fchmod(fd, Mode::from_raw_mode(mode))?)
}

pub fn gid_of(fd: impl AsFd) -> io::Result<(u32, u32, u32)> {
    let st = rfs::fstat(fd)?;
    Ok((st.st_uid, st.st_gid, st.st_mode & 0o7777))
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}
