//! The agent's configuration for one workspace, and for VMs the cloud-init that installs it.

use kube::ResourceExt;
use noexit_crds::Workspace;
use noexit_crds::agent::{
    AgentConfig, AgentMode, ControlPlane, DesktopKind, DlpConfig, EgressAllowlist, Endpoint, WorkspaceIdentity,
};
use noexit_crds::workspace::Runtime;
use serde::Serialize;

use super::validate::ResolvedWorkspace;
use crate::site::Site;

pub const CONFIG_DIR: &str = "/etc/noexit";
pub const CA_FILE: &str = "/etc/noexit/tls/ca.crt";
pub const CERT_FILE: &str = "/etc/noexit/tls/tls.crt";
pub const KEY_FILE: &str = "/etc/noexit/tls/tls.key";
/// KubeVirt's masquerade binding: desktop connections reach the guest from this address.
const KUBEVIRT_MASQUERADE_GATEWAY: &str = "10.0.2.1/32";

pub fn agent_config(ws: &Workspace, resolved: &ResolvedWorkspace, site: &Site) -> AgentConfig {
    let vm = ws.spec.runtime == Runtime::Vm;
    let mut endpoints = vec![Endpoint {
        name: "controlPlane".into(),
        address: site.control_plane.address.clone(),
        port: site.control_plane.port,
    }];
    if resolved.mirror {
        endpoints.push(Endpoint {
            name: "mirror".into(),
            address: site.mirror.address.clone(),
            port: site.mirror.port,
        });
    }
    AgentConfig {
        workspace: WorkspaceIdentity { project: ws.spec.project.clone(), name: ws.name_any() },
        control_plane: ControlPlane {
            url: site.control_plane_url(),
            ca_file: CA_FILE.into(),
            cert_file: CERT_FILE.into(),
            key_file: KEY_FILE.into(),
        },
        egress: EgressAllowlist {
            // The workspace DNS server only (never the cluster resolver, which forwards).
            resolvers: site.dns.address.parse().into_iter().collect(),
            endpoints,
            gateway_sources: if vm { vec![KUBEVIRT_MASQUERADE_GATEWAY.into()] } else { Vec::new() },
            desktop_port: site.desktop_port,
            canary: Some(Endpoint {
                name: "canary".into(),
                address: site.canary_address.clone(),
                port: site.canary_port,
            }),
        },
        outbox: "/outbox".into(),
        inbox: "/inbox".into(),
        spool: "/var/lib/noexit-agent/spool".into(),
        mode: if vm { AgentMode::Vm } else { AgentMode::Pod },
        desktop: DesktopKind::Vnc,
        clipboard_in: resolved.clipboard_in,
        heartbeat_seconds: 5,
        dlp: DlpConfig::default(),
    }
}

#[derive(Serialize)]
struct CloudConfig<'a> {
    write_files: Vec<WriteFile<'a>>,
    runcmd: Vec<Vec<&'a str>>,
}

#[derive(Serialize)]
struct WriteFile<'a> {
    path: &'a str,
    permissions: &'a str,
    owner: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding: Option<&'a str>,
    content: std::borrow::Cow<'a, str>,
}

/// Where the guest's desktop reads TigerVNC's password file (as in the pod image).
pub const VNC_PASSWD_FILE: &str = "/etc/noexit/vnc/passwd";

/// `#cloud-config` user data that writes the agent's config and credentials (root-only) and
/// starts the agent, which the VM image ships as `noexit-agent.service`; also TigerVNC's
/// password file for the desktop (`noexit-desktop.service`, run as the researcher).
pub fn cloud_init(config_yaml: &str, ca_pem: &str, cert_pem: &str, key_pem: &str, vnc_passwd: &[u8]) -> String {
    use base64::Engine as _;
    let text = |path, permissions, content| WriteFile {
        path,
        permissions,
        owner: "root:root",
        encoding: None,
        content: std::borrow::Cow::Borrowed(content),
    };
    let doc = CloudConfig {
        write_files: vec![
            text("/etc/noexit/agent.yaml", "0600", config_yaml),
            text(CA_FILE, "0644", ca_pem),
            text(CERT_FILE, "0644", cert_pem),
            text(KEY_FILE, "0600", key_pem),
            WriteFile {
                path: VNC_PASSWD_FILE,
                permissions: "0400",
                owner: "researcher:researcher",
                encoding: Some("b64"),
                content: std::borrow::Cow::Owned(base64::engine::general_purpose::STANDARD.encode(vnc_passwd)),
            },
        ],
        runcmd: vec![
            vec!["systemctl", "enable", "--now", "noexit-agent.service"],
            vec!["systemctl", "enable", "--now", "noexit-desktop.service"],
        ],
    };
    format!("#cloud-config\n{}", serde_yaml::to_string(&doc).unwrap_or_default())
}
