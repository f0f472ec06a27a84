//! WorkspaceRequest: load the project → validate the request and its decision → on approval,
//! create the Workspace once → status (`Fulfilled`, `Ready`, `decision`). The admin's
//! `Approved` / `Denied` conditions are kept as they are.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use kube::api::PostParams;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use noexit_crds::common::condition;
use noexit_crds::workspace_request::Decision;
use noexit_crds::{Project, Workspace, WorkspaceRequest, WorkspaceRequestStatus};

use super::{build, decision, validate};
use crate::children::labels;
use crate::conditions::{Desired, is_true, merge, transitions};
use crate::context::{Context, Outcome, key_of};
use crate::error::{Error, is_conflict};
use crate::invalid::Reason;

pub const KIND: &str = "WorkspaceRequest";

pub async fn reconcile(guard: Arc<DeserializeGuard<WorkspaceRequest>>, ctx: Arc<Context>) -> Result<Action, Error> {
    let req = match &guard.0 {
        Ok(r) => r,
        Err(bad) => return Ok(ctx.malformed::<WorkspaceRequest>(KIND, bad).await),
    };
    let key = format!("{KIND} {}", key_of(req));
    ctx.instrumented(KIND, &key, reconcile_request(req, &ctx)).await
}

pub fn error_policy(guard: Arc<DeserializeGuard<WorkspaceRequest>>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.retry_after_failure(&format!("{KIND} {}", key_of(guard.as_ref())), error)
}

/// Where the request stands, as the controller sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stage {
    AwaitingDecision,
    Denied,
    /// The decision or the request breaks a rule (self-approval, non-admin, …).
    Refused {
        reason: Reason,
        message: String,
    },
    /// The Workspace exists (created by this request).
    Fulfilled {
        workspace: String,
    },
    /// A Workspace of that name exists but was not created by this request.
    NameTaken {
        workspace: String,
    },
}

pub fn compute(req: &WorkspaceRequest, stage: &Stage, now: DateTime<Utc>) -> WorkspaceRequestStatus {
    let (fulfilled, ready) = match stage {
        Stage::AwaitingDecision => (
            Desired::new(condition::FULFILLED, false, "AwaitingDecision", "waiting for an admin to approve or deny"),
            Desired::new(condition::READY, false, "AwaitingDecision", ""),
        ),
        Stage::Denied => (
            Desired::new(condition::FULFILLED, false, "Denied", "an admin denied this request"),
            Desired::new(condition::READY, false, "Denied", ""),
        ),
        Stage::Refused { reason, message } => (
            Desired::new(condition::FULFILLED, false, reason.as_str(), message.clone()),
            Desired::new(condition::READY, false, reason.as_str(), "the request or its decision is refused"),
        ),
        Stage::Fulfilled { workspace } => (
            Desired::new(condition::FULFILLED, true, "WorkspaceCreated", format!("created workspace {workspace}")),
            Desired::new(condition::READY, true, "WorkspaceCreated", ""),
        ),
        Stage::NameTaken { workspace } => (
            Desired::new(
                condition::FULFILLED,
                false,
                "WorkspaceExists",
                format!("workspace {workspace} already exists and was not created by this request"),
            ),
            Desired::new(condition::READY, false, "WorkspaceExists", ""),
        ),
    };
    let live = req.status.clone().unwrap_or_default();
    WorkspaceRequestStatus {
        observed_generation: req.metadata.generation,
        conditions: merge(&live.conditions, &[fulfilled, ready], req.metadata.generation, now),
        decision: decision(req),
        decided_by: live.decided_by,
    }
}

async fn reconcile_request(req: &WorkspaceRequest, ctx: &Context) -> Result<Outcome, Error> {
    let ns = req.namespace().ok_or_else(|| Error::Internal(format!("request {} has no namespace", req.name_any())))?;
    let api: Api<WorkspaceRequest> = Api::namespaced(ctx.client.clone(), &ns);
    let result = decide(req, &ns, &api, ctx).await;
    if let Err(e) = &result {
        let live = req.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
        ctx.report_failure(&api, req, &live, e).await;
    }
    result
}

async fn decide(
    req: &WorkspaceRequest,
    ns: &str,
    api: &Api<WorkspaceRequest>,
    ctx: &Context,
) -> Result<Outcome, Error> {
    let live_conditions = req.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
    if is_true(&live_conditions, condition::FULFILLED) {
        // Fulfilled once; deleting the Workspace later must not bring it back.
        return Ok(Outcome::await_change());
    }
    let project = Api::<Project>::all(ctx.client.clone())
        .get_opt(&req.spec.workspace.project)
        .await
        .map_err(|e| Error::kube("read", format!("project {}", req.spec.workspace.project), e))?;
    let stage = match validate(req, project.as_ref()) {
        Err(problem) => Stage::Refused { reason: problem.reason, message: problem.to_string() },
        Ok(()) => match decision(req) {
            None => Stage::AwaitingDecision,
            Some(Decision::Denied) => Stage::Denied,
            Some(Decision::Approved) => match build(req, project.as_ref()) {
                Some(ws) => create_once(req, ns, &ws, ctx).await?,
                None => Stage::AwaitingDecision,
            },
        },
    };
    let new = compute(req, &stage, ctx.now());
    let old = req.status.clone().unwrap_or_default();
    if new != old {
        let value = serde_json::to_value(&new).map_err(|e| Error::Internal(e.to_string()))?;
        ctx.apply_status(api, req, value).await?;
        for c in transitions(&old.conditions, &new.conditions).into_iter().filter(|c| c.type_ == condition::FULFILLED) {
            let warning = matches!(stage, Stage::Refused { .. } | Stage::NameTaken { .. });
            ctx.event(&req.object_ref(&()), warning, &c.reason, c.message.clone()).await;
        }
    }
    Ok(match stage {
        Stage::Refused { .. } | Stage::NameTaken { .. } => Outcome::invalid(),
        _ => Outcome::await_change(),
    })
}

/// Create the Workspace unless it exists; an existing one counts only if this request made it.
async fn create_once(req: &WorkspaceRequest, ns: &str, ws: &Workspace, ctx: &Context) -> Result<Stage, Error> {
    let name = ws.name_any();
    let what = format!("{ns}/{name}");
    let api: Api<Workspace> = Api::namespaced(ctx.client.clone(), ns);
    let params = PostParams { field_manager: Some(crate::FIELD_MANAGER.into()), ..PostParams::default() };
    let existing = match api.create(&params, ws).await {
        Ok(_) => {
            tracing::info!(request = %key_of(req), workspace = %what, "created the approved workspace");
            return Ok(Stage::Fulfilled { workspace: what });
        }
        Err(e) if is_conflict(&e) => {
            api.get(&name).await.map_err(|e| Error::kube("read", format!("workspace {what}"), e))?
        }
        Err(e) => return Err(Error::kube("create", format!("workspace {what}"), e)),
    };
    let ours = existing.labels().get(labels::REQUEST) == Some(&req.name_any());
    Ok(if ours { Stage::Fulfilled { workspace: what } } else { Stage::NameTaken { workspace: what } })
}
