//! Thin I/O over libvirt (the `virt` crate): read what exists, run plan steps. Blocking calls;
//! run them off the async runtime.

use std::collections::BTreeMap;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::network::Network;

use crate::model::Lease;
use crate::plan::{ObservedDomain, ObservedNetwork};
use crate::render;

#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error(
        "cannot connect to libvirt at {uri}: {message} (is libvirtd running? without an init system start it with `virtlogd -d; libvirtd -d`)"
    )]
    Connect { uri: String, message: String },
    #[error("libvirt: {action} {kind} {name:?}: {message}")]
    Call { action: &'static str, kind: &'static str, name: String, message: String },
}

/// An open libvirt connection.
pub struct Libvirt {
    conn: Connect,
    uri: String,
}

// libvirt connections are thread-safe (virConnect is refcounted and locked).
unsafe impl Send for Libvirt {}
unsafe impl Sync for Libvirt {}

impl Drop for Libvirt {
    fn drop(&mut self) {
        let _ = self.conn.close();
    }
}

fn err(action: &'static str, kind: &'static str, name: &str) -> impl Fn(virt::error::Error) -> LibvirtError {
    let name = name.to_owned();
    move |e| LibvirtError::Call { action, kind, name: name.clone(), message: e.to_string() }
}

const VIR_NETWORK_UPDATE_COMMAND_DELETE: u32 = 2;
const VIR_NETWORK_UPDATE_COMMAND_ADD_LAST: u32 = 3;
const VIR_NETWORK_SECTION_IP_DHCP_HOST: u32 = 4;
const VIR_NETWORK_UPDATE_AFFECT_LIVE: u32 = 1;
const VIR_NETWORK_UPDATE_AFFECT_CONFIG: u32 = 2;

impl Libvirt {
    pub fn open(uri: &str) -> Result<Self, LibvirtError> {
        let conn = Connect::open(Some(uri))
            .map_err(|e| LibvirtError::Connect { uri: uri.to_owned(), message: e.to_string() })?;
        Ok(Self { conn, uri: uri.to_owned() })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Every domain whose name starts with `prefix`, with its noexit owner marker if any.
    pub fn domains(&self, prefix: &str) -> Result<BTreeMap<String, ObservedDomain>, LibvirtError> {
        let mut out = BTreeMap::new();
        for d in self.conn.list_all_domains(0).map_err(err("listing", "domains", ""))? {
            let name = d.get_name().map_err(err("naming", "domain", ""))?;
            if !name.starts_with(prefix) {
                continue;
            }
            let xml = d.get_xml_desc(0).map_err(err("reading", "domain", &name))?;
            let active = d.is_active().map_err(err("reading", "domain", &name))?;
            out.insert(name, ObservedDomain { owner: render::owner(&xml), active });
        }
        Ok(out)
    }

    pub fn networks(&self, prefix: &str) -> Result<BTreeMap<String, ObservedNetwork>, LibvirtError> {
        let mut out = BTreeMap::new();
        for n in self.conn.list_all_networks(0).map_err(err("listing", "networks", ""))? {
            let name = n.get_name().map_err(err("naming", "network", ""))?;
            if !name.starts_with(prefix) {
                continue;
            }
            let xml = n.get_xml_desc(0).map_err(err("reading", "network", &name))?;
            let active = n.is_active().map_err(err("reading", "network", &name))?;
            let leases = render::network::parse_leases(&xml);
            out.insert(name, ObservedNetwork { owner: render::owner(&xml), active, leases });
        }
        Ok(out)
    }

    /// Define (replacing the definition if it exists) and start a network.
    pub fn define_network(&self, name: &str, xml: &str, replace: bool) -> Result<(), LibvirtError> {
        if replace {
            self.delete_network(name)?;
        }
        let net = Network::define_xml(&self.conn, xml).map_err(err("defining", "network", name))?;
        if let Err(e) = net.create() {
            // Nothing half-made: a network that cannot start is not left defined.
            let _ = net.undefine();
            return Err(err("starting", "network", name)(e));
        }
        net.set_autostart(true).map_err(err("setting autostart of", "network", name))?;
        Ok(())
    }

    pub fn delete_network(&self, name: &str) -> Result<(), LibvirtError> {
        let Ok(net) = Network::lookup_by_name(&self.conn, name) else { return Ok(()) };
        if net.is_active().unwrap_or(false) {
            net.destroy().map_err(err("stopping", "network", name))?;
        }
        net.undefine().map_err(err("undefining", "network", name))?;
        Ok(())
    }

    pub fn update_lease(&self, network: &str, lease: &Lease, add: bool) -> Result<(), LibvirtError> {
        let net = Network::lookup_by_name(&self.conn, network).map_err(err("finding", "network", network))?;
        let cmd = if add { VIR_NETWORK_UPDATE_COMMAND_ADD_LAST } else { VIR_NETWORK_UPDATE_COMMAND_DELETE };
        net.update(
            cmd,
            VIR_NETWORK_SECTION_IP_DHCP_HOST,
            -1,
            &render::network::lease(lease),
            VIR_NETWORK_UPDATE_AFFECT_LIVE | VIR_NETWORK_UPDATE_AFFECT_CONFIG,
        )
        .map_err(err("updating the leases of", "network", network))?;
        Ok(())
    }

    /// Define a domain (replacing our old definition: it is stopped first).
    pub fn define_domain(&self, name: &str, xml: &str, replace: bool) -> Result<(), LibvirtError> {
        let mut xml = xml.to_owned();
        if replace {
            self.stop_domain(name)?;
            // libvirt refuses a definition without the existing domain's UUID ("already exists
            // with uuid …"): the rendered XML has none, so carry the old one over.
            if let Ok(d) = Domain::lookup_by_name(&self.conn, name) {
                let uuid = d.get_uuid_string().map_err(err("reading", "domain", name))?;
                xml = with_uuid(&xml, &uuid);
            }
        }
        Domain::define_xml(&self.conn, &xml).map_err(err("defining", "domain", name))?;
        Ok(())
    }

    pub fn start_domain(&self, name: &str) -> Result<(), LibvirtError> {
        let d = Domain::lookup_by_name(&self.conn, name).map_err(err("finding", "domain", name))?;
        if !d.is_active().map_err(err("reading", "domain", name))? {
            d.create().map_err(err("starting", "domain", name))?;
        }
        Ok(())
    }

    /// Power off (the home disk is kept; the agent spools what it has not sent).
    pub fn stop_domain(&self, name: &str) -> Result<(), LibvirtError> {
        let Ok(d) = Domain::lookup_by_name(&self.conn, name) else { return Ok(()) };
        if d.is_active().unwrap_or(false) {
            d.destroy().map_err(err("stopping", "domain", name))?;
        }
        Ok(())
    }

    pub fn delete_domain(&self, name: &str) -> Result<(), LibvirtError> {
        self.stop_domain(name)?;
        let Ok(d) = Domain::lookup_by_name(&self.conn, name) else { return Ok(()) };
        d.undefine().map_err(err("undefining", "domain", name))?;
        Ok(())
    }

    /// Where a running domain's VNC console is, from its live XML (see [`vnc_address`]).
    pub fn vnc_address(&self, name: &str) -> Option<String> {
        let d = Domain::lookup_by_name(&self.conn, name).ok()?;
        vnc_address(&d.get_xml_desc(0).ok()?)
    }
}

/// The VNC console of a live domain XML: `unix:<path>` for a socket (the path libvirt chose),
/// `<address>:<port>` for TCP (the port autoport gave).
pub fn vnc_address(xml: &str) -> Option<String> {
    let g = &xml[xml.find("<graphics type='vnc'")?..];
    let g = &g[..g.find("</graphics>").or_else(|| g.find("/>"))?];
    let opening = &g[..g.find('>')?];
    if let Some(listen) = g.find("<listen type='socket'").map(|i| &g[i..]) {
        return render::attr(&listen[..listen.find('>')?], "socket").map(|p| format!("unix:{p}"));
    }
    let port: i32 = render::attr(opening, "port")?.parse().ok()?;
    let port = u16::try_from(port).ok()?;
    let address = render::attr(opening, "listen").unwrap_or_else(|| "127.0.0.1".into());
    Some(format!("{address}:{port}"))
}

/// `xml` with `<uuid>` right after its `<name>` (the rendered domain has none).
fn with_uuid(xml: &str, uuid: &str) -> String {
    match xml.find("</name>\n") {
        Some(i) => {
            let at = i + "</name>\n".len();
            format!("{}  <uuid>{}</uuid>\n{}", &xml[..at], render::xml_escape(uuid), &xml[at..])
        }
        None => xml.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vnc_addresses_from_live_xml() {
        let socket = "<domain>\n    <graphics type='vnc' socket='/var/lib/libvirt/qemu/domain-3-x/vnc.sock'>\n      <listen type='socket' socket='/var/lib/libvirt/qemu/domain-3-x/vnc.sock'/>\n    </graphics>\n</domain>";
        assert_eq!(vnc_address(socket).as_deref(), Some("unix:/var/lib/libvirt/qemu/domain-3-x/vnc.sock"));
        let tcp = "<graphics type='vnc' port='5901' autoport='yes' listen='127.0.0.1'>\n      <listen type='address' address='127.0.0.1'/>\n    </graphics>";
        assert_eq!(vnc_address(tcp).as_deref(), Some("127.0.0.1:5901"));
        // Not started yet (port -1), or no console at all.
        assert_eq!(vnc_address("<graphics type='vnc' port='-1' autoport='yes'>\n</graphics>"), None);
        assert_eq!(vnc_address("<domain/>"), None);
    }

    /// libvirt's test driver: in-process, no daemon.
    fn test_driver() -> Libvirt {
        Libvirt::open("test:///default").expect("the test driver is built into libvirt")
    }

    fn network_xml(name: &str, instance: &str) -> String {
        let net = crate::model::ProjectNet {
            project: name.trim_start_matches("noexit-").into(),
            index: 7,
            base: crate::model::DEFAULT_SUBNET_BASE,
        };
        crate::render::network::render(instance, &net, &[])
    }

    #[test]
    fn define_read_back_update_and_delete_a_network() {
        let lv = test_driver();
        lv.define_network("noexit-t1", &network_xml("noexit-t1", "i1"), false).unwrap();
        let nets = lv.networks("noexit-").unwrap();
        let n = &nets["noexit-t1"];
        assert!(n.active);
        assert_eq!(n.owner.as_ref().map(|o| o.instance.as_str()), Some("i1"));
        let lease = Lease { mac: "52:54:00:d5:07:0a".into(), ip: "10.213.7.10".parse().unwrap(), name: "w".into() };
        lv.update_lease("noexit-t1", &lease, true).unwrap();
        assert_eq!(lv.networks("noexit-").unwrap()["noexit-t1"].leases, vec![lease.clone()]);
        lv.update_lease("noexit-t1", &lease, false).unwrap();
        assert!(lv.networks("noexit-").unwrap()["noexit-t1"].leases.is_empty());
        lv.delete_network("noexit-t1").unwrap();
        assert!(!lv.networks("noexit-").unwrap().contains_key("noexit-t1"));
    }

    /// A changed workspace (memory, seed, image) redefines its domain under the same name.
    #[test]
    fn a_domain_is_redefined_in_place() {
        let lv = test_driver();
        let mut spec = crate::render::domain::tests::spec();
        spec.workspace = "redefine".into();
        let name = spec.name();
        lv.define_domain(&name, &crate::render::domain::render(&spec), false).unwrap();
        lv.start_domain(&name).unwrap();
        spec.memory_mib = 1024;
        let xml = crate::render::domain::render(&spec);
        lv.define_domain(&name, &xml, true).unwrap();
        let d = &lv.domains("noexit-").unwrap()[&name];
        assert!(!d.active, "stopped for the new definition");
        assert_eq!(d.owner.as_ref().map(|o| o.hash.as_str()), Some(crate::render::domain::hash(&spec).as_str()));
        lv.delete_domain(&name).unwrap();
    }

    #[test]
    fn the_existing_uuid_goes_into_the_new_definition() {
        let xml = "<domain type=\"qemu\">\n  <name>a</name>\n  <memory>1</memory>\n</domain>\n";
        assert_eq!(
            with_uuid(xml, "6f1c"),
            "<domain type=\"qemu\">\n  <name>a</name>\n  <uuid>6f1c</uuid>\n  <memory>1</memory>\n</domain>\n"
        );
    }

    #[test]
    fn a_domain_made_elsewhere_has_no_owner() {
        let lv = test_driver();
        // The test driver's own domain "test".
        let all = lv.domains("").unwrap();
        assert_eq!(all["test"].owner, None);
    }

    #[test]
    fn unreachable_daemon_is_a_clear_error() {
        let e = Libvirt::open("qemu+unix:///system?socket=/nonexistent/libvirt-sock").err().unwrap().to_string();
        assert!(e.contains("cannot connect to libvirt") && e.contains("libvirtd -d"), "{e}");
    }
}
