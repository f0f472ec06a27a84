//! What `noexit-mirror-config` should hold (pure): rendered by `mirror::deploy::config_map`
//! from the live Projects and workspace pods.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use noexit_crds::Project;
use noexit_crds::names::project_namespace;

use crate::children::labels;
use crate::mirror_config::deploy::{CONFIG_MAP, config_map};
use crate::project::build::WORKSPACE_COMPONENT;
use crate::site::Site;
use noexit_mirror::clients::ClientId;

/// Label selector of workspace pods (and of the launcher pods of VM workspaces): the labels
/// `workspace::build` puts on every workload.
pub fn workspace_pod_selector() -> String {
    format!("{}={WORKSPACE_COMPONENT},{}={}", labels::COMPONENT, labels::MANAGED_BY, labels::MANAGER)
}

/// The workspace a pod runs and its addresses, or `None` for a pod the mirror must not serve:
/// being deleted or finished (its address may soon belong to someone else), without an address
/// yet, without our workspace labels, or outside its project's namespace.
fn pod_client(pod: &Pod) -> Option<(ClientId, Vec<IpAddr>)> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let pod_labels = pod.metadata.labels.as_ref()?;
    if pod_labels.get(labels::COMPONENT).map(String::as_str) != Some(WORKSPACE_COMPONENT) {
        return None;
    }
    let project = pod_labels.get(labels::PROJECT)?;
    let workspace = pod_labels.get(labels::WORKSPACE)?;
    // Labels are only trusted where the operator put the pod: its project's namespace.
    if pod.namespace().as_deref() != Some(project_namespace(project).as_str()) {
        return None;
    }
    let id: ClientId = format!("{project}/{workspace}").parse().ok()?;
    let mut addresses: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .chain(status.pod_ip.as_deref())
        .filter_map(|ip| ip.trim().parse().ok())
        .collect();
    addresses.sort();
    addresses.dedup();
    (!addresses.is_empty()).then_some((id, addresses))
}

/// Address → workspace for the running workspace pods, sorted by address. An address claimed
/// by two different workspaces (a stale pod and its successor) is left out: a request from it
/// is refused rather than credited to the wrong project.
pub fn workspace_clients(pods: &[Pod]) -> Vec<(IpAddr, ClientId)> {
    let mut by_address: BTreeMap<IpAddr, Option<ClientId>> = BTreeMap::new();
    for (id, addresses) in pods.iter().filter_map(pod_client) {
        for ip in addresses {
            by_address
                .entry(ip)
                .and_modify(|seen| {
                    if seen.as_ref() != Some(&id) {
                        *seen = None;
                    }
                })
                .or_insert_with(|| Some(id.clone()));
        }
    }
    by_address.into_iter().filter_map(|(ip, id)| Some((ip, id?))).collect()
}

/// The ConfigMap to apply in `namespace`: only its name and data. Its labels and its existence
/// belong to the Helm chart (which checks its own labels on upgrade). Projects being deleted
/// are left out, so their workspaces are refused. Deterministic: the same Projects and pods
/// give the same bytes, so an unchanged set causes no write.
pub fn desired_config(site: &Site, namespace: &str, projects: &[Project], pods: &[Pod]) -> ConfigMap {
    let live: Vec<Project> = projects.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).cloned().collect();
    let rendered = config_map(site, &live, &workspace_clients(pods));
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONFIG_MAP.into()),
            namespace: Some(namespace.into()),
            ..ObjectMeta::default()
        },
        data: rendered.data,
        ..ConfigMap::default()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodIP, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use noexit_crds::project::PackageRule;

    use super::*;
    use crate::testdata;
    use noexit_mirror::clients::ClientMap;
    use noexit_mirror::policy::{PolicyFile, Refusal, decide};

    fn pod(project: &str, workspace: &str, ip: Option<&str>) -> Pod {
        let labels = BTreeMap::from([
            (labels::COMPONENT.to_owned(), WORKSPACE_COMPONENT.to_owned()),
            (labels::MANAGED_BY.to_owned(), labels::MANAGER.to_owned()),
            (labels::PROJECT.to_owned(), project.to_owned()),
            (labels::WORKSPACE.to_owned(), workspace.to_owned()),
        ]);
        Pod {
            metadata: ObjectMeta {
                name: Some(format!("ws-{workspace}")),
                namespace: Some(project_namespace(project)),
                labels: Some(labels),
                ..ObjectMeta::default()
            },
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: ip.map(str::to_owned),
                ..PodStatus::default()
            }),
            ..Pod::default()
        }
    }

    fn files(cm: &ConfigMap) -> (PolicyFile, ClientMap) {
        let data = cm.data.as_ref().unwrap();
        (PolicyFile::from_yaml(&data["policy.yaml"]).unwrap(), ClientMap::from_yaml(&data["clients.yaml"]).unwrap())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn renders_the_policy_and_the_running_pods() {
        let mut project = testdata::project();
        project.spec.egress.mirror.deny = vec![PackageRule { name: "curl".into(), versions: vec![] }];
        let pods = [pod("ward-7", "alice-r", Some("10.244.1.17"))];
        let cm = desired_config(&Site::default(), "noexit-system", &[project], &pods);
        assert_eq!(cm.metadata.name.as_deref(), Some("noexit-mirror-config"));
        assert_eq!(cm.metadata.namespace.as_deref(), Some("noexit-system"));
        assert!(cm.metadata.labels.is_none(), "labels belong to the chart");
        let (policy, clients) = files(&cm);
        assert_eq!(decide(policy.project("ward-7"), "curl", "5.2.1"), Err(Refusal::Denied("curl 5.2.1".into())));
        assert_eq!(clients.lookup(ip("10.244.1.17")).map(ToString::to_string), Some("ward-7/alice-r".into()));
    }

    #[test]
    fn a_disabled_or_deleted_project_is_refused() {
        let mut project = testdata::project();
        project.spec.egress.mirror.enabled = false;
        let (policy, _) = files(&desired_config(&Site::default(), "ns", std::slice::from_ref(&project), &[]));
        assert_eq!(decide(policy.project("ward-7"), "ggplot2", "3.5.1"), Err(Refusal::Disabled));

        project.spec.egress.mirror.enabled = true;
        project.metadata.deletion_timestamp = Some(Time("2026-12-01T08:00:00Z".parse().unwrap()));
        let (policy, _) = files(&desired_config(&Site::default(), "ns", &[project], &[]));
        assert_eq!(decide(policy.project("ward-7"), "ggplot2", "3.5.1"), Err(Refusal::NoPolicy));
    }

    #[test]
    fn skips_pods_without_an_address_finished_deleted_or_misplaced() {
        let no_ip = pod("ward-7", "a", None);
        let mut finished = pod("ward-7", "b", Some("10.0.0.2"));
        finished.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let mut failed = pod("ward-7", "c", Some("10.0.0.3"));
        failed.status.as_mut().unwrap().phase = Some("Failed".into());
        let mut deleting = pod("ward-7", "d", Some("10.0.0.4"));
        deleting.metadata.deletion_timestamp = Some(Time("2026-12-01T08:00:00Z".parse().unwrap()));
        let mut elsewhere = pod("ward-7", "e", Some("10.0.0.5"));
        elsewhere.metadata.namespace = Some("default".into());
        let mut not_ours = pod("ward-7", "f", Some("10.0.0.6"));
        not_ours.metadata.labels.as_mut().unwrap().insert(labels::COMPONENT.into(), "desktop".into());
        let running = pod("ward-7", "g", Some("10.0.0.7"));
        let clients = workspace_clients(&[no_ip, finished, failed, deleting, elsewhere, not_ours, running]);
        assert_eq!(clients, [(ip("10.0.0.7"), "ward-7/g".parse().unwrap())]);
    }

    #[test]
    fn dual_stack_addresses_all_map_and_a_contested_address_maps_to_nobody() {
        let mut dual = pod("ward-7", "alice-r", Some("10.0.0.1"));
        dual.status.as_mut().unwrap().pod_ips =
            Some(vec![PodIP { ip: "10.0.0.1".into() }, PodIP { ip: "fd00::1".into() }]);
        let a = pod("ward-7", "bob-r", Some("10.0.0.9"));
        let b = pod("icu", "carol-r", Some("10.0.0.9"));
        let clients = workspace_clients(&[dual, a, b]);
        let names: Vec<String> = clients.iter().map(|(ip, id)| format!("{ip}={id}")).collect();
        assert_eq!(names, ["10.0.0.1=ward-7/alice-r", "fd00::1=ward-7/alice-r"]);
    }

    #[test]
    fn the_same_set_in_any_order_renders_the_same_bytes() {
        let mut other = testdata::project();
        other.metadata.name = Some("icu".into());
        let projects = [testdata::project(), other];
        let pods = [pod("ward-7", "a", Some("10.0.0.1")), pod("icu", "b", Some("10.0.0.2"))];
        let site = Site::default();
        let one = desired_config(&site, "ns", &projects, &pods);
        let (mut rp, mut rq) = (projects.to_vec(), pods.to_vec());
        rp.reverse();
        rq.reverse();
        assert_eq!(desired_config(&site, "ns", &rp, &rq), one);
    }
}
