//! The host's nftables table for one project: the outer wall, independent of the agent's table
//! in the guest. It lets the project's VMs reach only the host's API, mirror and DNS (and DHCP
//! from libvirt's dnsmasq) on the project gateway address; every other packet from the bridge —
//! to the host, to another project, or routed anywhere — is counted and dropped.
//!
//! Rendered as one nft script that replaces the table in a single transaction (`add`, `delete`,
//! then the whole table), so an apply never leaves a gap.

use std::fmt::Write;

use crate::model::{HostPorts, ProjectNet};

/// Family of every noexit host table.
pub const FAMILY: &str = "inet";
/// Named counter of packets from the VMs to the host that the table dropped.
pub const BLOCKED_IN: &str = "blocked_in";
/// Named counter of packets the table dropped instead of routing (to or from the bridge).
pub const BLOCKED_FORWARD: &str = "blocked_forward";
/// Priority of the filter chains: before the default `filter` (0), so our drops are counted
/// even where libvirt's own rules would also drop.
const FILTER_PRIORITY: &str = "filter - 10";

/// The table's definition (what `nft list table` would show, in our order).
pub fn table(net: &ProjectNet, ports: &HostPorts) -> String {
    let name = net.table_name();
    let br = net.bridge();
    let gw = net.gateway();
    let mut t = String::new();
    let _ = writeln!(t, "table {FAMILY} {name} {{");
    let _ = writeln!(
        t,
        "\tcomment \"noexit: outer wall of project {} (bridge {br}, {}/{})\"",
        net.project,
        net.subnet(),
        net.prefix()
    );
    let _ = writeln!(t, "\tcounter {BLOCKED_IN} {{\n\t}}");
    let _ = writeln!(t, "\tcounter {BLOCKED_FORWARD} {{\n\t}}");
    let _ = writeln!(t, "\tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;");
    for proto in ["udp", "tcp"] {
        let _ = writeln!(
            t,
            "\t\tiifname \"{br}\" ip daddr {gw} {proto} dport 53 redirect to :{} comment \"DNS ({proto}) to the noexit DNS server\"",
            ports.dns
        );
    }
    t.push_str("\t}\n");
    let _ = writeln!(t, "\tchain input {{\n\t\ttype filter hook input priority {FILTER_PRIORITY}; policy accept;");
    let _ = writeln!(t, "\t\tiifname \"{br}\" udp sport 68 udp dport 67 accept comment \"DHCP (fixed leases)\"");
    let allow = [
        ("tcp", ports.api, "control-plane API"),
        ("tcp", ports.mirror, "package mirror"),
        ("udp", ports.dns, "DNS"),
        ("tcp", ports.dns, "DNS"),
    ];
    for (proto, port, what) in allow {
        let _ = writeln!(t, "\t\tiifname \"{br}\" ip daddr {gw} {proto} dport {port} accept comment \"{what}\"");
    }
    let _ =
        writeln!(t, "\t\tiifname \"{br}\" counter name \"{BLOCKED_IN}\" drop comment \"anything else to the host\"");
    t.push_str("\t}\n");
    let _ = writeln!(t, "\tchain forward {{\n\t\ttype filter hook forward priority {FILTER_PRIORITY}; policy accept;");
    let _ = writeln!(
        t,
        "\t\tiifname \"{br}\" counter name \"{BLOCKED_FORWARD}\" drop comment \"nothing is routed out of the project\""
    );
    let _ = writeln!(
        t,
        "\t\toifname \"{br}\" counter name \"{BLOCKED_FORWARD}\" drop comment \"nothing is routed into the project\""
    );
    t.push_str("\t}\n}\n");
    t
}

/// One transaction replacing the table (created if missing).
pub fn replace_script(net: &ProjectNet, ports: &HostPorts) -> String {
    replace(&net.table_name(), &table(net, ports))
}

/// One transaction replacing table `name` with `table` (its definition): the table is removed
/// (made first, so removing never fails) and defined afresh, all or nothing.
pub fn replace(name: &str, table: &str) -> String {
    format!("{}{table}", delete_script(name))
}

/// One transaction removing the table (no error if it is already gone).
pub fn delete_script(name: &str) -> String {
    format!("add table {FAMILY} {name}\ndelete table {FAMILY} {name}\n")
}

/// Hash of the table, recorded when applied so an unchanged table is not re-applied.
pub fn hash(net: &ProjectNet, ports: &HostPorts) -> String {
    crate::model::digest(&table(net, ports))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DEFAULT_SUBNET_BASE;

    #[test]
    fn host_table() {
        let net = ProjectNet { project: "ward-7".into(), index: 0, base: DEFAULT_SUBNET_BASE };
        let ports = HostPorts { api: 8443, mirror: 8080, dns: 5353 };
        insta::assert_snapshot!(replace_script(&net, &ports));
        assert_ne!(hash(&net, &ports), hash(&net, &HostPorts { api: 9443, ..ports }));
    }
}
