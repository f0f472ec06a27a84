//! Project: load datasets → validate → build → apply → prune → status. No finalizer: every
//! child is in the cluster and owned through an owner reference.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    LimitRange, Namespace, PersistentVolume, PersistentVolumeClaim, ResourceQuota, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{ListParams, PostParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use noexit_crds::common::condition;
use noexit_crds::names::project_namespace;
use noexit_crds::{Dataset, Project, Workspace};

use super::build::{CONTROLLER_BINDING, owns_namespace};
use super::{build, status, validate};
use crate::apply::{Scope, apply_all, prune};
use crate::children::Child;
use crate::children::Owner;
use crate::conditions::transitions;
use crate::context::{Context, Outcome, RESYNC, key_of};
use crate::error::{Error, is_conflict, is_not_found};
use crate::invalid::{Invalid, Reason, describe};

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
    let ns = project_namespace(&name);
    let checked = match validate(p, &datasets, &ctx.site.operator_namespace, now.date_naive()) {
        Err(problem) => Err((problem, Outcome::invalid())),
        Ok(resolved) => {
            let children = build(p, &resolved, &ctx.site)?;
            match claim_namespace(p, &ns, &children, ctx).await? {
                // Someone else's namespace: look again later (its deletion does not wake us).
                Err(problem) => Err((problem, Outcome::requeue(RESYNC))),
                Ok(()) => Ok((resolved, children)),
            }
        }
    };
    let (new, outcome) = match checked {
        Err((problem, outcome)) => (status::invalid(p, &problem, now), outcome),
        Ok((resolved, children)) => {
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

/// Make sure the project namespace is noexit's before anything is applied into it: create it
/// (a plain POST, which fails if it exists, so a namespace made in between is never adopted)
/// when absent, refuse when it exists without this Project's owner reference, and create the
/// controller's own RoleBinding in it (a POST too: until it exists the controller has no rights
/// there to patch with).
async fn claim_namespace(
    p: &Project,
    ns: &str,
    children: &[Child],
    ctx: &Context,
) -> Result<Result<(), Invalid>, Error> {
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    let what = format!("Namespace {ns}");
    let live = namespaces.get_opt(ns).await.map_err(|e| Error::kube("read", &what, e))?;
    let live = match live {
        Some(live) => Some(live),
        None => {
            let built = children
                .iter()
                .find(|c| c.kind() == "Namespace")
                .ok_or_else(|| Error::Internal(format!("project {}: no namespace was built", p.name_any())))?;
            let object: Namespace = serde_json::to_value(&built.object)
                .and_then(serde_json::from_value)
                .map_err(|e| Error::Internal(e.to_string()))?;
            match namespaces.create(&PostParams::default(), &object).await {
                Ok(_) => None,
                Err(e) if is_conflict(&e) => Some(namespaces.get(ns).await.map_err(|e| Error::kube("read", &what, e))?),
                Err(e) => return Err(Error::kube("create", &what, e)),
            }
        }
    };
    if let Some(live) = live
        && !owns_namespace(p, &live)
    {
        return Ok(Err(Invalid::new(
            describe("project", None, &p.name_any()),
            "metadata.name",
            Reason::NamespaceNotOwned,
            format!(
                "namespace {ns:?} already exists and was not created by noexit for this project (no owner reference to it); noexit will not adopt or change it: rename the project, or remove the namespace if it is an old one"
            ),
        )));
    }
    if let Some(binding) = children.iter().find(|c| c.kind() == "RoleBinding" && c.name() == CONTROLLER_BINDING) {
        let api: Api<kube::core::DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &binding.resource);
        match api.create(&PostParams::default(), &binding.object).await {
            Ok(_) => tracing::info!(namespace = ns, "controller bound in the project namespace"),
            Err(e) if is_conflict(&e) => {}
            Err(e) => return Err(Error::kube("create", binding.describe(), e)),
        }
    }
    Ok(Ok(()))
}
