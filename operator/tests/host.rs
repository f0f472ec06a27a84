//! End to end, single-host mode: `noexit-operator up` boots the tiny test image through libvirt
//! (`qemu:///system`, TCG) and everything the issue lists is checked against the real parts.
//!
//! Needs root, libvirtd + virtlogd (started here if not running; never stopped: others may use
//! them), qemu-system-x86, xorriso, nft, ip, mkfs.ext4, and the tiny image
//! (`images/vm/build.sh tiny`, built here if needed). Missing parts skip with a message, unless
//! `NOEXIT_CI=1`, where they fail.
//!
//! Everything this test makes is named with a random per-run tag: projects, libvirt networks
//! and domains, bridges, nft tables, the "outside" network namespace. It removes all of it.

mod support;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use noexit_test_support::netns::{self, End, Netns};
use noexit_test_support::poll::blocking as poll;
use support::libvirt::{Cleanup, URI, daemons, have, image_dir, ok, rand_u32, sh, skip_or_fail, tiny_image};

const BIN: &str = env!("CARGO_BIN_EXE_noexit-operator");

fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port()
}

/// The guest's test shell (the tiny image's ttyS1), through `support::guest_console`.
struct GuestConsole(support::guest_console::GuestConsole);

impl GuestConsole {
    fn connect(sock: &Path) -> Self {
        let sock = poll("the test console socket", Duration::from_secs(120), || sock.exists().then(|| sock.to_owned()));
        let mut c = support::guest_console::GuestConsole::connect(&sock, Duration::from_secs(60)).expect("console");
        c.wait_ready(Duration::from_secs(300)).expect("the guest's test shell");
        Self(c)
    }

    fn run(&mut self, cmd: &str) -> (i32, String) {
        let (code, out) =
            self.0.run(cmd, Duration::from_secs(60)).unwrap_or_else(|e| panic!("guest command {cmd:?}: {e}"));
        (code, out.trim_end().to_owned())
    }
}

struct Up {
    child: Child,
}

impl Drop for Up {
    fn drop(&mut self) {
        // SAFETY: SIGTERM to the child this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

struct World {
    tag: String,
    dir: tempfile::TempDir,
    image: PathBuf,
    ports: [u16; 3],
    base: Ipv4Addr,
}

impl World {
    fn state(&self) -> &Path {
        self.dir.path()
    }

    fn project(&self, p: &str) -> String {
        format!("{p}{}", self.tag)
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--state-dir".into(),
            self.state().display().to_string(),
            "--libvirt-uri".into(),
            URI.into(),
            "--virt-type".into(),
            "qemu".into(),
            "--api-port".into(),
            self.ports[0].to_string(),
            "--mirror-port".into(),
            self.ports[1].to_string(),
            "--dns-port".into(),
            self.ports[2].to_string(),
            "--subnet-base".into(),
            self.base.to_string(),
            "--interval".into(),
            "2".into(),
        ]
    }

    fn cmd(&self, sub: &str, files: &[&Path], extra: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg(sub);
        if sub == "up" {
            c.args(self.args());
        } else {
            c.args(["--state-dir", &self.state().display().to_string(), "--libvirt-uri", URI]);
        }
        for f in files {
            c.arg("-f").arg(f);
        }
        c.args(extra);
        c
    }

    fn once(&self, files: &[&Path]) -> Output {
        self.cmd("up", files, &["--once"]).output().unwrap()
    }

    fn start(&self, files: &[&Path]) -> Up {
        let log = std::fs::File::create(self.state().join(format!("up-{}.log", std::process::id()))).unwrap();
        Up { child: self.cmd("up", files, &[]).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap() }
    }

    fn manifests(&self, name: &str, projects: &[(&str, &[(&str, bool)])]) -> PathBuf {
        let mut text = String::new();
        let ds = format!("ds{}", self.tag);
        text.push_str(&format!(
            "apiVersion: noexit.io/v1alpha1\nkind: Dataset\nmetadata: {{name: {ds}}}\nspec:\n  classification: Synthetic\n  source: {{hostPath: {{path: {}}}}}\n  size: 8Mi\n  grantedTo: [{}]\n---\n",
            self.state().join("dataset.img").display(),
            projects.iter().map(|(p, _)| self.project(p)).collect::<Vec<_>>().join(", ")
        ));
        for (p, workspaces) in projects {
            let p = self.project(p);
            text.push_str(&format!(
                "apiVersion: noexit.io/v1alpha1\nkind: Project\nmetadata: {{name: {p}}}\nspec:\n  displayName: test\n  members: [{{user: r@x, roles: [researcher, admin]}}]\n  approval: {{reference: T-1, expires: \"2099-01-01\"}}\n  datasets: [{ds}]\n  egress: {{mirror: {{allow: [{{name: survival}}]}}}}\n---\n"
            ));
            for (w, with_ds) in *workspaces {
                text.push_str(&format!(
                    "apiVersion: noexit.io/v1alpha1\nkind: Workspace\nmetadata: {{name: {w}, namespace: noexit-{p}}}\nspec:\n  project: {p}\n  owner: r@x\n  runtime: vm\n  image: {}\n  resources: {{cpu: \"1\", memory: 256Mi, homeSize: 64Mi}}\n  datasets: [{}]\n---\n",
                    self.image.display(),
                    if *with_ds { ds.as_str() } else { "" }
                ));
            }
        }
        let path = self.state().join(name);
        write_atomically(&path, &text);
        path
    }

    fn heartbeat(&self, project: &str, ws: &str) -> Option<bool> {
        let db = self.state().join("api.db");
        let out = sh(&format!(
            "sqlite3 -readonly {} \"SELECT egress_locked FROM agent_heartbeats WHERE project='{project}' AND workspace='{ws}'\"",
            db.display()
        ));
        let s = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (!s.is_empty()).then(|| s == "1")
    }

    fn console(&self, project: &str, ws: &str) -> GuestConsole {
        GuestConsole::connect(&self.state().join("workspaces").join(project).join(ws).join("ttyS1.sock"))
    }

    fn gateway(&self, index: u8) -> Ipv4Addr {
        let [a, b, c, _] = self.base.octets();
        Ipv4Addr::new(a, b, c + index, 1)
    }
}

/// Replaces a manifest file `up` may be reading: a pass that read it between the truncation and
/// the write of a plain `std::fs::write` would see no objects at all and delete everything.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn exists(kind: &str, name: &str) -> bool {
    let cmd = if kind == "dom" { "dominfo" } else { "net-info" };
    sh(&format!("virsh -c {URI} {cmd} {name}")).status.success()
}

fn table_exists(name: &str) -> bool {
    sh(&format!("nft list table inet {name}")).status.success()
}

fn counter(table: &str, name: &str) -> u64 {
    let out = ok(&format!("nft list counter inet {table} {name}"));
    out.split("packets ").nth(1).and_then(|s| s.split_whitespace().next()).and_then(|n| n.parse().ok()).unwrap_or(0)
}

fn guest_counter(c: &mut GuestConsole, name: &str) -> u64 {
    let (_, out) = c.run(&format!("nft list counter inet noexit {name}"));
    out.split("packets ").nth(1).and_then(|s| s.split_whitespace().next()).and_then(|n| n.parse().ok()).unwrap_or(0)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The outside: a network namespace behind a veth, with an HTTP server; reached from the host,
/// and through neither wall from the VMs.
struct Outside {
    // Dropped first: the server lives in the namespace.
    server: Child,
    _ns: Netns,
    address: Ipv4Addr,
}

impl Outside {
    fn new(tag: &str, base: Ipv4Addr) -> Self {
        let ns = Netns::new(format!("nxout{tag}"));
        let [a, b, c, _] = base.octets();
        let host = Ipv4Addr::new(a, b, c + 200, 1);
        let address = Ipv4Addr::new(a, b, c + 200, 2);
        let (host_end, inside) = netns::veth(End::Host(&format!("nxo{tag}")), End::In(&ns, "eth0"));
        host_end.addr(&format!("{host}/30")).up();
        inside.addr(&format!("{address}/30")).up();
        ns.ip(&["route", "add", "default", "via", &host.to_string()]);
        let server = ns
            .exec(["python3", "-m", "http.server", "--bind", &address.to_string(), "8000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        poll("the outside server", Duration::from_secs(20), || {
            sh(&format!("curl -s -o /dev/null --max-time 2 http://{address}:8000/")).status.success().then_some(())
        });
        Self { server, _ns: ns, address }
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// An HTTP GET from the guest with busybox nc (the static busybox's wget crashes resolving):
/// `(reached, output)`; reached means an HTTP response came back.
fn get(c: &mut GuestConsole, host: impl std::fmt::Display, port: u16, path: &str) -> (bool, String) {
    let (_, out) = c.run(&format!("(printf 'GET {path} HTTP/1.0\\r\\n\\r\\n'; sleep 3) | nc -w 4 {host} {port}"));
    (out.contains("HTTP/1."), out)
}

#[test]
fn single_host_end_to_end() {
    if unsafe { libc::geteuid() } != 0 {
        skip_or_fail("needs root (libvirt system daemon, nftables, network namespaces)");
        return;
    }
    for tool in [
        "libvirtd",
        "virtlogd",
        "virsh",
        "qemu-system-x86_64",
        "qemu-img",
        "xorriso",
        "nft",
        "ip",
        "mkfs.ext4",
        "python3",
        "curl",
        "sqlite3",
    ] {
        if !have(tool) {
            skip_or_fail(&format!("{tool} is not installed (hack/install-deps.sh)"));
            return;
        }
    }
    let Some(tiny) = tiny_image() else {
        skip_or_fail("the tiny VM image cannot be built (images/vm/build.sh tiny)");
        return;
    };
    daemons();
    let tag: String = format!("{:06x}", rand_u32() & 0xff_ffff);
    let _cleanup = Cleanup(tag.clone());
    let dir = tempfile::tempdir().unwrap();
    // The image: the tiny kernel and initramfs, booted with the test shell on ttyS1.
    let image = image_dir(&tiny, dir.path(), "console=ttyS0 noexit.test=1 quiet");
    // A dataset disk: ext4 with one file.
    let content = dir.path().join("dscontent");
    std::fs::create_dir(&content).unwrap();
    std::fs::write(content.join("hello.txt"), "dataset-content\n").unwrap();
    ok(&format!("mkfs.ext4 -q -d {} {} 8M", content.display(), dir.path().join("dataset.img").display()));
    let base = Ipv4Addr::new(10, 100 + (rand_u32() % 100) as u8, 0, 0);
    let w = World { tag: tag.clone(), dir, image, ports: [free_port(), free_port(), free_port()], base };
    let (pa, pb) = (w.project("a"), w.project("b"));

    // ---- Bad input: each refused with a clear message, nothing made. ----
    let bad = w.manifests("bad-image.yaml", &[("a", &[("w1", true)])]);
    std::fs::write(
        &bad,
        std::fs::read_to_string(&bad).unwrap().replace(&w.image.display().to_string(), "/nonexistent/image"),
    )
    .unwrap();
    let o = w.once(&[&bad]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("spec.image: /nonexistent/image does not exist"), "{}", stderr(&o));
    let bad = w.manifests("bad-ds.yaml", &[("a", &[("w1", true)])]);
    std::fs::write(&bad, std::fs::read_to_string(&bad).unwrap().replace("dataset.img", "missing.img")).unwrap();
    let o = w.once(&[&bad]);
    assert!(
        stderr(&o).contains("spec.source.hostPath.path:") && stderr(&o).contains("missing.img does not exist"),
        "{}",
        stderr(&o)
    );
    let good = w.manifests("a.yaml", &[("a", &[("w1", true)])]);
    let mut args = w.args();
    args[3] = "qemu+unix:///system?socket=/nonexistent/libvirt-sock".into();
    let o = Command::new(BIN).arg("up").args(args).args(["--once", "-f"]).arg(&good).output().unwrap();
    assert!(stderr(&o).contains("cannot connect to libvirt") && stderr(&o).contains("libvirtd -d"), "{}", stderr(&o));
    // A domain of the same name not made by noexit: refused, left alone, nothing else made.
    let foreign = format!("noexit-{pa}-w1");
    let xml = w.state().join("foreign.xml");
    std::fs::write(&xml, format!("<domain type='qemu'><name>{foreign}</name><memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os></domain>")).unwrap();
    ok(&format!("virsh -c {URI} define {}", xml.display()));
    let o = w.once(&[&good]);
    assert!(
        stderr(&o).contains(&format!("libvirt domain \"{foreign}\" exists and was not made by this noexit")),
        "{}",
        stderr(&o)
    );
    assert!(exists("dom", &foreign), "the foreign domain was touched");
    assert!(!exists("net", &format!("noexit-{pa}")) && !table_exists(&format!("noexit-{pa}")), "half-created");
    ok(&format!("virsh -c {URI} undefine {foreign}"));

    // ---- Up: two projects, a workspace each; agents heartbeat over the project networks. ----
    let both = w.manifests("both.yaml", &[("a", &[("w1", true)]), ("b", &[("w1", false)])]);
    let started = Instant::now();
    let up = w.start(&[&both]);
    poll("the first heartbeat of a/w1", Duration::from_secs(600), || w.heartbeat(&pa, "w1"));
    eprintln!("first heartbeat after {:?}", started.elapsed());
    // The agent applies its lock right after starting; a later heartbeat reports it.
    poll("a/w1 to report its egress lock", Duration::from_secs(120), || w.heartbeat(&pa, "w1").filter(|l| *l));
    poll("the first heartbeat of b/w1", Duration::from_secs(600), || w.heartbeat(&pb, "w1"));
    let status = String::from_utf8_lossy(&w.cmd("status", &[], &[]).output().unwrap().stdout).into_owned();
    assert!(
        status.contains("virtualisation: qemu")
            && status.contains("services: API tcp")
            && status.contains("Running")
            && status.contains("locked"),
        "{status}"
    );

    let mut a = w.console(&pa, "w1");
    let mut b = w.console(&pb, "w1");
    let (gw_a, gw_b) = (w.gateway(0), w.gateway(1));
    // The mirror answers on the project's gateway address.
    let (reached, out) = get(&mut a, gw_a, w.ports[1], "/healthz");
    assert!(reached, "mirror from a/w1: {out}");
    assert!(get(&mut b, gw_b, w.ports[1], "/healthz").0, "b cannot reach its own mirror");
    // DNS too: port 53 on the gateway, redirected to the server, which answers (refusing a name
    // outside its zone, without recursing).
    let (_, out) = a.run(&format!("nslookup example.org {gw_a}"));
    assert!(
        !out.contains("timed out") && ["REFUSED", "NXDOMAIN", "can't find"].iter().any(|s| out.contains(s)),
        "DNS from a/w1: {out}"
    );
    // The API (heartbeats), the mirror and DNS were reached through the services table as well,
    // which names both projects' bridges.
    let instance = ok(&format!("sqlite3 -readonly {} 'SELECT id FROM instance'", w.state().join("host.db").display()));
    let services = ok(&format!("nft list table inet noexit-services.{}", instance.trim()));
    for p in [&pa, &pb] {
        let br = ok(&format!("virsh -c {URI} net-info noexit-{p} | awk '/Bridge/ {{print $2}}'"));
        assert!(services.contains(&format!("\"{}\"", br.trim())), "{p}'s bridge {br}: {services}");
    }
    // The dataset is there and read-only; the home is writable.
    assert_eq!(a.run(&format!("cat /data/ds{tag}/hello.txt")), (0, "dataset-content".into()));
    let (code, out) = a.run(&format!("touch /data/ds{tag}/x"));
    assert_ne!(code, 0, "wrote to the dataset: {out}");
    assert_eq!(a.run("echo kept > /home/researcher/marker && sync").0, 0);

    // ---- The walls. libvirt's own isolated-network rules also refuse forwarding (a third wall,
    // and the host does not route: ip_forward=0), so the outside is never reachable; each of our
    // walls is shown by its counter while the other is off. ----
    let outside = Outside::new(&tag, base);
    let out_ip = outside.address;
    let bridge_a = String::from_utf8_lossy(
        &sh(&format!("virsh -c {URI} net-info noexit-{pa} | awk '/Bridge/ {{print $2}}'")).stdout,
    )
    .trim()
    .to_owned();
    // Forwarding on our own bridge only, so the host's forward hook (our wall) sees the packets.
    ok(&format!("sysctl -qw net.ipv4.conf.{bridge_a}.forwarding=1"));
    assert!(!get(&mut a, out_ip, 8000, "/").0, "outside reached with both walls on");
    drop(up); // `up` stopped: its loop would restore a deleted wall at once (as it should).
    let table_a = format!("noexit-{pa}");
    // Host wall off, guest wall on: the guest's counter rises.
    ok(&format!("nft delete table inet {table_a}"));
    let before = guest_counter(&mut a, "blocked_out");
    assert!(!get(&mut a, out_ip, 8000, "/").0, "outside reached through the guest wall");
    assert!(guest_counter(&mut a, "blocked_out") > before, "the guest wall did not count the attempt");
    // Guest wall off (agent replaced by `true`, table deleted), host wall on: the host counter rises.
    let o = w.once(&[&both]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(table_exists(&table_a), "`up --once` did not restore the wall");
    a.run("mount --bind /bin/true $(command -v noexit-agent); killall noexit-agent; sleep 1; nft delete table inet noexit");
    assert_ne!(a.run("nft list table inet noexit").0, 0, "the guest table is still there");
    let before = counter(&table_a, "blocked_forward");
    assert!(!get(&mut a, out_ip, 8000, "/").0, "outside reached through the host wall");
    assert!(counter(&table_a, "blocked_forward") > before, "the host wall did not count the attempt");
    // The host's other addresses: refused by the host wall's input chain.
    let before = counter(&table_a, "blocked_in");
    let host_side = Ipv4Addr::new(base.octets()[0], base.octets()[1], 200, 1);
    assert!(!get(&mut a, host_side, w.ports[1], "/healthz").0);
    assert!(counter(&table_a, "blocked_in") > before);
    // Both off: libvirt's rules still refuse (reported as such, not asserted reachable).
    ok(&format!("nft delete table inet {table_a}"));
    let both_off = get(&mut a, out_ip, 8000, "/");
    eprintln!(
        "both walls off: reached={} ({}) — libvirt's isolated-network rules refuse forwarding",
        both_off.0, both_off.1
    );
    assert!(!both_off.0);
    // Project b cannot reach project a: neither a's VM nor the host services on a's address.
    let a_addr = Ipv4Addr::new(base.octets()[0], base.octets()[1], 0, 10);
    assert!(!get(&mut b, gw_a, w.ports[1], "/healthz").0, "b reached a's gateway");
    assert_ne!(b.run(&format!("ping -c 1 -W 2 {a_addr}")).0, 0, "b reached a's VM");
    drop(outside);

    // ---- down keeps home; up again finds it. ----
    let o = w.cmd("down", &[], &[]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!exists("net", &format!("noexit-{pa}")) && !table_exists(&table_a));
    drop(a);
    let up = w.start(&[&both]);
    let mut a = w.console(&pa, "w1");
    assert_eq!(a.run("cat /home/researcher/marker"), (0, "kept".into()));

    // ---- A changed manifest reconciles: b's workspace goes (domain and disks), then b. ----
    let only_a_and_b = w.manifests("both.yaml", &[("a", &[("w1", true)]), ("b", &[])]);
    let b_dir = w.state().join("workspaces").join(&pb).join("w1");
    poll("b/w1 to be deleted", Duration::from_secs(60), || {
        (!exists("dom", &format!("noexit-{pb}-w1")) && !b_dir.exists()).then_some(())
    });
    assert!(exists("net", &format!("noexit-{pb}")), "project b's network went with its workspace");
    assert!(!w.state().join("workspaces").join(&pb).exists(), "an empty workspaces/{pb}/ was left behind");
    write_atomically(
        &only_a_and_b,
        &std::fs::read_to_string(w.manifests("a-only.yaml", &[("a", &[("w1", true)])])).unwrap(),
    );
    poll("project b's network and wall to be removed", Duration::from_secs(60), || {
        (!exists("net", &format!("noexit-{pb}")) && !table_exists(&format!("noexit-{pb}"))).then_some(())
    });
    assert!(exists("dom", &format!("noexit-{pa}-w1")) && table_exists(&table_a));
    drop(up);
    // Everything goes: no manifests.
    let empty = w.state().join("empty.yaml");
    std::fs::write(&empty, "").unwrap();
    let o = w.once(&[&empty]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        !exists("dom", &format!("noexit-{pa}-w1"))
            && !exists("net", &format!("noexit-{pa}"))
            && !table_exists(&table_a)
    );
}

/// `noexit audit …` on a state directory's audit store (the API's, where `up` records refusals).
fn audit(state: &Path, args: &[&str]) -> Output {
    let url = format!("sqlite:{}", state.join("api.db").display());
    Command::new(env!("CARGO_BIN_EXE_noexit")).arg("audit").args(args).args(["--database-url", &url]).output().unwrap()
}

/// The refused entries as (action, object, reason).
fn refused(state: &Path) -> Vec<(String, String, String)> {
    let o = audit(state, &["query", "--outcome", "refused", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            (s("action"), s("object"), s("reason"))
        })
        .collect()
}

fn verify_audit(state: &Path) {
    let key = state.join("audit-signing.pub.pem");
    let o = audit(state, &["verify", "--checkpoint-key-pub", key.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "audit verify: {out}{}", stderr(&o));
}

/// Every refusal of `up` is in the tamper-evident audit log (the API's store in the state
/// directory), signed with the API's key: at start (no libvirt needed for these) and, with
/// libvirtd and root, when a later pass refuses an edited file while `up` runs.
#[test]
fn up_refusals_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // Files the manifest names: a kernel-boot image directory and a dataset disk.
    let image = dir.path().join("image");
    std::fs::create_dir(&image).unwrap();
    std::fs::write(image.join("vmlinuz"), "").unwrap();
    std::fs::write(image.join("initrd.img"), "").unwrap();
    let ds = dir.path().join("ds.img");
    std::fs::write(&ds, "").unwrap();
    let tag = format!("{:06x}", rand_u32() & 0xff_ffff);
    let project = format!("au{tag}");
    let good = format!(
        "apiVersion: noexit.io/v1alpha1\nkind: Project\nmetadata: {{name: {project}}}\nspec:\n  displayName: t\n  members: [{{user: r@x, roles: [researcher, admin]}}]\n  approval: {{reference: T-1, expires: \"2099-01-01\"}}\n  datasets: [d{tag}]\n---\napiVersion: noexit.io/v1alpha1\nkind: Dataset\nmetadata: {{name: d{tag}}}\nspec:\n  classification: Synthetic\n  source: {{hostPath: {{path: {}}}}}\n  size: 8Mi\n  grantedTo: [{project}]\n---\napiVersion: noexit.io/v1alpha1\nkind: Workspace\nmetadata: {{name: w1, namespace: noexit-{project}}}\nspec:\n  project: {project}\n  owner: r@x\n  runtime: vm\n  image: {}\n  resources: {{cpu: \"1\", memory: 256Mi, homeSize: 64Mi}}\n  datasets: [d{tag}]\n",
        ds.display(),
        image.display()
    );
    let file = dir.path().join("m.yaml");
    let up = |extra: &[&str]| {
        let ports = [free_port(), free_port(), free_port()];
        let mut c = Command::new(BIN);
        c.arg("up")
            .args(["--state-dir", state.to_str().unwrap(), "--virt-type", "qemu", "-f", file.to_str().unwrap()])
            .args(["--api-port", &ports[0].to_string(), "--mirror-port", &ports[1].to_string()])
            .args(["--dns-port", &ports[2].to_string(), "--interval", "1"])
            .args(extra);
        c
    };

    // At start: a pod workspace (refused by the checks), then an unreachable libvirt.
    std::fs::write(&file, good.replace("runtime: vm", "runtime: pod")).unwrap();
    let o = up(&["--once"]).output().unwrap();
    assert!(!o.status.success() && stderr(&o).contains("`pod` workspaces need Kubernetes"), "{}", stderr(&o));
    std::fs::write(&file, &good).unwrap();
    let bad_uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock";
    let o = up(&["--once", "--libvirt-uri", bad_uri]).output().unwrap();
    assert!(stderr(&o).contains("cannot connect to libvirt"), "{}", stderr(&o));
    let r = refused(&state);
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!((r[0].0.as_str(), r[0].1.as_str()), ("host.up", format!("workspace:{project}/w1").as_str()));
    assert!(r[0].2.contains("`pod` workspaces need Kubernetes"), "{r:?}");
    assert_eq!((r[1].0.as_str(), r[1].1.as_str()), ("host.up", format!("libvirt:{bad_uri}").as_str()));
    assert!(r[1].2.contains("cannot connect to libvirt"), "{r:?}");
    verify_audit(&state);

    // A later pass: `up` runs (nothing to make: no projects), then the file is edited badly.
    if unsafe { libc::geteuid() } != 0 {
        skip_or_fail("the later-pass part needs root (libvirt system daemon, nftables)");
        return;
    }
    for tool in ["libvirtd", "virtlogd", "virsh", "nft"] {
        if !have(tool) {
            skip_or_fail(&format!("{tool} is not installed (hack/install-deps.sh)"));
            return;
        }
    }
    daemons();
    std::fs::write(&file, "").unwrap();
    let log = std::fs::File::create(dir.path().join("up.log")).unwrap();
    let child = up(&["--libvirt-uri", URI]).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap();
    let running = Up { child };
    poll("up to write its pid file", Duration::from_secs(60), || state.join("up.pid").exists().then_some(()));
    // The API's keys are this instance's, in its state directory (not the API's defaults).
    poll("the API's seal key in the state directory", Duration::from_secs(60), || {
        state.join("airlock-seal.key").exists().then_some(())
    });
    std::fs::write(&file, good.replace(&ds.display().to_string(), "/nonexistent/ds.img")).unwrap();
    let want = format!("dataset:d{tag}");
    poll("the later pass's refusal in the audit log", Duration::from_secs(60), || {
        refused(&state).into_iter().find(|(a, o, _)| a == "host.reconcile" && *o == want)
    });
    // Passes every second find the same bad file (each logs it): recorded once, not per pass.
    let passes = || {
        std::fs::read_to_string(dir.path().join("up.log"))
            .unwrap_or_default()
            .matches("refused, nothing changed")
            .count()
    };
    let (entries, seen) = (refused(&state).len(), passes());
    poll("three more refusing passes", Duration::from_secs(60), || (passes() >= seen + 3).then_some(()));
    assert_eq!(refused(&state).len(), entries, "the same refusal was recorded again");
    // A file still being written (here: emptied, its time ahead of the clock so it never looks
    // settled) is not taken for the admin's intent: refused, nothing deleted.
    std::fs::write(&file, "").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(std::time::SystemTime::now() + Duration::from_secs(3600))
        .unwrap();
    let want = format!("manifest:{}", file.display());
    let (_, _, reason) = poll("the unsettled file's refusal in the audit log", Duration::from_secs(60), || {
        refused(&state).into_iter().find(|(a, o, _)| a == "host.reconcile" && *o == want)
    });
    assert!(reason.contains("still being written"), "{reason}");
    drop(running);
    verify_audit(&state);
}

/// How a TCP connect ended.
#[derive(Debug, PartialEq, Eq)]
enum Reach {
    Connected,
    /// Refused or reset: a packet came back.
    Refused,
    /// Nothing came back within the bound: dropped on the way.
    Dropped,
}

/// A TCP connect to `ip:port`, from network namespace `ns` or (None) from the host; silence
/// for 3 s counts as dropped.
fn tcp(ns: Option<&str>, ip: Ipv4Addr, port: u16) -> Reach {
    let probe = format!("timeout 3 bash -c 'exec 3<>/dev/tcp/{ip}/{port}'");
    let cmd = match ns {
        Some(ns) => format!("ip netns exec {ns} {probe}"),
        None => probe,
    };
    match sh(&cmd).status.code() {
        Some(0) => Reach::Connected,
        Some(124) => Reach::Dropped,
        _ => Reach::Refused,
    }
}

/// Whether a DNS query over UDP (`example.org A`) to `ip:port` is answered within 3 s, from
/// network namespace `ns` or (None) from the host.
fn udp_dns_answered(ns: Option<&str>, ip: Ipv4Addr, port: u16) -> bool {
    let query = "123401000001000000000000076578616d706c65036f72670000010001";
    let probe = format!(
        "python3 -c \"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); s.sendto(bytes.fromhex('{query}'), ('{ip}', {port})); s.recvfrom(512)\""
    );
    let cmd = match ns {
        Some(ns) => format!("ip netns exec {ns} {probe}"),
        None => probe,
    };
    sh(&cmd).status.success()
}

/// Removes a table by name whatever happened (the services table is named by the instance,
/// not the run's tag, so [`Cleanup`] does not see it).
struct DropTable(String);

impl Drop for DropTable {
    fn drop(&mut self) {
        let _ = sh(&format!("nft delete table inet {}", self.0));
    }
}

/// `up` closes the API, mirror and DNS ports to everything but loopback and the project
/// bridges (its services table), with no VM: a Project without workspaces. From an "outside"
/// network namespace behind a veth (another network the host is on), TCP to the API and the
/// mirror (and DNS, TCP and UDP) on the host's address there is dropped (and counted) while a port `up` does not
/// serve answers and loopback reaches both; `--api-allow <outside>/32` opens the API to it and
/// not the mirror; the table goes when `up` stops, and `down` removes it after an `up` that
/// was killed; each apply and removal is audited.
#[test]
fn up_closes_its_service_ports_to_other_networks() {
    if unsafe { libc::geteuid() } != 0 {
        skip_or_fail("needs root (libvirt system daemon, nftables, network namespaces)");
        return;
    }
    for tool in ["libvirtd", "virtlogd", "virsh", "nft", "ip", "bash", "timeout", "sqlite3", "python3"] {
        if !have(tool) {
            skip_or_fail(&format!("{tool} is not installed (hack/install-deps.sh)"));
            return;
        }
    }
    daemons();
    let tag = format!("{:06x}", rand_u32() & 0xff_ffff);
    let _cleanup = Cleanup(tag.clone());
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let ds = dir.path().join("ds.img");
    std::fs::write(&ds, "").unwrap();
    let project = format!("sw{tag}");
    let file = dir.path().join("m.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: noexit.io/v1alpha1\nkind: Project\nmetadata: {{name: {project}}}\nspec:\n  displayName: t\n  members: [{{user: r@x, roles: [researcher, admin]}}]\n  approval: {{reference: T-1, expires: \"2099-01-01\"}}\n  datasets: [d{tag}]\n---\napiVersion: noexit.io/v1alpha1\nkind: Dataset\nmetadata: {{name: d{tag}}}\nspec:\n  classification: Synthetic\n  source: {{hostPath: {{path: {}}}}}\n  size: 8Mi\n  grantedTo: [{project}]\n",
            ds.display()
        ),
    )
    .unwrap();
    let r = rand_u32();
    let subnet_base = Ipv4Addr::new(10, 100 + (r % 100) as u8, ((r >> 8) % 200) as u8, 0);
    let [api, mirror, dns] = [free_port(), free_port(), free_port()];
    let up = |extra: &[&str]| {
        let log = std::fs::File::options().create(true).append(true).open(dir.path().join("up.log")).unwrap();
        let child = Command::new(BIN)
            .arg("up")
            .args(["--state-dir", state.to_str().unwrap(), "--libvirt-uri", URI, "--virt-type", "qemu"])
            .args(["-f", file.to_str().unwrap(), "--subnet-base", &subnet_base.to_string(), "--interval", "1"])
            .args([
                "--api-port",
                &api.to_string(),
                "--mirror-port",
                &mirror.to_string(),
                "--dns-port",
                &dns.to_string(),
            ])
            .args(extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let up = Up { child };
        // The table is applied by the first pass, before anything listens.
        poll("the API on loopback", Duration::from_secs(60), || {
            (tcp(None, Ipv4Addr::LOCALHOST, api) == Reach::Connected).then_some(())
        });
        up
    };

    // The outside: a namespace on a /30 of its own (172.16.0.0/12, random), like a LAN.
    let o = 4 * (rand_u32() % (1 << 18));
    let net = u32::from(Ipv4Addr::new(172, 16, 0, 0)) + o;
    let (host_ip, out_ip) = (Ipv4Addr::from(net + 1), Ipv4Addr::from(net + 2));
    let outside = Netns::new(format!("nxsw{tag}"));
    let ns = outside.name();
    let (host_end, inside) = netns::veth(End::Host(&format!("nxsw{tag}")), End::In(&outside, "eth0"));
    host_end.addr(&format!("{host_ip}/30")).up();
    inside.addr(&format!("{out_ip}/30")).up();
    // A port `up` does not serve, open on every address: the outside reaches the host.
    let control = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let control_port = control.local_addr().unwrap().port();
    poll("the outside to reach the host", Duration::from_secs(20), || {
        (tcp(Some(ns), host_ip, control_port) == Reach::Connected).then_some(())
    });

    let running = up(&[]);
    let instance = ok(&format!("sqlite3 -readonly {} 'SELECT id FROM instance'", state.join("host.db").display()))
        .trim()
        .to_owned();
    let table = format!("noexit-services.{instance}");
    let _drop_table = DropTable(table.clone());
    let listed = ok(&format!("nft list table inet {table}"));
    eprintln!("{listed}");
    let bridge = String::from_utf8_lossy(
        &sh(&format!("virsh -c {URI} net-info noexit-{project} | awk '/Bridge/ {{print $2}}'")).stdout,
    )
    .trim()
    .to_owned();
    assert!(!bridge.is_empty() && listed.contains(&format!("\"{bridge}\"")), "the project's bridge: {listed}");
    let log = || std::fs::read_to_string(dir.path().join("up.log")).unwrap_or_default();
    assert!(
        log().contains(&format!("reached from loopback and the project bridges only (table inet {table})")),
        "{}",
        log()
    );

    let before = counter(&table, "blocked_services");
    for (what, port) in [("API", api), ("mirror", mirror), ("DNS (tcp)", dns)] {
        assert_eq!(tcp(Some(ns), host_ip, port), Reach::Dropped, "{what} from the outside");
        assert_eq!(tcp(None, Ipv4Addr::LOCALHOST, port), Reach::Connected, "{what} from loopback");
        // The host's own address on that network: local traffic, through loopback.
        assert_eq!(tcp(None, host_ip, port), Reach::Connected, "{what} from the host to {host_ip}");
    }
    assert!(!udp_dns_answered(Some(ns), host_ip, dns), "DNS (udp) answered the outside");
    assert!(udp_dns_answered(None, Ipv4Addr::LOCALHOST, dns), "DNS (udp) from loopback");
    assert_eq!(tcp(Some(ns), host_ip, control_port), Reach::Connected, "the outside lost the host");
    let dropped = counter(&table, "blocked_services") - before;
    assert!(dropped >= 4, "the table counted {dropped} dropped packets");
    eprintln!("dropped from the outside: {dropped} packets (SYNs and their retries)");
    let o = Command::new(BIN).args(["status", "--state-dir", state.to_str().unwrap()]).output().unwrap();
    let status = String::from_utf8_lossy(&o.stdout);
    assert!(status.contains(&format!("services: API tcp {api}, mirror tcp {mirror}")), "{status}");
    assert!(status.contains(&format!("(table inet {table})")), "{status}");
    // Stopping `up` stops the services, and their table goes with them.
    drop(running);
    assert!(!table_exists(&table), "the services table outlived `up`");

    // The API, and only the API, opened to the outside.
    let running = up(&["--api-allow", &format!("{out_ip}/32")]);
    let listed = ok(&format!("nft list table inet {table}"));
    assert!(listed.contains(&format!("ip saddr {out_ip} tcp dport {api} accept")), "{listed}");
    assert_eq!(tcp(Some(ns), host_ip, api), Reach::Connected, "API from an --api-allow network");
    assert_eq!(tcp(Some(ns), host_ip, mirror), Reach::Dropped, "mirror from an --api-allow network");
    drop(running);

    // `up` killed (no chance to clean up): the table stays, closing the ports, until `down`.
    let mut running = up(&[]);
    running.child.kill().unwrap();
    running.child.wait().unwrap();
    std::mem::forget(running);
    assert!(table_exists(&table), "the table went with a killed `up`");
    let o = Command::new(BIN)
        .args(["down", "--state-dir", state.to_str().unwrap(), "--libvirt-uri", URI])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains(&format!("delete table inet {table}")), "{said}");
    assert!(!table_exists(&table), "down left the services table");
    let o = Command::new(BIN).args(["status", "--state-dir", state.to_str().unwrap()]).output().unwrap();
    let status = String::from_utf8_lossy(&o.stdout);
    assert!(status.contains("services: off (`up` is not running"), "{status}");

    // Audited: each apply (the second with the allowance) and each removal (by `up` as it
    // stopped, then by `down`).
    let q = audit(&state, &["query", "--action", "host.services-table.*", "--json"]);
    assert!(q.status.success(), "{}", stderr(&q));
    let entries: Vec<serde_json::Value> =
        String::from_utf8_lossy(&q.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let seen: Vec<(&str, &str)> =
        entries.iter().map(|e| (e["action"].as_str().unwrap(), e["object"].as_str().unwrap())).collect();
    let object = format!("nft-table:inet {table}");
    assert_eq!(
        seen,
        [
            ("host.services-table.apply", object.as_str()),
            ("host.services-table.remove", object.as_str()),
            ("host.services-table.apply", object.as_str()),
            ("host.services-table.remove", object.as_str()),
            ("host.services-table.apply", object.as_str()),
            ("host.services-table.remove", object.as_str())
        ],
        "{entries:?}"
    );
    assert_eq!(entries[2]["detail"]["apiAllow"], serde_json::json!([format!("{out_ip}/32")]), "{entries:?}");
    assert_eq!(entries[0]["detail"]["bridges"], serde_json::json!([bridge]), "{entries:?}");
    // The whole log (the DNS server's entries for the loopback queries too), with the command
    // `up` printed.
    let command = log().lines().find_map(|l| l.strip_prefix("audit: noexit ").map(str::to_owned)).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_noexit")).args(command.split_whitespace()).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains("audit log intact"), "{out}{}", stderr(&o));
    drop(control);
}
