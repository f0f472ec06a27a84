//! A child object the operator applies, in a kind-independent form, plus the metadata every
//! child carries (labels for pruning, owner reference, spec hash).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::core::{ApiResource, DynamicObject};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use sha2::{Digest, Sha256};

pub mod labels {
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    pub const PART_OF: &str = "app.kubernetes.io/part-of";
    pub const NAME: &str = "app.kubernetes.io/name";
    pub const COMPONENT: &str = "app.kubernetes.io/component";
    pub const OWNER_KIND: &str = "noexit.io/owner-kind";
    pub const OWNER_NAME: &str = "noexit.io/owner-name";
    pub const PROJECT: &str = "noexit.io/project";
    pub const WORKSPACE: &str = "noexit.io/workspace";
    /// Which WorkspaceRequest created a Workspace.
    pub const REQUEST: &str = "noexit.io/request";
    pub const MANAGER: &str = "noexit-operator";
}

pub mod annotations {
    /// Hash of the built spec, for objects that must be replaced rather than patched (Pods).
    pub const SPEC_HASH: &str = "noexit.io/spec-hash";
}

/// One object to apply: its API resource (group, version, kind, plural) and the object.
#[derive(Clone, Debug)]
pub struct Child {
    pub resource: ApiResource,
    pub object: DynamicObject,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot convert {kind} {name} to a dynamic object: {source}")]
pub struct ConvertError {
    kind: String,
    name: String,
    source: serde_json::Error,
}

impl Child {
    /// Wrap a typed object (k8s-openapi or a noexit CRD).
    pub fn from_typed<K>(obj: &K) -> Result<Self, ConvertError>
    where
        K: Resource<DynamicType = ()> + Serialize,
    {
        let resource = ApiResource::erase::<K>(&());
        let value = serde_json::to_value(obj)
            .and_then(|mut v| {
                // Typed objects may omit apiVersion/kind when serialised; dynamic ones need them.
                if let Some(map) = v.as_object_mut() {
                    map.insert("apiVersion".into(), resource.api_version.clone().into());
                    map.insert("kind".into(), resource.kind.clone().into());
                }
                serde_json::from_value::<DynamicObject>(v)
            })
            .map_err(|source| ConvertError { kind: resource.kind.clone(), name: obj.name_any(), source })?;
        Ok(Self { resource, object: value })
    }

    /// Wrap an object of a type we have no Rust struct for (KubeVirt).
    pub fn from_value(resource: ApiResource, value: serde_json::Value) -> Result<Self, ConvertError> {
        let name = value.pointer("/metadata/name").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        serde_json::from_value::<DynamicObject>(value)
            .map(|object| Self { resource: resource.clone(), object })
            .map_err(|source| ConvertError { kind: resource.kind, name, source })
    }

    pub fn kind(&self) -> &str {
        &self.resource.kind
    }

    pub fn name(&self) -> String {
        self.object.name_any()
    }

    pub fn namespace(&self) -> Option<&str> {
        self.object.metadata.namespace.as_deref()
    }

    /// `Kind namespace/name` for logs and messages.
    pub fn describe(&self) -> String {
        match self.namespace() {
            Some(ns) => format!("{} {ns}/{}", self.kind(), self.name()),
            None => format!("{} {}", self.kind(), self.name()),
        }
    }
}

/// Who owns a set of children: used for the owner reference and the pruning labels.
#[derive(Clone, Debug)]
pub struct Owner {
    pub kind: &'static str,
    pub name: String,
    pub project: String,
    reference: OwnerReference,
}

impl Owner {
    pub fn of<K: Resource<DynamicType = ()>>(obj: &K, project: &str) -> Self {
        let reference = OwnerReference {
            api_version: K::api_version(&()).into_owned(),
            kind: K::kind(&()).into_owned(),
            name: obj.name_any(),
            // The API server assigns uids; a dry run (render) has none yet.
            uid: obj.meta().uid.clone().unwrap_or_else(|| "<assigned-by-api-server>".into()),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        let kind: &'static str = match K::kind(&()).as_ref() {
            "Project" => "Project",
            "Workspace" => "Workspace",
            "WorkspaceRequest" => "WorkspaceRequest",
            "Dataset" => "Dataset",
            _ => "Other",
        };
        Self { kind, name: obj.name_any(), project: project.to_owned(), reference }
    }

    /// Labels every child of this owner carries; pruning selects on them.
    pub fn labels(&self, component: &str) -> BTreeMap<String, String> {
        let mut l = BTreeMap::new();
        l.insert(labels::MANAGED_BY.into(), labels::MANAGER.into());
        l.insert(labels::PART_OF.into(), "noexit".into());
        l.insert(labels::COMPONENT.into(), component.into());
        l.insert(labels::OWNER_KIND.into(), self.kind.into());
        l.insert(labels::OWNER_NAME.into(), self.name.clone());
        l.insert(labels::PROJECT.into(), self.project.clone());
        if self.kind == "Workspace" {
            l.insert(labels::WORKSPACE.into(), self.name.clone());
        }
        l
    }

    /// Metadata for a child: name, namespace, owner reference, labels.
    pub fn meta(&self, name: impl Into<String>, namespace: Option<&str>, component: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: namespace.map(str::to_owned),
            labels: Some(self.labels(component)),
            owner_references: Some(vec![self.reference.clone()]),
            ..ObjectMeta::default()
        }
    }

    /// Label selector matching every child of this owner (for pruning).
    pub fn selector(&self) -> String {
        selector_for_owner(self.kind, &self.name)
    }
}

/// Label selector for the children of `kind`/`name`.
pub fn selector_for_owner(kind: &str, name: &str) -> String {
    format!("{}={},{}={kind},{}={name}", labels::MANAGED_BY, labels::MANAGER, labels::OWNER_KIND, labels::OWNER_NAME)
}

/// Short stable hash of a serialisable value (hex, 16 chars).
pub fn spec_hash<T: Serialize>(value: &T) -> String {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    hex::encode(&Sha256::digest(&bytes)[..8])
}
