//! The walls around the workspace: the nftables egress lock (VM), the pod-mode probe, and the
//! desktop/device hardening. They are written in `egress/`, `probe.rs` and `hardening.rs`; this
//! module starts them and hands the agent their state (for heartbeats) and violations (for the
//! spool). Until a guard has confirmed the wall, the egress state says `locked: false`, so the
//! workspace is not Ready: fail closed.

use std::path::PathBuf;
use std::time::Duration;

use noexit_crds::agent::{AgentConfig, AgentMode, EgressState, HardeningState, Violation};
use tokio::sync::{mpsc, watch};

/// Live state of the guards and the violations they report.
pub struct Guards {
    pub egress: watch::Receiver<EgressState>,
    pub hardening: watch::Receiver<HardeningState>,
    pub violations: mpsc::Receiver<Violation>,
}

fn unconfirmed(mode: AgentMode, detail: &str) -> EgressState {
    EgressState { locked: false, mode, detail: Some(detail.into()), blocked_since_last: 0 }
}

/// Start the guards for `cfg`. `root` is where hardening writes desktop settings (`/`).
pub fn start(cfg: &AgentConfig, root: PathBuf, interval: Duration) -> Guards {
    let (vtx, violations) = mpsc::channel(64);
    let (etx, egress) = watch::channel(unconfirmed(cfg.mode, "egress lock not confirmed yet"));
    let (htx, hardening) = watch::channel(HardeningState::default());
    match cfg.mode {
        AgentMode::Vm => match crate::egress::EgressLock::new(cfg) {
            Ok(lock) => {
                tokio::spawn(crate::egress::watch(lock, interval, vtx.clone(), etx));
            }
            Err(e) => {
                tracing::error!(error = %e, "egress lock cannot be planned; the workspace stays not Ready");
                let _ = etx.send(crate::egress::not_locked(&e));
            }
        },
        AgentMode::Pod => {
            tokio::spawn(crate::probe::watch(cfg.clone(), interval, etx));
        }
    }
    tokio::spawn(crate::hardening::watch(cfg.clone(), root, interval, vtx, htx));
    Guards { egress, hardening, violations }
}
