//! Who is asking: a workspace, named `<project>/<workspace>`, found from the client
//! certificate (URI SAN `noexit://workspace/<project>/<name>`, as the operator's CA issues
//! them) or from the source address in the clients file the operator renders.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// A workspace the mirror serves.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId {
    pub project: String,
    pub workspace: String,
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.project, self.workspace)
    }
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl std::str::FromStr for ClientId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((p, w)) if dns_label(p) && dns_label(w) => Ok(Self { project: p.into(), workspace: w.into() }),
            _ => Err(format!("{s:?} is not <project>/<workspace> (two DNS labels)")),
        }
    }
}

/// The clients file (`--clients`): source address → `<project>/<workspace>`.
///
/// ```yaml
/// clients:
///   10.244.1.17: ward-7/alice-r
///   fd00::17: ward-7/alice-vm
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientsFile {
    #[serde(default)]
    pub clients: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientsError {
    #[error("clients file is not valid YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("clients file: key {0:?} is not an IP address")]
    Address(String),
    #[error("clients file: {address}: {problem}")]
    Workspace { address: String, problem: String },
}

/// The parsed clients file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientMap(BTreeMap<IpAddr, ClientId>);

impl ClientMap {
    pub fn from_yaml(text: &str) -> Result<Self, ClientsError> {
        let file: ClientsFile = serde_yaml::from_str(text)?;
        let mut map = BTreeMap::new();
        for (address, id) in file.clients {
            let ip: IpAddr = address.trim().parse().map_err(|_| ClientsError::Address(address.clone()))?;
            let id = id.parse().map_err(|problem| ClientsError::Workspace { address: address.clone(), problem })?;
            map.insert(ip, id);
        }
        Ok(Self(map))
    }

    /// The workspace at `ip`. IPv4-mapped IPv6 addresses (dual-stack listeners) count as IPv4.
    pub fn lookup(&self, ip: IpAddr) -> Option<&ClientId> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.0.get(&ip)
    }
}

/// Render the clients file (pure; for the operator's ConfigMap).
pub fn clients_yaml(entries: &[(IpAddr, ClientId)]) -> String {
    let file = ClientsFile { clients: entries.iter().map(|(ip, id)| (ip.to_string(), id.to_string())).collect() };
    serde_yaml::to_string(&file).unwrap_or_default()
}

const URI_PREFIX: &[u8] = b"noexit://workspace/";

/// The workspace named by a client certificate's URI SAN. The certificate has already been
/// verified against the operator's CA by the TLS layer, which issues exactly one such SAN;
/// this finds the DER `[6] IA5String` (tag 0x86, short length) that carries it.
pub fn identity_from_certificate(der: &[u8]) -> Option<ClientId> {
    let mut at = 0;
    while let Some(pos) = memchr::memmem::find(&der[at..], URI_PREFIX) {
        let start = at + pos;
        at = start + 1;
        if start < 2 || der[start - 2] != 0x86 {
            continue;
        }
        let len = usize::from(der[start - 1]);
        if len >= 0x80 || start + len > der.len() {
            continue;
        }
        let uri = std::str::from_utf8(&der[start..start + len]).ok()?;
        return uri.strip_prefix("noexit://workspace/")?.parse().ok();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_looks_up_addresses() {
        let map =
            ClientMap::from_yaml("clients:\n  10.244.1.17: ward-7/alice-r\n  fd00::17: ward-7/alice-vm\n").unwrap();
        let id = map.lookup("10.244.1.17".parse().unwrap()).unwrap();
        assert_eq!(id.to_string(), "ward-7/alice-r");
        assert_eq!(map.lookup("::ffff:10.244.1.17".parse().unwrap()), Some(id));
        assert_eq!(map.lookup("fd00::17".parse().unwrap()).unwrap().workspace, "alice-vm");
        assert!(map.lookup("10.244.1.18".parse().unwrap()).is_none());
    }

    #[test]
    fn refuses_bad_entries_naming_them() {
        let e = ClientMap::from_yaml("clients:\n  10.0.0.300: a/b\n").unwrap_err().to_string();
        assert!(e.contains("10.0.0.300"), "{e}");
        let e = ClientMap::from_yaml("clients:\n  10.0.0.3: just-a-project\n").unwrap_err().to_string();
        assert!(e.contains("10.0.0.3") && e.contains("<project>/<workspace>"), "{e}");
        assert!(ClientMap::from_yaml("client: {}\n").is_err());
    }

    #[test]
    fn renders_what_it_parses() {
        let entries = [("10.1.2.3".parse().unwrap(), "p/w".parse().unwrap())];
        let map = ClientMap::from_yaml(&clients_yaml(&entries)).unwrap();
        assert_eq!(map.lookup(entries[0].0), Some(&entries[0].1));
    }

    #[test]
    fn reads_the_workspace_from_a_certificate_the_ca_issued() {
        let ca = noexit_common::pki::Ca::generate("test ca").unwrap();
        let ws = noexit_crds::agent::WorkspaceIdentity { project: "ward-7".into(), name: "alice-r".into() };
        let issued = ca.issue_workspace_client(&ws, chrono::Duration::days(1)).unwrap();
        let der = rustls_pemfile::certs(&mut issued.cert_pem.as_bytes()).next().unwrap().unwrap();
        let id = identity_from_certificate(&der).unwrap();
        assert_eq!(id.to_string(), "ward-7/alice-r");
        assert!(identity_from_certificate(b"no identity here").is_none());
    }
}
