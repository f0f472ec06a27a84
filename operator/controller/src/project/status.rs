//! The Project status: its namespace, counts, the datasets both keys granted, and conditions.

use chrono::{DateTime, Utc};
use kube::ResourceExt;
use noexit_crds::common::condition;
use noexit_crds::names::project_namespace;
use noexit_crds::{Project, ProjectStatus};

use super::validate::ResolvedProject;
use crate::conditions::{Desired, merge};
use crate::invalid::Invalid;

/// Domain condition: every dataset the project lists is granted by its steward.
pub const DATASETS_GRANTED: &str = "DatasetsGranted";

/// Status of a valid project whose children were applied.
pub fn provisioned(p: &Project, resolved: &ResolvedProject, workspaces: u32, now: DateTime<Utc>) -> ProjectStatus {
    let ready = if resolved.expired {
        Desired::new(
            condition::READY,
            false,
            "ApprovalExpired",
            format!("the approval expired on {}; workspaces are stopped", p.spec.approval.expires),
        )
    } else {
        Desired::new(condition::READY, true, "Provisioned", "namespace, quota, network policies and RBAC applied")
    };
    let granted = if resolved.ungranted.is_empty() {
        Desired::new(DATASETS_GRANTED, true, "AllGranted", "")
    } else {
        Desired::new(
            DATASETS_GRANTED,
            false,
            "DatasetNotGranted",
            format!("not granted by their steward (or missing): {}", resolved.ungranted.join(", ")),
        )
    };
    let desired = [
        ready,
        Desired::new(condition::PROGRESSING, false, "Reconciled", ""),
        Desired::new(condition::DEGRADED, false, "Reconciled", ""),
        granted,
    ];
    ProjectStatus {
        observed_generation: p.metadata.generation,
        conditions: merge(&live(p), &desired, p.metadata.generation, now),
        namespace: Some(project_namespace(&p.name_any())),
        member_count: u32::try_from(p.spec.members.len()).ok(),
        workspace_count: Some(workspaces),
        granted_datasets: resolved.datasets.iter().map(|d| d.name_any()).collect(),
    }
}

/// Status of a project that is invalid as written: nothing is built.
pub fn invalid(p: &Project, problem: &Invalid, now: DateTime<Utc>) -> ProjectStatus {
    let reason = problem.reason.as_str();
    let desired = [
        Desired::new(condition::READY, false, reason, problem.to_string()),
        Desired::new(condition::PROGRESSING, false, reason, "waiting for the project to change"),
        Desired::new(condition::DEGRADED, false, "Reconciled", ""),
    ];
    ProjectStatus {
        observed_generation: p.metadata.generation,
        conditions: merge(&live(p), &desired, p.metadata.generation, now),
        ..p.status.clone().unwrap_or_default()
    }
}

fn live(p: &Project) -> Vec<noexit_crds::Condition> {
    p.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default()
}
