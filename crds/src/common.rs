//! Types shared by several resources.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// What a person may do in a project. Everything not granted to a role is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    /// Works inside workspaces; submits outputs to the airlock.
    Researcher,
    /// Data steward: registers datasets and requests workspaces.
    DataAnalyst,
    /// Approves requests, manages members.
    Admin,
    /// Reviews airlock output requests.
    OutputChecker,
    /// Reads and verifies the audit log.
    Auditor,
    /// Operates the platform; sees status, never data.
    Sre,
}

impl Role {
    pub const ALL: [Role; 6] =
        [Role::Researcher, Role::DataAnalyst, Role::Admin, Role::OutputChecker, Role::Auditor, Role::Sre];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Researcher => "researcher",
            Role::DataAnalyst => "dataAnalyst",
            Role::Admin => "admin",
            Role::OutputChecker => "outputChecker",
            Role::Auditor => "auditor",
            Role::Sre => "sre",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str().eq_ignore_ascii_case(s) || r.as_str().eq_ignore_ascii_case(&s.replace(['-', '_'], "")))
            .ok_or_else(|| {
                format!("unknown role {s:?} (one of researcher, dataAnalyst, admin, outputChecker, auditor, sre)")
            })
    }
}

/// Standard condition types used across noexit resources.
pub mod condition {
    pub const READY: &str = "Ready";
    pub const PROGRESSING: &str = "Progressing";
    pub const DEGRADED: &str = "Degraded";
    pub const PROVISIONED: &str = "Provisioned";
    pub const EGRESS_LOCKED: &str = "EgressLocked";
    pub const AGENT_CONNECTED: &str = "AgentConnected";
    pub const APPROVED: &str = "Approved";
    pub const DENIED: &str = "Denied";
    pub const FULFILLED: &str = "Fulfilled";
    pub const VALID: &str = "Valid";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_leniently_and_print_canonically() {
        assert_eq!("data-analyst".parse::<Role>(), Ok(Role::DataAnalyst));
        assert_eq!("outputChecker".parse::<Role>(), Ok(Role::OutputChecker));
        assert_eq!("SRE".parse::<Role>(), Ok(Role::Sre));
        assert!("root".parse::<Role>().is_err());
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
    }
}
