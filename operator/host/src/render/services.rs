//! The host's nftables table around its own services: the API, the mirror and the DNS server
//! listen on every address (`--listen-address 0.0.0.0`) because each project's VMs reach them
//! on that project's bridge address, and bridges come and go. This table closes those ports to
//! everything but loopback and the project bridges (each project's own table, [`super::nft`],
//! keeps its VMs to its gateway address), so a host on another network (a hospital LAN) does
//! not offer them there. An admin may open the API, and only the API, to named networks.
//!
//! One table per noexit instance (state directory): its name carries the instance id, so two
//! instances on one host (each with its own ports) never fight over it, and it holds a `.`,
//! which no project name can, so it never meets a project's table. Applied like the project
//! tables: one transaction replacing the table, the hash recorded.

use std::collections::BTreeSet;
use std::fmt::Write;

use super::nft::FAMILY;
use crate::model::{HostPorts, Ipv4Cidr};

/// Start of every services table's name.
pub const TABLE_PREFIX: &str = "noexit-services.";
/// Named counter of packets to the service ports that the table dropped.
pub const BLOCKED: &str = "blocked_services";
/// Priority of the input chain: that of the project tables. A drop in any base chain is final,
/// whatever other tables (or the host's own firewall) accept, so running first is not needed
/// for the drop to hold; it only makes the counter see every packet.
const FILTER_PRIORITY: &str = "filter - 10";

/// What the table is made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicesWall {
    /// Id of the noexit instance (state directory) the table belongs to.
    pub instance: String,
    pub ports: HostPorts,
    /// The project bridges (Linux interface names), in any order.
    pub bridges: Vec<String>,
    /// Networks besides loopback and the bridges that may reach the API (`--api-allow`).
    pub api_allow: Vec<Ipv4Cidr>,
}

/// The table's name for an instance.
pub fn table_name(instance: &str) -> String {
    format!("{TABLE_PREFIX}{instance}")
}

impl ServicesWall {
    pub fn table_name(&self) -> String {
        table_name(&self.instance)
    }

    /// The table's definition (what `nft list table` would show, in our order).
    pub fn table(&self) -> String {
        let p = &self.ports;
        let bridges: BTreeSet<&str> = self.bridges.iter().map(String::as_str).collect();
        let allow: BTreeSet<Ipv4Cidr> = self.api_allow.iter().copied().collect();
        let tcp: BTreeSet<u16> = [p.api, p.mirror, p.dns].into();
        let mut t = String::new();
        let _ = writeln!(t, "table {FAMILY} {} {{", self.table_name());
        let _ = writeln!(
            t,
            "\tcomment \"noexit: the API, mirror and DNS ports, for loopback, the project bridges and --api-allow only\""
        );
        let _ = writeln!(t, "\tcounter {BLOCKED} {{\n\t}}");
        let _ = writeln!(t, "\tchain input {{\n\t\ttype filter hook input priority {FILTER_PRIORITY}; policy accept;");
        let _ = writeln!(t, "\t\tiif \"lo\" accept comment \"the host itself\"");
        if !bridges.is_empty() {
            let names: Vec<String> = bridges.iter().map(|b| format!("\"{b}\"")).collect();
            let _ = writeln!(
                t,
                "\t\tiifname {{ {} }} accept comment \"the project bridges (each project's table keeps its VMs to its gateway)\"",
                names.join(", ")
            );
        }
        if !allow.is_empty() {
            let nets: Vec<String> = allow.iter().map(ToString::to_string).collect();
            let _ = writeln!(
                t,
                "\t\tip saddr {{ {} }} tcp dport {} accept comment \"--api-allow\"",
                nets.join(", "),
                p.api
            );
        }
        let ports: Vec<String> = tcp.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            t,
            "\t\ttcp dport {{ {} }} counter name \"{BLOCKED}\" drop comment \"from anywhere else\"",
            ports.join(", ")
        );
        let _ = writeln!(t, "\t\tudp dport {} counter name \"{BLOCKED}\" drop comment \"from anywhere else\"", p.dns);
        t.push_str("\t}\n}\n");
        t
    }

    /// One transaction replacing the table (created if missing).
    pub fn replace_script(&self) -> String {
        super::nft::replace(&self.table_name(), &self.table())
    }

    /// Hash of the table, recorded when applied so an unchanged table is not re-applied.
    pub fn hash(&self) -> String {
        crate::model::digest(&self.table())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DEFAULT_SUBNET_BASE, ProjectNet};

    fn wall() -> ServicesWall {
        let net = |p: &str, index| ProjectNet { project: p.into(), index, base: DEFAULT_SUBNET_BASE };
        ServicesWall {
            instance: "3f2a9c0d1e2b4a5c".into(),
            ports: HostPorts { api: 8443, mirror: 8080, dns: 5353 },
            bridges: vec![net("ward-7", 0).bridge(), net("icu", 1).bridge()],
            api_allow: vec!["192.0.2.0/24".parse().unwrap(), "198.51.100.7".parse().unwrap()],
        }
    }

    #[test]
    fn services_table() {
        insta::assert_snapshot!(wall().replace_script());
    }

    #[test]
    fn without_bridges_or_allowances_only_loopback_passes() {
        let w = ServicesWall { bridges: vec![], api_allow: vec![], ..wall() };
        let t = w.table();
        assert!(!t.contains("iifname") && !t.contains("saddr"), "{t}");
        assert!(t.contains("iif \"lo\" accept"), "{t}");
        assert!(t.contains("tcp dport { 5353, 8080, 8443 } counter name \"blocked_services\" drop"), "{t}");
        assert!(t.contains("udp dport 5353 counter name \"blocked_services\" drop"), "{t}");
    }

    #[test]
    fn the_api_allowance_opens_the_api_port_only() {
        let t = wall().table();
        let allow: Vec<&str> = t.lines().filter(|l| l.contains("saddr")).collect();
        assert_eq!(
            allow,
            ["\t\tip saddr { 192.0.2.0/24, 198.51.100.7/32 } tcp dport 8443 accept comment \"--api-allow\""]
        );
    }

    #[test]
    fn same_input_same_table_and_changes_are_seen() {
        let w = wall();
        let mut shuffled = w.clone();
        shuffled.bridges.reverse();
        shuffled.api_allow.reverse();
        assert_eq!(shuffled.hash(), w.hash(), "order does not matter");
        let changed = [
            ServicesWall { bridges: vec![w.bridges[0].clone()], ..w.clone() },
            ServicesWall { api_allow: vec![], ..w.clone() },
            ServicesWall { ports: HostPorts { mirror: 18080, ..w.ports }, ..w.clone() },
        ];
        for c in changed {
            assert_ne!(c.hash(), w.hash(), "{c:?}");
        }
    }

    #[test]
    fn its_name_is_per_instance_and_never_a_project_table() {
        assert_eq!(wall().table_name(), "noexit-services.3f2a9c0d1e2b4a5c");
        // Project tables are `noexit-<project>`, and project names are DNS labels (no '.').
        assert!(wall().table_name().starts_with("noexit-"), "listed with noexit's other tables");
        assert!(wall().table_name()["noexit-".len()..].contains('.'));
    }

    /// nft refuses the whole transaction over a comment longer than 128 bytes.
    #[test]
    fn comments_fit_nft() {
        for line in wall().table().lines().filter(|l| l.contains("comment")) {
            let comment = line.split("comment \"").nth(1).unwrap().trim_end_matches('"');
            assert!(comment.len() <= 128, "{} bytes: {comment}", comment.len());
        }
    }

    #[test]
    fn one_port_used_twice_is_listed_once() {
        let w = ServicesWall { ports: HostPorts { api: 8443, mirror: 8443, dns: 5353 }, ..wall() };
        assert!(w.table().contains("tcp dport { 5353, 8443 }"), "{}", w.table());
    }
}
