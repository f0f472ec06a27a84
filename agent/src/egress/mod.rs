//! The in-guest egress lock (VM mode, agent is root): an nftables table `inet noexit` that lets
//! the workspace reach only loopback, its DNS resolvers, the package mirror and the control
//! plane, and accepts inbound only the desktop port from the gateway.
//!
//! - [`plan`] (pure) computes the table from the config;
//! - [`EgressLock`] applies it atomically, compares the live table with it and restores it;
//! - [`watch`] is the loop the agent spawns: it re-checks the table as soon as the kernel reports
//!   an nftables change ([`monitor`], netlink) and on an interval as a backstop, publishes
//!   [`EgressState`] and sends `tamper` / `egressBlocked` [`Violation`]s.
//!
//! [`EgressState`]: noexit_crds::agent::EgressState
//! [`Violation`]: noexit_crds::agent::Violation

mod live;
mod lock;
pub mod monitor;
mod plan;
mod watch;

pub use lock::{BlockedCounts, CheckOutcome, EgressLock, not_locked};
pub use plan::{BLOCKED_IN, BLOCKED_OUT, LOG_PREFIX, Net, Ruleset, TABLE, plan};
pub use watch::{DEFAULT_BLOCKED_REPORT_EVERY, WatchOptions, watch, watch_with};

/// Why the lock could not be planned, applied or confirmed.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("invalid agent config: {field}: {reason}")]
    Config { field: String, reason: String },
    #[error("{action}: {message}")]
    Nft { action: &'static str, message: String },
    #[error("egress table not as planned after applying it: {0}")]
    Verify(String),
}

impl EgressError {
    /// Fixed set of values for metric labels.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Config { .. } => "config",
            Self::Nft { .. } => "nft",
            Self::Verify(_) => "verify",
        }
    }
}
