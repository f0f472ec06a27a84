//! A project's isolated libvirt network: a bridge with the host at `.1`, no `<forward>` (libvirt
//! then routes nothing off it), libvirt's DNS off (the guests ask the noexit DNS server, through
//! the host table's redirect), and DHCP handing out only the fixed MAC→address leases, so the
//! mirror and the API can attribute traffic to a workspace.

use std::fmt::Write;

use super::{metadata, xml_escape};
use crate::model::{Lease, ProjectNet};

/// The network XML, with the leases.
pub fn render(instance: &str, net: &ProjectNet, leases: &[Lease]) -> String {
    let hash = hash(net);
    let mut x = format!("<network>\n  <name>{}</name>\n", xml_escape(&net.network_name()));
    x.push_str(&metadata(&[("instance", instance), ("project", &net.project)], &hash));
    let _ = writeln!(x, "  <bridge name=\"{}\" stp=\"off\" delay=\"0\"/>", net.bridge());
    x.push_str("  <dns enable=\"no\"/>\n");
    let _ = writeln!(x, "  <ip address=\"{}\" prefix=\"{}\">", net.gateway(), net.prefix());
    x.push_str("    <dhcp>\n");
    for l in leases {
        let _ = writeln!(x, "      {}", lease(l));
    }
    x.push_str("    </dhcp>\n  </ip>\n</network>\n");
    x
}

/// One `<host>` element (also what `virNetworkUpdate` takes).
pub fn lease(l: &Lease) -> String {
    format!("<host mac=\"{}\" name=\"{}\" ip=\"{}\"/>", xml_escape(&l.mac), xml_escape(&l.name), l.ip)
}

/// The hash of everything but the leases (which change live, without redefining).
pub fn hash(net: &ProjectNet) -> String {
    crate::model::digest(&format!(
        "{}|{}|{}|{}|dns=no|forward=none",
        net.network_name(),
        net.bridge(),
        net.gateway(),
        net.prefix()
    ))
}

/// The leases in a network XML as libvirt returns it.
pub fn parse_leases(xml: &str) -> Vec<Lease> {
    let attr = |el: &str, name: &str| -> Option<String> {
        let key = format!("{name}=");
        let start = el.find(&key)? + key.len();
        let quote = el[start..].chars().next()?;
        let rest = &el[start + 1..];
        Some(rest[..rest.find(quote)?].to_owned())
    };
    let mut out: Vec<Lease> = xml
        .split("<host ")
        .skip(1)
        .filter_map(|el| {
            let el = &el[..el.find("/>").unwrap_or(el.len())];
            Some(Lease {
                mac: attr(el, "mac")?.to_lowercase(),
                name: attr(el, "name").unwrap_or_default(),
                ip: attr(el, "ip")?.parse().ok()?,
            })
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DEFAULT_SUBNET_BASE;

    fn net() -> ProjectNet {
        ProjectNet { project: "ward-7".into(), index: 0, base: DEFAULT_SUBNET_BASE }
    }

    fn leases() -> Vec<Lease> {
        vec![Lease { mac: net().mac(0), ip: net().address(0), name: "alice-vm".into() }]
    }

    #[test]
    fn network_xml() {
        let xml = render("i1", &net(), &leases());
        insta::assert_snapshot!(xml);
        assert!(!xml.contains("<forward"), "an isolated network has no forward mode");
    }

    #[test]
    fn leases_read_back_from_libvirt_formatting() {
        let libvirt = "<network><ip address='10.213.0.1' prefix='24'><dhcp>\n<host mac='52:54:00:D5:00:0A' name='alice-vm' ip='10.213.0.10'/>\n</dhcp></ip></network>";
        assert_eq!(parse_leases(libvirt), leases());
        assert_eq!(parse_leases(&render("i1", &net(), &leases())), leases());
    }
}
