//! Which projects a person checks outputs for: only to build the `/review` list. The API
//! decides who may read and review an output; a project listed here wrongly shows the API's
//! refusal, one missing here is still reachable at `/review/{project}/{id}`.

use std::path::PathBuf;

use futures::future::BoxFuture;
use serde::Deserialize;

pub trait Checkers: Send + Sync {
    /// Names of the projects where `user` has the `outputChecker` role.
    fn projects_of<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<Vec<String>, String>>;
}

/// The gateway's `--directory` file: each project may list `outputCheckers` (the desktop
/// directory ignores the key).
pub struct FileCheckers {
    pub path: PathBuf,
}

#[derive(Deserialize)]
struct File {
    #[serde(default)]
    projects: Vec<FileProject>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileProject {
    name: String,
    #[serde(default)]
    output_checkers: Vec<String>,
}

impl Checkers for FileCheckers {
    fn projects_of<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<Vec<String>, String>> {
        Box::pin(async move {
            let text =
                std::fs::read_to_string(&self.path).map_err(|e| format!("reading {}: {e}", self.path.display()))?;
            let file: File =
                serde_yaml::from_str(&text).map_err(|e| format!("parsing {}: {e}", self.path.display()))?;
            Ok(file
                .projects
                .into_iter()
                .filter(|p| p.output_checkers.iter().any(|c| c == user))
                .map(|p| p.name)
                .collect())
        })
    }
}

/// Project resources in the cluster: members with the `outputChecker` role.
pub struct KubeCheckers {
    pub client: kube::Client,
}

impl Checkers for KubeCheckers {
    fn projects_of<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<Vec<String>, String>> {
        Box::pin(async move {
            use noexit_crds::{Project, Role};
            let api: kube::Api<Project> = kube::Api::all(self.client.clone());
            let list = api.list(&Default::default()).await.map_err(|e| format!("listing Projects: {e}"))?;
            Ok(list
                .items
                .iter()
                .filter(|p| p.spec.users_with(Role::OutputChecker).contains(&user))
                .filter_map(|p| p.metadata.name.clone())
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_directory_file_names_checkers_per_project() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.yaml");
        std::fs::write(
            &path,
            "projects:\n- name: ward-7\n  members: [a, b]\n  outputCheckers: [b]\n- name: ward-8\n  members: [b]\n",
        )
        .unwrap();
        let c = FileCheckers { path };
        assert_eq!(c.projects_of("b").await.unwrap(), vec!["ward-7".to_owned()]);
        assert!(c.projects_of("a").await.unwrap().is_empty());
    }
}
