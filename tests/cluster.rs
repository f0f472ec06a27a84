//! End-to-end against a real cluster with noexit installed (`hack/kind-up.sh`). Runs when
//! `KUBECONFIG` is set; otherwise each test prints that it skipped and passes.
//!
//!   hack/kind-up.sh && KUBECONFIG=$HOME/.kube/config cargo test -p noexit-e2e --test cluster
//!
//! Each test works on its own project (`e2e-<tag>-<hex>`) and deletes it at the end.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use noexit_crds::{Dataset, Project, Workspace, WorkspaceRequest};
use noexit_e2e::{Example, apply, apply_admitted, as_user, cluster, refusal, wait_for, with_project};
use serde_json::json;

const SHORT: Duration = Duration::from_secs(60);
const LONG: Duration = Duration::from_secs(180);

/// Apply the example project and its datasets as the cluster admin; wait for its namespace.
async fn create_project(client: &Client, ex: &Example) -> anyhow::Result<()> {
    apply(&Api::<Project>::all(client.clone()), &ex.project).await?;
    for d in &ex.datasets {
        apply(&Api::<Dataset>::all(client.clone()), d).await?;
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = ex.namespace();
    wait_for(&format!("namespace {ns}"), LONG, || async { Ok(namespaces.get_opt(&ns).await?) }).await?;
    // The webhook judges from its caches: wait until they hold the project and its datasets
    // (a server-side dry run of the example workspace is admitted).
    let workspaces: Api<Workspace> = Api::namespaced(client.clone(), &ns);
    let dry_run = PostParams { dry_run: true, ..PostParams::default() };
    wait_for("the webhook to admit the example workspace (dry run)", SHORT, || async {
        Ok(workspaces.create(&dry_run, &ex.workspaces[0]).await.ok().map(|_| ()))
    })
    .await?;
    Ok(())
}

fn condition<'a>(conditions: &'a [noexit_crds::Condition], type_: &str) -> Option<&'a noexit_crds::Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[tokio::test]
async fn crds_apply_and_are_established() -> anyhow::Result<()> {
    let Some(client) = cluster().await? else { return Ok(()) };
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    for crd in noexit_crds::all_crds() {
        // Idempotent over the chart's copy (the same YAML, checked by crds/tests/chart.rs).
        apply(&crds, &crd).await?;
        let name = crd.name_any();
        wait_for(&format!("CRD {name} Established"), SHORT, || async {
            let Some(live) = crds.get_opt(&name).await? else { return Ok(None) };
            let established = live
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            Ok(established.then_some(()))
        })
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_project_gets_its_walled_namespace() -> anyhow::Result<()> {
    let Some(client) = cluster().await? else { return Ok(()) };
    with_project(&client, "ns", |client, ex| async move {
        create_project(&client, &ex).await?;
        let ns: Namespace = Api::all(client.clone()).get(&ex.namespace()).await?;
        let labels: BTreeMap<String, String> = ns.labels().clone();
        anyhow::ensure!(
            labels.get("pod-security.kubernetes.io/enforce").map(String::as_str) == Some("restricted"),
            "namespace {} is not Pod Security restricted: {labels:?}",
            ex.namespace()
        );
        let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ex.namespace());
        wait_for("NetworkPolicy noexit-default-deny", SHORT, || async {
            Ok(policies.get_opt("noexit-default-deny").await?)
        })
        .await?;
        let projects: Api<Project> = Api::all(client.clone());
        let name = ex.project.name_any();
        wait_for("Project Ready=True", LONG, || async {
            let p = projects.get(&name).await?;
            let ready = p.status.as_ref().and_then(|s| condition(&s.conditions, "Ready")).map(|c| c.status == "True");
            Ok((ready == Some(true)).then_some(()))
        })
        .await
    })
    .await
}

#[tokio::test]
async fn a_pod_workspace_runs_stops_and_keeps_its_home() -> anyhow::Result<()> {
    let Some(client) = cluster().await? else { return Ok(()) };
    with_project(&client, "ws", |client, ex| async move {
        create_project(&client, &ex).await?;
        let ns = ex.namespace();
        let workspaces: Api<Workspace> = Api::namespaced(client.clone(), &ns);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
        let ws = ex.workspaces.iter().find(|w| w.name_any() == "alice-r").cloned().ok_or(anyhow::anyhow!("alice-r"))?;
        apply_admitted(&workspaces, &ws).await?;

        wait_for("pod ws-alice-r", LONG, || async { Ok(pods.get_opt("ws-alice-r").await?) }).await?;
        wait_for("workspace status for the current generation", LONG, || async {
            let w = workspaces.get("alice-r").await?;
            let seen = w.status.as_ref().and_then(|s| s.observed_generation);
            Ok((seen.is_some() && seen == w.metadata.generation).then_some(()))
        })
        .await?;

        let stop = json!({"spec": {"lifecycle": {"running": false}}});
        workspaces.patch("alice-r", &PatchParams::default(), &Patch::Merge(&stop)).await?;
        wait_for("pod ws-alice-r gone after stop", LONG, || async {
            Ok(pods.get_opt("ws-alice-r").await?.is_none().then_some(()))
        })
        .await?;
        anyhow::ensure!(pvcs.get_opt("ws-alice-r-home").await?.is_some(), "stopping deleted the home volume");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn revoking_a_grant_blocks_the_workspace_with_dataset_not_granted() -> anyhow::Result<()> {
    let Some(client) = cluster().await? else { return Ok(()) };
    with_project(&client, "grant", |client, ex| async move {
        create_project(&client, &ex).await?;
        let ns = ex.namespace();
        let workspaces: Api<Workspace> = Api::namespaced(client.clone(), &ns);
        let ws = ex.workspaces.iter().find(|w| w.name_any() == "alice-r").cloned().ok_or(anyhow::anyhow!("alice-r"))?;
        apply_admitted(&workspaces, &ws).await?;

        // The steward revokes: admitted (with a warning), and the workspace stops.
        let mut icu = ex.datasets[0].clone();
        icu.spec.granted_to.clear();
        apply(&Api::<Dataset>::all(client.clone()), &icu).await?;
        wait_for("Ready=False reason DatasetNotGranted", LONG, || async {
            let w = workspaces.get("alice-r").await?;
            let blocked = w
                .status
                .as_ref()
                .and_then(|s| condition(&s.conditions, "Ready"))
                .is_some_and(|c| c.status == "False" && c.reason == "DatasetNotGranted");
            Ok(blocked.then_some(()))
        })
        .await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn the_webhook_refuses_what_cel_cannot_see() -> anyhow::Result<()> {
    let Some(client) = cluster().await? else { return Ok(()) };
    with_project(&client, "hook", |client, ex| async move {
        create_project(&client, &ex).await?;
        let project = ex.project.name_any();
        let workspaces: Api<Workspace> = Api::namespaced(client.clone(), &ex.namespace());

        // A dataset the project does not list.
        let mut ws = ex.workspaces[0].clone();
        ws.metadata.name = Some("alice-x".into());
        let mut other = ex.datasets[0].clone();
        other.metadata.name = Some(format!("{project}-other"));
        apply(&Api::<Dataset>::all(client.clone()), &other).await?;
        ws.spec.datasets = vec![ex.datasets[1].name_any(), other.name_any()];
        let msg = wait_for("the webhook's cache to hold the new dataset", SHORT, || async {
            let msg = refusal(workspaces.create(&PostParams::default(), &ws).await)?;
            Ok((!msg.contains("does not exist")).then_some(msg))
        })
        .await?;
        let expected =
            format!("workspace {project}/alice-x: spec.datasets[1]: dataset \"{project}-other\" is not granted to project \"{project}\"");
        anyhow::ensure!(msg.contains(&expected), "refusal {msg:?} lacks {expected:?}");
        let _ = Api::<Dataset>::all(client.clone()).delete(&other.name_any(), &Default::default()).await;

        // An owner who is not a researcher.
        let mut ws = ex.workspaces[0].clone();
        ws.metadata.name = Some("bob-r".into());
        ws.spec.owner = "bob@ward7.example".into();
        let msg = refusal(workspaces.create(&PostParams::default(), &ws).await)?;
        anyhow::ensure!(msg.contains("spec.owner"), "{msg}");

        // A request filed in someone else's name.
        let bob = as_user("bob@ward7.example").await?;
        let mut forged = ex.request.clone();
        forged.metadata.name = Some("forged".into());
        forged.spec.requester = "dave@ward7.example".into();
        let requests: Api<WorkspaceRequest> = Api::namespaced(bob, &ex.namespace());
        let msg = wait_for("bob's request role (RBAC from the controller)", LONG, || async {
            match requests.create(&PostParams::default(), &forged).await {
                Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains("cannot create resource") => Ok(None),
                other => refusal(other).map(Some),
            }
        })
        .await?;
        anyhow::ensure!(msg.contains("in the name of"), "{msg}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_request_is_approved_by_an_admin_and_never_by_its_requester() -> anyhow::Result<()> {
    let Some(client) = cluster().await? else { return Ok(()) };
    with_project(&client, "req", |client, mut ex| async move {
        // Bob is an admin too, so RBAC lets his status write through and the webhook judges it.
        ex.project.spec.members[1].roles.push(noexit_crds::Role::Admin);
        create_project(&client, &ex).await?;
        let ns = ex.namespace();
        // Members act as themselves (impersonation); their Roles come from the controller.
        let bob = as_user("bob@ward7.example").await?;
        let carol = as_user("carol@ward7.example").await?;
        let as_bob: Api<WorkspaceRequest> = Api::namespaced(bob, &ns);
        let as_carol: Api<WorkspaceRequest> = Api::namespaced(carol, &ns);
        wait_for("bob may file requests (RBAC from the controller)", LONG, || async {
            match as_bob.create(&PostParams::default(), &ex.request).await {
                Ok(r) => Ok(Some(r)),
                Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains("cannot create resource") => Ok(None),
                Err(e) => Err(e.into()),
            }
        })
        .await?;

        let decision = |by: &str| {
            json!({"status": {
                "conditions": [{"type": "Approved", "status": "True", "reason": "AdminDecision",
                    "message": "e2e", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                "decidedBy": by,
            }})
        };
        let name = ex.request.name_any();
        let msg = refusal(
            as_bob.patch_status(&name, &PatchParams::default(), &Patch::Merge(decision("bob@ward7.example"))).await,
        )?;
        anyhow::ensure!(msg.contains("may not decide on it"), "{msg}");
        let msg = refusal(
            as_bob.patch_status(&name, &PatchParams::default(), &Patch::Merge(decision("carol@ward7.example"))).await,
        )?;
        anyhow::ensure!(msg.contains("not the authenticated user"), "{msg}");

        as_carol.patch_status(&name, &PatchParams::default(), &Patch::Merge(decision("carol@ward7.example"))).await?;
        let workspaces: Api<Workspace> = Api::namespaced(client.clone(), &ns);
        let wanted = ex.request.spec.workspace_name.clone();
        wait_for("the approved workspace", LONG, || async { Ok(workspaces.get_opt(&wanted).await?) }).await?;
        Ok(())
    })
    .await
}
