//! The host side of the single-host tests (`tests/host.rs`, `tests/host_gateway.rs`): shell
//! helpers, the libvirt daemons, the tiny image, and removal of everything a run named with its
//! tag.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use noexit_test_support::poll;

/// The libvirt connection the tests use (domain type `qemu`: TCG).
pub const URI: &str = "qemu:///system";

/// Fails under `NOEXIT_CI=1`; otherwise prints why the test skips and returns `false`.
pub fn skip_or_fail(msg: &str) -> bool {
    if std::env::var("NOEXIT_CI").as_deref() == Ok("1") {
        panic!("{msg} (NOEXIT_CI=1: not skipping)");
    }
    eprintln!("SKIP: {msg}");
    false
}

pub fn have(tool: &str) -> bool {
    noexit_test_support::deps::have(tool)
}

pub fn sh(cmd: &str) -> Output {
    Command::new("sh").args(["-c", cmd]).output().expect("sh")
}

/// Runs `cmd`, failing the test when it fails; its standard output.
pub fn ok(cmd: &str) -> String {
    let o = sh(cmd);
    assert!(o.status.success(), "`{cmd}` failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn pid_alive(pidfile: &str) -> bool {
    std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

/// libvirtd and virtlogd, started if not running (their pidfiles say); never stopped here.
/// libvirtd is started with /dev/kvm hidden (a private mount namespace): on hosts where KVM
/// hangs, its QEMU capability probe (`accel=kvm:tcg`) would hang every call; the tests run TCG.
pub fn daemons() {
    if !pid_alive("/run/virtlogd.pid") {
        ok("virtlogd -d");
    }
    if !pid_alive("/run/libvirtd.pid") {
        ok(
            "unshare -m --propagation private sh -c 'if [ -e /dev/kvm ]; then mount --bind /dev/null /dev/kvm; fi; exec libvirtd -d'",
        );
    }
    poll::blocking("libvirtd to answer", Duration::from_secs(30), || {
        sh(&format!("virsh -c {URI} version")).status.success().then_some(())
    });
}

/// The tiny test image's directory (`images/vm/build.sh tiny`, built if needed).
pub fn tiny_image() -> Option<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new(repo.join("images/vm/build.sh"))
        .arg("tiny")
        .current_dir(repo)
        .stderr(Stdio::inherit())
        .output()
        .ok()?;
    out.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// `<dir>/image`: the tiny image's kernel and initramfs, booted with `cmdline` (what a
/// Workspace's `spec.image` names in single-host mode).
pub fn image_dir(tiny: &Path, dir: &Path, cmdline: &str) -> PathBuf {
    let image = dir.join("image");
    std::fs::create_dir(&image).unwrap_or_else(|e| panic!("{}: {e}", image.display()));
    for file in ["vmlinuz", "initrd.img"] {
        std::fs::copy(tiny.join(file), image.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
    std::fs::write(image.join("cmdline"), format!("{cmdline}\n")).unwrap();
    image
}

pub fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut b).unwrap();
    u32::from_le_bytes(b)
}

/// Removes every libvirt domain and network and every nft table named with the tag, whatever
/// happened.
pub struct Cleanup(pub String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let tag = &self.0;
        let list = sh(&format!("virsh -c {URI} list --all --name; virsh -c {URI} net-list --all --name"));
        for name in String::from_utf8_lossy(&list.stdout).lines().filter(|n| n.contains(tag.as_str())) {
            let _ = sh(&format!("virsh -c {URI} destroy {name}; virsh -c {URI} undefine {name}"));
            let _ = sh(&format!("virsh -c {URI} net-destroy {name}; virsh -c {URI} net-undefine {name}"));
        }
        let tables = sh("nft list tables inet");
        for t in String::from_utf8_lossy(&tables.stdout).lines().filter_map(|l| l.strip_prefix("table inet ")) {
            if t.contains(tag.as_str()) {
                let _ = sh(&format!("nft delete table inet {t}"));
            }
        }
    }
}
