//! The Workspace status the controller owns, computed only from what was validated and applied
//! and from the agent's last report (written by the API under its own field manager).

use chrono::{DateTime, Utc};
use kube::ResourceExt;
use noexit_crds::common::condition;
use noexit_crds::workspace::{Phase, Runtime};
use noexit_crds::{Workspace, WorkspaceStatus};

use super::build::desktop_service_name;
use super::validate::ResolvedWorkspace;
use crate::apply::Applied;
use crate::conditions::{Desired, merge};
use crate::site::Site;

/// A heartbeat older than this means the agent is not connected.
pub const AGENT_STALE_AFTER: chrono::Duration = chrono::Duration::seconds(60);

/// What a reconcile pass found and did.
pub struct Observed<'a> {
    pub resolved: &'a ResolvedWorkspace,
    pub applied: &'a Applied,
    /// The pod / VM should be running (`build::should_run`).
    pub running: bool,
    pub serial: &'a str,
    pub now: DateTime<Utc>,
}

/// The status to apply (without `agent`, which the API owns).
pub fn compute(ws: &Workspace, site: &Site, seen: &Observed<'_>) -> WorkspaceStatus {
    let live = ws.status.clone().unwrap_or_default();
    let (phase, desired) = conditions(ws, seen);
    let endpoint = format!(
        "{}.{}.svc:{}",
        desktop_service_name(&ws.name_any()),
        ws.namespace().unwrap_or_default(),
        site.desktop_port
    );
    WorkspaceStatus {
        observed_generation: ws.metadata.generation,
        phase: Some(phase),
        conditions: merge(&live.conditions, &desired, ws.metadata.generation, seen.now),
        endpoint: Some(endpoint),
        agent: None,
        agent_certificate_serial: Some(seen.serial.to_owned()),
    }
}

fn conditions(ws: &Workspace, seen: &Observed<'_>) -> (Phase, Vec<Desired>) {
    let ok = |t, reason: &str, message: String| Desired::new(t, true, reason, message);
    let no = |t, reason: &str, message: String| Desired::new(t, false, reason, message);
    let degraded = no(condition::DEGRADED, "Reconciled", String::new());
    let applied = format!("applied {} objects", seen.applied.applied.len());

    if let Some(problem) = seen.resolved.blocked() {
        let reason = problem.reason.as_str();
        let message = problem.to_string();
        let withheld = match ws.spec.runtime {
            Runtime::Pod => "no pod is created",
            Runtime::Vm => "the virtual machine is halted",
        };
        return (
            Phase::Failed,
            vec![
                no(condition::READY, reason, format!("{message}; {withheld} until this is fixed")),
                no(
                    condition::PROGRESSING,
                    reason,
                    "waiting for the workspace, its project or datasets to change".into(),
                ),
                degraded,
                no(condition::PROVISIONED, reason, format!("{applied}; {withheld}")),
            ],
        );
    }
    if seen.resolved.expired {
        let message = "spec.lifecycle.expires has passed; the workspace is stopped, its home volume kept".to_owned();
        return (
            Phase::Expired,
            vec![
                no(condition::READY, "Expired", message.clone()),
                no(condition::PROGRESSING, "Expired", message),
                degraded,
                ok(condition::PROVISIONED, "Stopped", applied),
            ],
        );
    }
    if !seen.running {
        let message = "spec.lifecycle.running is false; the workspace is stopped, its home volume kept".to_owned();
        return (
            Phase::Stopped,
            vec![
                no(condition::READY, "Stopped", message.clone()),
                no(condition::PROGRESSING, "Stopped", message),
                degraded,
                ok(condition::PROVISIONED, "Stopped", applied),
            ],
        );
    }
    if !seen.applied.waiting.is_empty() {
        let message = format!("replacing {} (spec changed)", seen.applied.waiting.join(", "));
        return (
            Phase::Provisioning,
            vec![
                no(condition::READY, "Replacing", message.clone()),
                ok(condition::PROGRESSING, "Replacing", message.clone()),
                degraded,
                no(condition::PROVISIONED, "Replacing", message),
            ],
        );
    }

    let agent = ws.status.as_ref().and_then(|s| s.agent.as_ref());
    let connected = agent.is_some_and(|a| seen.now - a.last_heartbeat < AGENT_STALE_AFTER);
    let locked = connected && agent.is_some_and(|a| a.egress_locked);
    let agent_condition = match agent {
        None => no(condition::AGENT_CONNECTED, "NoHeartbeat", "the agent has not reported yet".into()),
        Some(a) if !connected => no(
            condition::AGENT_CONNECTED,
            "HeartbeatStale",
            format!("last heartbeat at {}", a.last_heartbeat.to_rfc3339()),
        ),
        Some(a) => ok(condition::AGENT_CONNECTED, "Heartbeat", format!("agent {} reporting", a.version)),
    };
    let egress_condition = match agent {
        Some(a) if locked => ok(
            condition::EGRESS_LOCKED,
            "Confirmed",
            a.egress_detail.clone().unwrap_or_else(|| "the agent confirmed the egress wall".into()),
        ),
        Some(a) if connected => no(
            condition::EGRESS_LOCKED,
            "NotConfirmed",
            a.egress_detail.clone().unwrap_or_else(|| "the agent has not confirmed the egress wall".into()),
        ),
        _ => no(condition::EGRESS_LOCKED, "Unknown", "no current agent report".into()),
    };
    let (phase, ready, progressing) = if locked {
        (
            Phase::Running,
            ok(condition::READY, "Running", "the agent is connected and the egress wall holds".into()),
            no(condition::PROGRESSING, "Running", String::new()),
        )
    } else {
        let why = if connected { "WaitingForEgressLock" } else { "WaitingForAgent" };
        (
            Phase::Provisioning,
            no(condition::READY, why, "provisioned; waiting for the agent to confirm the egress wall".into()),
            ok(condition::PROGRESSING, why, applied.clone()),
        )
    };
    (
        phase,
        vec![
            ready,
            progressing,
            degraded,
            ok(condition::PROVISIONED, "Applied", applied),
            agent_condition,
            egress_condition,
        ],
    )
}

/// The live status as far as the controller owns it, for change detection.
pub fn owned_part(ws: &Workspace) -> WorkspaceStatus {
    WorkspaceStatus { agent: None, ..ws.status.clone().unwrap_or_default() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invalid::{Invalid, Reason};
    use crate::testdata;
    use noexit_crds::workspace::AgentReport;

    fn now() -> DateTime<Utc> {
        "2026-11-22T10:00:00Z".parse().expect("time")
    }

    fn ready(s: &WorkspaceStatus) -> (&str, &str) {
        let c = s.conditions.iter().find(|c| c.type_ == "Ready").expect("Ready");
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn ready_only_when_the_agent_confirms_the_wall() {
        let mut ws = testdata::workspaces().remove(0);
        ws.metadata.generation = Some(3);
        let resolved = ResolvedWorkspace::default();
        let applied = Applied { applied: vec!["Pod x".into()], ..Applied::default() };
        let seen = Observed { resolved: &resolved, applied: &applied, running: true, serial: "0a", now: now() };
        let s = compute(&ws, &Site::default(), &seen);
        assert_eq!(ready(&s), ("False", "WaitingForAgent"));
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.endpoint.as_deref(), Some("ws-alice-r-desktop.noexit-ward-7.svc:5901"));

        ws.status = Some(WorkspaceStatus {
            agent: Some(AgentReport {
                last_heartbeat: now() - chrono::Duration::seconds(5),
                version: "0.1.0".into(),
                egress_locked: true,
                ..AgentReport::default()
            }),
            ..s.clone()
        });
        let s2 = compute(&ws, &Site::default(), &seen);
        assert_eq!(ready(&s2), ("True", "Running"));
        assert_eq!(s2.phase, Some(Phase::Running));
        assert!(s2.agent.is_none(), "the agent report belongs to the API");
    }

    #[test]
    fn blocked_stopped_and_expired() {
        let ws = testdata::workspaces().remove(0);
        let applied = Applied::default();
        let blocked = ResolvedWorkspace {
            problems: vec![Invalid::new(
                "workspace ward-7/alice-r",
                "spec.datasets[0]",
                Reason::DatasetNotGranted,
                "no",
            )],
            ..ResolvedWorkspace::default()
        };
        let seen = |r, running| Observed { resolved: r, applied: &applied, running, serial: "0a", now: now() };
        let s = compute(&ws, &Site::default(), &seen(&blocked, false));
        assert_eq!(ready(&s), ("False", "DatasetNotGranted"));
        assert_eq!(s.phase, Some(Phase::Failed));
        let fine = ResolvedWorkspace::default();
        assert_eq!(compute(&ws, &Site::default(), &seen(&fine, false)).phase, Some(Phase::Stopped));
        let expired = ResolvedWorkspace { expired: true, ..ResolvedWorkspace::default() };
        assert_eq!(compute(&ws, &Site::default(), &seen(&expired, false)).phase, Some(Phase::Expired));
    }
}
