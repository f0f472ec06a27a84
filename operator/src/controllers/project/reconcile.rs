//! Project: load datasets → validate → build → apply → prune → status. No finalizer: every
//! child is in the cluster and owned through an owner reference.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{LimitRange, PersistentVolume, PersistentVolumeClaim, ResourceQuota, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::ListParams;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use noexit_crds::common::condition;
use noexit_crds::names::project_namespace;
use noexit_crds::{Dataset, Project, Workspace};

use super::{build, status, validate};
use crate::controllers::apply::{Scope, apply_all, prune};
use crate::controllers::children::Owner;
use crate::controllers::conditions::transitions;
use crate::controllers::context::{Context, Outcome, RESYNC, key_of};
use crate::controllers::error::{Error, is_not_found};

pub const KIND: &str = "Project";

pub async fn reconcile(guard: Arc<DeserializeGuard<Project>>, ctx: Arc<Context>) -> Result<Action, Error> {
    let project = match &guard.0 {
        Ok(p) => p,
        Err(bad) => return Ok(ctx.malformed::<Project>(KIND, bad).await),
    };
    let key = format!("{KIND} {}", key_of(project));
    ctx.instrumented(KIND, &key, reconcile_project(project, &ctx)).await
}

pub fn error_policy(guard: Arc<DeserializeGuard<Project>>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.retry_after_failure(&format!("{KIND} {}", key_of(guard.as_ref())), error)
}

/// Where a Project's children live (for pruning). The Namespace itself is always built.
pub fn scopes(namespace: &str) -> Vec<Scope> {
    let ns = Some(namespace);
    vec![
        Scope::of::<ServiceAccount>(ns),
        Scope::of::<ResourceQuota>(ns),
        Scope::of::<LimitRange>(ns),
        Scope::of::<NetworkPolicy>(ns),
        Scope::of::<Role>(ns),
        Scope::of::<RoleBinding>(ns),
        Scope::of::<PersistentVolumeClaim>(ns),
        Scope::of::<PersistentVolume>(None),
    ]
}

async fn reconcile_project(p: &Project, ctx: &Context) -> Result<Outcome, Error> {
    let api: Api<Project> = Api::all(ctx.client.clone());
    if p.metadata.deletion_timestamp.is_some() {
        // Garbage collection removes the children through their owner references.
        return Ok(Outcome::await_change());
    }
    let result = provision(p, &api, ctx).await;
    if let Err(e) = &result {
        let live = p.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
        ctx.report_failure(&api, p, &live, e).await;
    }
    result
}

async fn provision(p: &Project, api: &Api<Project>, ctx: &Context) -> Result<Outcome, Error> {
    let name = p.name_any();
    let now = ctx.now();
    let datasets = Api::<Dataset>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| Error::kube("list", "datasets", e))?
        .items;
    let (new, outcome) = match validate(p, &datasets, now.date_naive()) {
        Err(problem) => (status::invalid(p, &problem, now), Outcome::invalid()),
        Ok(resolved) => {
            let ns = project_namespace(&name);
            let children = build(p, &resolved, &ctx.site)?;
            apply_all(&ctx.client, &children).await?;
            let owner = Owner::of(p, &name);
            let pruned = prune(&ctx.client, &owner.selector(), &scopes(&ns), &children).await?;
            if !pruned.is_empty() {
                ctx.event(&p.object_ref(&()), false, "Pruned", format!("deleted {}", pruned.join(", "))).await;
            }
            let workspaces =
                match Api::<Workspace>::namespaced(ctx.client.clone(), &ns).list_metadata(&ListParams::default()).await
                {
                    // A terminating workspace no longer counts (its removal wakes no one).
                    Ok(list) => list.items.iter().filter(|w| w.metadata.deletion_timestamp.is_none()).count(),
                    Err(e) if is_not_found(&e) => 0,
                    Err(e) => return Err(Error::kube("list", format!("workspaces in {ns}"), e)),
                };
            let count = u32::try_from(workspaces).unwrap_or(u32::MAX);
            (status::provisioned(p, &resolved, count, now), Outcome::requeue(RESYNC))
        }
    };
    let old = p.status.clone().unwrap_or_default();
    if new != old {
        let value = serde_json::to_value(&new).map_err(|e| Error::Internal(e.to_string()))?;
        ctx.apply_status(api, p, value).await?;
        let regarding = p.object_ref(&());
        for c in transitions(&old.conditions, &new.conditions).into_iter().filter(|c| c.type_ == condition::READY) {
            ctx.event(&regarding, c.status != "True", &c.reason, c.message.clone()).await;
        }
    }
    Ok(outcome)
}
