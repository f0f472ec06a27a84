//! From checked manifests and the stable allocations to what must exist on the host: the
//! libvirt networks and domains, the host tables (as [`noexit_host::plan::Desired`]) and each
//! workspace's files (home disk, seed). Pure.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use kube::ResourceExt;
use noexit_crds::agent::{
    AgentConfig, AgentMode, ControlPlane, DesktopKind, DlpConfig, EgressAllowlist, Endpoint, WorkspaceIdentity,
};
use noexit_host::model::{DomainSpec, HostPorts, Ipv4Cidr, Lease, ProjectNet, VirtType, domain_name};
use noexit_host::plan::{Desired, DesiredDomain, DesiredNetwork, DesiredTable};
use noexit_host::render::seed::{self, GUEST_DIR, GuestNetwork, SeedFile};
use noexit_host::render::services::ServicesWall;
use noexit_host::render::{domain, network, nft};

use super::check::Checked;

/// Host name of the control-plane API inside the guests (an `/etc/hosts` entry from the seed).
pub const API_NAME: &str = "api.noexit";
/// Host name of the package mirror inside the guests.
pub const MIRROR_NAME: &str = "mirror.noexit";
/// Port the guest's desktop (VNC) listens on; the gateway connects from the project gateway
/// address.
pub const DESKTOP_PORT: u16 = 5901;

/// How this host runs workspaces.
#[derive(Clone, Debug)]
pub struct Settings {
    pub instance: String,
    pub state_dir: PathBuf,
    pub virt_type: VirtType,
    pub ports: HostPorts,
    pub subnet_base: Ipv4Addr,
    /// TCP address of the VNC consoles; `None`: unix sockets (only root reaches them).
    pub vnc_listen: Option<Ipv4Addr>,
    /// The services table: `Some` (with the networks `--api-allow` opens the API to) while `up`
    /// serves the API, mirror and DNS; `None` with `--once`, where nothing listens and the
    /// table goes.
    pub services: Option<Vec<Ipv4Cidr>>,
}

/// What the state database holds for the manifests' objects.
#[derive(Clone, Debug, Default)]
pub struct Allocations {
    /// Project → subnet index.
    pub projects: BTreeMap<String, u8>,
    /// (project, workspace) → host index, VNC password.
    pub workspaces: BTreeMap<(String, String), (u8, String)>,
    /// (project, workspace) → client certificate and key.
    pub credentials: BTreeMap<(String, String), (String, String)>,
    pub ca_pem: String,
}

/// One workspace's files and identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkspaceFiles {
    pub project: String,
    pub workspace: String,
    pub dir: PathBuf,
    pub home: PathBuf,
    pub home_bytes: u64,
    /// (base image, overlay) for disk images.
    pub overlay: Option<(PathBuf, PathBuf)>,
    pub seed: PathBuf,
    pub seed_files: Vec<SeedFile>,
    pub address: Ipv4Addr,
    pub test_console: Option<PathBuf>,
    pub console_log: PathBuf,
}

#[derive(Clone, Debug, Default)]
pub struct World {
    pub desired: Desired,
    /// By domain name.
    pub workspaces: BTreeMap<String, WorkspaceFiles>,
    /// Workspace addresses, for the mirror's and the DNS server's attribution.
    pub clients: Vec<(IpAddr, String, String)>,
    /// What the services table is made from (also in `desired.tables`), when there is one.
    pub services: Option<ServicesWall>,
}

/// Directory of a workspace's files.
pub fn workspace_dir(state_dir: &Path, project: &str, workspace: &str) -> PathBuf {
    state_dir.join("workspaces").join(project).join(workspace)
}

pub fn project_net(settings: &Settings, project: &str, index: u8) -> ProjectNet {
    ProjectNet { project: project.to_owned(), index, base: settings.subnet_base }
}

/// The agent's config for a workspace on `net` (the same shape the operator writes for
/// KubeVirt; the addresses are the project gateway's).
pub fn agent_config(project: &str, workspace: &str, net: &ProjectNet, ports: &HostPorts, mirror: bool) -> AgentConfig {
    let gw = net.gateway().to_string();
    let mut endpoints = vec![Endpoint { name: "controlPlane".into(), address: gw.clone(), port: ports.api }];
    if mirror {
        endpoints.push(Endpoint { name: "mirror".into(), address: gw.clone(), port: ports.mirror });
    }
    AgentConfig {
        workspace: WorkspaceIdentity { project: project.to_owned(), name: workspace.to_owned() },
        control_plane: ControlPlane {
            url: format!("https://{API_NAME}:{}", ports.api),
            ca_file: format!("{GUEST_DIR}/tls/ca.crt").into(),
            cert_file: format!("{GUEST_DIR}/tls/client.crt").into(),
            key_file: format!("{GUEST_DIR}/tls/client.key").into(),
        },
        egress: EgressAllowlist {
            resolvers: vec![IpAddr::V4(net.gateway())],
            endpoints,
            gateway_sources: vec![format!("{gw}/32")],
            desktop_port: DESKTOP_PORT,
            canary: None,
        },
        outbox: "/outbox".into(),
        inbox: "/inbox".into(),
        spool: "/var/lib/noexit-agent/spool".into(),
        mode: AgentMode::Vm,
        desktop: DesktopKind::Vnc,
        clipboard_in: false,
        heartbeat_seconds: 5,
        dlp: DlpConfig::default(),
    }
}

/// Everything that must exist. Workspaces or projects without an allocation are skipped (the
/// caller allocates first).
pub fn world(checked: &Checked, settings: &Settings, alloc: &Allocations) -> World {
    let mut out =
        World { desired: Desired { instance: settings.instance.clone(), ..Default::default() }, ..Default::default() };
    let mut leases: BTreeMap<String, Vec<Lease>> = BTreeMap::new();
    for p in &checked.projects {
        let Some(&index) = alloc.projects.get(&p.name_any()) else { continue };
        let net = project_net(settings, &p.name_any(), index);
        leases.entry(net.network_name()).or_default();
        out.desired.tables.insert(
            net.table_name(),
            DesiredTable { script: nft::replace_script(&net, &settings.ports), hash: nft::hash(&net, &settings.ports) },
        );
    }
    for w in &checked.workspaces {
        let key = (w.project.clone(), w.name.clone());
        let (Some(&index), Some((host, password)), Some((cert, key_pem))) =
            (alloc.projects.get(&w.project), alloc.workspaces.get(&key), alloc.credentials.get(&key))
        else {
            continue;
        };
        let net = project_net(settings, &w.project, index);
        let address = net.address(*host);
        let mac = net.mac(*host);
        leases.entry(net.network_name()).or_default().push(Lease {
            mac: mac.clone(),
            ip: address,
            name: w.name.clone(),
        });
        let config = agent_config(&w.project, &w.name, &net, &settings.ports, w.mirror);
        let config_yaml = serde_yaml::to_string(&config).unwrap_or_default();
        let guest_net = GuestNetwork {
            address,
            prefix: net.prefix(),
            gateway: net.gateway(),
            host_names: vec![API_NAME.into(), MIRROR_NAME.into()],
        };
        let seed_files = seed::files(&config_yaml, &alloc.ca_pem, cert, key_pem, Some(&guest_net));
        let dir = workspace_dir(&settings.state_dir, &w.project, &w.name);
        // Made with the workspace's files and removed with its directory (reconcile).
        let overlay = w.boot.base_disk().map(|base| (base.clone(), dir.join("root.qcow2")));
        let test_console = w.boot.test_console().then(|| dir.join("ttyS1.sock"));
        let spec = DomainSpec {
            instance: settings.instance.clone(),
            project: w.project.clone(),
            workspace: w.name.clone(),
            virt_type: settings.virt_type,
            memory_mib: w.memory_mib,
            vcpus: w.vcpus,
            boot: w.boot.boot(dir.join("root.qcow2")),
            home: dir.join("home.qcow2"),
            datasets: w.datasets.clone(),
            seed: dir.join("seed.iso"),
            network: net.network_name(),
            mac,
            vnc_listen: settings.vnc_listen,
            vnc_password: password.clone(),
            console_log: dir.join("console.log"),
            test_console: test_console.clone(),
            seed_digest: seed::digest(&seed_files),
            root_base: w.boot.base_disk().cloned(),
        };
        let name = domain_name(&w.project, &w.name);
        out.desired.domains.insert(
            name.clone(),
            DesiredDomain {
                xml: domain::render(&spec),
                hash: domain::hash(&spec),
                running: w.running,
                network: net.network_name(),
            },
        );
        out.workspaces.insert(
            name,
            WorkspaceFiles {
                project: w.project.clone(),
                workspace: w.name.clone(),
                home: spec.home.clone(),
                home_bytes: w.home_bytes,
                overlay,
                seed: spec.seed.clone(),
                seed_files,
                address,
                test_console,
                console_log: spec.console_log.clone(),
                dir,
            },
        );
        out.clients.push((IpAddr::V4(address), w.project.clone(), w.name.clone()));
    }
    for p in &checked.projects {
        let Some(&index) = alloc.projects.get(&p.name_any()) else { continue };
        let net = project_net(settings, &p.name_any(), index);
        let mut l = leases.remove(&net.network_name()).unwrap_or_default();
        l.sort();
        out.desired.networks.insert(
            net.network_name(),
            DesiredNetwork { xml: network::render(&settings.instance, &net, &l), hash: network::hash(&net), leases: l },
        );
    }
    if let Some(api_allow) = &settings.services {
        let wall = services_wall(checked, settings, alloc, api_allow);
        out.desired.tables.insert(wall.table_name(), DesiredTable { script: wall.replace_script(), hash: wall.hash() });
        out.services = Some(wall);
    }
    out
}

/// The services table's input: the ports, every project's bridge (a project without workspaces
/// too: its network exists), and the `--api-allow` networks.
fn services_wall(checked: &Checked, settings: &Settings, alloc: &Allocations, api_allow: &[Ipv4Cidr]) -> ServicesWall {
    let bridges = checked
        .projects
        .iter()
        .filter_map(|p| alloc.projects.get(&p.name_any()).map(|&i| project_net(settings, &p.name_any(), i).bridge()))
        .collect();
    ServicesWall { instance: settings.instance.clone(), ports: settings.ports, bridges, api_allow: api_allow.to_vec() }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::manifests::parse_documents;
    use crate::single_host::check::check;
    use crate::single_host::check::tests::{MANIFESTS, files};

    pub(crate) fn settings() -> Settings {
        Settings {
            instance: "i1".into(),
            state_dir: "/var/lib/noexit/host".into(),
            virt_type: VirtType::Qemu,
            ports: HostPorts { api: 8443, mirror: 8080, dns: 5353 },
            subnet_base: noexit_host::model::DEFAULT_SUBNET_BASE,
            vnc_listen: None,
            services: Some(vec![]),
        }
    }

    fn alloc() -> Allocations {
        let key = ("ward-7".to_owned(), "alice-vm".to_owned());
        Allocations {
            projects: [("ward-7".to_owned(), 0)].into(),
            workspaces: [(key.clone(), (0, "pw".to_owned()))].into(),
            credentials: [(key, ("CERT".to_owned(), "KEY".to_owned()))].into(),
            ca_pem: "CA".into(),
        }
    }

    #[test]
    fn one_project_one_workspace() {
        let checked = check(&parse_documents(MANIFESTS).unwrap(), &files(), Utc::now()).unwrap();
        let w = world(&checked, &settings(), &alloc());
        assert_eq!(w.desired.networks.keys().collect::<Vec<_>>(), ["noexit-ward-7"]);
        assert_eq!(w.desired.tables.keys().collect::<Vec<_>>(), ["noexit-services.i1", "noexit-ward-7"]);
        let d = &w.desired.domains["noexit-ward-7-alice-vm"];
        assert!(d.xml.contains("<serial>ds-icu</serial>") && d.xml.contains("ttyS1.sock"), "{}", d.xml);
        assert_eq!(w.desired.networks["noexit-ward-7"].leases[0].ip, Ipv4Addr::new(10, 213, 0, 10));
        let files = &w.workspaces["noexit-ward-7-alice-vm"];
        let yaml = &files.seed_files[0].content;
        assert!(yaml.contains("url: https://api.noexit:8443"), "{yaml}");
        assert!(yaml.contains("address: 10.213.0.1"), "{yaml}");
        assert_eq!(files.seed_files[4].content.lines().next(), Some("ADDRESS=10.213.0.10/24"));
        // Same input, same world (the reconcile loop relies on it to do nothing).
        assert_eq!(world(&checked, &settings(), &alloc()).desired, w.desired);
        // Without an allocation nothing is rendered for the workspace.
        let mut a = alloc();
        a.credentials.clear();
        assert!(world(&checked, &settings(), &a).desired.domains.is_empty());
    }

    /// The workspace image's form: kernel + initrd + a root disk in one directory. Each
    /// workspace gets its own overlay of the disk in its directory, attached as `root`.
    #[test]
    fn a_kernel_image_with_a_root_disk_gets_an_overlay() {
        let mut f = files();
        f.0.insert("/img/tiny/workspace.qcow2".into(), Some(String::new()));
        f.0.remove(std::path::Path::new("/img/tiny/cmdline"));
        let checked = check(&parse_documents(MANIFESTS).unwrap(), &f, Utc::now()).unwrap();
        let w = world(&checked, &settings(), &alloc());
        let files = &w.workspaces["noexit-ward-7-alice-vm"];
        let overlay = std::path::PathBuf::from("/var/lib/noexit/host/workspaces/ward-7/alice-vm/root.qcow2");
        assert_eq!(files.dir.join("root.qcow2"), overlay, "the overlay lives (and goes) with the workspace directory");
        assert_eq!(files.overlay, Some(("/img/tiny/workspace.qcow2".into(), overlay.clone())));
        let xml = &w.desired.domains["noexit-ward-7-alice-vm"].xml;
        assert!(xml.contains("<kernel>/img/tiny/vmlinuz</kernel>"), "{xml}");
        assert!(xml.contains("<cmdline>console=ttyS0 root=LABEL=noexit-root ro</cmdline>"), "{xml}");
        assert!(xml.contains(&format!("<source file=\"{}\"/>", overlay.display())), "{xml}");
        assert!(xml.contains("<serial>root</serial>"), "{xml}");
        // The tiny form has none.
        let checked =
            check(&parse_documents(MANIFESTS).unwrap(), &super::super::check::tests::files(), Utc::now()).unwrap();
        let w = world(&checked, &settings(), &alloc());
        assert_eq!(w.workspaces["noexit-ward-7-alice-vm"].overlay, None);
        assert!(!w.desired.domains["noexit-ward-7-alice-vm"].xml.contains("<serial>root</serial>"));
    }

    /// The services table names every project's bridge (the same name the project's network
    /// and table use) and the --api-allow networks; with `--once` there is none.
    #[test]
    fn the_services_table_follows_the_projects_and_the_options() {
        let checked = check(&parse_documents(MANIFESTS).unwrap(), &files(), Utc::now()).unwrap();
        let allow: Vec<Ipv4Cidr> = vec!["192.0.2.0/24".parse().unwrap()];
        let s = Settings { services: Some(allow.clone()), ..settings() };
        let w = world(&checked, &s, &alloc());
        let wall = w.services.as_ref().unwrap();
        let net = project_net(&s, "ward-7", 0);
        assert_eq!(wall.bridges, [net.bridge()]);
        assert!(w.desired.networks["noexit-ward-7"].xml.contains(&format!("<bridge name=\"{}\"", net.bridge())));
        assert!(w.desired.tables["noexit-ward-7"].script.contains(&format!("iifname \"{}\"", net.bridge())));
        assert_eq!((wall.api_allow.clone(), wall.ports), (allow, s.ports));
        let t = &w.desired.tables["noexit-services.i1"];
        assert_eq!(t.hash, wall.hash());
        assert!(t.script.contains("ip saddr { 192.0.2.0/24 } tcp dport 8443 accept"), "{}", t.script);
        // A project without an allocation yet has no network, so no bridge.
        let none = world(&checked, &s, &Allocations { projects: Default::default(), ..alloc() });
        assert!(none.services.unwrap().bridges.is_empty());
        // Nothing served (`--once`): no services table.
        let once = world(&checked, &Settings { services: None, ..settings() }, &alloc());
        assert!(once.services.is_none());
        assert_eq!(once.desired.tables.keys().collect::<Vec<_>>(), ["noexit-ward-7"]);
    }
}
