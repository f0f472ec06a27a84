//! Adding and removing our finalizer with JSON patches guarded by `test` operations on the
//! finalizer list we read (as kube's finalizer helper does), so a concurrent writer's finalizers
//! are never lost: the write fails and is retried. Other changes (status writes) do not conflict.

use std::fmt::Debug;

use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::error::Error;

fn describe<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!("{} {}", K::kind(&()), crate::context::key_of(obj))
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

/// A `test` operation failed: the object changed since we read it.
fn test_failed(e: &Error) -> bool {
    matches!(e, Error::Kube { source: kube::Error::Api(s), .. } if s.code == 409 || s.code == 422)
}

/// Make sure `finalizer` is on `obj`. `obj` may come from a cache that has not yet seen our
/// own earlier addition: when the guarded patch fails, read the object again and decide on that.
pub async fn ensure<K>(api: &Api<K>, obj: &K, finalizer: &str) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    match add(api, obj, finalizer).await {
        Err(e) if test_failed(&e) => {
            let fresh = api.get(&obj.name_any()).await.map_err(|e| Error::kube("read", describe(obj), e))?;
            add(api, &fresh, finalizer).await
        }
        other => other,
    }
}

async fn add<K>(api: &Api<K>, obj: &K, finalizer: &str) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    if obj.finalizers().iter().any(|f| f == finalizer) {
        return Ok(());
    }
    let ops = if obj.finalizers().is_empty() {
        json!([
            { "op": "test", "path": "/metadata/finalizers", "value": null },
            { "op": "add", "path": "/metadata/finalizers", "value": [finalizer] },
        ])
    } else {
        json!([
            { "op": "test", "path": "/metadata/finalizers", "value": obj.finalizers() },
            { "op": "add", "path": "/metadata/finalizers/-", "value": finalizer },
        ])
    };
    json_patch(api, obj, ops, "add finalizer to").await
}

/// Remove `finalizer` from `obj` (nothing if absent).
pub async fn remove<K>(api: &Api<K>, obj: &K, finalizer: &str) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let Some(i) = obj.finalizers().iter().position(|f| f == finalizer) else { return Ok(()) };
    let path = format!("/metadata/finalizers/{i}");
    let ops = json!([{ "op": "test", "path": path, "value": finalizer }, { "op": "remove", "path": path }]);
    json_patch(api, obj, ops, "remove finalizer from").await
}
