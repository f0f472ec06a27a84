//! The seed: the files the VM reads at boot from an ISO9660 CD-ROM labelled [`LABEL`]
//! (`agent.yaml`, `tls/ca.crt`, `tls/client.crt`, `tls/client.key`, and `network.env` for a
//! static address). The guest copies them to `/etc/noexit/` (the agent's config names those
//! paths).

use std::net::Ipv4Addr;

/// Volume label the guest looks for.
pub const LABEL: &str = "NOEXITSEED";
/// Where the guest puts the seed's files; the agent config's paths point here.
pub const GUEST_DIR: &str = "/etc/noexit";

/// One file of the seed: path inside the ISO and content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedFile {
    pub path: &'static str,
    pub content: String,
}

/// Static addressing for the guest (instead of DHCP): faster under TCG and the same address the
/// network's fixed lease gives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestNetwork {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    /// `/etc/hosts` names for the gateway address (`api.noexit`, `mirror.noexit`).
    pub host_names: Vec<String>,
}

/// `network.env`: shell-style assignments the guest's init reads.
pub fn network_env(n: &GuestNetwork) -> String {
    format!(
        "ADDRESS={}/{}\nGATEWAY={}\nDNS={}\nHOSTS=\"{} {}\"\n",
        n.address,
        n.prefix,
        n.gateway,
        n.gateway,
        n.gateway,
        n.host_names.join(" ")
    )
}

/// Every file of the seed, in a fixed order.
pub fn files(
    agent_yaml: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    net: Option<&GuestNetwork>,
) -> Vec<SeedFile> {
    let mut out = vec![
        SeedFile { path: "agent.yaml", content: agent_yaml.to_owned() },
        SeedFile { path: "tls/ca.crt", content: ca_pem.to_owned() },
        SeedFile { path: "tls/client.crt", content: cert_pem.to_owned() },
        SeedFile { path: "tls/client.key", content: key_pem.to_owned() },
    ];
    if let Some(n) = net {
        out.push(SeedFile { path: "network.env", content: network_env(n) });
    }
    out
}

/// Hash over the seed's files (paths and contents).
pub fn digest(files: &[SeedFile]) -> String {
    let mut all = String::new();
    for f in files {
        all.push_str(f.path);
        all.push('\0');
        all.push_str(&crate::model::digest(&f.content));
        all.push('\n');
    }
    crate::model::digest(&all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_env_is_the_boot_contract() {
        let n = GuestNetwork {
            address: Ipv4Addr::new(10, 213, 0, 10),
            prefix: 24,
            gateway: Ipv4Addr::new(10, 213, 0, 1),
            host_names: vec!["api.noexit".into(), "mirror.noexit".into()],
        };
        assert_eq!(
            network_env(&n),
            "ADDRESS=10.213.0.10/24\nGATEWAY=10.213.0.1\nDNS=10.213.0.1\nHOSTS=\"10.213.0.1 api.noexit mirror.noexit\"\n"
        );
        let f = files("a", "b", "c", "d", Some(&n));
        assert_eq!(
            f.iter().map(|f| f.path).collect::<Vec<_>>(),
            ["agent.yaml", "tls/ca.crt", "tls/client.crt", "tls/client.key", "network.env"]
        );
        let mut g = f.clone();
        g[3].content = "e".into();
        assert_ne!(digest(&f), digest(&g));
        assert_eq!(files("a", "b", "c", "d", None).len(), 4);
    }
}
