//! Controller scenarios: the real controllers (kube-runtime, server-side apply, finalizers,
//! leader election) against the in-memory fake API of `noexit_operator::testing`.
//!
//! `cargo test -p noexit-operator --features testing --test controllers`

use std::time::Duration;

use http::Method;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::{Api, ResourceExt};
use noexit_crds::{Condition, Dataset, Project, Workspace, WorkspaceRequest};
use noexit_operator::controllers::leader::LeaderElector;
use noexit_operator::controllers::workspace::build::SERIAL_ANNOTATION;
use noexit_operator::manifests::{Manifest, parse_documents};
use noexit_operator::testing::{FakeApi, ResourceKey, Running, eventually};
use serde_json::json;

const NS: &str = "noexit-ward-7";

struct Example {
    project: Project,
    datasets: Vec<Dataset>,
    workspaces: Vec<Workspace>,
    request: WorkspaceRequest,
}

fn example() -> Example {
    let docs = parse_documents(include_str!("../../examples/ward-7.yaml"))
        .expect("example")
        .into_iter()
        .chain(parse_documents(include_str!("../../examples/request.yaml")).expect("request"));
    let (mut project, mut datasets, mut workspaces, mut request) = (None, vec![], vec![], None);
    for m in docs {
        match m {
            Manifest::Project(p) => project = Some(*p),
            Manifest::Dataset(d) => datasets.push(*d),
            Manifest::Workspace(mut w) => {
                w.metadata.namespace = Some(NS.into());
                workspaces.push(*w)
            }
            Manifest::WorkspaceRequest(r) => request = Some(*r),
        }
    }
    Example { project: project.expect("a project"), datasets, workspaces, request: request.expect("a request") }
}

/// The project, its datasets and the named workspaces in the fake API.
fn seed(api: &FakeApi, workspaces: &[&str]) -> Example {
    let ex = example();
    api.create(&ex.project).expect("project");
    for d in &ex.datasets {
        api.create(d).expect("dataset");
    }
    for w in ex.workspaces.iter().filter(|w| workspaces.contains(&w.name_any().as_str())) {
        api.create(w).expect("workspace");
    }
    ex
}

async fn wait<T>(what: &str, check: impl FnMut() -> Option<T>) -> T {
    match eventually(Duration::from_secs(15), check).await {
        Some(v) => v,
        None => panic!("timed out waiting for {what}"),
    }
}

/// Wait (at most 5 s) for a 300 ms window with no request whose path contains `needle`.
async fn quiet(api: &FakeApi, needle: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        api.clear_calls();
        tokio::time::sleep(Duration::from_millis(300)).await;
        if !api.calls().iter().any(|c| c.path.contains(needle)) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "requests about {needle} never stop");
    }
}

fn condition(conditions: &[Condition], type_: &str) -> Option<(String, String)> {
    conditions.iter().find(|c| c.type_ == type_).map(|c| (c.status.clone(), c.reason.clone()))
}

fn ws_condition(api: &FakeApi, name: &str, type_: &str) -> Option<(String, String)> {
    let ws = api.get::<Workspace>(Some(NS), name)?;
    condition(&ws.status?.conditions, type_)
}

fn pod(api: &FakeApi, ws: &str) -> Option<Pod> {
    api.get::<Pod>(Some(NS), &format!("ws-{ws}"))
}

fn pod_memory(p: &Pod) -> Option<String> {
    let c = p.spec.as_ref()?.containers.iter().find(|c| c.name == "workspace")?;
    Some(c.resources.as_ref()?.limits.as_ref()?.get("memory")?.0.clone())
}

#[tokio::test]
async fn a_project_and_a_workspace_get_all_their_children_by_server_side_apply() {
    let api = FakeApi::new();
    seed(&api, &["alice-r"]);
    let running = Running::in_process(api.clone());

    let pod = wait("the workspace pod", || pod(&api, "alice-r")).await;
    wait("the project namespace", || api.get::<Namespace>(None, NS)).await;
    wait("five network policies", || (api.list::<NetworkPolicy>(Some(NS)).len() == 5).then_some(())).await;
    wait("the agent secret", || api.get::<Secret>(Some(NS), "ws-alice-r-agent")).await;
    wait("the home volume", || api.get::<PersistentVolumeClaim>(Some(NS), "ws-alice-r-home")).await;
    wait("the desktop service", || api.get::<Service>(Some(NS), "ws-alice-r-desktop")).await;
    wait("project Ready with one workspace", || {
        let status = api.get::<Project>(None, "ward-7")?.status?;
        let ready = condition(&status.conditions, "Ready")? == ("True".into(), "Provisioned".into());
        (ready && status.workspace_count == Some(1) && status.granted_datasets.len() == 2).then_some(())
    })
    .await;
    let ws = wait("workspace status", || {
        let ws = api.get::<Workspace>(Some(NS), "alice-r")?;
        let provisioned = condition(&ws.status.as_ref()?.conditions, "Provisioned")?;
        (provisioned.0 == "True").then_some(ws)
    })
    .await;

    // The pod is owned by the workspace and carries our finalizer's counterpart on the owner.
    let owner = &pod.owner_references()[0];
    assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Workspace", ws.uid().expect("uid").as_str()));
    assert_eq!(ws.finalizers(), ["noexit.io/revoke-agent-certificate"]);
    let status = ws.status.expect("status");
    assert_eq!(status.observed_generation, ws.metadata.generation);
    assert_eq!(condition(&status.conditions, "Ready"), Some(("False".into(), "WaitingForAgent".into())));
    // Every server-side apply used the one field manager, with force.
    let applies: Vec<_> = api.calls().into_iter().filter(|c| c.patch == Some("apply")).collect();
    assert!(applies.len() > 20, "{} applies", applies.len());
    assert!(applies.iter().all(|c| c.field_manager.as_deref() == Some("noexit-operator")), "{applies:#?}");
    // The CA was created once in the operator namespace.
    assert!(api.get::<Secret>(Some("noexit-system"), "noexit-ca").is_some());
    running.stop().await;
}

#[tokio::test]
async fn a_spec_change_updates_the_children_and_replaces_the_pod() {
    let api = FakeApi::new();
    seed(&api, &["alice-r"]);
    let running = Running::in_process(api.clone());
    let first = wait("the pod", || pod(&api, "alice-r")).await;
    assert_eq!(pod_memory(&first).as_deref(), Some("8Gi"));

    api.update::<Workspace>(
        Some(NS),
        "alice-r",
        json!({"spec": {"resources": {"memory": "12Gi", "homeSize": "80Gi"}}}),
    )
    .expect("update");
    let second =
        wait("the replaced pod", || pod(&api, "alice-r").filter(|p| pod_memory(p).as_deref() == Some("12Gi"))).await;
    assert_ne!(first.uid(), second.uid(), "pods are replaced, not patched");
    wait("the bigger home volume", || {
        let pvc = api.get::<PersistentVolumeClaim>(Some(NS), "ws-alice-r-home")?;
        let size = pvc.spec?.resources?.requests?.get("storage")?.0.clone();
        (size == "80Gi").then_some(())
    })
    .await;
    wait("observedGeneration 2", || {
        let ws = api.get::<Workspace>(Some(NS), "alice-r")?;
        (ws.status?.observed_generation == Some(2)).then_some(())
    })
    .await;
    running.stop().await;
}

#[tokio::test]
async fn stopping_removes_the_pod_and_keeps_the_home_volume_and_starting_brings_it_back() {
    let api = FakeApi::new();
    seed(&api, &["alice-r"]);
    let running = Running::in_process(api.clone());
    wait("the pod", || pod(&api, "alice-r")).await;
    let home = api.get::<PersistentVolumeClaim>(Some(NS), "ws-alice-r-home").expect("home");

    api.update::<Workspace>(Some(NS), "alice-r", json!({"spec": {"lifecycle": {"running": false}}})).expect("stop");
    wait("the pod to go", || pod(&api, "alice-r").is_none().then_some(())).await;
    wait("phase Stopped", || (ws_condition(&api, "alice-r", "Ready")?.1 == "Stopped").then_some(())).await;
    let kept = api.get::<PersistentVolumeClaim>(Some(NS), "ws-alice-r-home").expect("home kept");
    assert_eq!(kept.uid(), home.uid(), "the same home volume");

    api.update::<Workspace>(Some(NS), "alice-r", json!({"spec": {"lifecycle": {"running": true}}})).expect("start");
    wait("the pod again", || pod(&api, "alice-r")).await;
    assert_eq!(api.get::<PersistentVolumeClaim>(Some(NS), "ws-alice-r-home").expect("home").uid(), home.uid());
    running.stop().await;
}

#[tokio::test]
async fn deleting_a_workspace_revokes_its_certificate_then_lets_go() {
    let api = FakeApi::new();
    seed(&api, &["alice-r"]);
    let running = Running::in_process(api.clone());
    wait("the pod", || pod(&api, "alice-r")).await;
    let secret = api.get::<Secret>(Some(NS), "ws-alice-r-agent").expect("secret");
    let serial = secret.annotations()[SERIAL_ANNOTATION].clone();

    // The first revocation fails: the finalizer stays and the status says why.
    running.revoker.fail_next(3);
    api.delete::<Workspace>(Some(NS), "alice-r").expect("delete");
    wait("the revocation failure in status", || {
        (ws_condition(&api, "alice-r", "Degraded")? == ("True".into(), "RevocationFailed".into())).then_some(())
    })
    .await;
    wait("the workspace to go", || api.get::<Workspace>(Some(NS), "alice-r").is_none().then_some(())).await;
    let calls = running.revoker.calls();
    assert!(calls.len() >= 4, "retried after the failures: {calls:?}");
    assert!(
        calls.iter().all(|c| c.workspace == "ward-7/alice-r" && c.serial == serial && c.reason == "workspace deleted")
    );
    assert!(pod(&api, "alice-r").is_none());
    assert!(api.get::<Secret>(Some(NS), "ws-alice-r-agent").is_none());
    assert!(api.get::<PersistentVolumeClaim>(Some(NS), "ws-alice-r-home").is_none());
    assert!(api.get::<Service>(Some(NS), "ws-alice-r-desktop").is_none());
    assert!(api.events_about("alice-r").iter().any(|(t, r, _)| t == "Warning" && r == "RevocationFailed"));
    assert!(api.events_about("alice-r").iter().any(|(_, r, n)| r == "CertificateRevoked" && n.contains(&serial)));
    running.stop().await;
}

#[tokio::test]
async fn a_dataset_not_granted_gets_no_pod_and_no_retry_loop() {
    let api = FakeApi::new();
    let mut ex = example();
    ex.datasets[0].spec.granted_to = vec!["ward-9".into()];
    api.create(&ex.project).expect("project");
    for d in &ex.datasets {
        api.create(d).expect("dataset");
    }
    api.create(&ex.workspaces[0]).expect("workspace");
    let running = Running::in_process(api.clone());

    wait("Ready=False DatasetNotGranted", || {
        (ws_condition(&api, "alice-r", "Ready")? == ("False".into(), "DatasetNotGranted".into())).then_some(())
    })
    .await;
    assert!(pod(&api, "alice-r").is_none());
    // Home, Secret and Service are kept; only the pod is withheld.
    assert!(api.get::<PersistentVolumeClaim>(Some(NS), "ws-alice-r-home").is_some());
    let ws = api.get::<Workspace>(Some(NS), "alice-r").expect("ws");
    let message =
        ws.status.expect("status").conditions.into_iter().find(|c| c.type_ == "Ready").expect("Ready").message;
    assert!(
        message.contains(r#"spec.datasets[0]: dataset "icu-2019" is not granted to project "ward-7""#),
        "{message}"
    );

    // No hot loop: the workspace goes quiet (a loop never would) and stays quiet.
    quiet(&api, "alice-r").await;
    api.clear_calls();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let touching: Vec<_> = api.calls().into_iter().filter(|c| c.path.contains("alice-r")).collect();
    assert!(touching.is_empty(), "the invalid workspace was retried: {touching:#?}");

    // Granting the dataset wakes the workspace: the pod appears.
    api.update::<Dataset>(None, "icu-2019", json!({"spec": {"grantedTo": ["ward-7", "ward-9"]}})).expect("grant");
    wait("the pod after the grant", || pod(&api, "alice-r")).await;
    running.stop().await;
}

fn decide(api: &FakeApi, request: &str, decision: &str, by: &str) {
    let condition = json!({
        "type": decision, "status": "True", "reason": "AdminDecision", "message": "",
        "lastTransitionTime": "2026-12-01T08:00:00Z",
    });
    api.set_status::<WorkspaceRequest>(Some(NS), request, json!({"conditions": [condition], "decidedBy": by}))
        .expect("decide");
}

fn request_named(ex: &Example, name: &str) -> WorkspaceRequest {
    let mut r = ex.request.clone();
    r.metadata.name = Some(name.into());
    r.spec.workspace_name = name.into();
    r
}

fn fulfilled(api: &FakeApi, name: &str) -> Option<(String, String)> {
    let r = api.get::<WorkspaceRequest>(Some(NS), name)?;
    condition(&r.status?.conditions, "Fulfilled")
}

#[tokio::test]
async fn requests_create_a_workspace_only_after_a_valid_approval() {
    let api = FakeApi::new();
    let ex = seed(&api, &[]);
    for name in ["approved", "denied", "self-approved"] {
        api.create(&request_named(&ex, name)).expect("request");
    }
    let running = Running::in_process(api.clone());
    wait("awaiting decision", || (fulfilled(&api, "approved")?.1 == "AwaitingDecision").then_some(())).await;
    assert!(api.get::<Workspace>(Some(NS), "approved").is_none());

    decide(&api, "approved", "Approved", "carol@ward7.example");
    decide(&api, "denied", "Denied", "carol@ward7.example");
    decide(&api, "self-approved", "Approved", "bob@ward7.example");

    let ws = wait("the approved workspace", || api.get::<Workspace>(Some(NS), "approved")).await;
    assert_eq!(ws.spec, ex.request.spec.workspace);
    assert_eq!(ws.labels()["noexit.io/request"], "approved");
    wait("Fulfilled", || (fulfilled(&api, "approved")? == ("True".into(), "WorkspaceCreated".into())).then_some(()))
        .await;
    wait("Denied", || (fulfilled(&api, "denied")?.1 == "Denied").then_some(())).await;
    wait("SelfApproval", || {
        (fulfilled(&api, "self-approved")? == ("False".into(), "SelfApproval".into())).then_some(())
    })
    .await;
    assert!(api.get::<Workspace>(Some(NS), "denied").is_none());
    assert!(api.get::<Workspace>(Some(NS), "self-approved").is_none());
    assert!(api.events_about("self-approved").iter().any(|(t, r, _)| t == "Warning" && r == "SelfApproval"));
    // The admin's decision is kept next to the controller's conditions.
    let r = api.get::<WorkspaceRequest>(Some(NS), "approved").expect("request");
    assert_eq!(condition(&r.status.expect("status").conditions, "Approved").map(|c| c.0).as_deref(), Some("True"));
    running.stop().await;
}

#[tokio::test]
async fn api_errors_are_retried_with_backoff_and_reported() {
    let api = FakeApi::new();
    seed(&api, &["alice-r"]);
    api.fail_next(Some(Method::PATCH), "/namespaces/noexit-ward-7/pods/ws-alice-r", 500, 3);
    api.fail_next(Some(Method::PATCH), "/services/ws-alice-r-desktop", 409, 1);
    let running = Running::in_process(api.clone());

    wait("the pod after the failures", || pod(&api, "alice-r")).await;
    let attempts: Vec<_> =
        api.calls().into_iter().filter(|c| c.method == "PATCH" && c.path.ends_with("/pods/ws-alice-r")).collect();
    assert_eq!(attempts.iter().take(4).map(|c| c.status).collect::<Vec<_>>(), [500, 500, 500, 201]);
    // Backoff: the retry after the third failure waits at least 2 × the 50 ms base.
    let last_gap = attempts[3].at - attempts[2].at;
    assert!(last_gap >= Duration::from_millis(100), "retried after {last_gap:?}");
    let events = api.events_about("alice-r");
    assert!(
        events.iter().any(|(t, r, n)| t == "Warning" && r == "ApiUnavailable" && n.contains("injected failure 500")),
        "{events:#?}"
    );
    let metrics = running.ctx.metrics.encode();
    assert!(
        metrics.contains(r#"noexit_reconcile_errors_total{kind="Workspace",category="unavailable"} 3"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"noexit_reconcile_errors_total{kind="Workspace",category="conflict"} 1"#), "{metrics}");
    // Once it works again, Degraded clears.
    wait("Degraded=False", || (ws_condition(&api, "alice-r", "Degraded")?.0 == "False").then_some(())).await;
    running.stop().await;
}

/// Touch workspace alice-r and wait until it has been reconciled again: a GET whose path ends
/// with `read` (a Secret the reconcile reads), then the desktop Service applied.
async fn reconcile_again(api: &FakeApi, read: &str) {
    api.clear_calls();
    api.update::<Workspace>(Some(NS), "alice-r", json!({"metadata": {"labels": {"touched": "yes"}}})).expect("touch");
    wait("a second reconcile", || {
        api.calls().iter().any(|c| c.method == "GET" && c.path.ends_with(read)).then_some(())
    })
    .await;
    wait("the reconcile to finish", || {
        api.calls()
            .iter()
            .any(|c| c.method == "PATCH" && c.path.ends_with("/services/ws-alice-r-desktop"))
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_agent_secret_is_stable_across_reconciles() {
    let api = FakeApi::new();
    seed(&api, &["alice-r", "alice-vm"]);
    let running = Running::in_process(api.clone());
    wait("the pod", || pod(&api, "alice-r")).await;
    let before = wait("the secret", || api.get::<Secret>(Some(NS), "ws-alice-r-agent")).await;

    // Touch the workspace: it is reconciled again.
    reconcile_again(&api, "/secrets/ws-alice-r-agent").await;
    let after = api.get::<Secret>(Some(NS), "ws-alice-r-agent").expect("secret");
    assert_eq!(before.data, after.data, "certificate and key unchanged");
    assert_eq!(before.annotations()[SERIAL_ANNOTATION], after.annotations()[SERIAL_ANNOTATION]);
    assert_eq!(before.resource_version(), after.resource_version(), "the apply was a no-op");
    let issued = api.events_about("alice-r").into_iter().filter(|(_, r, _)| r == "CertificateIssued").count();
    assert_eq!(issued, 1);
    // The VM workspace got a VirtualMachine (KubeVirt) with its cloud-init in the same Secret.
    let vms =
        api.list_raw(&ResourceKey { prefix: "apis/kubevirt.io/v1".into(), plural: "virtualmachines".into() }, Some(NS));
    assert_eq!(vms.len(), 1);
    running.stop().await;
}

#[tokio::test]
async fn a_malformed_object_does_not_break_the_watch() {
    let api = FakeApi::new();
    seed(&api, &["alice-r"]);
    let mut bad = serde_json::to_value(&example().workspaces[1]).expect("json");
    bad["spec"]["runtime"] = json!("banana");
    bad["apiVersion"] = json!("noexit.io/v1alpha1");
    bad["kind"] = json!("Workspace");
    api.create_raw(&ResourceKey::of::<Workspace>(), Some(NS), bad).expect("raw");
    let running = Running::in_process(api.clone());
    wait("the good workspace's pod", || pod(&api, "alice-r")).await;
    wait("a Malformed event", || api.events_about("alice-vm").iter().any(|(_, r, _)| r == "Malformed").then_some(()))
        .await;
    running.stop().await;
}

#[tokio::test]
async fn leader_election_has_one_holder_and_hands_over() {
    let api = FakeApi::new();
    let client = api.client();
    let lease = || Api::<Lease>::namespaced(client.clone(), "noexit-system");
    let a = LeaderElector::new(lease(), "noexit-controller-leader", "a", Duration::from_secs(1));
    let b = LeaderElector::new(lease(), "noexit-controller-leader", "b", Duration::from_secs(1));

    let (ra, rb) = tokio::join!(a.try_acquire_or_renew(), b.try_acquire_or_renew());
    let (ra, rb) = (ra.expect("a"), rb.expect("b"));
    assert!(ra ^ rb, "exactly one leader (a: {ra}, b: {rb})");
    let (leader, follower) = if ra { (&a, &b) } else { (&b, &a) };
    assert!(leader.try_acquire_or_renew().await.expect("renew"));
    assert!(!follower.try_acquire_or_renew().await.expect("follow"));

    // A leader that stops renewing loses the lease once it expires.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if follower.try_acquire_or_renew().await.expect("try") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the follower never took over an expired lease");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Release hands over at once.
    follower.release().await.expect("release");
    assert!(leader.try_acquire_or_renew().await.expect("reacquire"));
    let l =
        Api::<Lease>::namespaced(client.clone(), "noexit-system").get("noexit-controller-leader").await.expect("lease");
    assert_eq!(l.spec.expect("spec").lease_transitions, Some(2));
}

#[tokio::test]
async fn health_and_metrics_endpoints() {
    use tower::ServiceExt;
    let metrics = std::sync::Arc::new(noexit_operator::telemetry::Metrics::default());
    metrics.observe("Project", "success", 0.01);
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let router = noexit_operator::controllers::run::health_router(metrics, ready.clone());
    let get = |path: &str| http::Request::get(path).body(axum::body::Body::empty()).expect("request");
    assert_eq!(router.clone().oneshot(get("/healthz")).await.expect("healthz").status(), 200);
    assert_eq!(router.clone().oneshot(get("/readyz")).await.expect("readyz").status(), 503);
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(router.clone().oneshot(get("/readyz")).await.expect("readyz").status(), 200);
    let response = router.oneshot(get("/metrics")).await.expect("metrics");
    let body = http_body_util::BodyExt::collect(response.into_body()).await.expect("body").to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains(r#"noexit_reconcile_total{kind="Project",outcome="success"} 1"#), "{text}");
}

fn heartbeat(api: &FakeApi, locked: bool) {
    let report = json!({ "agent": {
        "lastHeartbeat": chrono::Utc::now().to_rfc3339(), "version": "0.1.0", "egressLocked": locked,
        "activeSessions": 1, "spoolDepth": 0,
    }});
    api.set_status::<Workspace>(Some(NS), "alice-r", report).expect("heartbeat");
}

#[tokio::test]
async fn the_agent_report_makes_a_workspace_ready_and_heartbeats_alone_wake_nothing() {
    let api = FakeApi::new();
    seed(&api, &["alice-r"]);
    let running = Running::in_process(api.clone());
    wait("the pod", || pod(&api, "alice-r")).await;

    heartbeat(&api, true);
    wait("Ready=True", || (ws_condition(&api, "alice-r", "Ready")? == ("True".into(), "Running".into())).then_some(()))
        .await;
    assert_eq!(ws_condition(&api, "alice-r", "EgressLocked").map(|c| c.0).as_deref(), Some("True"));
    quiet(&api, "alice-r").await;

    for _ in 0..3 {
        heartbeat(&api, true);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reconciles = api.calls().into_iter().filter(|c| c.path.ends_with("/secrets/ws-alice-r-agent")).count();
    assert_eq!(reconciles, 0, "heartbeats woke the reconciler");

    // The egress wall failing is a change the controller must see.
    heartbeat(&api, false);
    wait("Ready=False", || (ws_condition(&api, "alice-r", "Ready")?.1 == "WaitingForEgressLock").then_some(())).await;
    running.stop().await;
}

/// The mirror's `noexit-mirror-config` follows the Projects' `spec.egress.mirror` and the
/// workspace pods' addresses; an unchanged set is not rewritten.
#[tokio::test]
async fn the_mirror_config_follows_project_policies_and_workspace_addresses() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use noexit_operator::mirror::clients::ClientMap;
    use noexit_operator::mirror::policy::PolicyFile;

    const CM: &str = "noexit-mirror-config";
    let api = FakeApi::new();
    // As the chart creates it: empty, every project refused.
    let mut empty = ConfigMap::default();
    empty.metadata.name = Some(CM.into());
    empty.metadata.namespace = Some("noexit-system".into());
    empty.data = Some(
        [("policy.yaml", "projects: {}\n"), ("clients.yaml", "clients: {}\n")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    );
    api.create(&empty).expect("configmap");
    let ex = seed(&api, &["alice-r"]);
    let running = Running::in_process(api.clone());
    let files = |api: &FakeApi| {
        let data = api.get::<ConfigMap>(Some("noexit-system"), CM)?.data?;
        Some((PolicyFile::from_yaml(&data["policy.yaml"]).ok()?, ClientMap::from_yaml(&data["clients.yaml"]).ok()?))
    };
    let address = "10.244.1.17".parse().expect("ip");

    wait("the workspace pod", || pod(&api, "alice-r")).await;
    api.set_status::<Pod>(Some(NS), "ws-alice-r", json!({"phase": "Running", "podIP": "10.244.1.17"}))
        .expect("pod status");
    let (policy, _) = wait("the policy and the client mapping", || {
        let (policy, clients) = files(&api)?;
        (clients.lookup(address)?.to_string() == "ward-7/alice-r").then_some((policy, clients))
    })
    .await;
    assert_eq!(policy.project("ward-7"), Some(&ex.project.spec.egress.mirror));
    let applies: Vec<_> = api.calls().into_iter().filter(|c| c.path.ends_with(CM) && c.patch.is_some()).collect();
    assert!(!applies.is_empty() && applies.iter().all(|c| c.patch == Some("apply")), "{applies:#?}");
    assert!(applies.iter().all(|c| c.field_manager.as_deref() == Some("noexit-operator")), "{applies:#?}");
    // Nothing changed since: no further writes.
    quiet(&api, &format!("configmaps/{CM}")).await;

    api.update::<Project>(None, "ward-7", json!({"spec": {"egress": {"mirror": {"deny": [{"name": "stringi"}]}}}}))
        .expect("new deny list");
    wait("the new deny list", || {
        let (policy, _) = files(&api)?;
        let deny: Vec<String> = policy.project("ward-7")?.deny.iter().map(|r| r.name.clone()).collect();
        (deny == ["stringi"]).then_some(())
    })
    .await;

    api.delete::<Pod>(Some(NS), "ws-alice-r").expect("delete pod");
    wait("the mapping gone", || files(&api)?.1.lookup(address).is_none().then_some(())).await;
    running.stop().await;
}

/// A namespace `noexit-ward-7` that noexit did not create (here: a team's, with its own labels)
/// is never adopted: the Project is refused with `NamespaceNotOwned`, the namespace is not
/// written to and nothing is created in it.
#[tokio::test]
async fn a_foreign_namespace_is_never_adopted() {
    let api = FakeApi::new();
    let foreign = Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(NS.into()),
            labels: Some([("team".to_owned(), "someone-else".to_owned())].into()),
            ..Default::default()
        },
        ..Default::default()
    };
    api.create(&foreign).expect("the foreign namespace");
    let before = api.get::<Namespace>(None, NS).expect("namespace");
    seed(&api, &[]);
    let running = Running::in_process(api.clone());

    let message = wait("Ready=False NamespaceNotOwned", || {
        let status = api.get::<Project>(None, "ward-7")?.status?;
        let ready = status.conditions.into_iter().find(|c| c.type_ == "Ready")?;
        (ready.status == "False" && ready.reason == "NamespaceNotOwned").then_some(ready.message)
    })
    .await;
    assert!(message.contains(r#"namespace "noexit-ward-7" already exists and was not created by noexit"#), "{message}");
    let after = api.get::<Namespace>(None, NS).expect("namespace");
    assert_eq!(after, before, "the foreign namespace was changed");
    let writes: Vec<_> = api
        .calls()
        .into_iter()
        .filter(|c| c.method != "GET" && c.path.contains("noexit-ward-7") && !c.path.contains("/events"))
        .collect();
    assert!(writes.is_empty(), "writes into the foreign namespace: {writes:#?}");
    assert!(api.list::<NetworkPolicy>(Some(NS)).is_empty());
    running.stop().await;
}

/// A Project named `system` would be the operator's own namespace `noexit-system`: refused
/// before anything is built, and the operator namespace is left alone.
#[tokio::test]
async fn a_project_named_after_the_operator_namespace_is_refused() {
    let api = FakeApi::new();
    let mut ex = example();
    ex.project.metadata.name = Some("system".into());
    api.create(&ex.project).expect("project");
    let running = Running::in_process(api.clone());
    let message = wait("Ready=False for project system", || {
        let status = api.get::<Project>(None, "system")?.status?;
        let ready = status.conditions.into_iter().find(|c| c.type_ == "Ready")?;
        (ready.status == "False").then_some(ready.message)
    })
    .await;
    assert!(message.starts_with("project system: metadata.name: \"system\" is reserved"), "{message}");
    let touched: Vec<_> = api
        .calls()
        .into_iter()
        .filter(|c| c.method != "GET" && c.path.contains("namespaces/noexit-system") && !c.path.contains("secrets"))
        .filter(|c| !c.path.contains("leases") && !c.path.contains("events") && !c.path.contains("configmaps"))
        .collect();
    assert!(touched.is_empty(), "the operator namespace was written to: {touched:#?}");
    assert!(api.list::<NetworkPolicy>(Some("noexit-system")).is_empty());
    running.stop().await;
}

/// With the site's image allowlist (examples/site.yaml), a workspace whose image is a tag, or
/// not listed, gets no pod (`Ready=False ImageNotAllowed` naming `spec.image`); the listed
/// digest runs.
#[tokio::test]
async fn a_workspace_image_off_the_site_allowlist_gets_no_pod() {
    let site: noexit_operator::controllers::Site =
        serde_yaml::from_str(include_str!("../../examples/site.yaml")).expect("examples/site.yaml");
    assert!(site.workspace_images.is_set());
    let api = FakeApi::new();
    let ex = seed(&api, &[]);
    let mut tagged = ex.workspaces[0].clone();
    tagged.spec.image = "registry.ward7.example/noexit/r-desktop:4.4".into();
    api.create(&tagged).expect("workspace");
    let running = Running::in_process_with_site(api.clone(), site);

    let message = wait("Ready=False ImageNotAllowed", || {
        let ws = api.get::<Workspace>(Some(NS), "alice-r")?;
        let ready = ws.status?.conditions.into_iter().find(|c| c.type_ == "Ready")?;
        (ready.status == "False" && ready.reason == "ImageNotAllowed").then_some(ready.message)
    })
    .await;
    assert!(message.starts_with("workspace ward-7/alice-r: spec.image: "), "{message}");
    assert!(pod(&api, "alice-r").is_none(), "a pod was made from an image off the allowlist");

    // The listed digest: the pod appears.
    let pinned = ex.workspaces[0].spec.image.clone();
    api.update::<Workspace>(Some(NS), "alice-r", json!({"spec": {"image": pinned}})).expect("pin");
    let p = wait("the pod with the pinned image", || pod(&api, "alice-r")).await;
    let image = p.spec.expect("spec").containers.into_iter().find(|c| c.name == "workspace").and_then(|c| c.image);
    assert_eq!(image.as_deref(), Some(pinned.as_str()));
    running.stop().await;
}

/// Issue 10: each workspace gets its VNC Secret (a random password of at most 8 characters
/// for the gateway, TigerVNC's password file for the desktop), owned by the Workspace, made
/// once and kept across reconciles; and a Role that lets the gateway get that Secret alone.
#[tokio::test]
async fn the_vnc_secret_is_made_once_owned_by_the_workspace_and_kept() {
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let api = FakeApi::new();
    seed(&api, &["alice-r", "alice-vm"]);
    let running = Running::in_process(api.clone());
    wait("the pod", || pod(&api, "alice-r")).await;
    let before = wait("the VNC secret", || api.get::<Secret>(Some(NS), "ws-alice-r-vnc")).await;
    let data = before.data.clone().expect("data");
    let password = data["password"].0.clone();
    assert_eq!(password.len(), 8, "TigerVNC reads 8 characters");
    assert!(password.iter().all(u8::is_ascii_alphanumeric));
    assert_eq!(data["passwd"].0, noexit_gateway::rfb::handshake::password_file(&password));
    let owner = &before.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("Workspace", "alice-r", Some(true)));
    let other = wait("the VM's VNC secret", || api.get::<Secret>(Some(NS), "ws-alice-vm-vnc")).await;
    assert_ne!(other.data.expect("data")["password"].0, password, "each workspace has its own password");

    // The pod mounts it where start-desktop reads it.
    let p = pod(&api, "alice-r").expect("pod");
    let vol =
        p.spec.as_ref().and_then(|s| s.volumes.as_ref()).and_then(|v| v.iter().find(|v| v.name == "vnc").cloned());
    assert_eq!(vol.and_then(|v| v.secret).and_then(|s| s.secret_name).as_deref(), Some("ws-alice-r-vnc"));

    // The gateway's right to read it: by name, get only.
    let role = wait("the gateway role", || api.get::<Role>(Some(NS), "ws-alice-r-gateway")).await;
    let rule = &role.rules.expect("rules")[0];
    assert_eq!(rule.resource_names.as_deref(), Some(&["ws-alice-r-vnc".to_owned()][..]));
    assert_eq!(rule.verbs, ["get"]);
    let binding = wait("the gateway binding", || api.get::<RoleBinding>(Some(NS), "ws-alice-r-gateway")).await;
    let subject = &binding.subjects.expect("subjects")[0];
    assert_eq!((subject.name.as_str(), subject.namespace.as_deref()), ("noexit-gateway", Some("noexit-system")));

    // Reconciled again: the same password (a new one would cut the live desktop session).
    reconcile_again(&api, "/secrets/ws-alice-r-vnc").await;
    let after = api.get::<Secret>(Some(NS), "ws-alice-r-vnc").expect("secret");
    assert_eq!(before.data, after.data, "the VNC password was rotated by a reconcile");
    assert_eq!(before.resource_version(), after.resource_version(), "the apply was a no-op");
    let made = api.events_about("alice-r").into_iter().filter(|(_, r, _)| r == "VncPasswordCreated").count();
    assert_eq!(made, 1);
    running.stop().await;
}

/// The gateway's Kubernetes directory reads what the controller rendered: the desktop address
/// from `status.endpoint`, the password from the VNC Secret, the policy from
/// `spec.desktop`; and it follows membership, approval, expiry and the workspace's state.
#[tokio::test]
async fn the_gateway_directory_reads_what_the_controller_rendered() {
    use noexit_gateway::directory::{self, DesktopPolicy, KubeDirectory, SecondConnect};
    let api = FakeApi::new();
    let ex = seed(&api, &["alice-r"]);
    let running = Running::in_process(api.clone());
    wait("the pod", || pod(&api, "alice-r")).await;
    let secret = wait("the VNC secret", || api.get::<Secret>(Some(NS), "ws-alice-r-vnc")).await;
    let password = secret.data.expect("data")["password"].0.clone();
    heartbeat(&api, true);
    wait("Ready=True", || (ws_condition(&api, "alice-r", "Ready")?.0 == "True").then_some(())).await;
    api.update::<Project>(
        None,
        "ward-7",
        json!({"spec": {"desktop": {"maxSessionMinutes": 120, "secondConnect": "refuse", "adminSupport": true}}}),
    )
    .expect("policy");

    let site = DesktopPolicy { paste_max_bytes: 4096, max_session_seconds: 3600, ..DesktopPolicy::default() };
    let dir = KubeDirectory::new(api.client(), site);
    const ALICE: &str = "alice@ward7.example";
    let grant = directory::resolve(&dir, ALICE, true, "ward-7", "alice-r").await.expect("alice opens her desktop");
    assert_eq!(grant.address, "ws-alice-r-desktop.noexit-ward-7.svc:5901");
    assert_eq!(grant.password, password);
    assert!(grant.policy.clipboard_in, "examples/ward-7.yaml allows paste");
    assert_eq!(grant.policy.idle_timeout_seconds, 30 * 60);
    assert_eq!(grant.policy.max_session_seconds, 3600, "the site's cap is shorter than the project's 120 min");
    assert_eq!(grant.policy.second_connect, SecondConnect::Refuse);
    assert_eq!(grant.policy.paste_max_bytes, 4096);
    assert!(!grant.policy.admin_support, "the site did not allow admin support");
    let listed = directory::list(&dir, ALICE, true).await.expect("list");
    assert_eq!(listed.iter().map(|l| (l.workspace.as_str(), l.available)).collect::<Vec<_>>(), [("alice-r", true)]);

    let code = |user: &'static str, mfa: bool, ws: &'static str| {
        let dir = dir.clone();
        async move { directory::resolve(&dir, user, mfa, "ward-7", ws).await.expect_err("refused").code() }
    };
    assert_eq!(code("bob@ward7.example", true, "alice-r").await, "notOwner");
    assert_eq!(code("mallory@ward7.example", true, "alice-r").await, "notMember");
    assert_eq!(code(ALICE, false, "alice-r").await, "mfaRequired");
    assert_eq!(code(ALICE, true, "nope").await, "unknownWorkspace");

    // The workspace stopped.
    api.update::<Workspace>(Some(NS), "alice-r", json!({"spec": {"lifecycle": {"running": false}}})).expect("stop");
    wait("stopped", || {
        let ws = api.get::<Workspace>(Some(NS), "alice-r")?;
        (ws.status?.phase? != noexit_crds::workspace::Phase::Running).then_some(())
    })
    .await;
    assert_eq!(code(ALICE, true, "alice-r").await, "workspaceStopped");
    api.update::<Workspace>(Some(NS), "alice-r", json!({"spec": {"lifecycle": {"running": true}}})).expect("start");

    // The project expired.
    api.update::<Project>(None, "ward-7", json!({"spec": {"approval": {"expires": "2020-01-01"}}})).expect("expire");
    assert!(matches!(code(ALICE, true, "alice-r").await, "projectExpired" | "projectNotApproved"));
    // Alice removed from the project.
    let members = serde_json::to_value(&ex.project.spec.members).expect("members");
    let without_alice: Vec<serde_json::Value> =
        members.as_array().expect("list").iter().filter(|m| m["user"] != ALICE).cloned().collect();
    api.update::<Project>(
        None,
        "ward-7",
        json!({"spec": {"approval": {"expires": "2099-01-01"}, "members": without_alice}}),
    )
    .expect("remove alice");
    assert_eq!(code(ALICE, true, "alice-r").await, "notMember");
    assert!(directory::list(&dir, ALICE, true).await.expect("list").is_empty());

    // Alice back; then, with the controller stopped, no VNC Secret means no desktop (never an
    // unauthenticated connection).
    api.update::<Project>(None, "ward-7", json!({"spec": {"members": members}})).expect("alice back");
    // (Her workspace was blocked while she was not a member: the pod comes back and the
    // agent reports again.)
    for _ in 0..100 {
        if directory::resolve(&dir, ALICE, true, "ward-7", "alice-r").await.is_ok() {
            break;
        }
        if pod(&api, "alice-r").is_some() {
            heartbeat(&api, true);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    directory::resolve(&dir, ALICE, true, "ward-7", "alice-r").await.expect("alice may connect again");
    running.stop().await;
    api.delete::<Secret>(Some(NS), "ws-alice-r-vnc").expect("delete");
    let refused = directory::resolve(&dir, ALICE, true, "ward-7", "alice-r").await.expect_err("no secret");
    assert_eq!(refused.code(), "noDesktop", "{refused}");
}
