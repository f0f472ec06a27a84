//! Adding and removing our finalizer with JSON patches guarded by the resourceVersion we read,
//! so a concurrent writer's finalizers are never lost (the write fails and is retried).

use std::fmt::Debug;

use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::controllers::error::Error;

fn guard<K: Resource>(obj: &K) -> Value {
    json!({ "op": "test", "path": "/metadata/resourceVersion", "value": obj.resource_version() })
}

fn describe<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!("{} {}", K::kind(&()), crate::controllers::context::key_of(obj))
}

async fn json_patch<K>(api: &Api<K>, obj: &K, ops: Value, action: &'static str) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let patch: json_patch::Patch = serde_json::from_value(ops).map_err(|e| Error::Internal(e.to_string()))?;
    api.patch(&obj.name_any(), &PatchParams::default(), &Patch::<()>::Json(patch))
        .await
        .map(|_| ())
        .map_err(|e| Error::kube(action, describe(obj), e))
}

/// Make sure `finalizer` is on `obj`.
pub async fn ensure<K>(api: &Api<K>, obj: &K, finalizer: &str) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    if obj.finalizers().iter().any(|f| f == finalizer) {
        return Ok(());
    }
    let add = if obj.finalizers().is_empty() {
        json!({ "op": "add", "path": "/metadata/finalizers", "value": [finalizer] })
    } else {
        json!({ "op": "add", "path": "/metadata/finalizers/-", "value": finalizer })
    };
    json_patch(api, obj, json!([guard(obj), add]), "add finalizer to").await
}

/// Remove `finalizer` from `obj` (nothing if absent).
pub async fn remove<K>(api: &Api<K>, obj: &K, finalizer: &str) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let Some(i) = obj.finalizers().iter().position(|f| f == finalizer) else { return Ok(()) };
    let path = format!("/metadata/finalizers/{i}");
    let ops = json!([guard(obj), { "op": "test", "path": path, "value": finalizer }, { "op": "remove", "path": path }]);
    json_patch(api, obj, ops, "remove finalizer from").await
}
