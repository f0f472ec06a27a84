//! Names and addresses: what a project's network and a workspace's VM are called and where
//! they live. Deterministic from the allocation indices kept in [`crate::state`].

use std::net::Ipv4Addr;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

/// First address of the range project subnets are cut from (a /24 each). Never the host's
/// routed networks: the default is 10.213.0.0/16.
pub const DEFAULT_SUBNET_BASE: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 0);
/// Host part of the first workspace address in a project subnet (.1 is the host).
pub const FIRST_HOST: u8 = 10;
/// Most workspaces per project subnet.
pub const MAX_HOSTS: u16 = 240;

/// libvirt's virtualisation type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtType {
    /// Hardware virtualisation (`/dev/kvm`).
    Kvm,
    /// Emulation (TCG), slow but works anywhere.
    Qemu,
}

impl VirtType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Qemu => "qemu",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "kvm" => Some(Self::Kvm),
            "qemu" | "tcg" => Some(Self::Qemu),
            _ => None,
        }
    }
}

/// One project's isolated network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProjectNet {
    pub project: String,
    /// Which /24 of the range (third octet offset).
    pub index: u8,
    pub base: Ipv4Addr,
}

impl ProjectNet {
    /// libvirt network name, also the host nftables table name.
    pub fn network_name(&self) -> String {
        format!("noexit-{}", self.project)
    }

    pub fn table_name(&self) -> String {
        self.network_name()
    }

    /// Linux bridge name (at most 15 bytes): `nx` and a short tag of the project name.
    pub fn bridge(&self) -> String {
        format!("nx{}", &short_tag(&self.project)[..10])
    }

    pub fn subnet(&self) -> Ipv4Addr {
        let [a, b, c, _] = self.base.octets();
        Ipv4Addr::new(a, b, c.wrapping_add(self.index), 0)
    }

    /// The host's address on the network (API, mirror and DNS answer here).
    pub fn gateway(&self) -> Ipv4Addr {
        let [a, b, c, _] = self.subnet().octets();
        Ipv4Addr::new(a, b, c, 1)
    }

    pub fn prefix(&self) -> u8 {
        24
    }

    /// Address of the workspace with host index `host` (0-based).
    pub fn address(&self, host: u8) -> Ipv4Addr {
        let [a, b, c, _] = self.subnet().octets();
        Ipv4Addr::new(a, b, c, FIRST_HOST + host)
    }

    /// Fixed MAC of the workspace with host index `host` (locally administered, QEMU's OUI).
    pub fn mac(&self, host: u8) -> String {
        let [_, b, c, _] = self.subnet().octets();
        format!("52:54:00:{b:02x}:{c:02x}:{:02x}", FIRST_HOST + host)
    }
}

/// First 16 hex digits of the SHA-256 of `s`.
pub fn short_tag(s: &str) -> String {
    hex::encode(&Sha256::digest(s.as_bytes())[..8])
}

/// SHA-256 hex of `s` (the change detector carried in metadata).
pub fn digest(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// The libvirt domain name of a workspace.
pub fn domain_name(project: &str, workspace: &str) -> String {
    format!("noexit-{project}-{workspace}")
}

/// How the VM boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Boot {
    /// Direct kernel boot: `vmlinuz` + `initrd.img`, and for an image whose root file system is
    /// on a disk (the workspace image, which has no boot loader) a qcow2 overlay (per workspace)
    /// of that disk, attached as the first virtio disk with serial `root`. Without one the root
    /// is the initramfs (the tiny test image).
    Kernel { kernel: PathBuf, initrd: PathBuf, cmdline: String, root: Option<PathBuf> },
    /// A root disk booted by its own boot loader: a qcow2 overlay (per workspace) on the image.
    Disk { overlay: PathBuf },
}

/// A dataset attached read-only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetDisk {
    pub name: String,
    pub path: PathBuf,
    /// `raw` or `qcow2`.
    pub format: String,
}

/// Everything a workspace's domain XML is made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainSpec {
    /// Id of the noexit instance (state directory) that owns the domain.
    pub instance: String,
    pub project: String,
    pub workspace: String,
    pub virt_type: VirtType,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub boot: Boot,
    pub home: PathBuf,
    pub datasets: Vec<DatasetDisk>,
    pub seed: PathBuf,
    pub network: String,
    pub mac: String,
    /// TCP address of the VNC console; `None`: a unix socket in libvirt's private directory for
    /// the domain, which only root (the gateway in `up`) can open.
    pub vnc_listen: Option<Ipv4Addr>,
    pub vnc_password: String,
    /// The first serial port (kernel console) goes to this file.
    pub console_log: PathBuf,
    /// Test images only: a second serial port (the guest's test shell) on this unix socket.
    pub test_console: Option<PathBuf>,
    /// Hash of the seed's files, so a changed seed redefines the domain.
    pub seed_digest: String,
    /// The image disk the root overlay is made on, so a new base redefines the domain (and the
    /// overlay is made again on it: `files::ensure_overlay`).
    pub root_base: Option<PathBuf>,
}

impl Boot {
    /// The workspace's root disk (an overlay), if it has one.
    pub fn root_disk(&self) -> Option<&PathBuf> {
        match self {
            Self::Kernel { root, .. } => root.as_ref(),
            Self::Disk { overlay } => Some(overlay),
        }
    }
}

impl DomainSpec {
    pub fn name(&self) -> String {
        domain_name(&self.project, &self.workspace)
    }
}

/// A fixed MAC→address DHCP entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lease {
    pub mac: String,
    pub ip: Ipv4Addr,
    pub name: String,
}

/// Where the host's services listen for the VMs (on every project gateway address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostPorts {
    pub api: u16,
    pub mirror: u16,
    /// Where the DNS server really listens; guests ask port 53, the host table redirects.
    pub dns: u16,
}

/// An IPv4 network in CIDR form (`192.0.2.0/24`; a bare address is a `/32`), as an admin gives
/// it on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not an IPv4 address or network (like 192.0.2.7 or 192.0.2.0/24)")]
    Syntax(String),
    #[error("{0:?}: the prefix length must be 0 to 32")]
    Prefix(String),
    /// Refused rather than masked: `10.1.2.3/24` may be a typo for `10.1.2.3/32`, and guessing
    /// wrong would open the port to a whole network.
    #[error("{given:?} has bits set past the prefix: write {network} (the whole network) or {address}/32 (one host)")]
    HostBits { given: String, network: String, address: Ipv4Addr },
}

impl std::str::FromStr for Ipv4Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = addr.parse().map_err(|_| CidrError::Syntax(s.to_owned()))?;
        let prefix: u8 = prefix.parse().map_err(|_| CidrError::Syntax(s.to_owned()))?;
        if prefix > 32 {
            return Err(CidrError::Prefix(s.to_owned()));
        }
        let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
        let network = Ipv4Addr::from(u32::from(addr) & mask);
        if network != addr {
            return Err(CidrError::HostBits {
                given: s.to_owned(),
                network: Self { network, prefix }.to_string(),
                address: addr,
            });
        }
        Ok(Self { network, prefix })
    }
}

impl std::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_names() {
        let n = ProjectNet { project: "ward-7".into(), index: 3, base: DEFAULT_SUBNET_BASE };
        assert_eq!(n.subnet(), Ipv4Addr::new(10, 213, 3, 0));
        assert_eq!(n.gateway(), Ipv4Addr::new(10, 213, 3, 1));
        assert_eq!(n.address(0), Ipv4Addr::new(10, 213, 3, 10));
        assert_eq!(n.address(2), Ipv4Addr::new(10, 213, 3, 12));
        assert_eq!(n.mac(2), "52:54:00:d5:03:0c");
        assert_eq!(n.network_name(), "noexit-ward-7");
        assert!(n.bridge().len() <= 15, "{}", n.bridge());
        assert_ne!(n.bridge(), ProjectNet { project: "ward-9".into(), ..n.clone() }.bridge());
        assert_eq!(domain_name("ward-7", "alice-vm"), "noexit-ward-7-alice-vm");
    }

    #[test]
    fn virt_types() {
        for v in [VirtType::Kvm, VirtType::Qemu] {
            assert_eq!(VirtType::parse(v.as_str()), Some(v));
        }
        assert_eq!(VirtType::parse("tcg"), Some(VirtType::Qemu));
        assert_eq!(VirtType::parse("xen"), None);
    }

    #[test]
    fn cidrs() {
        let c: Ipv4Cidr = "192.0.2.0/24".parse().unwrap();
        assert_eq!(c.to_string(), "192.0.2.0/24");
        assert_eq!("192.0.2.7".parse::<Ipv4Cidr>().unwrap().to_string(), "192.0.2.7/32");
        assert_eq!("0.0.0.0/0".parse::<Ipv4Cidr>().unwrap().prefix, 0);
        let e = "10.1.2.3/24".parse::<Ipv4Cidr>().unwrap_err().to_string();
        assert_eq!(
            e,
            "\"10.1.2.3/24\" has bits set past the prefix: write 10.1.2.0/24 (the whole network) or 10.1.2.3/32 (one host)"
        );
        assert!(matches!("10.0.0.0/33".parse::<Ipv4Cidr>(), Err(CidrError::Prefix(_))));
        assert!(matches!("ward-7".parse::<Ipv4Cidr>(), Err(CidrError::Syntax(_))));
        assert!(matches!("::1/128".parse::<Ipv4Cidr>(), Err(CidrError::Syntax(_))));
    }
}
