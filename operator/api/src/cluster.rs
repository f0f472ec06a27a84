//! What the API reads from and writes to Kubernetes, behind a trait: a kube implementation
//! (server-side apply with field manager [`API_FIELD_MANAGER`]) and an in-memory one for tests
//! and single-host runs.

use std::collections::BTreeMap;
use std::sync::Mutex;

use futures::future::BoxFuture;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use noexit_crds::agent::WorkspaceIdentity;
use noexit_crds::names::project_namespace;
use noexit_crds::workspace::AgentReport;
use noexit_crds::workspace_request::Decision;
use noexit_crds::{OutputRequest, Project, Workspace, WorkspaceRequest, WorkspaceRequestStatus};

/// Field manager of everything the API writes (Workspace `status.agent`, request decisions).
pub const API_FIELD_MANAGER: &str = "noexit-api";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
}

/// A decision on a WorkspaceRequest, as written to its status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecisionRecord {
    pub decision: Decision,
    pub by: String,
    pub reason: String,
}

pub trait Cluster: Send + Sync {
    fn project(&self, name: &str) -> BoxFuture<'_, Result<Option<Project>, ClusterError>>;
    fn create_request(&self, req: WorkspaceRequest) -> BoxFuture<'_, Result<WorkspaceRequest, ClusterError>>;
    fn list_requests(&self, project: &str) -> BoxFuture<'_, Result<Vec<WorkspaceRequest>, ClusterError>>;
    fn get_request(&self, project: &str, name: &str) -> BoxFuture<'_, Result<Option<WorkspaceRequest>, ClusterError>>;
    fn decide_request(
        &self,
        project: &str,
        name: &str,
        decision: DecisionRecord,
    ) -> BoxFuture<'_, Result<WorkspaceRequest, ClusterError>>;
    /// Write `status.agent` of the workspace (the controller derives `AgentConnected` from it).
    fn report_agent(&self, id: &WorkspaceIdentity, report: AgentReport) -> BoxFuture<'_, Result<(), ClusterError>>;
    /// The workspace's current agent certificate serial, if the controller recorded one.
    fn workspace(&self, id: &WorkspaceIdentity) -> BoxFuture<'_, Result<Option<Workspace>, ClusterError>>;
    /// Write the kubectl mirror of one airlock request (spec and status) into the project
    /// namespace. Never read back: the API's database is the source of truth.
    fn mirror_output(&self, project: &str, mirror: OutputRequest) -> BoxFuture<'_, Result<(), ClusterError>>;
}

/// The status written for a decision: one condition and the summary fields.
pub fn decision_status(record: &DecisionRecord, now: chrono::DateTime<chrono::Utc>) -> WorkspaceRequestStatus {
    let type_ = match record.decision {
        Decision::Approved => noexit_crds::common::condition::APPROVED,
        Decision::Denied => noexit_crds::common::condition::DENIED,
    };
    WorkspaceRequestStatus {
        observed_generation: None,
        conditions: vec![Condition {
            type_: type_.into(),
            status: "True".into(),
            reason: "AdminDecision".into(),
            message: record.reason.clone(),
            last_transition_time: Time(to_timestamp(now)),
            observed_generation: None,
        }],
        decision: Some(record.decision),
        decided_by: Some(record.by.clone()),
    }
}

/// k8s-openapi's `Time` wraps a `jiff` timestamp.
pub fn to_timestamp(t: chrono::DateTime<chrono::Utc>) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::from_second(t.timestamp()).unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
}

fn unavailable(e: kube::Error) -> ClusterError {
    ClusterError::Unavailable(e.to_string())
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// The cluster through the Kubernetes API.
#[derive(Clone)]
pub struct KubeCluster {
    client: Client,
}

impl KubeCluster {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    fn requests(&self, project: &str) -> Api<WorkspaceRequest> {
        Api::namespaced(self.client.clone(), &project_namespace(project))
    }
}

impl Cluster for KubeCluster {
    fn project(&self, name: &str) -> BoxFuture<'_, Result<Option<Project>, ClusterError>> {
        let name = name.to_owned();
        Box::pin(async move { Api::<Project>::all(self.client.clone()).get_opt(&name).await.map_err(unavailable) })
    }

    fn create_request(&self, req: WorkspaceRequest) -> BoxFuture<'_, Result<WorkspaceRequest, ClusterError>> {
        Box::pin(async move {
            let project = req.spec.workspace.project.clone();
            let name = req.name_any();
            match self.requests(&project).create(&PostParams::default(), &req).await {
                Ok(r) => Ok(r),
                Err(e) if is_status(&e, 409) => {
                    Err(ClusterError::AlreadyExists(format!("workspacerequest {project}/{name}")))
                }
                Err(e) => Err(unavailable(e)),
            }
        })
    }

    fn list_requests(&self, project: &str) -> BoxFuture<'_, Result<Vec<WorkspaceRequest>, ClusterError>> {
        let api = self.requests(project);
        Box::pin(async move { Ok(api.list(&ListParams::default()).await.map_err(unavailable)?.items) })
    }

    fn get_request(&self, project: &str, name: &str) -> BoxFuture<'_, Result<Option<WorkspaceRequest>, ClusterError>> {
        let api = self.requests(project);
        let name = name.to_owned();
        Box::pin(async move { api.get_opt(&name).await.map_err(unavailable) })
    }

    fn decide_request(
        &self,
        project: &str,
        name: &str,
        decision: DecisionRecord,
    ) -> BoxFuture<'_, Result<WorkspaceRequest, ClusterError>> {
        let api = self.requests(project);
        let (project, name) = (project.to_owned(), name.to_owned());
        Box::pin(async move {
            let status = decision_status(&decision, chrono::Utc::now());
            let patch = serde_json::json!({
                "apiVersion": "noexit.io/v1alpha1",
                "kind": "WorkspaceRequest",
                "status": status,
            });
            let params = PatchParams::apply(API_FIELD_MANAGER).force();
            match api.patch_status(&name, &params, &Patch::Apply(&patch)).await {
                Ok(r) => Ok(r),
                Err(e) if is_status(&e, 404) => {
                    Err(ClusterError::NotFound(format!("workspacerequest {project}/{name}")))
                }
                Err(e) => Err(unavailable(e)),
            }
        })
    }

    fn report_agent(&self, id: &WorkspaceIdentity, report: AgentReport) -> BoxFuture<'_, Result<(), ClusterError>> {
        let api: Api<Workspace> = Api::namespaced(self.client.clone(), &project_namespace(&id.project));
        let id = id.clone();
        Box::pin(async move {
            let patch = serde_json::json!({
                "apiVersion": "noexit.io/v1alpha1",
                "kind": "Workspace",
                "status": { "agent": report },
            });
            let params = PatchParams::apply(API_FIELD_MANAGER).force();
            match api.patch_status(&id.name, &params, &Patch::Apply(&patch)).await {
                Ok(_) => Ok(()),
                Err(e) if is_status(&e, 404) => {
                    Err(ClusterError::NotFound(format!("workspace {}/{}", id.project, id.name)))
                }
                Err(e) => Err(unavailable(e)),
            }
        })
    }

    fn workspace(&self, id: &WorkspaceIdentity) -> BoxFuture<'_, Result<Option<Workspace>, ClusterError>> {
        let api: Api<Workspace> = Api::namespaced(self.client.clone(), &project_namespace(&id.project));
        let name = id.name.clone();
        Box::pin(async move { api.get_opt(&name).await.map_err(unavailable) })
    }

    fn mirror_output(&self, project: &str, mirror: OutputRequest) -> BoxFuture<'_, Result<(), ClusterError>> {
        let api: Api<OutputRequest> = Api::namespaced(self.client.clone(), &project_namespace(project));
        let project = project.to_owned();
        Box::pin(async move {
            let name = mirror.name_any();
            let params = PatchParams::apply(API_FIELD_MANAGER).force();
            let body = serde_json::json!({
                "apiVersion": "noexit.io/v1alpha1",
                "kind": "OutputRequest",
                "metadata": {"name": name, "labels": mirror.metadata.labels},
                "spec": mirror.spec,
            });
            let status = serde_json::json!({
                "apiVersion": "noexit.io/v1alpha1",
                "kind": "OutputRequest",
                "status": mirror.status,
            });
            let named = |e: kube::Error| ClusterError::Unavailable(format!("outputrequest {project}/{name}: {e}"));
            api.patch(&name, &params, &Patch::Apply(&body)).await.map_err(named)?;
            api.patch_status(&name, &params, &Patch::Apply(&status)).await.map_err(named)?;
            Ok(())
        })
    }
}

/// An in-memory cluster: Projects, WorkspaceRequests and Workspaces in maps.
#[derive(Default)]
pub struct MemoryCluster {
    inner: Mutex<MemoryState>,
}

#[derive(Default)]
struct MemoryState {
    projects: BTreeMap<String, Project>,
    requests: BTreeMap<(String, String), WorkspaceRequest>,
    workspaces: BTreeMap<(String, String), Workspace>,
    /// Each mirror written, in order: `(project, object)`.
    mirrors: Vec<(String, OutputRequest)>,
    /// Refuse mirror writes (tests: an unreachable or forbidding Kubernetes API).
    refuse_mirrors: bool,
}

impl MemoryCluster {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        // A panic while holding the lock cannot leave these maps half-written; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn put_project(&self, project: Project) {
        self.state().projects.insert(project.name_any(), project);
    }

    pub fn put_workspace(&self, ws: Workspace) {
        let key = (ws.spec.project.clone(), ws.name_any());
        self.state().workspaces.insert(key, ws);
    }

    /// Replace every Project and Workspace (keeping the agent status a workspace already has):
    /// single-host mode after each reconcile of its manifests.
    pub fn replace_all(&self, projects: Vec<Project>, workspaces: Vec<Workspace>) {
        let mut state = self.state();
        state.projects = projects.into_iter().map(|p| (p.name_any(), p)).collect();
        let mut next = BTreeMap::new();
        for mut ws in workspaces {
            let key = (ws.spec.project.clone(), ws.name_any());
            if let Some(agent) =
                state.workspaces.get(&key).and_then(|old| old.status.as_ref()).and_then(|s| s.agent.clone())
            {
                ws.status.get_or_insert_with(Default::default).agent = Some(agent);
            }
            next.insert(key, ws);
        }
        state.workspaces = next;
    }

    pub fn get_request_now(&self, project: &str, name: &str) -> Option<WorkspaceRequest> {
        self.state().requests.get(&(project.to_owned(), name.to_owned())).cloned()
    }

    pub fn workspace_now(&self, project: &str, name: &str) -> Option<Workspace> {
        self.state().workspaces.get(&(project.to_owned(), name.to_owned())).cloned()
    }

    /// Make every later mirror write fail as an unavailable cluster would (`true`).
    pub fn refuse_mirrors(&self, refuse: bool) {
        self.state().refuse_mirrors = refuse;
    }

    /// Every OutputRequest mirror written so far, in order (`(project, object)`).
    pub fn mirrors(&self) -> Vec<(String, OutputRequest)> {
        self.state().mirrors.clone()
    }
}

impl Cluster for MemoryCluster {
    fn project(&self, name: &str) -> BoxFuture<'_, Result<Option<Project>, ClusterError>> {
        let found = self.state().projects.get(name).cloned();
        Box::pin(async move { Ok(found) })
    }

    fn create_request(&self, mut req: WorkspaceRequest) -> BoxFuture<'_, Result<WorkspaceRequest, ClusterError>> {
        let key = (req.spec.workspace.project.clone(), req.name_any());
        let what = format!("workspacerequest {}/{}", key.0, key.1);
        let result = match self.state().requests.entry(key) {
            std::collections::btree_map::Entry::Occupied(_) => Err(ClusterError::AlreadyExists(what)),
            std::collections::btree_map::Entry::Vacant(slot) => {
                req.metadata.creation_timestamp = Some(Time(to_timestamp(chrono::Utc::now())));
                req.metadata.uid = Some(uuid::Uuid::new_v4().to_string());
                slot.insert(req.clone());
                Ok(req)
            }
        };
        Box::pin(async move { result })
    }

    fn list_requests(&self, project: &str) -> BoxFuture<'_, Result<Vec<WorkspaceRequest>, ClusterError>> {
        let found: Vec<_> =
            self.state().requests.iter().filter(|((p, _), _)| p == project).map(|(_, r)| r.clone()).collect();
        Box::pin(async move { Ok(found) })
    }

    fn get_request(&self, project: &str, name: &str) -> BoxFuture<'_, Result<Option<WorkspaceRequest>, ClusterError>> {
        let found = self.state().requests.get(&(project.to_owned(), name.to_owned())).cloned();
        Box::pin(async move { Ok(found) })
    }

    fn decide_request(
        &self,
        project: &str,
        name: &str,
        decision: DecisionRecord,
    ) -> BoxFuture<'_, Result<WorkspaceRequest, ClusterError>> {
        let key = (project.to_owned(), name.to_owned());
        let result = match self.state().requests.get_mut(&key) {
            Some(req) => {
                req.status = Some(decision_status(&decision, chrono::Utc::now()));
                Ok(req.clone())
            }
            None => Err(ClusterError::NotFound(format!("workspacerequest {project}/{name}"))),
        };
        Box::pin(async move { result })
    }

    fn report_agent(&self, id: &WorkspaceIdentity, report: AgentReport) -> BoxFuture<'_, Result<(), ClusterError>> {
        let key = (id.project.clone(), id.name.clone());
        let result = match self.state().workspaces.get_mut(&key) {
            Some(ws) => {
                ws.status.get_or_insert_with(Default::default).agent = Some(report);
                Ok(())
            }
            None => Err(ClusterError::NotFound(format!("workspace {}/{}", id.project, id.name))),
        };
        Box::pin(async move { result })
    }

    fn workspace(&self, id: &WorkspaceIdentity) -> BoxFuture<'_, Result<Option<Workspace>, ClusterError>> {
        let found = self.state().workspaces.get(&(id.project.clone(), id.name.clone())).cloned();
        Box::pin(async move { Ok(found) })
    }

    fn mirror_output(&self, project: &str, mirror: OutputRequest) -> BoxFuture<'_, Result<(), ClusterError>> {
        let mut state = self.state();
        let result = if state.refuse_mirrors {
            Err(ClusterError::Unavailable(format!("outputrequest {project}/{}: refused", mirror.name_any())))
        } else {
            state.mirrors.push((project.to_owned(), mirror));
            Ok(())
        };
        Box::pin(async move { result })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// One request the fake API server saw.
    #[derive(Debug)]
    struct Seen {
        method: String,
        path_and_query: String,
        content_type: String,
        body: serde_json::Value,
    }

    /// A kube client whose "API server" records each request and answers with `reply`.
    fn fake_kube(reply: serde_json::Value) -> (KubeCluster, Arc<Mutex<Vec<Seen>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let log = log.clone();
            let reply = reply.clone();
            async move {
                use http_body_util::BodyExt;
                let (parts, body) = req.into_parts();
                let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                log.lock().unwrap().push(Seen {
                    method: parts.method.to_string(),
                    path_and_query: parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
                    content_type: parts
                        .headers
                        .get(http::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned(),
                    body: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
                });
                let body = http_body_util::Full::new(bytes::Bytes::from(serde_json::to_vec(&reply).unwrap()));
                Ok::<_, std::convert::Infallible>(http::Response::builder().status(200).body(body).unwrap())
            }
        });
        (KubeCluster::new(Client::new(service, "default")), seen)
    }

    #[tokio::test]
    async fn heartbeats_are_applied_to_the_status_subresource_as_noexit_api() {
        let ws = serde_json::json!({
            "apiVersion": "noexit.io/v1alpha1", "kind": "Workspace",
            "metadata": {"name": "alice-r", "namespace": "noexit-ward-7"},
            "spec": {"project": "ward-7", "owner": "alice", "runtime": "pod", "image": "r"},
        });
        let (cluster, seen) = fake_kube(ws);
        let report = AgentReport {
            last_heartbeat: chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            version: "0.1.0".into(),
            egress_locked: true,
            egress_detail: None,
            active_sessions: 2,
            spool_depth: 0,
        };
        let id = WorkspaceIdentity { project: "ward-7".into(), name: "alice-r".into() };
        cluster.report_agent(&id, report).await.unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
        let req = &seen[0];
        assert_eq!(req.method, "PATCH");
        assert!(
            req.path_and_query
                .starts_with("/apis/noexit.io/v1alpha1/namespaces/noexit-ward-7/workspaces/alice-r/status?"),
            "{}",
            req.path_and_query
        );
        assert!(req.path_and_query.contains("fieldManager=noexit-api") && req.path_and_query.contains("force=true"));
        assert_eq!(req.content_type, "application/apply-patch+yaml");
        assert_eq!(req.body["status"]["agent"]["activeSessions"], 2);
        assert_eq!(req.body["status"]["agent"]["egressLocked"], true);
        // Only the agent report: the controller owns conditions and phase.
        assert_eq!(req.body["status"].as_object().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn decisions_are_applied_as_conditions_with_the_decider() {
        let wr = serde_json::json!({
            "apiVersion": "noexit.io/v1alpha1", "kind": "WorkspaceRequest",
            "metadata": {"name": "r1", "namespace": "noexit-ward-7"},
            "spec": {"requester": "bob", "justification": "j", "workspaceName": "w",
                     "workspace": {"project": "ward-7", "owner": "alice", "runtime": "vm", "image": "r"}},
        });
        let (cluster, seen) = fake_kube(wr);
        let record = DecisionRecord { decision: Decision::Denied, by: "carol".into(), reason: "no REC".into() };
        cluster.decide_request("ward-7", "r1", record).await.unwrap();
        let seen = seen.lock().unwrap();
        let req = &seen[0];
        assert_eq!(req.method, "PATCH");
        assert!(
            req.path_and_query
                .starts_with("/apis/noexit.io/v1alpha1/namespaces/noexit-ward-7/workspacerequests/r1/status?")
        );
        assert!(req.path_and_query.contains("fieldManager=noexit-api"));
        let status = &req.body["status"];
        assert_eq!((status["decision"].as_str(), status["decidedBy"].as_str()), (Some("Denied"), Some("carol")));
        assert_eq!(status["conditions"][0]["type"], "Denied");
        assert_eq!(status["conditions"][0]["message"], "no REC");
        let parsed: WorkspaceRequestStatus = serde_json::from_value(status.clone()).unwrap();
        assert_eq!(parsed.decision_from_conditions(), Some(Decision::Denied));
    }
    #[tokio::test]
    async fn output_mirrors_are_applied_as_noexit_api_spec_then_status() {
        let spec = noexit_crds::OutputRequestSpec {
            request_id: "0f3a2b1c-0000-4000-8000-000000000001".into(),
            workspace: "alice-r".into(),
            file_name: "table.csv".into(),
            size: 12,
            sha256: "ab".repeat(32),
            requester: "alice".into(),
        };
        let mut obj = OutputRequest::new("out-0f3a2b1c-0000-4000-8000-000000000001", spec);
        obj.status = Some(noexit_crds::OutputRequestStatus {
            state: "inReview".into(),
            verdict: Some("pass".into()),
            approvals: "1/2".into(),
            reviewers_required: 2,
            decisions: vec![],
            updated_at: chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
        });
        let (cluster, seen) = fake_kube(serde_json::to_value(&obj).unwrap());
        cluster.mirror_output("ward-7", obj).await.unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "{seen:?}");
        let base =
            "/apis/noexit.io/v1alpha1/namespaces/noexit-ward-7/outputrequests/out-0f3a2b1c-0000-4000-8000-000000000001";
        assert!(seen[0].path_and_query.starts_with(&format!("{base}?")), "{}", seen[0].path_and_query);
        assert!(seen[1].path_and_query.starts_with(&format!("{base}/status?")), "{}", seen[1].path_and_query);
        for req in seen.iter() {
            assert_eq!((req.method.as_str(), req.content_type.as_str()), ("PATCH", "application/apply-patch+yaml"));
            assert!(req.path_and_query.contains("fieldManager=noexit-api"));
        }
        assert_eq!(seen[0].body["spec"]["fileName"], "table.csv");
        assert!(seen[0].body.get("status").is_none());
        assert_eq!(seen[1].body["status"]["approvals"], "1/2");
    }
}
