//! End-to-end against a real control plane with noexit on it: `hack/dev-cluster.sh up` (etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler, kwok nodes, the chart installed by
//! helm, the controller, webhook and API from this build) or a kind cluster (`hack/kind-up.sh`).
//! Runs when `KUBECONFIG` is set; otherwise each test prints `SKIPPED` and passes, except under
//! `NOEXIT_CI=1` (hack/test.sh, which starts the control plane), where that is a failure.
//!
//!   hack/dev-cluster.sh up && . "$(hack/control-plane/control-plane.sh dir)/env"
//!   cargo test -p noexit-e2e --test cluster
//!   hack/dev-cluster.sh down
//!
//! The tests below the first block use `kubectl`/`helm` from PATH and the `NOEXIT_DEV_*`
//! variables of dev-cluster's env file.
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
use noexit_e2e::{
    Example, Run, apply, apply_admitted, as_user, cluster, dev_env, kubectl, kubectl_stdin, refusal, repo, run,
    wait_for, with_project,
};
use noexit_test_support::agent;
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

        // A spec change reaches the children: a new image (the site's other pinned version, by
        // digest: the allowlist refuses tags) on the running pod.
        let image = "registry.ward7.example/noexit/r-desktop:4.5@sha256:c9bc7485b65e08ccfdce3be00190525d40be2d9a0f59a00169d76ae0fc2e86e3";
        let change = json!({"spec": {"image": image}});
        workspaces.patch("alice-r", &PatchParams::default(), &Patch::Merge(&change)).await?;
        wait_for("pod ws-alice-r with the new image", LONG, || async {
            let Some(pod) = pods.get_opt("ws-alice-r").await? else { return Ok(None) };
            let images: Vec<String> =
                pod.spec.map(|s| s.containers.into_iter().filter_map(|c| c.image).collect()).unwrap_or_default();
            Ok(images.iter().any(|i| i == image).then_some(()))
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
        // The controller writes each member Role as its own object: the admins' one may land a
        // moment after the analysts'. Until it has, RBAC (not the webhook) answers.
        let msg = wait_for("bob's decision reaches the webhook (admin Role from the controller)", LONG, || async {
            let result =
                as_bob.patch_status(&name, &PatchParams::default(), &Patch::Merge(decision("bob@ward7.example"))).await;
            match result {
                Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains("cannot patch resource") => Ok(None),
                other => refusal(other).map(Some),
            }
        })
        .await?;
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

// ---------------------------------------------------------------------------------------------
// On the local control plane (hack/dev-cluster.sh): the chart as helm installed it, kubectl as a
// person uses it, the CRDs' CEL rules, RBAC, the finalizer and garbage collection.

/// Run `kubectl apply -f -` with `yaml`, retrying for up to 60 s while the webhook or the
/// controller has not yet caught up with an object created a moment ago; returns the final run.
async fn kubectl_apply_admitted(yaml: &str) -> anyhow::Result<Run> {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let run = kubectl_stdin(&["apply", "-f", "-"], yaml).await?;
        // The webhook's caches, or the namespace the controller makes from the Project, may
        // lag behind the Project applied in the same run.
        let unseen = run.stderr.contains("does not exist")
            || run.stderr.contains("has not loaded")
            || run.stderr.contains("status unknown for quota")
            || (run.stderr.contains("namespaces \"") && run.stderr.contains("not found"));
        if run.success || !unseen || std::time::Instant::now() > deadline {
            return Ok(run);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn the_chart_is_installed_by_helm_and_the_api_server_kept_every_object() -> anyhow::Result<()> {
    let Some(_client) = cluster().await? else { return Ok(()) };
    let status = run("helm", &["status", "noexit", "-n", "noexit-system", "-o", "json"], None).await?.ok()?;
    let status: serde_json::Value = serde_json::from_str(&status)?;
    anyhow::ensure!(status["info"]["status"] == "deployed", "helm status: {}", status["info"]);
    let manifest = run("helm", &["get", "manifest", "noexit", "-n", "noexit-system"], None).await?.ok()?;
    let docs = manifest.split("\n---").filter(|d| d.contains("kind:")).count();
    let names = kubectl_stdin(&["get", "-f", "-", "-o", "name"], &manifest).await?.ok()?;
    anyhow::ensure!(
        names.lines().count() == docs,
        "the chart rendered {docs} objects, the API server holds {}:\n{names}",
        names.lines().count()
    );
    // The CRDs (the chart's crds/) are established, and the webhook configuration points at
    // the locally running webhook, whose CA it now carries.
    for crd in noexit_crds::all_crds() {
        let name = crd.name_any();
        kubectl(&["wait", "--for=condition=Established", &format!("crd/{name}"), "--timeout=60s"]).await?.ok()?;
    }
    let hook = kubectl(&["get", "validatingwebhookconfiguration", "noexit-webhook", "-o", "json"]).await?.ok()?;
    let hook: serde_json::Value = serde_json::from_str(&hook)?;
    let config = &hook["webhooks"][0]["clientConfig"];
    anyhow::ensure!(config["url"] == dev_env("NOEXIT_DEV_WEBHOOK")?.as_str(), "clientConfig: {config}");
    anyhow::ensure!(config["caBundle"].as_str().is_some_and(|b| !b.is_empty()), "no caBundle: {config}");
    Ok(())
}

#[tokio::test]
async fn kubectl_apply_examples_runs_the_project_on_the_nodes() -> anyhow::Result<()> {
    let Some(client) = cluster().await? else { return Ok(()) };
    let examples = std::fs::read_to_string(repo().join("examples/ward-7.yaml"))?;
    let result = async {
        let run = kubectl_apply_admitted(&examples).await?;
        anyhow::ensure!(run.success, "kubectl apply -f examples/ward-7.yaml: {}{}", run.stdout, run.stderr);
        for line in ["project.noexit.io/ward-7", "dataset.noexit.io/icu-2019", "workspace.noexit.io/alice-r"] {
            anyhow::ensure!(run.stdout.contains(line), "kubectl apply printed no {line}: {}", run.stdout);
        }
        // Pod Security `restricted` admits the workspace pod, the scheduler puts it on a kwok
        // node, and kwok reports it Running with an address.
        let pods: Api<Pod> = Api::namespaced(client.clone(), "noexit-ward-7");
        let pod = wait_for("pod ws-alice-r Running on a node with an IP", LONG, || async {
            let Some(pod) = pods.get_opt("ws-alice-r").await? else { return Ok(None) };
            let status = pod.status.clone().unwrap_or_default();
            let running = status.phase.as_deref() == Some("Running") && status.pod_ip.is_some();
            Ok(running.then_some(pod))
        })
        .await?;
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
        anyhow::ensure!(node.starts_with("kwok-node-"), "scheduled onto {node:?}");
        let workspaces: Api<Workspace> = Api::namespaced(client.clone(), "noexit-ward-7");
        // Provisioned; no agent runs in a kwok pod, so the workspace waits for its heartbeat.
        wait_for("workspace alice-r provisioned, waiting for its agent", LONG, || async {
            let w = workspaces.get("alice-r").await?;
            let status = w.status.unwrap_or_default();
            let waiting = status.phase == Some(noexit_crds::workspace::Phase::Provisioning)
                && condition(&status.conditions, "Ready").is_some_and(|c| c.reason == "WaitingForAgent");
            Ok(waiting.then_some(()))
        })
        .await?;

        // The printer columns, as a person sees them.
        let table = kubectl(&["get", "workspaces", "-A"]).await?.ok()?;
        let header: Vec<&str> = table.lines().next().unwrap_or_default().split_whitespace().collect();
        anyhow::ensure!(
            header == ["NAMESPACE", "NAME", "PROJECT", "OWNER", "RUNTIME", "PHASE", "AGE"],
            "kubectl get workspaces -A header: {header:?}"
        );
        let row =
            table.lines().find(|l| l.starts_with("noexit-ward-7 ") && l.contains(" alice-r ")).unwrap_or_default();
        let row: Vec<&str> = row.split_whitespace().collect();
        anyhow::ensure!(
            row.get(..6)
                == Some(&["noexit-ward-7", "alice-r", "ward-7", "alice@ward7.example", "pod", "Provisioning"][..]),
            "kubectl get workspaces -A row: {row:?}\n{table}"
        );
        // Events a person finds with kubectl describe.
        let events = wait_for("Events in kubectl describe workspace alice-r", SHORT, || async {
            let text = kubectl(&["describe", "workspace", "alice-r", "-n", "noexit-ward-7"]).await?.ok()?;
            let events = text.split("Events:").nth(1).unwrap_or_default().trim().to_owned();
            Ok((!events.is_empty() && events != "<none>").then_some(events))
        })
        .await?;
        anyhow::ensure!(events.contains("noexit"), "Events not from noexit: {events}");
        Ok(())
    }
    .await;
    // Deleting the Project terminates its namespace (and everything in it).
    let cleanup = async {
        kubectl(&["delete", "project", "ward-7", "--wait=false"]).await?.ok()?;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        wait_for("namespace noexit-ward-7 to terminate", LONG, || async {
            Ok(namespaces.get_opt("noexit-ward-7").await?.is_none().then_some(()))
        })
        .await?;
        kubectl(&["delete", "dataset", "icu-2019", "cohort-2024", "--ignore-not-found"]).await?.ok()?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    result.and(cleanup)
}

#[tokio::test]
async fn the_webhook_refuses_an_ungranted_dataset_through_kubectl_apply() -> anyhow::Result<()> {
    let Some(client) = cluster().await? else { return Ok(()) };
    with_project(&client, "kapply", |client, ex| async move {
        let project = ex.project.name_any();
        // The steward grants the icu dataset to another project only.
        let mut icu = ex.datasets[0].clone();
        icu.spec.granted_to = vec!["someone-else".into()];
        let mut datasets = ex.datasets.clone();
        datasets[0] = icu;
        let ex = noexit_e2e::Example { datasets, ..ex };
        create_project_without_dry_run(&client, &ex).await?;
        let ws = serde_yaml::to_string(&ex.workspaces[0])?;
        let icu = ex.datasets[0].name_any();
        let expected = format!(
            "workspace {project}/alice-r: spec.datasets[0]: dataset \"{icu}\" is not granted to project \"{project}\""
        );
        let run = wait_for("the webhook to refuse with the grant message", SHORT, || async {
            let run = kubectl_stdin(&["apply", "-f", "-"], &ws).await?;
            anyhow::ensure!(!run.success, "kubectl apply admitted a workspace with an ungranted dataset");
            Ok(run.stderr.contains("is not granted").then_some(run))
        })
        .await?;
        anyhow::ensure!(
            run.stderr.contains("admission webhook \"validate.noexit.io\" denied the request"),
            "{}",
            run.stderr
        );
        anyhow::ensure!(run.stderr.contains(&expected), "kubectl said {:?}, expected {expected:?}", run.stderr);
        Ok(())
    })
    .await
}

/// [`create_project`] without the dry run of the example workspace (which may be refused).
async fn create_project_without_dry_run(client: &Client, ex: &Example) -> anyhow::Result<()> {
    apply(&Api::<Project>::all(client.clone()), &ex.project).await?;
    for d in &ex.datasets {
        apply(&Api::<Dataset>::all(client.clone()), d).await?;
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = ex.namespace();
    wait_for(&format!("namespace {ns}"), LONG, || async { Ok(namespaces.get_opt(&ns).await?) }).await?;
    Ok(())
}

#[tokio::test]
async fn members_rbac_reaches_their_own_project_only() -> anyhow::Result<()> {
    let Some(client) = cluster().await? else { return Ok(()) };
    with_project(&client, "rbac-a", |client, a| async move {
        with_project(&client, "rbac-b", |client, mut b| async move {
            // Project B has its own members (nobody from A).
            for m in &mut b.project.spec.members {
                m.user = m.user.replace("ward7.example", "other.example");
            }
            create_project_without_dry_run(&client, &a).await?;
            create_project_without_dry_run(&client, &b).await?;
            let (ns_a, ns_b) = (a.namespace(), b.namespace());
            let alice = "--as=alice@ward7.example";
            let can = |ns: String| async move {
                let run = kubectl(&["auth", "can-i", "get", "workspaces.noexit.io", "-n", &ns, alice]).await?;
                Ok::<_, anyhow::Error>(run.stdout.trim().to_owned())
            };
            wait_for("alice may read project A's workspaces (RBAC from the controller)", LONG, || async {
                Ok((can(ns_a.clone()).await? == "yes").then_some(()))
            })
            .await?;
            anyhow::ensure!(can(ns_b.clone()).await? == "no", "alice may read project B's workspaces");
            // And real requests, as alice.
            kubectl(&["get", "workspaces", "-n", &ns_a, alice]).await?.ok()?;
            let denied = kubectl(&["get", "workspaces", "-n", &ns_b, alice]).await?;
            anyhow::ensure!(
                !denied.success && denied.stderr.contains("Forbidden") && denied.stderr.contains("alice@ward7.example"),
                "alice reading project B: {denied:?}"
            );
            Ok(())
        })
        .await
    })
    .await
}

/// Issue 11: the API's ServiceAccount may write the airlock's OutputRequest mirrors in a project
/// namespace (RoleBinding `noexit-api` from the controller) and nowhere else; whoever holds the
/// built-in `view` role there reads them (the chart aggregates them into it).
#[tokio::test]
async fn the_api_mirrors_output_requests_in_project_namespaces_only() -> anyhow::Result<()> {
    let Some(client) = cluster().await? else { return Ok(()) };
    with_project(&client, "outreq", |client, ex| async move {
        create_project_without_dry_run(&client, &ex).await?;
        let ns = ex.namespace();
        let api_sa = "--as=system:serviceaccount:noexit-system:noexit-api";
        let can = |verb: &'static str, ns: String, who: &'static str| async move {
            let run = kubectl(&["auth", "can-i", verb, "outputrequests.noexit.io", "-n", &ns, who]).await?;
            Ok::<_, anyhow::Error>(run.stdout.trim().to_owned())
        };
        wait_for("the API may patch OutputRequests in the project (RoleBinding from the controller)", LONG, || async {
            Ok((can("patch", ns.clone(), api_sa).await? == "yes").then_some(()))
        })
        .await?;
        anyhow::ensure!(
            can("patch", "default".into(), api_sa).await? == "no",
            "the API may patch OutputRequests in default"
        );
        let name = "out-0f3a2b1c-0000-4000-8000-000000000001";
        let yaml = format!(
            "apiVersion: noexit.io/v1alpha1\nkind: OutputRequest\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{requestId: 0f3a2b1c-0000-4000-8000-000000000001, workspace: alice-r, fileName: t.csv, \
             size: 1, sha256: ab, requester: alice@ward7.example}}\n"
        );
        kubectl_stdin(&["apply", "--server-side", "--field-manager=noexit-api", api_sa, "-f", "-"], &yaml)
            .await?
            .ok()?;
        // An SRE bound to `view` in the namespace reads it.
        let sre = "--as=sre@example.org";
        kubectl(&["create", "rolebinding", "sre-view", "--clusterrole=view", "--user=sre@example.org", "-n", &ns])
            .await?
            .ok()?;
        wait_for("an SRE with view reads OutputRequests", LONG, || async {
            Ok((can("list", ns.clone(), sre).await? == "yes").then_some(()))
        })
        .await?;
        let got = kubectl(&["get", "outputrequests", "-n", &ns, sre]).await?.ok()?;
        anyhow::ensure!(got.contains(name) && got.contains("t.csv"), "{got}");
        anyhow::ensure!(can("patch", ns.clone(), sre).await? == "no", "view may patch OutputRequests");
        Ok(())
    })
    .await
}

/// Every `x-kubernetes-validations` message of the CRDs, as `(CRD name, message)`.
fn cel_messages() -> std::collections::BTreeSet<(String, String)> {
    fn walk(crd: &str, v: &serde_json::Value, out: &mut std::collections::BTreeSet<(String, String)>) {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(rules) = map.get("x-kubernetes-validations").and_then(|r| r.as_array()) {
                    for r in rules {
                        if let Some(m) = r["message"].as_str() {
                            out.insert((crd.to_owned(), m.to_owned()));
                        }
                    }
                }
                map.values().for_each(|v| walk(crd, v, out));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(crd, v, out)),
            _ => {}
        }
    }
    let mut out = std::collections::BTreeSet::new();
    for crd in noexit_crds::all_crds() {
        let name = crd.name_any();
        walk(&name, &serde_json::to_value(&crd).unwrap_or_default(), &mut out);
    }
    out
}

#[tokio::test]
async fn every_cel_rule_in_the_crds_fires_on_a_bad_object() -> anyhow::Result<()> {
    let Some(client) = cluster().await? else { return Ok(()) };
    with_project(&client, "cel", |client, ex| async move {
        create_project(&client, &ex).await?;
        let ns = ex.namespace();
        let mut fired: std::collections::BTreeSet<(String, String)> = Default::default();
        // Record which of the CRD's messages the API server's refusal carries.
        let mut expect = |crd: &str, result: Result<(), kube::Error>, wanted: &[&str]| -> anyhow::Result<()> {
            let msg = refusal(result)?;
            for w in wanted {
                anyhow::ensure!(msg.contains(w), "{crd}: refusal {msg:?} lacks {w:?}");
                fired.insert((crd.to_owned(), (*w).to_owned()));
            }
            Ok(())
        };
        let create = PostParams::default();
        let projects: Api<Project> = Api::all(client.clone());
        let datasets: Api<Dataset> = Api::all(client.clone());
        let workspaces: Api<Workspace> = Api::namespaced(client.clone(), &ns);
        let requests: Api<WorkspaceRequest> = Api::namespaced(client.clone(), &ns);
        let long = |n: usize| "a".repeat(n);

        // Project
        let mut p = ex.project.clone();
        p.metadata.name = Some(long(57));
        expect(
            "projects.noexit.io",
            projects.create(&create, &p).await.map(drop),
            &["project names are at most 56 characters (the namespace is noexit-<name>)"],
        )?;
        p.metadata.name = Some(format!("{}.x", ex.project.name_any()));
        expect(
            "projects.noexit.io",
            projects.create(&create, &p).await.map(drop),
            &["project names must be DNS-1123 labels"],
        )?;
        p.metadata.name = Some("system".into());
        expect(
            "projects.noexit.io",
            projects.create(&create, &p).await.map(drop),
            &["this project name is reserved (its namespace noexit-<name> is kept for noexit or the cluster)"],
        )?;
        let mut p = ex.project.clone();
        let first = p.spec.members[0].clone();
        p.spec.members.push(first);
        expect(
            "projects.noexit.io",
            apply(&projects, &p).await.map(drop),
            &["each user appears once in spec.members"],
        )?;

        // Dataset
        let mut d = ex.datasets[0].clone();
        d.metadata.name = Some(long(41));
        expect(
            "datasets.noexit.io",
            datasets.create(&create, &d).await.map(drop),
            &["dataset names must be DNS-1123 labels of at most 40 characters"],
        )?;
        let mut d = serde_json::to_value(&ex.datasets[0])?;
        d["spec"]["source"]["hostPath"] = json!({"path": "/data/x"});
        let d: Dataset = serde_json::from_value(d)?;
        expect(
            "datasets.noexit.io",
            apply(&datasets, &d).await.map(drop),
            &["spec.source must set exactly one of nfs, csi, hostPath"],
        )?;

        // Workspace: created, then changed where it may not change.
        let ws = ex.workspaces.iter().find(|w| w.name_any() == "alice-r").cloned().ok_or(anyhow::anyhow!("alice-r"))?;
        let mut w = ws.clone();
        w.metadata.name = Some(long(41));
        expect(
            "workspaces.noexit.io",
            workspaces.create(&create, &w).await.map(drop),
            &["workspace names must be DNS-1123 labels of at most 40 characters"],
        )?;
        let mut w = ws.clone();
        w.spec.datasets.push(w.spec.datasets[0].clone());
        expect(
            "workspaces.noexit.io",
            workspaces.create(&create, &w).await.map(drop),
            &["spec.datasets lists a dataset twice"],
        )?;
        apply_admitted(&workspaces, &ws).await?;
        let change = json!({"spec": {"owner": "carol@ward7.example", "project": "elsewhere", "runtime": "vm"}});
        expect(
            "workspaces.noexit.io",
            workspaces.patch("alice-r", &PatchParams::default(), &Patch::Merge(&change)).await.map(drop),
            &["spec.owner is immutable", "spec.project is immutable", "spec.runtime is immutable"],
        )?;

        // WorkspaceRequest: created (as bob, whom RBAC from the controller lets file requests),
        // then changed.
        let mut r = ex.request.clone();
        r.metadata.name = Some("bad-name".into());
        r.spec.workspace_name = "Bad_Name".into();
        expect(
            "workspacerequests.noexit.io",
            requests.create(&create, &r).await.map(drop),
            &["spec.workspaceName must be a DNS-1123 label of at most 40 characters"],
        )?;
        let mut r = ex.request.clone();
        r.spec.workspace.datasets.push(r.spec.workspace.datasets[0].clone());
        expect(
            "workspacerequests.noexit.io",
            requests.create(&create, &r).await.map(drop),
            &["spec.datasets lists a dataset twice"],
        )?;
        let as_bob: Api<WorkspaceRequest> = Api::namespaced(as_user("bob@ward7.example").await?, &ns);
        wait_for("bob may file requests (RBAC from the controller)", LONG, || async {
            match as_bob.create(&PostParams::default(), &ex.request).await {
                Ok(r) => Ok(Some(r)),
                Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains("cannot create resource") => Ok(None),
                Err(e) => Err(e.into()),
            }
        })
        .await?;
        let name = ex.request.name_any();
        let change =
            json!({"spec": {"workspace": {"owner": "carol@ward7.example", "project": "elsewhere", "runtime": "vm"}}});
        expect(
            "workspacerequests.noexit.io",
            requests.patch(&name, &PatchParams::default(), &Patch::Merge(&change)).await.map(drop),
            &[
                "spec.owner is immutable",
                "spec.project is immutable",
                "spec.runtime is immutable",
                "a WorkspaceRequest's spec is immutable; create a new request",
            ],
        )?;

        let missing: Vec<_> = cel_messages().difference(&fired).cloned().collect();
        anyhow::ensure!(missing.is_empty(), "CEL rules no test made fire: {missing:?}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn deleting_a_workspace_revokes_its_certificate_at_the_api_then_its_children_go() -> anyhow::Result<()> {
    let Some(client) = cluster().await? else { return Ok(()) };
    with_project(&client, "fin", |client, ex| async move {
        create_project(&client, &ex).await?;
        let ns = ex.namespace();
        let project = ex.project.name_any();
        let workspaces: Api<Workspace> = Api::namespaced(client.clone(), &ns);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
        let ws = ex.workspaces.iter().find(|w| w.name_any() == "alice-r").cloned().ok_or(anyhow::anyhow!("alice-r"))?;
        apply_admitted(&workspaces, &ws).await?;
        wait_for("pod ws-alice-r and its agent Secret", LONG, || async {
            Ok(match (pods.get_opt("ws-alice-r").await?, secrets.get_opt("ws-alice-r-agent").await?) {
                (Some(_), Some(_)) => Some(()),
                _ => None,
            })
        })
        .await?;
        let live = workspaces.get("alice-r").await?;
        anyhow::ensure!(!live.finalizers().is_empty(), "workspace alice-r carries no finalizer");

        workspaces.delete("alice-r", &Default::default()).await?;
        wait_for("workspace alice-r gone (finalizer released)", LONG, || async {
            Ok(workspaces.get_opt("alice-r").await?.is_none().then_some(()))
        })
        .await?;
        // The API recorded the revocation (its SQLite store, read-only).
        let db = dev_env("NOEXIT_DEV_API_DB")?;
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&db).read_only(true);
        let pool = sqlx::SqlitePool::connect_with(options).await?;
        let (count,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM certificate_revocations WHERE project = ?1 AND workspace = ?2")
                .bind(&project)
                .bind("alice-r")
                .fetch_one(&pool)
                .await?;
        anyhow::ensure!(count == 1, "the API recorded {count} revocations for {project}/alice-r");
        // kube-controller-manager's garbage collector removes the children by owner reference.
        wait_for("pod and agent Secret of alice-r garbage-collected", LONG, || async {
            Ok(match (pods.get_opt("ws-alice-r").await?, secrets.get_opt("ws-alice-r-agent").await?) {
                (None, None) => Some(()),
                _ => None,
            })
        })
        .await?;
        Ok(())
    })
    .await
}

/// The holder of the controllers' Lease (`noexit-controller-leader` in `noexit-system`).
async fn lease_holder(client: &Client) -> anyhow::Result<Option<String>> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), "noexit-system");
    Ok(leases.get_opt("noexit-controller-leader").await?.and_then(|l| l.spec).and_then(|s| s.holder_identity))
}

/// A free port on 127.0.0.1 for a controller's metrics.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `noexit-operator controller` as hack/dev-cluster.sh runs it (the chart's ServiceAccount), with
/// `identity`; logs go to the control plane's log directory.
fn controller_command(identity: &str) -> anyhow::Result<std::process::Command> {
    let dir = dev_env("NOEXIT_CP_DIR")?;
    let log = std::fs::File::create(format!("{dir}/logs/noexit-controller-{identity}.log"))?;
    let mut cmd = std::process::Command::new("setsid");
    cmd.arg(dev_env("NOEXIT_DEV_OPERATOR")?)
        .args(["controller", "--site", &dev_env("NOEXIT_DEV_SITE")?, "--api-url", &dev_env("NOEXIT_DEV_API")?])
        .args(["--identity", identity, "--metrics-addr", &format!("127.0.0.1:{}", free_port()?)])
        .env("KUBECONFIG", dev_env("NOEXIT_DEV_CONTROLLER_KUBECONFIG")?)
        .env("POD_NAMESPACE", "noexit-system")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    Ok(cmd)
}

/// Kills a process by id (SIGTERM: a controller releases its Lease on the way out).
fn terminate(pid: u32) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill").arg(pid.to_string()).status()?;
    anyhow::ensure!(status.success(), "kill {pid} failed");
    Ok(())
}

#[tokio::test]
async fn a_second_controller_takes_over_when_the_leader_goes() -> anyhow::Result<()> {
    let Some(client) = cluster().await? else { return Ok(()) };
    let pidfile = format!("{}/pids/noexit-controller", dev_env("NOEXIT_CP_DIR")?);
    let leader_pid: u32 = std::fs::read_to_string(&pidfile)?.trim().parse()?;
    let leader = wait_for("a Lease holder", SHORT, || lease_holder(&client)).await?;

    // A second replica waits: it does not take the Lease while the leader renews it.
    let mut follower = controller_command("e2e-follower")?.spawn()?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    anyhow::ensure!(lease_holder(&client).await?.as_deref() == Some(leader.as_str()), "the follower took the Lease");

    // The leader goes; the follower takes over and converges new objects.
    terminate(leader_pid)?;
    let outcome = async {
        wait_for("the follower to hold the Lease", LONG, || async {
            Ok((lease_holder(&client).await?.as_deref() == Some("e2e-follower")).then_some(()))
        })
        .await?;
        with_project(&client, "leader", |client, ex| async move {
            create_project(&client, &ex).await?;
            let workspaces: Api<Workspace> = Api::namespaced(client.clone(), &ex.namespace());
            let pods: Api<Pod> = Api::namespaced(client.clone(), &ex.namespace());
            let ws =
                ex.workspaces.iter().find(|w| w.name_any() == "alice-r").cloned().ok_or(anyhow::anyhow!("alice-r"))?;
            apply_admitted(&workspaces, &ws).await?;
            wait_for("pod ws-alice-r from the new leader", LONG, || async { Ok(pods.get_opt("ws-alice-r").await?) })
                .await?;
            Ok(())
        })
        .await
    }
    .await;

    // Put a long-lived controller back for the other tests (hack/dev-cluster.sh down stops it),
    // then let the follower go: the Lease passes to it.
    let replacement = controller_command("dev-controller-2")?.spawn()?;
    std::fs::write(&pidfile, format!("{}\n", replacement.id()))?;
    terminate(follower.id())?;
    let _ = follower.wait();
    outcome?;
    wait_for("the replacement to hold the Lease", LONG, || async {
        Ok((lease_holder(&client).await?.as_deref() == Some("dev-controller-2")).then_some(()))
    })
    .await?;
    Ok(())
}

/// A free port on 127.0.0.1 with nothing listening (the agent's "outside" canary).
fn closed_port() -> anyhow::Result<u16> {
    free_port()
}

#[tokio::test]
async fn the_real_agent_reports_through_the_api_and_the_workspace_runs() -> anyhow::Result<()> {
    let Some(client) = cluster().await? else { return Ok(()) };
    with_project(&client, "agent", |client, ex| async move {
        create_project(&client, &ex).await?;
        let ns = ex.namespace();
        let project = ex.project.name_any();
        let workspaces: Api<Workspace> = Api::namespaced(client.clone(), &ns);
        let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
        let ws = ex.workspaces.iter().find(|w| w.name_any() == "alice-r").cloned().ok_or(anyhow::anyhow!("alice-r"))?;
        apply_admitted(&workspaces, &ws).await?;
        let secret =
            wait_for("Secret ws-alice-r-agent", LONG, || async { Ok(secrets.get_opt("ws-alice-r-agent").await?) })
                .await?;

        // The agent, outside any pod, with the certificate the controller issued for alice-r,
        // reporting to the API that runs beside the control plane.
        let dir = tempfile::tempdir()?;
        let p = dir.path();
        let data = secret.data.unwrap_or_default();
        for key in ["ca.crt", "tls.crt", "tls.key"] {
            let value = data.get(key).ok_or_else(|| anyhow::anyhow!("Secret ws-alice-r-agent has no {key}"))?;
            std::fs::write(p.join(key), &value.0)?;
        }
        agent::prepare(p);
        let api = dev_env("NOEXIT_DEV_API")?;
        let api_port = api.rsplit(':').next().unwrap_or_default();
        let api_port: u16 =
            api_port.parse().map_err(|e| anyhow::anyhow!("NOEXIT_DEV_API {api}: port {api_port}: {e}"))?;
        agent::pod_config(p, api_port)
            .project(&project)
            .control_plane_url(&api)
            .canary(closed_port()?)
            .without_inbox()
            .write();
        let log = std::fs::File::create(p.join("agent.log"))?;
        let mut agent = tokio::process::Command::from(agent::run_command(&repo().join("target/debug/noexit-agent"), p))
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        let running = wait_for("workspace alice-r Running (Ready: agent connected, wall confirmed)", LONG, || async {
            let w = workspaces.get("alice-r").await?;
            let status = w.status.clone().unwrap_or_default();
            let ready = condition(&status.conditions, "Ready").is_some_and(|c| c.status == "True");
            Ok((ready && status.phase == Some(noexit_crds::workspace::Phase::Running)).then_some(w))
        })
        .await;
        let running = match running {
            Ok(w) => w,
            Err(e) => {
                let _ = agent.kill().await;
                let log = std::fs::read_to_string(p.join("agent.log")).unwrap_or_default();
                anyhow::bail!("{e:#}\nagent log:\n{log}");
            }
        };
        // The API's status.agent writes and the controller's status writes have separate field
        // managers, and the phase holds steady while heartbeats keep arriving.
        let managers: Vec<String> = running
            .metadata
            .managed_fields
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|m| m.subresource.as_deref() == Some("status"))
            .filter_map(|m| m.manager)
            .collect();
        anyhow::ensure!(managers.iter().any(|m| m == "noexit-api"), "status managers: {managers:?}");
        anyhow::ensure!(managers.iter().any(|m| m == "noexit-operator"), "status managers: {managers:?}");
        let heartbeat = |w: &Workspace| w.status.as_ref().and_then(|s| s.agent.as_ref()).map(|a| a.last_heartbeat);
        let first = heartbeat(&running);
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let w = workspaces.get("alice-r").await?;
            let phase = w.status.as_ref().and_then(|s| s.phase);
            anyhow::ensure!(phase == Some(noexit_crds::workspace::Phase::Running), "phase flapped to {phase:?}");
        }
        // (The API writes status.agent when what the agent reports changes, not on every beat.)
        let w = workspaces.get("alice-r").await?;
        anyhow::ensure!(heartbeat(&w) >= first, "status.agent went back in time");
        let _ = agent.kill().await;
        Ok(())
    })
    .await
}
