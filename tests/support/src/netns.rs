//! Network namespaces for tests that need real routing: a namespace per role, veth pairs
//! between them (or to the test's own namespace), addresses, commands and sockets inside.
//! Everything is removed when the [`Netns`] is dropped, also after a failed assertion.
//!
//! Needs root and `ip` (iproute2). Name namespaces and interfaces with a [`tag`]: test
//! binaries run concurrently, and fixed names would break each other. Interface names are at
//! most 15 bytes.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Mutex;

use crate::process::run_ok;

/// A random 6-hex-digit tag for the names of one test's namespaces and interfaces.
pub fn tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..6].to_owned()
}

/// Runs `ip <args>`, failing the test (with `ip`'s message) when it fails.
pub fn ip(args: &[&str]) {
    run_ok(Command::new("ip").args(args));
}

/// A named network namespace with its loopback up. Dropping it deletes the namespace (and so
/// the veth ends inside it), the host ends of veths made to it, and its `/etc/netns/<name>`.
pub struct Netns {
    name: String,
    /// Veth ends in the test's namespace whose peer is here: deleted explicitly, because a
    /// process still inside would keep the namespace, and with it the pair, alive.
    host_links: Mutex<Vec<String>>,
}

impl Netns {
    /// Creates namespace `name` (`ip netns add`) and brings its loopback up.
    pub fn new(name: impl Into<String>) -> Netns {
        let ns = Netns { name: name.into(), host_links: Mutex::default() };
        ip(&["netns", "add", &ns.name]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <name> <args>`, failing the test when it fails.
    pub fn ip(&self, args: &[&str]) {
        run_ok(Command::new("ip").args(["-n", &self.name]).args(args));
    }

    /// `ip netns exec <name> <args>`: a command run inside (more arguments may follow).
    pub fn exec<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    /// Sets a sysctl inside (`net.ipv4.ip_forward=0`), failing the test when it fails.
    pub fn sysctl(&self, setting: &str) {
        run_ok(&mut self.exec(["sysctl", "-qw", setting]));
    }

    /// The resolver commands run by [`Netns::exec`] see: `ip netns exec` bind-mounts
    /// `/etc/netns/<name>/resolv.conf` over `/etc/resolv.conf`.
    pub fn set_resolv_conf(&self, nameserver: &str) {
        let dir = self.etc_dir();
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{dir}: {e}"));
        std::fs::write(format!("{dir}/resolv.conf"), format!("nameserver {nameserver}\n")).unwrap();
    }

    fn etc_dir(&self) -> String {
        format!("/etc/netns/{}", self.name)
    }

    /// Runs `f` on a thread that has entered this namespace: sockets `f` makes stay in it
    /// (a listener bound inside, a connection made from inside).
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: a valid namespace fd; setns changes only this thread's namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("the thread in the namespace panicked")
    }
}

impl std::fmt::Display for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let host_links = self.host_links.get_mut().unwrap_or_else(|e| e.into_inner());
        for dev in host_links.drain(..) {
            let _ = Command::new("ip").args(["link", "del", &dev]).output();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
        let _ = std::fs::remove_dir_all(self.etc_dir());
    }
}

/// Where one end of a veth pair goes: the test's own namespace, or one of ours.
#[derive(Clone, Copy)]
pub enum End<'a> {
    /// Interface `dev` in the namespace the test runs in.
    Host(&'a str),
    /// Interface `dev` inside namespace `ns`.
    In(&'a Netns, &'a str),
}

/// Makes a veth pair from `a` to `b` (each end made directly in its namespace, so a name like
/// `eth0` never meets the host's). Both ends are down and unaddressed: see [`Link`].
pub fn veth(a: End<'_>, b: End<'_>) -> (Link, Link) {
    let place = |end: End<'_>| -> (Option<String>, String) {
        match end {
            End::Host(dev) => (None, dev.to_owned()),
            End::In(ns, dev) => (Some(ns.name.clone()), dev.to_owned()),
        }
    };
    let (a_ns, a_dev) = place(a);
    let (b_ns, b_dev) = place(b);
    let mut args = vec!["link", "add", a_dev.as_str()];
    if let Some(ns) = &a_ns {
        args.extend(["netns", ns.as_str()]);
    }
    args.extend(["type", "veth", "peer", "name", b_dev.as_str()]);
    if let Some(ns) = &b_ns {
        args.extend(["netns", ns.as_str()]);
    }
    ip(&args);
    for (end, peer) in [(a, b), (b, a)] {
        if let (End::Host(dev), End::In(ns, _)) = (end, peer) {
            ns.host_links.lock().unwrap_or_else(|e| e.into_inner()).push(dev.to_owned());
        }
    }
    (Link { ns: a_ns, dev: a_dev }, Link { ns: b_ns, dev: b_dev })
}

/// One end of a veth pair, to configure.
pub struct Link {
    ns: Option<String>,
    dev: String,
}

impl Link {
    pub fn dev(&self) -> &str {
        &self.dev
    }

    fn ip(&self, args: &[&str]) {
        let mut cmd = Command::new("ip");
        if let Some(ns) = &self.ns {
            cmd.args(["-n", ns]);
        }
        run_ok(cmd.args(args));
    }

    /// Adds address `cidr` (`10.0.0.1/30`, `fd00::1/64`). IPv6 addresses skip duplicate
    /// address detection, so they are usable at once.
    pub fn addr(&self, cidr: &str) -> &Link {
        let mut args = vec!["addr", "add", cidr, "dev", &self.dev];
        if cidr.contains(':') {
            args.push("nodad");
        }
        self.ip(&args);
        self
    }

    /// No IPv6 link-local address: one that arrives a second after link-up makes Chromium
    /// abort page loads (`ERR_NETWORK_CHANGED`).
    pub fn no_link_local(&self) -> &Link {
        self.ip(&["link", "set", &self.dev, "addrgenmode", "none"]);
        self
    }

    pub fn up(&self) -> &Link {
        self.ip(&["link", "set", &self.dev, "up"]);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn can_run() -> bool {
        crate::deps::ready("netns unit test", &crate::deps::missing_as_root(&["ip"]), "run as root with iproute2")
    }

    #[test]
    fn two_namespaces_talk_over_a_veth_and_leave_nothing_behind() {
        if !can_run() {
            return;
        }
        let t = tag();
        let (a_name, b_name) = (format!("nxt-a-{t}"), format!("nxt-b-{t}"));
        {
            let a = Netns::new(&a_name);
            let b = Netns::new(&b_name);
            let host = format!("nxt{t}");
            let (to_b, to_a) = veth(End::In(&a, "eth0"), End::In(&b, "eth0"));
            to_b.addr("10.199.0.1/30").up();
            to_a.addr("10.199.0.2/30").up();
            let (h, _) = veth(End::Host(&host), End::In(&a, "up0"));
            h.up();
            let listener = b.enter(|| TcpListener::bind("10.199.0.2:7000").unwrap());
            let connected = a.enter(|| TcpStream::connect("10.199.0.2:7000").is_ok());
            assert!(connected, "a reaches b over the veth");
            drop(listener);
            let ok = a.exec(["ip", "link", "show", "eth0"]).output().unwrap();
            assert!(ok.status.success());
            assert!(Command::new("ip").args(["link", "show", &host]).output().unwrap().status.success());
        }
        let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
        let list = String::from_utf8_lossy(&list.stdout);
        assert!(!list.contains(&a_name) && !list.contains(&b_name), "namespaces left: {list}");
        let links = Command::new("ip").args(["link", "show"]).output().unwrap();
        assert!(!String::from_utf8_lossy(&links.stdout).contains(&format!("nxt{t}")), "host veth end left");
    }
}
