//! Revoked certificate serials, in memory so the check on every request costs a hash lookup.
//! The database is the record; this set is filled from it at start and updated on every
//! revocation before the revocation is acknowledged, so a revoked agent is refused at once.
//!
//! Also which workspace each agent serial belongs to, as far as the API has seen it: a project
//! admin may revoke only certificates of their project's workspaces (never another project's,
//! never the operator's), so the API must know whose a serial is. It learns it from the
//! Workspace's `status.agentCertificateSerial` (written by the controller, which issues the
//! certificates) and from every agent that authenticates (the workspace identity is the
//! CA-signed URI SAN of the very certificate, see [`RevocationSet::record_agent`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use noexit_crds::agent::WorkspaceIdentity;

use noexit_common::pki::normalize_serial;

/// Most agent serials remembered (one per certificate issued since the API started).
const MAX_AGENT_SERIALS: usize = 100_000;

#[derive(Clone, Debug, Default)]
pub struct RevocationSet {
    serials: Arc<RwLock<HashSet<String>>>,
    agents: Arc<RwLock<HashMap<String, WorkspaceIdentity>>>,
}

impl RevocationSet {
    pub fn new(serials: impl IntoIterator<Item = String>) -> Self {
        let set = serials.into_iter().map(|s| normalize_serial(&s)).collect();
        Self { serials: Arc::new(RwLock::new(set)), agents: Arc::default() }
    }

    pub fn insert(&self, serial: &str) {
        self.serials.write().unwrap_or_else(|p| p.into_inner()).insert(normalize_serial(serial));
    }

    pub fn contains(&self, serial: &str) -> bool {
        self.serials.read().unwrap_or_else(|p| p.into_inner()).contains(&normalize_serial(serial))
    }

    /// An agent authenticated with `serial`, a certificate for workspace `id`.
    pub fn record_agent(&self, serial: &str, id: &WorkspaceIdentity) {
        let serial = normalize_serial(serial);
        if self.agents.read().unwrap_or_else(|p| p.into_inner()).get(&serial) == Some(id) {
            return;
        }
        let mut agents = self.agents.write().unwrap_or_else(|p| p.into_inner());
        if agents.len() < MAX_AGENT_SERIALS || agents.contains_key(&serial) {
            agents.insert(serial, id.clone());
        }
    }

    /// The workspace an agent certificate with `serial` was seen to belong to.
    pub fn agent_of(&self, serial: &str) -> Option<WorkspaceIdentity> {
        self.agents.read().unwrap_or_else(|p| p.into_inner()).get(&normalize_serial(serial)).cloned()
    }
}

/// May a project admin revoke `serial` as a certificate of workspace `ws`? Only when it is known
/// to be that workspace's: its current serial as the controller recorded it, or a serial an
/// agent of that workspace authenticated with. Anything else (another project's agent, the
/// operator's client certificate, a serial nobody has seen) is not theirs to revoke.
pub fn belongs_to(
    serial: &str,
    ws: &WorkspaceIdentity,
    current: Option<&str>,
    seen: Option<&WorkspaceIdentity>,
) -> bool {
    let serial = normalize_serial(serial);
    current.is_some_and(|c| normalize_serial(c) == serial) || seen == Some(ws)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_ignore_case_and_leading_zero_bytes() {
        let set = RevocationSet::new(["00AB12".to_owned()]);
        assert!(set.contains("ab12"));
        assert!(!set.contains("ab13"));
        set.insert("CD");
        assert!(set.clone().contains("00cd"));
    }

    #[test]
    fn a_serial_belongs_to_a_workspace_only_when_known_to() {
        let a = WorkspaceIdentity { project: "ward-7".into(), name: "alice-r".into() };
        let b = WorkspaceIdentity { project: "ward-9".into(), name: "bob-r".into() };
        let set = RevocationSet::default();
        set.record_agent("00AB12", &a);
        assert_eq!(set.agent_of("ab12"), Some(a.clone()));
        assert!(belongs_to("ab12", &a, None, set.agent_of("ab12").as_ref()));
        assert!(!belongs_to("ab12", &b, None, set.agent_of("ab12").as_ref()), "another project's serial");
        assert!(belongs_to("0A0B", &b, Some("0a0b"), None), "the current serial from the status");
        assert!(!belongs_to("0c0d", &b, Some("0a0b"), None), "a serial nobody has seen");
    }
}
