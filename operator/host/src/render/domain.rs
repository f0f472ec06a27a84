//! A workspace's libvirt domain XML.
//!
//! What is deliberately absent: a USB controller (`model='none'`), SPICE and its agent channel
//! (no shared clipboard), any `<filesystem>` share, a balloon. The VNC console listens on the
//! address only the gateway uses, with the workspace's own password.
//!
//! The console shows the guest's own display (the workspace image runs Xorg + Xfce there in
//! single-host mode): standard VGA, which the guest drives with the kernel's bochs DRM driver
//! and Xorg's modesetting; the pointer is a virtio tablet (absolute, so the gateway's pointer
//! and the guest's agree) because a USB tablet would need the USB controller left out above;
//! the keyboard is the machine's built-in PS/2 one.

use std::fmt::Write;

use super::{metadata, xml_escape};
use crate::model::{Boot, DomainSpec};

/// The domain XML for `spec`, with the change hash in its metadata.
pub fn render(spec: &DomainSpec) -> String {
    let body = body(spec);
    let hash = crate::model::digest(&body);
    assemble(spec, &body, &hash)
}

/// The hash [`render`] puts in the metadata.
pub fn hash(spec: &DomainSpec) -> String {
    crate::model::digest(&body(spec))
}

fn assemble(spec: &DomainSpec, body: &str, hash: &str) -> String {
    format!(
        "<domain type=\"{}\">\n  <name>{}</name>\n{}{}</domain>\n",
        spec.virt_type.as_str(),
        xml_escape(&spec.name()),
        metadata(&[("instance", &spec.instance), ("project", &spec.project), ("workspace", &spec.workspace)], hash),
        body
    )
}

fn path(p: &std::path::Path) -> String {
    xml_escape(&p.display().to_string())
}

fn body(spec: &DomainSpec) -> String {
    let mut x = String::new();
    let _ = writeln!(x, "  <memory unit=\"MiB\">{}</memory>", spec.memory_mib);
    let _ = writeln!(x, "  <vcpu>{}</vcpu>", spec.vcpus.max(1));
    x.push_str("  <os>\n    <type arch=\"x86_64\" machine=\"pc\">hvm</type>\n");
    match &spec.boot {
        Boot::Kernel { kernel, initrd, cmdline, .. } => {
            let _ = writeln!(x, "    <kernel>{}</kernel>", path(kernel));
            let _ = writeln!(x, "    <initrd>{}</initrd>", path(initrd));
            let _ = writeln!(x, "    <cmdline>{}</cmdline>", xml_escape(cmdline));
        }
        Boot::Disk { .. } => x.push_str("    <boot dev=\"hd\"/>\n"),
    }
    x.push_str("  </os>\n  <features>\n    <acpi/>\n  </features>\n");
    if spec.virt_type == crate::model::VirtType::Kvm {
        x.push_str("  <cpu mode=\"host-passthrough\"/>\n");
    }
    x.push_str(
        "  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>\n",
    );
    x.push_str("  <devices>\n");
    let mut letters = b'a'..=b'z';
    let mut next = || format!("vd{}", letters.next().map(char::from).unwrap_or('z'));
    // The root disk first (vda): the guest finds it by label, but its boot loader (if any)
    // and anyone reading `lsblk` expect it there.
    if let Some(overlay) = spec.boot.root_disk() {
        disk(&mut x, overlay, "qcow2", &next(), "root", false);
    }
    disk(&mut x, &spec.home, "qcow2", &next(), "home", false);
    for d in &spec.datasets {
        disk(&mut x, &d.path, &d.format, &next(), &format!("ds-{}", d.name), true);
    }
    let _ = write!(
        x,
        "    <disk type=\"file\" device=\"cdrom\">\n      <driver name=\"qemu\" type=\"raw\"/>\n      <source file=\"{}\"/>\n      <target dev=\"hdc\" bus=\"ide\"/>\n      <readonly/>\n    </disk>\n",
        path(&spec.seed)
    );
    let _ = write!(
        x,
        "    <interface type=\"network\">\n      <source network=\"{}\"/>\n      <mac address=\"{}\"/>\n      <model type=\"virtio\"/>\n    </interface>\n",
        xml_escape(&spec.network),
        xml_escape(&spec.mac)
    );
    let _ = write!(
        x,
        "    <serial type=\"file\">\n      <source path=\"{}\"/>\n      <target port=\"0\"/>\n    </serial>\n",
        path(&spec.console_log)
    );
    if let Some(sock) = &spec.test_console {
        let _ = write!(
            x,
            "    <serial type=\"unix\">\n      <source mode=\"bind\" path=\"{}\"/>\n      <target port=\"1\"/>\n    </serial>\n",
            path(sock)
        );
    }
    x.push_str("    <input type=\"tablet\" bus=\"virtio\"/>\n");
    let pw = xml_escape(&spec.vnc_password);
    let _ = match spec.vnc_listen {
        Some(ip) => write!(
            x,
            "    <graphics type=\"vnc\" autoport=\"yes\" passwd=\"{pw}\">\n      <listen type=\"address\" address=\"{ip}\"/>\n    </graphics>\n"
        ),
        // libvirt makes the socket in the domain's private directory (root and QEMU only).
        None => {
            write!(x, "    <graphics type=\"vnc\" passwd=\"{pw}\">\n      <listen type=\"socket\"/>\n    </graphics>\n")
        }
    };
    x.push_str("    <video>\n      <model type=\"vga\"/>\n    </video>\n");
    x.push_str("    <controller type=\"usb\" model=\"none\"/>\n");
    x.push_str("    <memballoon model=\"none\"/>\n");
    x.push_str("  </devices>\n");
    let _ = writeln!(x, "  <!-- seed {} -->", spec.seed_digest);
    if let Some(base) = &spec.root_base {
        // `--` may not appear in an XML comment; a path with it still changes the hash.
        let _ = writeln!(x, "  <!-- root on {} -->", path(base).replace("--", "-\u{2010}"));
    }
    x
}

fn disk(x: &mut String, file: &std::path::Path, format: &str, dev: &str, serial: &str, readonly: bool) {
    let _ = write!(
        x,
        "    <disk type=\"file\" device=\"disk\">\n      <driver name=\"qemu\" type=\"{}\"/>\n      <source file=\"{}\"/>\n      <target dev=\"{dev}\" bus=\"virtio\"/>\n      <serial>{}</serial>\n{}    </disk>\n",
        xml_escape(format),
        path(file),
        xml_escape(serial),
        if readonly { "      <readonly/>\n" } else { "" }
    );
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::{DatasetDisk, VirtType};

    pub(crate) fn spec() -> DomainSpec {
        DomainSpec {
            instance: "i1".into(),
            project: "ward-7".into(),
            workspace: "alice-vm".into(),
            virt_type: VirtType::Qemu,
            memory_mib: 512,
            vcpus: 1,
            boot: Boot::Kernel {
                kernel: "/var/cache/noexit/tiny/vmlinuz".into(),
                initrd: "/var/cache/noexit/tiny/initrd.img".into(),
                cmdline: "console=ttyS0 noexit.test=1".into(),
                root: None,
            },
            home: "/var/lib/noexit/host/ward-7/alice-vm/home.qcow2".into(),
            datasets: vec![DatasetDisk {
                name: "icu-2019".into(),
                path: "/srv/data/icu-2019.img".into(),
                format: "raw".into(),
            }],
            seed: "/var/lib/noexit/host/ward-7/alice-vm/seed.iso".into(),
            network: "noexit-ward-7".into(),
            mac: "52:54:00:d5:00:0a".into(),
            vnc_listen: None,
            vnc_password: "s3cr&t".into(),
            console_log: "/var/lib/noexit/host/ward-7/alice-vm/console.log".into(),
            test_console: Some("/var/lib/noexit/host/ward-7/alice-vm/ttyS1.sock".into()),
            seed_digest: "0".repeat(64),
            root_base: None,
        }
    }

    #[test]
    fn domain_xml() {
        insta::assert_snapshot!(render(&spec()));
    }

    /// The workspace image: direct kernel boot of a root disk that has no boot loader.
    #[test]
    fn domain_xml_kernel_and_root_disk() {
        let mut s = spec();
        s.boot = Boot::Kernel {
            kernel: "/var/lib/noexit/images/workspace/vmlinuz".into(),
            initrd: "/var/lib/noexit/images/workspace/initrd.img".into(),
            cmdline: "console=ttyS0 root=LABEL=noexit-root ro".into(),
            root: Some("/var/lib/noexit/host/ward-7/alice-vm/root.qcow2".into()),
        };
        s.test_console = None;
        s.root_base = Some("/var/lib/noexit/images/workspace-a84704d78d5d410f/workspace.qcow2".into());
        let xml = render(&s);
        insta::assert_snapshot!(xml);
        assert!(!xml.contains("<boot dev="), "a kernel boot needs no boot device:\n{xml}");
        let root = xml.split("<disk").find(|d| d.contains("<serial>root")).unwrap();
        assert!(root.contains("root.qcow2") && root.contains("dev=\"vda\"") && !root.contains("<readonly/>"));
        assert!(xml.contains("<serial>home</serial>") && xml.contains("dev=\"vdb\""));
        // The root disk changes the domain.
        let mut without = s.clone();
        if let Boot::Kernel { root, .. } = &mut without.boot {
            *root = None;
        }
        assert_ne!(hash(&s), hash(&without));
        // So does a new base under it (the overlay is made again on it).
        let mut rebased = s.clone();
        rebased.root_base = Some("/var/lib/noexit/images/workspace-0000000000000000/workspace.qcow2".into());
        assert_ne!(hash(&s), hash(&rebased));
    }

    #[test]
    fn what_is_absent_and_what_is_read_only() {
        let xml = render(&spec());
        assert!(xml.contains("<controller type=\"usb\" model=\"none\"/>"));
        for absent in ["spice", "<channel", "<filesystem", "<redirdev", "<hostdev"] {
            assert!(!xml.contains(absent), "{absent} in\n{xml}");
        }
        // The dataset disk is read-only, the home disk is not.
        let ds = xml.split("<disk").find(|d| d.contains("ds-icu-2019")).unwrap();
        assert!(ds.contains("<readonly/>"));
        let home = xml.split("<disk").find(|d| d.contains("<serial>home")).unwrap();
        assert!(!home.contains("<readonly/>"));
        assert!(xml.contains("passwd=\"s3cr&amp;t\""));
        // The console is a unix socket (no TCP port) unless an address is asked for.
        assert!(xml.contains("<listen type=\"socket\"/>") && !xml.contains("autoport"), "{xml}");
        let mut tcp = spec();
        tcp.vnc_listen = Some(Ipv4Addr::LOCALHOST);
        let tcp = render(&tcp);
        assert!(tcp.contains("autoport=\"yes\"") && tcp.contains("address=\"127.0.0.1\""), "{tcp}");
        // The pointer needs no USB: an absolute virtio tablet.
        assert!(xml.contains("<input type=\"tablet\" bus=\"virtio\"/>"));
        assert!(!xml.contains("bus=\"usb\""));
    }

    #[test]
    fn any_change_changes_the_hash() {
        let a = spec();
        let mut b = spec();
        b.datasets.clear();
        assert_ne!(hash(&a), hash(&b));
        let mut c = spec();
        c.seed_digest = "1".repeat(64);
        assert_ne!(hash(&a), hash(&c));
        assert_eq!(hash(&a), hash(&spec()));
    }
}
