//! `noexit-operator dns` end to end, in network namespaces, with the real binary:
//!
//! ```text
//!  ws (workspace)            dns (noexit DNS)                        out (the internet)
//!  10.253.N.2 ──veth── 10.253.N.1  noexit-operator dns :53
//!  10.253.N.4          10.253.N.3  dnsmasq forwarder (kube-dns stand-in)
//!                      10.254.N.1 ─────────────veth──────────── 10.254.N.2  dnsmasq, logs
//!                                                                           every query
//! ```
//!
//! The workspace's resolver is whatever the operator renders into the workspace pod's
//! `dnsConfig` (written to the namespace's resolv.conf, as the kubelet would). Names the
//! workspace needs resolve; any other name is refused and never reaches the outside resolver,
//! while the same name sent through a forwarding resolver (what kube-dns is) does: the log
//! is proven to catch a leak. Also: caps on name length, a per-source rate limit, refused names
//! counted per project and audited per workspace, rate-limited.
//!
//! Needs root, `ip`, `dig` (bind9-dnsutils), `dnsmasq` (dnsmasq-base), `curl`, `getent`.
//! Missing tools skip with a message, unless `NOEXIT_CI=1`, where they fail.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use noexit_test_support::netns::{self, End, Netns};
use noexit_test_support::process::{run, run_ok};
use noexit_test_support::{deps, poll};

fn ready() -> bool {
    let missing = deps::missing_as_root(&["ip", "dig", "dnsmasq", "curl", "getent"]);
    deps::ready("dns test", &missing, "hack/install-deps.sh")
}

// ---------------------------------------------------------------------------------------------
// Three namespaces

struct Lab {
    tag: String,
    ws: Netns,
    dns: Netns,
    out: Netns,
    /// The workspace's address (in the clients file) and a second one (another source).
    ws_ip: String,
    ws_ip2: String,
    /// Where noexit dns listens; the kube-dns stand-in; the outside resolver.
    dns_ip: String,
    standin_ip: String,
    out_ip: String,
}

impl Lab {
    fn create() -> Self {
        let tag = netns::tag();
        let octet = u8::from_str_radix(&tag[..2], 16).unwrap_or(1) % 250 + 1;
        let me = Self {
            ws: Netns::new(format!("nxd-ws-{tag}")),
            dns: Netns::new(format!("nxd-dns-{tag}")),
            out: Netns::new(format!("nxd-out-{tag}")),
            ws_ip: format!("10.253.{octet}.2"),
            ws_ip2: format!("10.253.{octet}.4"),
            dns_ip: format!("10.253.{octet}.1"),
            standin_ip: format!("10.253.{octet}.3"),
            out_ip: format!("10.254.{octet}.2"),
            tag,
        };
        let t = &me.tag;
        // Workspace <-> DNS, a /29: the DNS side holds noexit dns (.1) and the stand-in (.3).
        let (w, d) = netns::veth(End::In(&me.ws, &format!("nxd{t}w")), End::In(&me.dns, &format!("nxd{t}d")));
        for a in [&me.ws_ip, &me.ws_ip2] {
            w.addr(&format!("{a}/29"));
        }
        for a in [&me.dns_ip, &me.standin_ip] {
            d.addr(&format!("{a}/29"));
        }
        w.up();
        d.up();
        // Everything the workspace sends goes to the DNS namespace, which does not forward.
        me.ws.ip(&["route", "add", "default", "via", &me.dns_ip]);
        me.dns.sysctl("net.ipv4.ip_forward=0");
        // DNS <-> outside, a /30.
        let (o, p) = netns::veth(End::In(&me.dns, &format!("nxd{t}o")), End::In(&me.out, &format!("nxd{t}p")));
        o.addr(&format!("10.254.{octet}.1/30")).up();
        p.addr(&format!("{}/30", me.out_ip)).up();
        me
    }

    /// `dig` from the workspace; returns (status, flags, answers).
    fn dig(&self, server: &str, extra: &[&str]) -> Dig {
        let out = run(self.ws.exec(["dig", &format!("@{server}"), "+tries=1", "+time=3"]).args(extra));
        Dig::parse(&String::from_utf8_lossy(&out.stdout))
    }

    fn curl_in_dns(&self, url: &str) -> Option<String> {
        let out = run(&mut self.dns.exec(["curl", "-sf", "--max-time", "5", url]));
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A UDP socket bound to `addr` inside the workspace namespace.
    fn udp_in_ws(&self, addr: &str) -> UdpSocket {
        let addr = format!("{addr}:0");
        self.ws.enter(move || UdpSocket::bind(addr).unwrap())
    }
}

#[derive(Debug)]
struct Dig {
    status: String,
    flags: Vec<String>,
    answers: Vec<String>,
    text: String,
}

impl Dig {
    fn parse(text: &str) -> Self {
        // ";; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 1" and ";; flags: qr aa rd; QUERY: 1, ..."
        let status = text
            .split_once("status: ")
            .and_then(|(_, rest)| rest.split(',').next())
            .map_or_else(|| "NO-ANSWER".to_owned(), |s| s.trim().to_owned());
        let flags = text
            .split_once(";; flags: ")
            .and_then(|(_, rest)| rest.split(';').next())
            .map(|f| f.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        let mut answers = Vec::new();
        let mut in_answer = false;
        for line in text.lines() {
            if line.starts_with(";; ANSWER SECTION") {
                in_answer = true;
            } else if line.trim().is_empty() {
                in_answer = false;
            } else if in_answer && let Some(last) = line.split_whitespace().last() {
                answers.push(last.to_owned());
            }
        }
        Self { status, flags, answers, text: text.to_owned() }
    }
}

/// A child process killed on drop.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dnsmasq(ns: &Netns, listen: &str, log: &Path, forward_to: Option<&str>) -> Proc {
    let mut cmd = ns.exec([
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--port=53",
        "--user=root",
        "--pid-file=",
        "--log-queries",
    ]);
    cmd.arg(format!("--listen-address={listen}")).arg(format!("--log-facility={}", log.display()));
    if let Some(upstream) = forward_to {
        cmd.arg(format!("--server={upstream}"));
    }
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let p = Proc { child, log: log.to_owned() };
    poll::blocking("dnsmasq to start", Duration::from_secs(10), || p.log().contains("started").then_some(()));
    p
}

// ---------------------------------------------------------------------------------------------
// What the operator renders for a workspace

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/ward-7.yaml");

fn site_yaml(dns_address: &str) -> String {
    format!(
        r#"operatorNamespace: noexit-system
controlPlane:
  service: noexit-api
  address: 10.96.100.10
  port: 8443
  podLabels: {{app.kubernetes.io/name: noexit, app.kubernetes.io/component: api}}
mirror:
  service: noexit-mirror
  address: 10.96.100.11
  port: 8080
  podLabels: {{app.kubernetes.io/name: noexit, app.kubernetes.io/component: mirror}}
dns:
  service: noexit-dns
  address: {dns_address}
  port: 53
  podLabels: {{app.kubernetes.io/name: noexit, app.kubernetes.io/component: dns}}
"#
    )
}

/// Render the example project with `site`; return the nameservers of the workspace pod
/// `ws-alice-r`, after checking the pod, the VM, the agent's allowlist and the project's
/// NetworkPolicy all name noexit's DNS server and nothing else.
fn rendered_nameservers(site: &Path, dns_address: &str) -> Vec<String> {
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_noexit-operator")).args(["render", "-f", EXAMPLE]).arg("--site").arg(site),
    );
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&String::from_utf8_lossy(&out.stdout))
        .map(|d| serde::Deserialize::deserialize(d).expect("document"))
        .collect();
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind} {name}"))
    };
    let pod = &find("Pod", "ws-alice-r")["spec"];
    // Before noexit dns, workspace pods had no dnsConfig: the cluster resolver (kube-dns,
    // 10.96.0.10), which forwards every name it does not know to the internet.
    assert_eq!(pod["dnsPolicy"], "None", "the workspace pod must not use the cluster DNS");
    let nameservers: Vec<String> = pod["dnsConfig"]["nameservers"]
        .as_sequence()
        .expect("pod dnsConfig.nameservers")
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(nameservers, [dns_address]);
    assert!(!nameservers.iter().any(|n| n == "10.96.0.10"));
    let vm = &find("VirtualMachine", "ws-alice-vm")["spec"]["template"]["spec"];
    assert_eq!(vm["dnsPolicy"], "None");
    assert_eq!(vm["dnsConfig"]["nameservers"][0].as_str(), Some(dns_address));
    let secret = find("Secret", "ws-alice-r-agent");
    use base64::Engine;
    let agent = base64::engine::general_purpose::STANDARD
        .decode(secret["data"]["agent.yaml"].as_str().expect("agent.yaml"))
        .expect("base64");
    let agent: noexit_crds::agent::AgentConfig = serde_yaml::from_slice(&agent).expect("agent config");
    assert_eq!(agent.egress.resolvers, [dns_address.parse::<IpAddr>().unwrap()], "agent nftables resolver");
    let allow = &find("NetworkPolicy", "noexit-allow-dns")["spec"]["egress"][0];
    assert_eq!(allow["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"], "dns");
    assert_eq!(allow["to"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], "noexit-system");
    assert!(!serde_yaml::to_string(allow).unwrap().contains("kube-dns"));
    nameservers
}

// ---------------------------------------------------------------------------------------------
// The test

const MIRROR: &str = "noexit-mirror.noexit-system.svc";
const API: &str = "noexit-api.noexit-system.svc";
const QPS: u32 = 20;
const BURST: u32 = 40;
const AUDIT_BURST: u32 = 8;
const AUDITS_PER_MINUTE: u32 = 6;

fn query(name: &str, id: u16) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(hickory_proto::op::Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

#[test]
fn workspaces_resolve_only_their_names_and_nothing_reaches_the_outside() {
    if !ready() {
        return;
    }
    let lab = Lab::create();
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site.yaml");
    std::fs::write(&site, site_yaml(&lab.dns_ip)).unwrap();
    let nameservers = rendered_nameservers(&site, &lab.dns_ip);
    // The kubelet writes a dnsPolicy: None pod's resolv.conf from dnsConfig alone.
    lab.ws.set_resolv_conf(&nameservers[0]);
    // Were noexit dns to use a system resolver, it would be the outside one, and be seen.
    lab.dns.set_resolv_conf(&lab.out_ip);

    let outside = dnsmasq(&lab.out, &lab.out_ip, &dir.path().join("outside.log"), None);
    let standin = dnsmasq(&lab.dns, &lab.standin_ip, &dir.path().join("standin.log"), Some(&lab.out_ip));

    let clients = dir.path().join("clients.yaml");
    std::fs::write(&clients, format!("clients:\n  {}: ward-7/alice-r\n", lab.ws_ip)).unwrap();
    let db = format!("sqlite://{}", dir.path().join("noexit.db").display());
    let (key, public) = (dir.path().join("dns.pem"), dir.path().join("dns.pub"));
    let dns_key = noexit_operator::audit::keys::write_key_pair(&key, &public).unwrap();
    let log = dir.path().join("dns.log");
    let child = lab
        .dns
        .exec([env!("CARGO_BIN_EXE_noexit-operator"), "dns"])
        .args(["--listen", &format!("{}:53", lab.dns_ip), "--metrics-addr", "127.0.0.1:9090"])
        .arg("--site")
        .arg(&site)
        .arg("--clients")
        .arg(&clients)
        .args(["--database-url", &db])
        .arg("--audit-key")
        .arg(&key)
        .args(["--queries-per-second", &QPS.to_string(), "--query-burst", &BURST.to_string()])
        .args(["--audits-per-minute", &AUDITS_PER_MINUTE.to_string(), "--audit-burst", &AUDIT_BURST.to_string()])
        .args(["--max-name-length", "100"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut dns = Proc { child, log };
    poll::blocking("noexit dns to answer /healthz", Duration::from_secs(30), || {
        if let Ok(Some(status)) = dns.child.try_wait() {
            panic!("noexit dns exited with {status}:\n{}", dns.log());
        }
        lab.curl_in_dns("http://127.0.0.1:9090/healthz")
    });
    let started = Instant::now();

    // The names a workspace needs resolve, through the resolver the pod was given (glibc).
    let getent = |name: &str| run(&mut lab.ws.exec(["getent", "ahostsv4", name]));
    let mirror = getent(MIRROR);
    assert!(mirror.status.success(), "getent {MIRROR}: {}\n{}", String::from_utf8_lossy(&mirror.stderr), dns.log());
    assert!(String::from_utf8_lossy(&mirror.stdout).starts_with("10.96.100.11 "));
    assert!(String::from_utf8_lossy(&getent(API).stdout).starts_with("10.96.100.10 "));
    // ... over UDP and TCP, authoritative, and never offering recursion.
    for transport in ["+notcp", "+tcp"] {
        for (name, address) in [(MIRROR, "10.96.100.11"), (API, "10.96.100.10")] {
            let d = lab.dig(&nameservers[0], &[transport, name, "A"]);
            assert_eq!((d.status.as_str(), d.answers.clone()), ("NOERROR", vec![address.to_owned()]), "{d:?}");
            assert!(d.flags.contains(&"aa".to_owned()) && !d.flags.contains(&"ra".to_owned()), "{d:?}");
        }
    }
    let d = lab.dig(&nameservers[0], &["NOEXIT-Mirror.NoExit-System.SVC", "A"]);
    assert_eq!(d.answers, ["10.96.100.11"], "names compare without case: {d:?}");
    let d = lab.dig(&nameservers[0], &[MIRROR, "AAAA"]);
    assert_eq!((d.status.as_str(), d.answers.len()), ("NOERROR", 0), "no AAAA configured: {d:?}");

    // Any other name: refused, recursion never offered, whatever the transport.
    let secret = format!("c2VjcmV0-{}.example.org", lab.tag);
    for transport in ["+notcp", "+tcp"] {
        let d = lab.dig(&nameservers[0], &[transport, &secret, "A"]);
        assert_eq!(d.status, "REFUSED", "{d:?}");
        assert!(!d.flags.contains(&"ra".to_owned()), "{}", d.text);
    }
    let via_glibc = format!("glibc-{}.example.org", lab.tag);
    assert_eq!(getent(&via_glibc).status.code(), Some(2), "getent {via_glibc} must find nothing");
    let txt = format!("txt-{}.example.org", lab.tag);
    assert_eq!(lab.dig(&nameservers[0], &[&txt, "TXT"]).status, "REFUSED");
    let inzone = format!("nope-{}.noexit-system.svc", lab.tag);
    assert_eq!(lab.dig(&nameservers[0], &[&inzone, "A"]).status, "NXDOMAIN");
    // A long name (data, not a lookup) is refused at the cap.
    let long = format!("{}.{}.long-{}.example.org", "a".repeat(60), "b".repeat(60), lab.tag);
    assert_eq!(lab.dig(&nameservers[0], &[&long, "A"]).status, "REFUSED");

    // A flood from one address is rate-limited; another address is not held back.
    let sock = lab.udp_in_ws(&lab.ws_ip);
    sock.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
    {
        // Room for every answer: they are read only after the whole flood is sent.
        use std::os::fd::AsRawFd;
        let size: libc::c_int = 8 << 20;
        // SAFETY: setsockopt on our own socket with a c_int option of the right size.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
    }
    let server: SocketAddr = format!("{}:53", lab.dns_ip).parse().unwrap();
    const FLOOD: u16 = 400;
    let flood_started = Instant::now();
    for i in 0..FLOOD {
        sock.send_to(&query(&format!("flood{i}-{}.noexit-system.svc.", lab.tag), i), server).unwrap();
    }
    let mut codes: BTreeMap<String, u32> = BTreeMap::new();
    let mut buf = [0u8; 1500];
    while let Ok((n, _)) = sock.recv_from(&mut buf) {
        let m = Message::from_vec(&buf[..n]).unwrap();
        assert!(!m.metadata.recursion_available);
        *codes.entry(format!("{:?}", m.metadata.response_code)).or_default() += 1;
    }
    let flood_secs = flood_started.elapsed().as_secs_f64();
    let answered = codes.get(&format!("{:?}", ResponseCode::NXDomain)).copied().unwrap_or(0);
    let limited = codes.get(&format!("{:?}", ResponseCode::Refused)).copied().unwrap_or(0);
    let allowed_max = f64::from(BURST) + f64::from(QPS) * flood_secs + 1.0;
    assert!(f64::from(answered) <= allowed_max, "{codes:?} in {flood_secs:.2}s: over the rate");
    assert!(limited >= 200, "{codes:?}: the flood was not limited");
    let other = lab.udp_in_ws(&lab.ws_ip2);
    other.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    other.send_to(&query(&format!("{MIRROR}."), 7), server).unwrap();
    let (n, _) = other.recv_from(&mut buf).expect("an answer for another source");
    assert_eq!(Message::from_vec(&buf[..n]).unwrap().metadata.response_code, ResponseCode::NoError);

    // Counted per project, never per name.
    let metrics = lab.curl_in_dns("http://127.0.0.1:9090/metrics").expect("metrics");
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{series} missing from\n{metrics}"))
    };
    assert!(value(r#"noexit_dns_refused_names_total{project="ward-7"} "#) >= f64::from(limited) + 5.0);
    assert!(value(r#"noexit_dns_queries_total{result="rate_limited",protocol="udp"} "#) >= f64::from(limited));
    assert!(value(r#"noexit_dns_queries_total{result="answered",protocol="tcp"} "#) >= 2.0);
    assert!(!metrics.contains("example.org") && !metrics.contains(&lab.tag), "a name became a label");

    // The outside resolver never saw any of it; through a forwarder (kube-dns), it would have.
    let control = format!("control-{}.example.org", lab.tag);
    run(&mut lab.ws.exec(["dig", &format!("@{}", lab.standin_ip), "+tries=1", "+time=3", &control, "A"]));
    let seen = poll::blocking("the control name in the outside resolver's log", Duration::from_secs(10), || {
        let log = outside.log();
        log.contains(&control).then_some(log)
    });
    for name in [&secret, &via_glibc, &txt, &inzone, &long, &MIRROR.to_owned(), &API.to_owned()] {
        assert!(!seen.contains(name.as_str()), "the outside resolver saw {name}:\n{seen}");
    }
    assert!(!seen.contains("flood"), "the outside resolver saw the flood");
    assert!(standin.log().contains(&control));

    // Refused names are in the audit log, attributed to the workspace, rate-limited.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = rt.block_on(noexit_operator::audit::Store::open_read_only(&db)).unwrap();
    let rows = poll::blocking("the refused names in the audit log", Duration::from_secs(10), || {
        let entries = rt.block_on(store.tail(1000)).unwrap();
        let rows: Vec<_> = entries.into_iter().filter(|e| e.event.action == "dns.query").collect();
        let has = |name: &str| rows.iter().any(|e| e.event.object == format!("dns:{name}."));
        (has(&secret) && rows.iter().any(|e| e.event.detail["category"] == "name_too_long")).then_some(rows)
    });
    eprintln!("flood: {codes:?} in {flood_secs:.2} s; {} audit rows", rows.len());
    for e in &rows {
        assert_eq!(e.event.actor, "workspace:ward-7/alice-r", "{e:?}");
        assert_eq!(e.event.source.as_deref(), Some(lab.ws_ip.as_str()));
        assert!(matches!(e.event.outcome, noexit_operator::audit::Outcome::Refused(_)));
        assert_eq!(e.writer.as_deref(), Some("dns"), "{e:?}");
    }
    // Every entry is signed by the DNS server's own key, as the writer that owns `dns.*`.
    let mut writers = noexit_operator::audit::writers::WriterKeys::new();
    writers.add("dns", dns_key);
    let options = noexit_operator::audit::verify::VerifyOptions { writers: Some(writers), ..Default::default() };
    let report = rt.block_on(noexit_operator::audit::verify::verify(&store, &options)).unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.entries_authenticated, report.entries, "{report:?}");
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    let bound = f64::from(AUDIT_BURST) + f64::from(AUDITS_PER_MINUTE) * minutes + 1.0;
    let refused = f64::from(limited) + f64::from(answered) + 6.0;
    assert!(
        (rows.len() as f64) <= bound,
        "{} audit rows for {refused} refused queries in {minutes:.2} min (bound {bound:.1})",
        rows.len()
    );

    // SIGTERM: a clean stop.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(dns.child.id() as i32, libc::SIGTERM) };
    let status = poll::blocking("noexit dns to stop on SIGTERM", Duration::from_secs(15), || {
        dns.child.try_wait().ok().flatten()
    });
    assert!(status.success(), "{status}:\n{}", dns.log());
    assert!(dns.log().contains("workspace DNS stopped"), "{}", dns.log());
}

// ---------------------------------------------------------------------------------------------
// On loopback, without root: the wire protocol, attribution and the JSON-lines audit file.

fn free_port() -> u16 {
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = udp.local_addr().unwrap().port();
    let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
    if tcp.is_ok() { port } else { free_port() }
}

fn ask(sock: &UdpSocket, server: SocketAddr, name: &str, qtype: RecordType) -> Message {
    let mut m = Message::query();
    m.add_query(hickory_proto::op::Query::query(Name::from_ascii(name).unwrap(), qtype));
    sock.send_to(&m.to_vec().unwrap(), server).unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = sock.recv_from(&mut buf).expect("an answer");
    let reply = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(reply.metadata.id, m.metadata.id);
    reply
}

#[test]
fn answers_refuses_and_audits_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site.yaml");
    std::fs::write(&site, site_yaml("127.0.0.53")).unwrap();
    let clients = dir.path().join("clients.yaml");
    std::fs::write(&clients, "clients:\n  127.0.0.1: ward-7/alice-r\n").unwrap();
    let audit = dir.path().join("audit.jsonl");
    let (port, metrics_port) = (free_port(), free_port());
    let log = dir.path().join("dns.log");
    let child = Command::new(env!("CARGO_BIN_EXE_noexit-operator"))
        .args(["dns", "--listen", &format!("127.0.0.1:{port}"), "--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .arg("--site")
        .arg(&site)
        .arg("--clients")
        .arg(&clients)
        .arg("--audit-file")
        .arg(&audit)
        .args(["--audit-burst", "3", "--audits-per-minute", "1"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut dns = Proc { child, log };
    let server: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    poll::blocking("noexit dns to answer", Duration::from_secs(30), || {
        if let Ok(Some(status)) = dns.child.try_wait() {
            panic!("noexit dns exited with {status}:\n{}", dns.log());
        }
        let mut m = Message::query();
        m.add_query(hickory_proto::op::Query::query(Name::from_ascii(format!("{API}.")).unwrap(), RecordType::A));
        sock.send_to(&m.to_vec().unwrap(), server).ok()?;
        let mut buf = [0u8; 1500];
        sock.recv_from(&mut buf).ok().map(|_| ())
    });
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    let a = ask(&sock, server, &format!("{MIRROR}."), RecordType::A);
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert!(a.metadata.authoritative && !a.metadata.recursion_available);
    assert_eq!(a.answers.iter().map(|r| r.data.to_string()).collect::<Vec<_>>(), ["10.96.100.11"]);
    let any = ask(&sock, server, &format!("{API}."), RecordType::ANY);
    assert_eq!(any.answers.len(), 1, "{any:?}");
    let aaaa = ask(&sock, server, &format!("{API}."), RecordType::AAAA);
    assert_eq!((aaaa.metadata.response_code, aaaa.answers.len()), (ResponseCode::NoError, 0));
    assert_eq!(
        aaaa.authorities.first().map(|r| r.record_type()),
        Some(RecordType::SOA),
        "negative answers carry the SOA"
    );
    let nx = ask(&sock, server, "nope.noexit-system.svc.", RecordType::A);
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    for i in 0..10 {
        let r = ask(&sock, server, &format!("Exfil{i}.Example.org."), RecordType::TXT);
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        assert!(!r.metadata.recursion_available);
    }

    // 11 refused names, an audit burst of 3: three lines, the workspace's, the name as sent.
    let lines = poll::blocking("three audit lines", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        (lines.len() >= 3).then_some(lines)
    });
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert!(lines.iter().all(|l| l["actor"] == "workspace:ward-7/alice-r" && l["action"] == "dns.query"));
    assert_eq!(lines[0]["object"], "dns:nope.noexit-system.svc.");
    assert_eq!(lines[1]["object"], "dns:Exfil0.Example.org.");
    assert_eq!(lines[1]["outcome"]["outcome"], "refused");
    assert_eq!(lines[1]["source"], "127.0.0.1");
    assert_eq!(lines[1]["detail"]["qtype"], "TXT");

    // /metrics counts per project; SIGTERM stops it cleanly.
    let body = {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
        use std::io::{Read, Write};
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(body.contains(r#"noexit_dns_refused_names_total{project="ward-7"} 11"#), "{body}");
    assert!(body.contains(r#"noexit_dns_audit_suppressed_total{project="ward-7"} 8"#), "{body}");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(dns.child.id() as i32, libc::SIGTERM) };
    let status = poll::blocking("noexit dns to stop", Duration::from_secs(15), || dns.child.try_wait().ok().flatten());
    assert!(status.success(), "{status}:\n{}", dns.log());
}
