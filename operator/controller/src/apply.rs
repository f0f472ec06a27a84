//! Server-side apply of built children, in the order `build` returns them, with the one
//! `FIELD_MANAGER`; replacement of Pods whose spec changed; pruning of children that carry our
//! labels but were not built this pass.

use std::collections::BTreeSet;

use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject};
use kube::{Api, Client, ResourceExt};

use crate::FIELD_MANAGER;
use crate::children::{Child, annotations};
use crate::error::{Error, is_not_found};

/// What an apply pass did, for status and logs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// `Kind ns/name` of every child applied.
    pub applied: Vec<String>,
    /// Pods deleted because their spec changed, or still terminating: applied on a later pass.
    pub waiting: Vec<String>,
    /// Children deleted because they were not built this pass.
    pub pruned: Vec<String>,
}

/// Where a kind of child may live: the resource and its namespace (`None`: cluster-scoped).
#[derive(Clone, Debug)]
pub struct Scope {
    pub resource: ApiResource,
    pub namespace: Option<String>,
}

impl Scope {
    pub fn of<K: kube::Resource<DynamicType = ()>>(namespace: Option<&str>) -> Self {
        Self { resource: ApiResource::erase::<K>(&()), namespace: namespace.map(str::to_owned) }
    }
}

fn api(client: &Client, resource: &ApiResource, namespace: Option<&str>) -> Api<DynamicObject> {
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, resource),
        None => Api::all_with(client.clone(), resource),
    }
}

fn spec_hash(obj: &DynamicObject) -> Option<&str> {
    obj.metadata.annotations.as_ref()?.get(annotations::SPEC_HASH).map(String::as_str)
}

/// Apply every child in order. A Pod whose built spec hash differs from the live one is
/// deleted and left for a later pass (pod specs are immutable).
pub async fn apply_all(client: &Client, children: &[Child]) -> Result<Applied, Error> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut out = Applied::default();
    for child in children {
        let what = child.describe();
        let name = child.name();
        let api = api(client, &child.resource, child.namespace());
        if child.kind() == "Pod" {
            let live = api.get_opt(&name).await.map_err(|e| Error::kube("read", &what, e))?;
            if let Some(live) = live {
                if live.metadata.deletion_timestamp.is_some() {
                    out.waiting.push(what);
                    continue;
                }
                if spec_hash(&live) != spec_hash(&child.object) {
                    tracing::info!(child = %what, "pod spec changed: replacing the pod");
                    match api.delete(&name, &DeleteParams::default()).await {
                        Ok(_) => {}
                        Err(e) if is_not_found(&e) => {}
                        Err(e) => return Err(Error::kube("delete", &what, e)),
                    }
                    out.waiting.push(what);
                    continue;
                }
            }
        }
        api.patch(&name, &params, &Patch::Apply(&child.object)).await.map_err(|e| Error::kube("apply", &what, e))?;
        out.applied.push(what);
    }
    Ok(out)
}

/// Delete every object in `scopes` that matches `selector` (our labels for one owner) and is
/// not in `keep`. A resource the cluster does not serve (e.g. KubeVirt absent) has nothing to
/// prune. The lists may be served from the API server's cache (`resourceVersion=0`): a stale
/// list can only miss an object (pruned on a later pass) or name one already gone (404).
pub async fn prune(client: &Client, selector: &str, scopes: &[Scope], keep: &[Child]) -> Result<Vec<String>, Error> {
    let wanted: BTreeSet<(String, Option<String>, String)> = keep
        .iter()
        .map(|c| (c.resource.api_version.clone() + "/" + &c.resource.kind, c.namespace().map(str::to_owned), c.name()))
        .collect();
    let mut pruned = Vec::new();
    for scope in scopes {
        let api = api(client, &scope.resource, scope.namespace.as_deref());
        let kind = &scope.resource.kind;
        let list = match api.list_metadata(&ListParams::default().labels(selector).match_any()).await {
            Ok(list) => list,
            Err(e) if is_not_found(&e) => continue,
            Err(e) => return Err(Error::kube("list", format!("{kind} ({selector})"), e)),
        };
        for item in list.items {
            let name = item.name_any();
            let key = (scope.resource.api_version.clone() + "/" + kind, item.namespace(), name.clone());
            if wanted.contains(&key) || item.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let what = match &key.1 {
                Some(ns) => format!("{kind} {ns}/{name}"),
                None => format!("{kind} {name}"),
            };
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(Error::kube("prune", &what, e)),
            }
            tracing::info!(child = %what, "pruned a child that is no longer wanted");
            pruned.push(what);
        }
    }
    Ok(pruned)
}
