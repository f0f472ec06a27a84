//! Notice nftables changes as they happen: a netlink socket subscribed to the kernel's
//! `NFNLGRP_NFTABLES` multicast group receives a message for every table, chain, rule or set
//! that is added, changed or deleted in this network namespace (what `nft monitor` prints).
//! The messages are not parsed: any of them means "compare the live table with the plan now".
//! The interval check stays as a backstop for whatever this misses (a socket that overflowed —
//! `ENOBUFS` also counts as a change — or could not be opened).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

/// `NFNLGRP_NFTABLES` from `linux/netfilter/nfnetlink.h`.
const NFNLGRP_NFTABLES: u32 = 7;

/// A netlink socket bound to the nftables multicast group (needs `CAP_NET_ADMIN`).
pub struct Monitor {
    fd: AsyncFd<OwnedFd>,
}

impl Monitor {
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_NETFILTER,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; all-zero is valid (pid 0: the kernel assigns one).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = 1 << (NFNLGRP_NFTABLES - 1);
        let len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: `addr` is a valid sockaddr_nl of `len` bytes for the duration of the call.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: an OwnedFd keeps its descriptor open and unchanged until the AsyncFd drops it.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.map_err(io::Error::from)?;
        Ok(Self { fd })
    }

    /// Waits until the kernel reports at least one change, then drains what is queued.
    pub async fn changed(&self) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut guard = self.fd.readable().await?;
            let mut got = false;
            loop {
                // SAFETY: reads into `buf`, which is valid for `buf.len()` bytes.
                let n = unsafe { libc::recv(self.fd.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n >= 0 {
                    got = true;
                    continue;
                }
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    Some(libc::EINTR) => continue,
                    // Messages were lost: something changed.
                    Some(libc::ENOBUFS) => got = true,
                    _ => return Err(e),
                }
            }
            guard.clear_ready();
            if got {
                return Ok(());
            }
        }
    }
}

/// Runs until the task is aborted: notifies `changed` for every burst of nftables changes. When the socket cannot be opened or fails, says so once and
/// retries now and then; the caller's interval check covers the gap.
pub async fn run(changed: Arc<Notify>) {
    let mut backoff =
        crate::client::Backoff::new(std::time::Duration::from_secs(1), std::time::Duration::from_secs(60));
    let mut reported = false;
    loop {
        let result: io::Result<()> = match Monitor::open() {
            Ok(m) => {
                if reported {
                    tracing::info!("nftables monitor open again");
                }
                reported = false;
                backoff.reset();
                loop {
                    if let Err(e) = m.changed().await {
                        break Err(e);
                    }
                    changed.notify_one();
                }
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result
            && !reported
        {
            tracing::warn!(error = %e, "cannot follow nftables changes; relying on the interval check");
            reported = true;
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_change_in_this_namespace_is_noticed() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0
            || !std::process::Command::new("nft").arg("--version").output().is_ok_and(|o| o.status.success())
        {
            eprintln!("SKIPPED nftables monitor test: needs root and nft");
            return;
        }
        let m = Monitor::open().unwrap();
        let table = format!("noexit_monitor_test_{}", std::process::id());
        let nft = |args: &[&str]| {
            let out = std::process::Command::new("nft").args(args).output().unwrap();
            assert!(out.status.success(), "nft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        nft(&["add", "table", "inet", &table]);
        let noticed = tokio::time::timeout(std::time::Duration::from_secs(5), m.changed()).await;
        nft(&["delete", "table", "inet", &table]);
        noticed.expect("no netlink message within 5 s").unwrap();
    }
}
