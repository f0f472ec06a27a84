//! The site: everything about the cluster the operator needs to render children that the
//! resources themselves do not say (where the API, the mirror, the gateway and the workspace DNS
//! server run, images). Read from a YAML file (`--site`); defaults suit a kind cluster installed with
//! the Helm chart in `charts/noexit`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Site {
    /// Namespace the operator, API, mirror and gateway run in.
    pub operator_namespace: String,
    pub control_plane: ServiceEndpoint,
    pub mirror: ServiceEndpoint,
    /// Pods allowed to open desktop connections (the gateway).
    pub gateway: PeerSelector,
    /// noexit's own DNS server (`noexit-operator dns`), the only resolver a workspace has: it
    /// answers the API's and the mirror's names and nothing else, and never recurses. `address`
    /// is its Service's ClusterIP, the one nameserver of every workspace (pod `dnsConfig`, VM
    /// guest, agent nftables; always port 53 there); `port` is the port its pods listen on
    /// (the Service maps 53 to it; NetworkPolicies name pod ports).
    pub dns: ServiceEndpoint,
    /// An address workspaces must NOT reach (default: the Kubernetes API service); pod-mode
    /// agents probe it to prove the NetworkPolicy wall holds.
    pub canary_address: String,
    pub canary_port: u16,
    /// Image of the agent sidecar (pod runtime); VM images carry the agent themselves.
    pub agent_image: String,
    /// Storage class of home volumes; `None` uses the cluster default.
    pub storage_class: Option<String>,
    /// Port the desktop (VNC) listens on in every workspace.
    pub desktop_port: u16,
    /// Validity of agent client certificates, in days; rotated at two thirds.
    pub agent_cert_days: u32,
    /// Non-root user id workspace processes run as (pod runtime).
    pub workspace_uid: i64,
    /// Non-root user id of the agent sidecar; shares the outbox through `fsGroup`.
    pub agent_uid: i64,
    /// The workspace images (container images, VM disk images) a Workspace may name, by digest.
    /// Empty: any image. See [`crate::images`].
    pub workspace_images: crate::images::ImageAllowlist,
}

/// A Service other components reach: in-cluster DNS name, address for the agent's nftables
/// allowlist (ClusterIP or CIDR), port, and the labels of the pods behind it (NetworkPolicy).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEndpoint {
    pub service: String,
    pub address: String,
    pub port: u16,
    pub pod_labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerSelector {
    pub namespace: String,
    pub pod_labels: BTreeMap<String, String>,
    /// The ServiceAccount of these pods (the gateway's: each workspace binds it a Role that
    /// reads that workspace's VNC Secret).
    #[serde(default = "gateway_service_account")]
    pub service_account: String,
}

fn gateway_service_account() -> String {
    "noexit-gateway".into()
}

fn component(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "noexit".to_owned()),
        ("app.kubernetes.io/component".to_owned(), name.to_owned()),
    ])
}

impl Default for Site {
    fn default() -> Self {
        Self {
            operator_namespace: "noexit-system".into(),
            control_plane: ServiceEndpoint {
                service: "noexit-api".into(),
                address: "10.96.100.10".into(),
                port: 8443,
                pod_labels: component("api"),
            },
            mirror: ServiceEndpoint {
                service: "noexit-mirror".into(),
                address: "10.96.100.11".into(),
                port: 8080,
                pod_labels: component("mirror"),
            },
            gateway: PeerSelector {
                namespace: "noexit-system".into(),
                pod_labels: component("gateway"),
                service_account: gateway_service_account(),
            },
            dns: ServiceEndpoint {
                service: "noexit-dns".into(),
                address: "10.96.100.53".into(),
                port: 5353,
                pod_labels: component("dns"),
            },
            canary_address: "10.96.0.1".into(),
            canary_port: 443,
            agent_image: "ghcr.io/noexit/agent:0.1.0".into(),
            storage_class: None,
            desktop_port: 5901,
            agent_cert_days: 30,
            workspace_uid: 1000,
            agent_uid: 65532,
            workspace_images: crate::images::ImageAllowlist::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error("cannot read site file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("site file {path}: {source}")]
    Parse { path: String, source: serde_yaml::Error },
}

impl Site {
    pub fn from_file(path: &Path) -> Result<Self, SiteError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| SiteError::Read { path: path.display().to_string(), source })?;
        serde_yaml::from_str(&text).map_err(|source| SiteError::Parse { path: path.display().to_string(), source })
    }

    /// In-cluster URL of the control-plane API.
    pub fn control_plane_url(&self) -> String {
        format!("https://{}.{}.svc:{}", self.control_plane.service, self.operator_namespace, self.control_plane.port)
    }

    /// The names workspaces resolve, and their addresses: exactly what `noexit-operator dns`
    /// answers. The names are the host parts of [`Site::control_plane_url`] and
    /// [`Site::mirror_url`], fully qualified and lower case.
    pub fn workspace_names(&self) -> Vec<(String, String)> {
        let name = |e: &ServiceEndpoint| format!("{}.{}.svc.", e.service, self.operator_namespace).to_ascii_lowercase();
        vec![
            (name(&self.control_plane), self.control_plane.address.clone()),
            (name(&self.mirror), self.mirror.address.clone()),
        ]
    }

    /// In-cluster URL of the CRAN mirror.
    pub fn mirror_url(&self) -> String {
        format!("http://{}.{}.svc:{}", self.mirror.service, self.operator_namespace, self.mirror.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_site_file_keeps_defaults_and_unknown_keys_are_refused() {
        let site: Site = serde_yaml::from_str("agentImage: registry.local/agent:1\n").expect("parse");
        assert_eq!(site.agent_image, "registry.local/agent:1");
        assert_eq!(site.desktop_port, 5901);
        assert!(serde_yaml::from_str::<Site>("agentImg: x\n").is_err());
    }

    #[test]
    fn workspace_names_are_the_hosts_of_the_urls_workspaces_use() {
        let site = Site::default();
        let names = site.workspace_names();
        assert_eq!(
            names,
            [
                ("noexit-api.noexit-system.svc.".to_owned(), "10.96.100.10".to_owned()),
                ("noexit-mirror.noexit-system.svc.".to_owned(), "10.96.100.11".to_owned()),
            ]
        );
        for (url, (name, _)) in [site.control_plane_url(), site.mirror_url()].iter().zip(&names) {
            assert!(url.contains(&format!("//{}:", name.trim_end_matches('.'))), "{url} vs {name}");
        }
    }
}
