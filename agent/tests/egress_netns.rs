//! The egress lock against real traffic: network namespaces joined by veth links play a
//! workspace and the hosts around it (mirror, control plane, resolver, a second resolver, an
//! outside host, the desktop gateway). `noexit-egress` runs inside the workspace namespace;
//! listeners and clients are sockets this test opens inside the namespaces (a thread enters a
//! namespace with setns; sockets stay in the namespace they were made in).
//!
//! Needs root, `ip`, `nft` and `ping`. Skips with a message otherwise, fails when NOEXIT_CI=1.
//!
//!   cargo test -p noexit-agent --test egress_netns -- --nocapture

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use noexit_test_support::deps;
use noexit_test_support::netns::{self, End, Netns};
use noexit_test_support::process::run;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_noexit-egress");
const SHORT: Duration = Duration::from_millis(700);

// ---- environment ---------------------------------------------------------------------------

/// True when the test should return early (after saying why; under NOEXIT_CI=1 it fails).
fn skip() -> bool {
    let missing = deps::missing_as_root(&["ip", "nft", "ping", "sysctl"]);
    !deps::ready("egress netns test", &missing, "apt-get install nftables iproute2 iputils-ping")
}

/// `nft <args>` inside `ns`, failing the test when it fails.
fn nft(ns: &Netns, args: &[&str]) {
    let out = run(ns.exec(["nft"]).args(args));
    assert!(out.status.success(), "nft {args:?} in {ns} failed: {}", String::from_utf8_lossy(&out.stderr));
}

// ---- the lab -------------------------------------------------------------------------------

/// Hosts around the workspace; host `i` sits on 10.77.i.0/24 and fd77:i::/64, `.2`/`::2`
/// on its side, `.1`/`::1` on the workspace's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Host {
    Mirror = 1,
    ControlPlane = 2,
    Outside = 3,
    Resolver = 4,
    Resolver2 = 5,
    Gateway = 6,
}

const HOSTS: [Host; 6] =
    [Host::Mirror, Host::ControlPlane, Host::Outside, Host::Resolver, Host::Resolver2, Host::Gateway];

impl Host {
    fn v4(self) -> IpAddr {
        format!("10.77.{}.2", self as u8).parse().unwrap()
    }
    fn v6(self) -> IpAddr {
        format!("fd77:{}::2", self as u8).parse().unwrap()
    }
    /// The workspace's own address on this host's link.
    fn ws_v4(self) -> IpAddr {
        format!("10.77.{}.1", self as u8).parse().unwrap()
    }
    fn role(self) -> &'static str {
        match self {
            Host::Mirror => "mirror",
            Host::ControlPlane => "cp",
            Host::Outside => "outside",
            Host::Resolver => "dns",
            Host::Resolver2 => "dns2",
            Host::Gateway => "gw",
        }
    }
}

/// Namespaces of one test, by role; deleted on drop, also when an assertion failed.
struct Lab {
    prefix: String,
    namespaces: Vec<(String, Netns)>,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new(tag: &str) -> Self {
        Self { prefix: format!("nx{}{tag}", netns::tag()), namespaces: Vec::new(), dir: tempfile::tempdir().unwrap() }
    }

    fn ns(&self, role: &str) -> &Netns {
        self.namespaces.iter().find(|(r, _)| r == role).map(|(_, ns)| ns).unwrap_or_else(|| panic!("no {role}"))
    }

    fn add_ns(&mut self, role: &str) {
        let ns = Netns::new(format!("{}-{role}", self.prefix));
        // Links made from now on skip duplicate address detection (link-local included).
        ns.sysctl("net.ipv6.conf.default.accept_dad=0");
        self.namespaces.push((role.to_owned(), ns));
    }

    /// Workspace plus every host, linked and addressed (IPv6 without duplicate address
    /// detection, so addresses are usable at once).
    fn build(tag: &str) -> Self {
        let mut lab = Self::new(tag);
        lab.add_ns("ws");
        for host in HOSTS {
            lab.add_ns(host.role());
            let i = host as u8;
            let ws_if = format!("to-{}", host.role());
            let (ws_end, host_end) = netns::veth(End::In(lab.ws(), &ws_if), End::In(lab.host_ns(host), "eth0"));
            for (link, last) in [(ws_end, 1), (host_end, 2)] {
                link.addr(&format!("10.77.{i}.{last}/24")).addr(&format!("fd77:{i}::{last}/64")).up();
            }
        }
        // A veth link needs a moment before it carries traffic: poll until every host
        // answers over IPv4 and IPv6.
        for host in HOSTS {
            for ip in [host.v4(), host.v6()] {
                let deadline = Instant::now() + Duration::from_secs(10);
                while !ping(lab.ws(), ip) {
                    assert!(Instant::now() < deadline, "lab: {ip} ({}) never answered", host.role());
                }
            }
        }
        lab
    }

    fn host_ns(&self, host: Host) -> &Netns {
        self.ns(host.role())
    }

    fn ws(&self) -> &Netns {
        self.ns("ws")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `noexit-egress` inside namespace `ns`.
    fn egress(&self, ns: &Netns, args: &[&str]) -> (Option<i32>, Value) {
        let out = run(ns.exec([BIN]).args(args));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!("noexit-egress {args:?}: {e}\nstdout: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr))
        });
        (out.status.code(), value)
    }
}

fn config_yaml() -> String {
    use Host::*;
    format!(
        r#"
workspace: {{ project: ward-7, name: alice-r }}
controlPlane: {{ url: "https://{cp}:8443", caFile: /nonexistent/ca.pem, certFile: /nonexistent/tls.crt, keyFile: /nonexistent/tls.key }}
egress:
  resolvers: [{dns}]
  endpoints:
    - {{ name: mirror, address: {mirror}, port: 443 }}
    - {{ name: mirrorV6, address: "{mirror6}", port: 443 }}
    - {{ name: controlPlane, address: {cp}, port: 8443 }}
    - {{ name: cpEcho, address: {cp}, port: 7 }}
  gatewaySources: [{gw}/32]
  desktopPort: 5901
  canary: {{ name: outside, address: {outside}, port: 443 }}
mode: vm
desktop: vnc
"#,
        cp = ControlPlane.v4(),
        dns = Resolver.v4(),
        mirror = Mirror.v4(),
        mirror6 = Mirror.v6(),
        gw = Gateway.v4(),
        outside = Outside.v4(),
    )
}

// ---- sockets inside namespaces -------------------------------------------------------------

/// TCP listener on `[::]:port` in `ns` (both IPv4 and IPv6) answering `hello <tag>`.
fn serve_tcp(ns: &Netns, port: u16, tag: &'static str) {
    let listener = ns.enter(move || TcpListener::bind(("::", port)).unwrap());
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let _ = s.write_all(format!("hello {tag}").as_bytes());
        }
    });
}

/// UDP responder on `[::]:port` in `ns`: answers every datagram with `<tag>:<datagram>`
/// (a stand-in for a DNS server: the wall only looks at addresses and ports).
fn serve_udp(ns: &Netns, port: u16, tag: &'static str) {
    let socket = ns.enter(move || UdpSocket::bind(("::", port)).unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let reply = [tag.as_bytes(), b":", &buf[..n]].concat();
            let _ = socket.send_to(&reply, from);
        }
    });
}

/// Echo server on `[::]:port` in `ns`, one thread per connection.
fn serve_echo(ns: &Netns, port: u16) {
    let listener = ns.enter(move || TcpListener::bind(("::", port)).unwrap());
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// A connection from `ns` kept open across steps (the socket stays in `ns`).
fn hold(ns: &Netns, ip: IpAddr, port: u16) -> TcpStream {
    let s = ns.enter(move || TcpStream::connect_timeout(&SocketAddr::new(ip, port), SHORT).unwrap());
    s.set_read_timeout(Some(SHORT)).unwrap();
    s.set_write_timeout(Some(SHORT)).unwrap();
    s
}

/// Whether one message still makes it there and back on an open connection.
fn echoes(mut s: &TcpStream) -> bool {
    let mut buf = [0u8; 4];
    s.write_all(b"ping").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"ping"
}

/// Connects from `ns`; `Ok(greeting)` or the error text.
fn tcp(ns: &Netns, ip: IpAddr, port: u16) -> Result<String, String> {
    ns.enter(move || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::new(ip, port), SHORT).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(SHORT)).map_err(|e| e.to_string())?;
        let mut got = String::new();
        s.read_to_string(&mut got).map_err(|e| e.to_string())?;
        Ok(got)
    })
}

/// One datagram from `ns` and its answer, or the error text (refused at send or no answer).
fn udp(ns: &Netns, ip: IpAddr, port: u16) -> Result<String, String> {
    ns.enter(move || {
        let s = UdpSocket::bind(if ip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(SHORT)).map_err(|e| e.to_string())?;
        s.send_to(b"query", (ip, port)).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 512];
        let (n, _) = s.recv_from(&mut buf).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

fn ping(ns: &Netns, ip: IpAddr) -> bool {
    run(&mut ns.exec(["ping", "-n", "-c", "1", "-W", "1", &ip.to_string()])).status.success()
}

// ---- assertions ----------------------------------------------------------------------------

/// Everything the lock must stop, as (description, reached?) pairs.
fn forbidden(lab: &Lab) -> Vec<(String, bool)> {
    use Host::*;
    let ws = lab.ws();
    let mut out = Vec::new();
    let mut add = |what: String, reached: bool| out.push((what, reached));
    add("tcp outside:443".into(), tcp(ws, Outside.v4(), 443).is_ok());
    add("tcp outside v6:443".into(), tcp(ws, Outside.v6(), 443).is_ok());
    add("tcp mirror:8080 (port not allowed)".into(), tcp(ws, Mirror.v4(), 8080).is_ok());
    add("udp outside:9999".into(), udp(ws, Outside.v4(), 9999).is_ok());
    add("udp outside v6:9999".into(), udp(ws, Outside.v6(), 9999).is_ok());
    add("dns udp outside".into(), udp(ws, Outside.v4(), 53).is_ok());
    add("dns tcp outside".into(), tcp(ws, Outside.v4(), 53).is_ok());
    add("dns udp second resolver".into(), udp(ws, Resolver2.v4(), 53).is_ok());
    add("dns tcp second resolver".into(), tcp(ws, Resolver2.v4(), 53).is_ok());
    add("dns udp second resolver v6".into(), udp(ws, Resolver2.v6(), 53).is_ok());
    add("icmp outside".into(), ping(ws, Outside.v4()));
    add("icmp v6 outside".into(), ping(ws, Outside.v6()));
    add("icmp mirror".into(), ping(ws, Mirror.v4()));
    add("desktop from outside".into(), tcp(lab.host_ns(Outside), Outside.ws_v4(), 5901).is_ok());
    out
}

fn assert_allowed_paths_work(lab: &Lab, when: &str) {
    use Host::*;
    let ws = lab.ws();
    let checks = [
        ("tcp mirror:443", tcp(ws, Mirror.v4(), 443), "hello mirror"),
        ("tcp mirror v6:443", tcp(ws, Mirror.v6(), 443), "hello mirror"),
        ("tcp control plane:8443", tcp(ws, ControlPlane.v4(), 8443), "hello cp"),
        ("dns udp resolver", udp(ws, Resolver.v4(), 53), "dns:query"),
        ("dns tcp resolver", tcp(ws, Resolver.v4(), 53), "hello dns"),
        ("desktop from gateway", tcp(lab.host_ns(Gateway), Gateway.ws_v4(), 5901), "hello desktop"),
    ];
    let broken: Vec<String> = checks
        .into_iter()
        .filter(|(_, got, want)| got.as_deref() != Ok(*want))
        .map(|(what, got, _)| format!("{what}: {got:?}"))
        .collect();
    assert!(broken.is_empty(), "{when}: allowed paths broken: {broken:?}\n{}", diagnose(lab));
}

/// State worth seeing when a path misbehaves.
fn diagnose(lab: &Lab) -> String {
    let mut out = String::new();
    for (ns, args) in [
        (lab.ws(), vec!["nft", "list", "ruleset"]),
        (lab.ws(), vec!["ip", "-6", "neigh"]),
        (lab.host_ns(Host::Mirror), vec!["ip", "-6", "neigh"]),
    ] {
        let o = run(&mut ns.exec(&args));
        out.push_str(&format!("--- {ns}: {}\n{}\n", args.join(" "), String::from_utf8_lossy(&o.stdout)));
    }
    out
}

fn assert_all_blocked(lab: &Lab, when: &str) {
    let leaks: Vec<String> = forbidden(lab).into_iter().filter(|(_, reached)| *reached).map(|(w, _)| w).collect();
    assert!(leaks.is_empty(), "{when}: the wall let through: {leaks:?}");
}

/// Lines of a child's stdout, readable with a bound.
fn lines_of(child: &mut Child) -> mpsc::Receiver<Value> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && tx.send(v).is_err()
            {
                break;
            }
        }
    });
    rx
}

/// Waits (bounded) for a line matching `pred`, returning it.
fn wait_for(rx: &mpsc::Receiver<Value>, what: &str, bound: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + bound;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(v) if pred(&v) => return v,
            Ok(v) => seen.push(v),
            Err(_) => break,
        }
    }
    panic!("no {what} within {bound:?}; saw {seen:#?}");
}

/// Kills the watcher even when an assertion fails first.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---- the tests -----------------------------------------------------------------------------

#[test]
fn egress_lock_holds_in_network_namespaces() {
    if skip() {
        return;
    }
    use Host::*;
    let lab = Lab::build("a");
    let ws = lab.ws();
    serve_tcp(lab.host_ns(Mirror), 443, "mirror");
    serve_tcp(lab.host_ns(Mirror), 8080, "mirror-other-port");
    serve_tcp(lab.host_ns(ControlPlane), 8443, "cp");
    serve_tcp(lab.host_ns(Outside), 443, "outside");
    serve_tcp(lab.host_ns(Outside), 53, "outside-dns");
    serve_udp(lab.host_ns(Outside), 9999, "outside");
    serve_udp(lab.host_ns(Outside), 53, "outside-dns");
    for (host, tag) in [(Resolver, "dns"), (Resolver2, "dns2")] {
        serve_tcp(lab.host_ns(host), 53, tag);
        serve_udp(lab.host_ns(host), 53, tag);
    }
    serve_tcp(ws, 5901, "desktop");
    serve_echo(lab.host_ns(Outside), 7);
    serve_echo(lab.host_ns(ControlPlane), 7);
    let config = lab.path("agent.yaml");
    std::fs::write(&config, config_yaml()).unwrap();
    let config = config.to_str().unwrap();

    // Without the lock everything is reachable: the checks below can tell open from closed.
    let open: Vec<String> = forbidden(&lab).into_iter().filter(|(_, r)| !*r).map(|(w, _)| w).collect();
    assert!(open.is_empty(), "lab broken, unreachable before the lock: {open:?}");
    assert_allowed_paths_work(&lab, "before the lock");
    let opened_before = hold(ws, Outside.v4(), 7);
    assert!(echoes(&opened_before));
    // The pod-mode probe sees the open wall for what it is.
    let (code, probe) = lab.egress(ws, &["probe", "--config", config]);
    assert_eq!(code, Some(3), "{probe}");
    assert!(probe["detail"].as_str().unwrap().contains("is reachable: the network wall is open"), "{probe}");

    let (code, state) = lab.egress(ws, &["apply", "--config", config]);
    assert_eq!(code, Some(0), "{state}");
    assert_eq!(state["locked"], true, "{state}");
    assert_eq!(state["mode"], "vm");

    assert_allowed_paths_work(&lab, "after apply");
    assert_all_blocked(&lab, "after apply");
    // A blocked TCP connection fails at once with a clear error instead of hanging.
    let err = tcp(ws, Outside.v4(), 443).unwrap_err();
    assert!(err.contains("No route to host") || err.contains("not permitted"), "{err}");

    // A connection opened before the lock does not survive it: only flows that started
    // through an allow rule (and carry its conntrack mark) pass as established.
    assert!(!echoes(&opened_before), "a flow from before the lock still gets out");

    // The live table equals the plan exactly (a fresh process has only the plan to go by).
    let (code, check) = lab.egress(ws, &["check", "--config", config]);
    assert_eq!((code, &check["outcome"]), (Some(0), &Value::from("intact")), "{check}");

    // Pod-mode probe from the same place: canary blocked, mirror reachable.
    let (code, probe) = lab.egress(ws, &["probe", "--config", config]);
    assert_eq!(code, Some(0), "{probe}");
    assert_eq!(probe["mode"], "pod");
    assert!(probe["detail"].as_str().unwrap().contains("canary outside 10.77.3.2:443 blocked"), "{probe}");

    // A rule slipped in by hand is found and removed by `check`.
    // (Both directions: replies of an unmarked flow are not let in either.)
    for chain in ["output", "input"] {
        nft(ws, &["insert", "rule", "inet", "noexit", chain, "accept"]);
    }
    assert!(tcp(ws, Outside.v4(), 443).is_ok(), "the inserted rules should open the wall");
    let (code, check) = lab.egress(ws, &["check", "--config", config]);
    assert_eq!((code, &check["outcome"]), (Some(0), &Value::from("restored")), "{check}");
    assert!(check["tamper"].as_str().unwrap().contains("chain output"), "{check}");
    assert_all_blocked(&lab, "after check restored an inserted rule");

    // Whatever is opened while the table is gone is cut when it comes back; allowed flows
    // opened under the lock keep working across the restore.
    let allowed = hold(ws, ControlPlane.v4(), 7);
    assert!(echoes(&allowed));
    nft(ws, &["flush", "ruleset"]);
    let opened_in_gap = hold(ws, Outside.v4(), 7);
    assert!(echoes(&opened_in_gap));
    let (_, check) = lab.egress(ws, &["check", "--config", config]);
    assert_eq!(check["outcome"], "restored", "{check}");
    assert!(!echoes(&opened_in_gap), "a flow opened while the table was gone survived the restore");
    assert!(echoes(&allowed), "an allowed flow was cut by the restore");

    // The watcher: flush everything by hand, it is put back and reported as tamper.
    let mut watcher = ws
        .exec([BIN, "watch", "--config", config])
        .args(["--interval-ms", "200", "--report-every-ms", "300"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut watcher);
    let _reaper = Reaper(watcher);
    wait_for(&rx, "locked state", Duration::from_secs(10), |v| v["event"] == "state" && v["state"]["locked"] == true);
    nft(ws, &["flush", "ruleset"]);
    let v = wait_for(&rx, "tamper violation", Duration::from_secs(10), |v| v["violation"]["kind"] == "tamper");
    assert!(v["violation"]["detail"].as_str().unwrap().contains("is gone"), "{v}");
    let (_, check) = lab.egress(ws, &["check", "--config", config]);
    assert_eq!(check["outcome"], "intact", "{check}");
    assert_all_blocked(&lab, "after the watcher restored a flushed ruleset");
    assert_allowed_paths_work(&lab, "after the watcher restored a flushed ruleset");

    // Blocked attempts are counted and reported as one summed, rate-limited violation.
    for _ in 0..3 {
        assert!(tcp(ws, Outside.v4(), 443).is_err());
    }
    // Earlier drops may share a report with these; the sum must cover at least these three.
    let mut reported = 0;
    while reported < 3 {
        let v = wait_for(&rx, "egressBlocked violation", Duration::from_secs(10), |v| {
            v["violation"]["kind"] == "egressBlocked"
        });
        reported += v["violation"]["count"].as_u64().unwrap();
    }

    // A failing apply (here: nft cannot run) reports not locked and leaves the table alone.
    let (code, state) = lab.egress(ws, &["apply", "--config", config, "--nft", "/bin/false"]);
    assert_eq!(code, Some(3), "{state}");
    assert_eq!(state["locked"], false, "{state}");
    assert!(state["detail"].as_str().unwrap().contains("applying the egress table"), "{state}");
    assert_all_blocked(&lab, "after a failed apply");
}

#[test]
fn apply_failure_reports_not_locked_and_opens_nothing() {
    if skip() {
        return;
    }
    let mut lab = Lab::new("b");
    lab.add_ns("ws");
    let ns = lab.ws();
    let config = lab.path("agent.yaml");
    // A config the plan refuses (port 0) never reaches nft.
    std::fs::write(&config, config_yaml().replace("port: 8443", "port: 0")).unwrap();
    let (code, state) = lab.egress(ns, &["apply", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(3), "{state}");
    assert_eq!(state["locked"], false);
    assert!(state["detail"].as_str().unwrap().contains("egress.endpoints[2].port (controlPlane)"), "{state}");

    // nft itself failing (missing binary) is reported the same way.
    std::fs::write(&config, config_yaml()).unwrap();
    let (code, state) = lab.egress(ns, &["apply", "--config", config.to_str().unwrap(), "--nft", "/nonexistent/nft"]);
    assert_eq!(code, Some(3), "{state}");
    assert!(state["detail"].as_str().unwrap().contains("egress lock not in force"), "{state}");
    let listing = run(&mut ns.exec(["nft", "list", "ruleset"]));
    assert!(String::from_utf8_lossy(&listing.stdout).trim().is_empty(), "nothing may be half-applied");
}

/// Sends one ICMPv6 neighbour solicitation for `to` from `ns` with the given hop limit (raw
/// socket; needs root). `Err` carries the sender's error (the lock rejects with `EPERM`).
fn send_neighbour_solicitation(ns: &Netns, to: IpAddr, hops: i32) -> Result<(), String> {
    let IpAddr::V6(to) = to else { panic!("{to} is not IPv6") };
    ns.enter(move || {
        // SAFETY: plain socket calls on a descriptor this closure owns and closes; every pointer
        // passed points to a live local of the size given.
        unsafe {
            let fd = libc::socket(libc::AF_INET6, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_ICMPV6);
            if fd < 0 {
                return Err(std::io::Error::last_os_error().to_string());
            }
            for opt in [libc::IPV6_UNICAST_HOPS, libc::IPV6_MULTICAST_HOPS] {
                let len = std::mem::size_of::<i32>() as libc::socklen_t;
                libc::setsockopt(fd, libc::IPPROTO_IPV6, opt, (&raw const hops).cast(), len);
            }
            // Type 135, code 0, checksum (the kernel fills it in), reserved, target address.
            let mut msg = [0u8; 24];
            msg[0] = 135;
            msg[8..].copy_from_slice(&to.octets());
            let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
            sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sa.sin6_addr.s6_addr = to.octets();
            let len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            let n = libc::sendto(fd, msg.as_ptr().cast(), msg.len(), 0, (&raw const sa).cast(), len);
            let result = if n < 0 { Err(std::io::Error::last_os_error().to_string()) } else { Ok(()) };
            libc::close(fd);
            result
        }
    })
}

/// Whether the workspace holds our table with its final rule (fully applied).
fn table_in_force(ns: &Netns) -> bool {
    let out = run(&mut ns.exec(["nft", "list", "table", "inet", "noexit"]));
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("noexit: blocked")
}

#[test]
fn the_lock_replaces_a_table_tampered_before_it_started_and_restores_a_flush_at_once() {
    if skip() {
        return;
    }
    use Host::*;
    let lab = Lab::build("c");
    let ws = lab.ws();
    serve_tcp(lab.host_ns(Outside), 443, "outside");
    serve_tcp(lab.host_ns(Mirror), 443, "mirror");
    let config = lab.path("agent.yaml");
    std::fs::write(&config, config_yaml()).unwrap();
    let config = config.to_str().unwrap();

    // Before the agent starts, someone (root in the guest) left a table of the same name that
    // lets everything out, with rule comments copied from ours.
    nft(ws, &["add", "table", "inet", "noexit"]);
    nft(ws, &["add", "chain", "inet", "noexit", "output", "{ type filter hook output priority 0; policy accept; }"]);
    nft(ws, &["add", "rule", "inet", "noexit", "output", "accept", "comment", "\"noexit: blocked\""]);
    assert!(tcp(ws, Outside.v4(), 443).is_ok(), "the planted table should let traffic out");

    // The interval is an hour: only the kernel's change notifications can make it react.
    let mut watcher = ws
        .exec([BIN, "watch", "--config", config])
        .args(["--interval-ms", "3600000"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut watcher);
    let _reaper = Reaper(watcher);
    wait_for(&rx, "locked state", Duration::from_secs(10), |v| v["event"] == "state" && v["state"]["locked"] == true);
    // Replaced, not adopted: a fresh process comparing with the plan finds it intact.
    let (code, check) = lab.egress(ws, &["check", "--config", config]);
    assert_eq!((code, &check["outcome"]), (Some(0), &Value::from("intact")), "{check}");
    assert!(tcp(ws, Outside.v4(), 443).is_err(), "the planted table was adopted");
    assert_eq!(tcp(ws, Mirror.v4(), 443).as_deref(), Ok("hello mirror"));

    // Neighbour discovery passes only with hop limit 255: a neighbour solicitation with any
    // other hop limit (one a router would forward) is refused like any other packet.
    assert_eq!(send_neighbour_solicitation(ws, Outside.v6(), 255), Ok(()));
    let err = send_neighbour_solicitation(ws, Outside.v6(), 64).unwrap_err();
    assert!(err.contains("not permitted"), "{err}");

    // A flush is put back well under a second later (bounded poll), and reported.
    for attempt in 0..3 {
        let flushed = Instant::now();
        nft(ws, &["flush", "ruleset"]);
        let deadline = flushed + Duration::from_secs(5);
        while !table_in_force(ws) {
            assert!(Instant::now() < deadline, "flush not restored within 5 s");
        }
        let took = flushed.elapsed();
        println!("flush #{attempt} restored after {} ms", took.as_millis());
        assert!(took < Duration::from_millis(1000), "restored after {took:?}: not at once");
        let v = wait_for(&rx, "tamper violation", Duration::from_secs(5), |v| v["violation"]["kind"] == "tamper");
        assert!(v["violation"]["detail"].as_str().unwrap().contains("is gone"), "{v}");
    }
    // A rule slipped in is removed as quickly.
    let inserted = Instant::now();
    nft(ws, &["insert", "rule", "inet", "noexit", "output", "accept"]);
    let v = wait_for(&rx, "tamper violation", Duration::from_secs(5), |v| v["violation"]["kind"] == "tamper");
    assert!(v["violation"]["detail"].as_str().unwrap().contains("chain output"), "{v}");
    println!("inserted rule removed after {} ms", inserted.elapsed().as_millis());
    assert!(inserted.elapsed() < Duration::from_millis(1000));
    let (_, check) = lab.egress(ws, &["check", "--config", config]);
    assert_eq!(check["outcome"], "intact", "{check}");
    assert_all_blocked_minimal(&lab);
}

/// The outside host is unreachable (a short form of [`assert_all_blocked`] for labs that serve
/// only a few ports).
fn assert_all_blocked_minimal(lab: &Lab) {
    assert!(tcp(lab.ws(), Host::Outside.v4(), 443).is_err(), "outside reachable");
    assert!(tcp(lab.ws(), Host::Outside.v6(), 443).is_err(), "outside v6 reachable");
}
