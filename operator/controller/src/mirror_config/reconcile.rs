//! Reconcile the one ConfigMap: list the Projects and the workspace pods, render, and
//! server-side apply only when the rendered data differs from the live one.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{ListParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use noexit_crds::Project;

use super::render::{desired_config, workspace_pod_selector};
use crate::context::{Context, Outcome, RESYNC, key_of};
use crate::error::Error;
use crate::mirror_config::deploy::CONFIG_MAP;

/// Metrics kind.
pub const KIND: &str = "mirror-config";

pub async fn reconcile(live: Arc<ConfigMap>, ctx: Arc<Context>) -> Result<Action, Error> {
    // The watch is narrowed to this one name by a field selector; a server that ignores it
    // must not make us write other ConfigMaps.
    if live.name_any() != CONFIG_MAP || live.namespace().as_deref() != Some(ctx.operator_namespace.as_str()) {
        return Ok(Action::await_change());
    }
    let key = format!("ConfigMap {}", key_of(live.as_ref()));
    ctx.instrumented(KIND, &key, sync(&live, &ctx)).await
}

pub fn error_policy(live: Arc<ConfigMap>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.retry_after_failure(&format!("ConfigMap {}", key_of(live.as_ref())), error)
}

async fn sync(live: &ConfigMap, ctx: &Context) -> Result<Outcome, Error> {
    let projects: Vec<Project> = Api::<DeserializeGuard<Project>>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| Error::kube("list", "projects", e))?
        .items
        .into_iter()
        // A Project that does not parse gets no policy: its workspaces are refused.
        .filter_map(|p| p.0.ok())
        .collect();
    let selector = workspace_pod_selector();
    let pods: Vec<Pod> = Api::<Pod>::all(ctx.client.clone())
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|e| Error::kube("list", format!("pods ({selector})"), e))?
        .items;
    let desired = desired_config(&ctx.site, &ctx.operator_namespace, &projects, &pods);
    if desired.data == live.data {
        return Ok(Outcome::requeue(RESYNC));
    }
    let api = Api::<ConfigMap>::namespaced(ctx.client.clone(), &ctx.operator_namespace);
    let params = PatchParams::apply(crate::FIELD_MANAGER).force();
    api.patch(CONFIG_MAP, &params, &Patch::Apply(&desired))
        .await
        .map_err(|e| Error::kube("apply", format!("ConfigMap {}/{CONFIG_MAP}", ctx.operator_namespace), e))?;
    tracing::info!(
        configmap = CONFIG_MAP,
        projects = projects.len(),
        workspace_pods = pods.len(),
        "mirror policy and clients updated"
    );
    Ok(Outcome::requeue(RESYNC))
}
