//! The tiny VM test image (images/vm/build.sh tiny) keeps the boot contract (images/README.md)
//! when booted by plain QEMU under TCG, with no network beyond a restricted user-mode NIC:
//! the seed ISO (NOEXITSEED) is found and its TLS copied, network.env applied, the agent started
//! (it cannot reach an API: fine) and its egress table applied with the guest's `nft`, the blank
//! home disk formatted and mounted read-write, surviving a reboot, and the dataset disk mounted
//! read-only, refusing writes both through the file system and to the device.
//!
//! The guest is driven through its test shell on ttyS1 (support::guest_console). The image is
//! built by the script (cached under ~/.cache/noexit/vm). Missing tools skip with a message,
//! unless `NOEXIT_CI=1`, where they fail.
//!   cargo build -p noexit-agent && cargo test -p noexit-operator --test vm_image -- --nocapture

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use noexit_crds::agent::WorkspaceIdentity;
use noexit_operator::pki::Ca;
use support::guest_console::GuestConsole;

/// Bounds. TCG is slow and these machines are shared; the debug agent compiles its DLP patterns
/// at start, which takes tens of seconds under TCG.
const BOOT: Duration = Duration::from_secs(180);
const AGENT: Duration = Duration::from_secs(240);
const CMD: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

/// `true` if the test may run; prints why not, or panics under `NOEXIT_CI=1`.
fn ready() -> bool {
    let missing: Vec<&str> =
        ["qemu-system-x86_64", "qemu-img", "xorriso", "mkfs.ext4", "mmdebstrap", "modprobe", "depmod", "cpio", "zstd"]
            .into_iter()
            .filter(|t| !have(t))
            .collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!("vm_image needs {}: run sudo hack/install-deps.sh", missing.join(", "));
    if std::env::var("NOEXIT_CI").as_deref() == Ok("1") {
        panic!("{msg} (NOEXIT_CI=1: not skipping)");
    }
    eprintln!("SKIPPED: {msg}");
    false
}

/// The agent binary of this build (the same profile directory as this package's binaries).
fn agent_binary() -> PathBuf {
    if let Ok(p) = std::env::var("AGENT") {
        return p.into();
    }
    let bin = Path::new(env!("CARGO_BIN_EXE_noexit-operator")).parent().unwrap().join("noexit-agent");
    assert!(bin.exists(), "{} is missing: cargo build -p noexit-agent first (or set AGENT)", bin.display());
    bin
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The image directory, built (or found in the cache) by the script.
fn build_tiny() -> PathBuf {
    let start = Instant::now();
    let out = sh(Command::new(repo().join("images/vm/build.sh")).arg("tiny").env("AGENT", agent_binary()));
    let dir = PathBuf::from(out.trim());
    eprintln!("vm_image: tiny image {} ({:?})", dir.display(), start.elapsed());
    dir
}

/// The seed the host would make: agent.yaml, a client certificate from the operator's CA code,
/// network.env for the restricted user-mode network (10.0.2.0/24).
fn make_seed(dir: &Path) -> PathBuf {
    let seed = dir.join("seed");
    std::fs::create_dir_all(seed.join("tls")).unwrap();
    let ca = Ca::generate("vm-image-test").unwrap();
    let id = WorkspaceIdentity { project: "ward-7".into(), name: "alice-r".into() };
    let client = ca.issue_workspace_client(&id, chrono::Duration::days(1)).unwrap();
    std::fs::write(seed.join("tls/ca.crt"), ca.cert_pem()).unwrap();
    std::fs::write(seed.join("tls/client.crt"), &client.cert_pem).unwrap();
    std::fs::write(seed.join("tls/client.key"), &client.key_pem).unwrap();
    std::fs::write(
        seed.join("agent.yaml"),
        r#"workspace: { project: ward-7, name: alice-r }
controlPlane:
  url: https://api.noexit:8443
  caFile: /etc/noexit/tls/ca.crt
  certFile: /etc/noexit/tls/client.crt
  keyFile: /etc/noexit/tls/client.key
egress:
  resolvers: [10.0.2.3]
  endpoints: [{ name: controlPlane, address: 10.0.2.2, port: 8443 }, { name: mirror, address: 10.0.2.2, port: 443 }]
  desktopPort: 5901
mode: vm
desktop: none
outbox: /home/researcher/outbox
"#,
    )
    .unwrap();
    std::fs::write(
        seed.join("network.env"),
        "ADDRESS=10.0.2.15/24\nGATEWAY=10.0.2.2\nDNS=10.0.2.3\nHOSTS=\"10.0.2.2 api.noexit mirror.noexit\"\n",
    )
    .unwrap();
    let iso = dir.join("seed.iso");
    sh(Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet", "-V", "NOEXITSEED", "-J", "-R", "-o"])
        .arg(&iso)
        .arg(&seed)
        .stderr(Stdio::null()));
    iso
}

/// A QEMU process, killed when dropped.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn boot(img: &Path, dir: &Path, iso: &Path, home: &Path, ds: &Path) -> Vm {
    let child = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35,accel=tcg", "-m", "256", "-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-kernel")
        .arg(img.join("vmlinuz"))
        .arg("-initrd")
        .arg(img.join("initrd.img"))
        .args(["-append", "console=ttyS0 quiet noexit.test=1"])
        .arg("-serial")
        .arg(format!("file:{}", dir.join("console.log").display()))
        .arg("-chardev")
        .arg(format!("socket,id=sh,path={},server=on,wait=off", dir.join("sh.sock").display()))
        .args(["-serial", "chardev:sh"])
        .arg("-drive")
        .arg(format!("file={},media=cdrom,if=none,id=seed,readonly=on", iso.display()))
        .args(["-device", "ide-cd,drive=seed"])
        .arg("-drive")
        .arg(format!("file={},if=none,id=home,format=qcow2", home.display()))
        .args(["-device", "virtio-blk-pci,drive=home,serial=home"])
        .arg("-drive")
        .arg(format!("file={},if=none,id=ds,format=raw,readonly=on", ds.display()))
        .args(["-device", "virtio-blk-pci,drive=ds,serial=ds-cohort"])
        // A NIC for network.env to configure, reaching nothing: restrict=on cuts the guest off
        // from the host and the outside.
        .args(["-nic", "user,model=virtio-net-pci,restrict=on"])
        .stdin(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64");
    Vm(child)
}

/// Poll the console log (ttyS0) until it has `count` lines containing `needle`.
fn wait_console(dir: &Path, needle: &str, count: usize, bound: Duration) -> String {
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
        if log.lines().filter(|l| l.contains(needle)).count() >= count {
            return log;
        }
        assert!(start.elapsed() < bound, "no {needle:?} (x{count}) on the console after {bound:?}:\n{log}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn tiny_image_keeps_the_boot_contract_under_tcg() {
    if !ready() {
        return;
    }
    let img = build_tiny();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let iso = make_seed(dir);
    let home = dir.join("home.qcow2");
    sh(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&home).arg("256M"));
    let ds_tree = dir.join("ds");
    std::fs::create_dir_all(&ds_tree).unwrap();
    std::fs::write(ds_tree.join("cohort.csv"), "id,age\n1,42\n").unwrap();
    let ds = dir.join("ds.img");
    sh(Command::new("mkfs.ext4").args(["-q", "-d"]).arg(&ds_tree).arg(&ds).arg("8M"));

    let started = Instant::now();
    let _vm = boot(&img, dir, &iso, &home, &ds);
    let mut c = GuestConsole::connect(&dir.join("sh.sock"), Duration::from_secs(30)).unwrap();
    c.wait_ready(BOOT).unwrap();
    eprintln!("vm_image: test shell up after {:?}", started.elapsed());

    // The seed: mounted read-only, TLS copied with a private key.
    let mounts = c.run_ok("cat /proc/mounts", CMD);
    assert!(mounts.contains("/dev/sr0 /run/noexit/seed iso9660 ro,"), "{mounts}");
    assert_eq!(c.run_ok("stat -c %a /etc/noexit/tls/client.key", CMD).trim(), "600");
    // network.env applied: the address, and the HOSTS line.
    assert!(c.run_ok("ip -4 addr show eth0", CMD).contains("inet 10.0.2.15/24"));
    assert!(c.run_ok("cat /etc/hosts", CMD).contains("10.0.2.2 api.noexit mirror.noexit"));

    // Home: blank, so formatted, mounted read-write, owned by the researcher.
    let home_mount = mounts.lines().find(|l| l.contains(" /home/researcher ")).expect("home mounted");
    assert!(home_mount.contains(" ext4 rw,"), "{home_mount}");
    assert_eq!(c.run_ok("stat -c %u:%g /home/researcher", CMD).trim(), "1000:1000");
    c.run_ok("echo kept-across-reboots > /home/researcher/probe.txt && sync", CMD);

    // The dataset: read-only mount, read-only device; reads work, writes are refused.
    let ds_mount = mounts.lines().find(|l| l.contains(" /data/cohort ")).expect("dataset mounted");
    assert!(ds_mount.contains(" ext4 ro,"), "{ds_mount}");
    assert_eq!(c.run_ok("cat /data/cohort/cohort.csv", CMD), "id,age\n1,42\n");
    let (code, out) = c.run("echo x > /data/cohort/new.txt", CMD).unwrap();
    assert_ne!(code, 0, "a write to the dataset succeeded: {out}");
    assert!(out.contains("Read-only file system"), "{out}");
    let dev = ds_mount.split_whitespace().next().unwrap().to_owned();
    assert_eq!(c.run_ok(&format!("blockdev --getro {dev}"), CMD).trim(), "1");
    let (code, out) = c.run(&format!("echo x | dd of={dev} conv=notrunc"), CMD).unwrap();
    assert_ne!(code, 0, "a write to the dataset device {dev} succeeded: {out}");

    // nft works in the guest.
    c.run_ok("nft add table inet vm_image_test && nft list tables | grep -q vm_image_test", CMD);

    // The agent: started (its log line on ttyS0), running, and its egress table applied.
    wait_console(dir, "noexit-agent: ", 1, AGENT);
    let log = wait_console(dir, "agent started", 1, AGENT);
    assert!(log.contains("workspace=noexit://workspace/ward-7/alice-r"), "{log}");
    eprintln!("vm_image: agent started after {:?}", started.elapsed());
    c.run_ok("pidof noexit-agent", CMD);
    let lock_start = Instant::now();
    loop {
        let (code, out) = c.run("nft list table inet noexit", CMD).unwrap();
        if code == 0 {
            assert!(out.contains("policy drop"), "{out}");
            break;
        }
        if lock_start.elapsed() > AGENT {
            let log = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
            panic!("the agent did not apply its egress table:\n{out}\nconsole:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }

    // Reboot: home keeps its data and is not formatted again.
    let boot_id = c.run_ok("cat /proc/sys/kernel/random/boot_id", CMD);
    c.send("sync; reboot -f").unwrap();
    let again = Instant::now();
    loop {
        c.wait_ready(BOOT).unwrap();
        match c.run("cat /proc/sys/kernel/random/boot_id", CMD) {
            Ok((0, id)) if id != boot_id => break,
            // The old shell answered before the reboot, or the new one is still starting.
            Ok(_) | Err(_) => {}
        }
        assert!(again.elapsed() < BOOT, "the guest did not come back after reboot");
    }
    eprintln!("vm_image: rebooted in {:?}", again.elapsed());
    assert_eq!(c.run_ok("cat /home/researcher/probe.txt", CMD), "kept-across-reboots\n");
    let log = wait_console(dir, "mounted read-write at /home/researcher", 2, CMD);
    assert_eq!(log.matches("is blank: formatting ext4").count(), 1, "home formatted twice:\n{log}");
    assert!(c.run_ok("cat /proc/mounts", CMD).contains(" /data/cohort ext4 ro,"));
}
