//! Reading noexit manifests (multi-document YAML) into typed objects, with errors that name the
//! document, the object and the field.

use noexit_crds::{Dataset, Project, Workspace, WorkspaceRequest};
use serde::de::DeserializeOwned;

/// One noexit object from a manifest file.
#[derive(Clone, Debug)]
pub enum Manifest {
    Project(Box<Project>),
    Dataset(Box<Dataset>),
    Workspace(Box<Workspace>),
    WorkspaceRequest(Box<WorkspaceRequest>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("document {index}: not valid YAML: {message}")]
    Yaml { index: usize, message: String },
    #[error("document {index}: has no apiVersion and kind")]
    NoKind { index: usize },
    #[error(
        "document {index}: {api_version} {kind} is not a noexit resource (expected noexit.io/v1alpha1 Project, Dataset, Workspace or WorkspaceRequest)"
    )]
    Unknown { index: usize, api_version: String, kind: String },
    #[error("{object}: {field}: {message}")]
    Field { object: String, field: String, message: String },
}

/// Parse every document of `text`. Empty documents are skipped.
pub fn parse_documents(text: &str) -> Result<Vec<Manifest>, ManifestError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let value: serde_yaml::Value =
            serde::Deserialize::deserialize(doc).map_err(|e| ManifestError::Yaml { index, message: e.to_string() })?;
        if value.is_null() {
            continue;
        }
        out.push(parse_one(index, value)?);
    }
    Ok(out)
}

fn parse_one(index: usize, value: serde_yaml::Value) -> Result<Manifest, ManifestError> {
    let text = |key: &str| value.get(key).and_then(|v| v.as_str()).map(str::to_owned);
    let (Some(api_version), Some(kind)) = (text("apiVersion"), text("kind")) else {
        return Err(ManifestError::NoKind { index });
    };
    let name =
        value.get("metadata").and_then(|m| m.get("name")).and_then(|n| n.as_str()).unwrap_or("<unnamed>").to_owned();
    let namespace = value.get("metadata").and_then(|m| m.get("namespace")).and_then(|n| n.as_str());
    let object = match namespace {
        Some(ns) => {
            format!("{} {}/{name}", kind.to_lowercase(), noexit_crds::names::project_of_namespace(ns).unwrap_or(ns))
        }
        None => format!("{} {name}", kind.to_lowercase()),
    };
    if api_version != "noexit.io/v1alpha1" {
        return Err(ManifestError::Unknown { index, api_version, kind });
    }
    Ok(match kind.as_str() {
        "Project" => Manifest::Project(Box::new(typed(&object, value)?)),
        "Dataset" => Manifest::Dataset(Box::new(typed(&object, value)?)),
        "Workspace" => Manifest::Workspace(Box::new(typed(&object, value)?)),
        "WorkspaceRequest" => Manifest::WorkspaceRequest(Box::new(typed(&object, value)?)),
        _ => return Err(ManifestError::Unknown { index, api_version, kind }),
    })
}

fn typed<T: DeserializeOwned>(object: &str, value: serde_yaml::Value) -> Result<T, ManifestError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." { "(root)".to_owned() } else { field };
        ManifestError::Field { object: object.to_owned(), field, message: e.into_inner().to_string() }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_parses_into_five_objects() {
        let all = parse_documents(include_str!("../../../examples/ward-7.yaml")).expect("parses");
        assert_eq!(all.len(), 5);
    }

    #[test]
    fn errors_name_object_and_field() {
        let bad = "apiVersion: noexit.io/v1alpha1\nkind: Workspace\nmetadata: {name: w, namespace: noexit-p}\nspec:\n  project: p\n  owner: a\n  runtime: container\n  image: x\n";
        let err = parse_documents(bad).expect_err("bad runtime").to_string();
        assert!(err.starts_with("workspace p/w: spec.runtime: unknown variant `container`"), "{err}");

        let err = parse_documents("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n").expect_err("not ours");
        assert!(matches!(err, ManifestError::Unknown { index: 1, .. }));

        let err = parse_documents("---\n---\nkind: [").expect_err("yaml");
        assert!(matches!(err, ManifestError::Yaml { .. }), "{err}");

        let err = parse_documents("foo: bar\n").expect_err("no kind");
        assert_eq!(err, ManifestError::NoKind { index: 1 });
    }
}
