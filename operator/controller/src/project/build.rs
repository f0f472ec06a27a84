//! Children of a Project, in the order they are applied: the namespace first, then what lives
//! in it, then the dataset volumes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, HostPathVolumeSource, LimitRange, LimitRangeItem, LimitRangeSpec, NFSVolumeSource,
    Namespace, ObjectReference, PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeSpec, ResourceQuota, ResourceQuotaSpec, ServiceAccount, VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use noexit_crds::names::project_namespace;
use noexit_crds::{Dataset, Project, Role as MemberRole};

use super::validate::ResolvedProject;
use crate::children::{Child, ConvertError, Owner, labels};
use crate::site::Site;

/// ServiceAccount every workspace pod runs as (no token, no permissions).
pub const WORKSPACE_SERVICE_ACCOUNT: &str = "noexit-workspace";
/// Label on workspace pods (and VM launcher pods) that the network policies select.
pub const WORKSPACE_COMPONENT: &str = "workspace";

/// The controller's ServiceAccount (in the operator namespace) and the ClusterRole it is bound
/// to in each project namespace: its rights over Secrets, Pods, RBAC and the other children
/// hold only where it made the namespace (see `docs/architecture.md`, "Decisions").
pub const CONTROLLER_SERVICE_ACCOUNT: &str = "noexit-controller";
pub const CONTROLLER_PROJECT_ROLE: &str = "noexit-controller-project";
/// Name of the RoleBinding that gives the controller its rights in a project namespace.
pub const CONTROLLER_BINDING: &str = "noexit-controller";
/// The API's ServiceAccount (in the operator namespace) and the ClusterRole bound to it in each
/// project namespace: it writes the `OutputRequest` mirrors of the airlock there, and nowhere else.
pub const API_SERVICE_ACCOUNT: &str = "noexit-api";
pub const API_PROJECT_ROLE: &str = "noexit-api-project";
/// Name of the RoleBinding that gives the API its rights in a project namespace.
pub const API_BINDING: &str = "noexit-api";

/// PVC name of a dataset inside a project namespace.
pub fn dataset_claim_name(dataset: &str) -> String {
    format!("dataset-{dataset}")
}

/// Cluster-wide name of the read-only PersistentVolume of `dataset` for `project`.
pub fn dataset_volume_name(project: &str, dataset: &str) -> String {
    format!("noexit-{project}-{dataset}")
}

pub fn build(project: &Project, resolved: &ResolvedProject, site: &Site) -> Result<Vec<Child>, ConvertError> {
    let name = project.name_any();
    let ns = project_namespace(&name);
    let owner = Owner::of(project, &name);
    let mut out = vec![
        Child::from_typed(&namespace(&owner, &ns))?,
        Child::from_typed(&controller_binding(&owner, &ns, site))?,
        Child::from_typed(&api_binding(&owner, &ns, site))?,
        Child::from_typed(&service_account(&owner, &ns))?,
        Child::from_typed(&quota(project, &owner, &ns))?,
        Child::from_typed(&limits(project, &owner, &ns))?,
    ];
    for policy in network_policies(project, &owner, &ns, site) {
        out.push(Child::from_typed(&policy)?);
    }
    for (role, binding) in rbac(project, &owner, &ns) {
        out.push(Child::from_typed(&role)?);
        out.push(Child::from_typed(&binding)?);
    }
    for dataset in &resolved.datasets {
        out.push(Child::from_typed(&dataset_volume(dataset, &owner, &name, &ns))?);
        out.push(Child::from_typed(&dataset_claim(dataset, &owner, &name, &ns))?);
    }
    Ok(out)
}

fn namespace(owner: &Owner, ns: &str) -> Namespace {
    let mut meta = owner.meta(ns, None, "project");
    let labels = meta.labels.get_or_insert_with(BTreeMap::new);
    // Pod Security Admission: refuse (enforce), and also warn and audit, anything not `restricted`.
    for mode in ["enforce", "audit", "warn"] {
        labels.insert(format!("pod-security.kubernetes.io/{mode}"), "restricted".into());
        labels.insert(format!("pod-security.kubernetes.io/{mode}-version"), "latest".into());
    }
    Namespace { metadata: meta, ..Namespace::default() }
}

/// The controller's own rights in the namespace: the ClusterRole [`CONTROLLER_PROJECT_ROLE`]
/// bound here only. Applied right after the namespace (created with a plain POST the first
/// time, see `project::reconcile`), since every later child needs it.
fn controller_binding(owner: &Owner, ns: &str, site: &Site) -> RoleBinding {
    RoleBinding {
        metadata: owner.meta(CONTROLLER_BINDING, Some(ns), "project"),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: CONTROLLER_PROJECT_ROLE.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: CONTROLLER_SERVICE_ACCOUNT.into(),
            namespace: Some(site.operator_namespace.clone()),
            ..Subject::default()
        }]),
    }
}

/// The API's rights in the namespace (the airlock's `OutputRequest` mirrors): the ClusterRole
/// [`API_PROJECT_ROLE`] bound here only, never cluster-wide.
fn api_binding(owner: &Owner, ns: &str, site: &Site) -> RoleBinding {
    RoleBinding {
        metadata: owner.meta(API_BINDING, Some(ns), "project"),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: API_PROJECT_ROLE.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: API_SERVICE_ACCOUNT.into(),
            namespace: Some(site.operator_namespace.clone()),
            ..Subject::default()
        }]),
    }
}

/// Is the live namespace noexit's for this project? Only a namespace whose controller owner
/// reference names this Project (by uid when the Project has one) is: a namespace someone else
/// made, or one left by an earlier Project of the same name, is never adopted.
pub fn owns_namespace(project: &Project, live: &Namespace) -> bool {
    let name = project.name_any();
    let uid = project.metadata.uid.as_deref();
    live.metadata.owner_references.iter().flatten().any(|r| {
        r.controller == Some(true)
            && r.kind == "Project"
            && r.api_version.starts_with("noexit.io/")
            && r.name == name
            && uid.is_none_or(|u| r.uid == u)
    })
}

fn service_account(owner: &Owner, ns: &str) -> ServiceAccount {
    ServiceAccount {
        metadata: owner.meta(WORKSPACE_SERVICE_ACCOUNT, Some(ns), "project"),
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

fn quota(project: &Project, owner: &Owner, ns: &str) -> ResourceQuota {
    let q = &project.spec.quota;
    let count = |n: u32| Quantity(n.to_string());
    let hard = BTreeMap::from([
        ("requests.cpu".to_owned(), q.cpu.clone()),
        ("limits.cpu".to_owned(), q.cpu.clone()),
        ("requests.memory".to_owned(), q.memory.clone()),
        ("limits.memory".to_owned(), q.memory.clone()),
        ("requests.storage".to_owned(), q.storage.clone()),
        // One pod (or VM launcher pod) per workspace.
        ("pods".to_owned(), count(q.workspaces)),
        ("count/workspaces.noexit.io".to_owned(), count(q.workspaces)),
        // Home volumes plus one claim per dataset.
        ("persistentvolumeclaims".to_owned(), count(q.workspaces + project.spec.datasets.len() as u32)),
        ("services.loadbalancers".to_owned(), count(0)),
        ("services.nodeports".to_owned(), count(0)),
    ]);
    ResourceQuota {
        metadata: owner.meta("noexit-quota", Some(ns), "project"),
        spec: Some(ResourceQuotaSpec { hard: Some(hard), ..ResourceQuotaSpec::default() }),
        ..ResourceQuota::default()
    }
}

fn limits(project: &Project, owner: &Owner, ns: &str) -> LimitRange {
    let q = &project.spec.quota;
    let pair = |cpu: &str, memory: &str| {
        BTreeMap::from([("cpu".to_owned(), Quantity(cpu.into())), ("memory".to_owned(), Quantity(memory.into()))])
    };
    LimitRange {
        metadata: owner.meta("noexit-limits", Some(ns), "project"),
        spec: Some(LimitRangeSpec {
            limits: vec![LimitRangeItem {
                type_: "Container".into(),
                default: Some(pair("1", "2Gi")),
                default_request: Some(pair("250m", "512Mi")),
                max: Some(BTreeMap::from([("cpu".to_owned(), q.cpu.clone()), ("memory".to_owned(), q.memory.clone())])),
                ..LimitRangeItem::default()
            }],
        }),
    }
}

fn selector(labels: &BTreeMap<String, String>) -> LabelSelector {
    LabelSelector { match_labels: Some(labels.clone()), ..LabelSelector::default() }
}

fn workspace_pods() -> LabelSelector {
    selector(&BTreeMap::from([(labels::COMPONENT.to_owned(), WORKSPACE_COMPONENT.to_owned())]))
}

/// Pods with `pod_labels` in namespace `namespace`.
fn peer(namespace: &str, pod_labels: &BTreeMap<String, String>) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(selector(&BTreeMap::from([(
            "kubernetes.io/metadata.name".to_owned(),
            namespace.to_owned(),
        )]))),
        pod_selector: Some(selector(pod_labels)),
        ..NetworkPolicyPeer::default()
    }
}

fn port(protocol: &str, port: u16) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: Some(protocol.into()),
        port: Some(IntOrString::Int(port.into())),
        ..NetworkPolicyPort::default()
    }
}

fn policy(owner: &Owner, ns: &str, name: &str, spec: NetworkPolicySpec) -> NetworkPolicy {
    NetworkPolicy { metadata: owner.meta(name, Some(ns), "project"), spec: Some(spec) }
}

fn egress_to(
    owner: &Owner,
    ns: &str,
    name: &str,
    to: NetworkPolicyPeer,
    ports: Vec<NetworkPolicyPort>,
) -> NetworkPolicy {
    policy(
        owner,
        ns,
        name,
        NetworkPolicySpec {
            pod_selector: Some(workspace_pods()),
            policy_types: Some(vec!["Egress".into()]),
            egress: Some(vec![NetworkPolicyEgressRule { to: Some(vec![to]), ports: Some(ports) }]),
            ..NetworkPolicySpec::default()
        },
    )
}

/// Default deny both ways for every pod in the namespace, then the narrow allows. Policies are
/// additive, so each allow is its own object: easy to read in `kubectl get netpol`.
fn network_policies(project: &Project, owner: &Owner, ns: &str, site: &Site) -> Vec<NetworkPolicy> {
    let mut out = vec![
        policy(
            owner,
            ns,
            "noexit-default-deny",
            NetworkPolicySpec {
                pod_selector: Some(LabelSelector::default()),
                policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
                ..NetworkPolicySpec::default()
            },
        ),
        egress_to(
            owner,
            ns,
            "noexit-allow-dns",
            // noexit's own DNS pods, never kube-dns (it forwards: a channel out).
            peer(&site.operator_namespace, &site.dns.pod_labels),
            vec![port("UDP", site.dns.port), port("TCP", site.dns.port)],
        ),
        egress_to(
            owner,
            ns,
            "noexit-allow-control-plane",
            peer(&site.operator_namespace, &site.control_plane.pod_labels),
            vec![port("TCP", site.control_plane.port)],
        ),
    ];
    if project.spec.egress.mirror.enabled {
        out.push(egress_to(
            owner,
            ns,
            "noexit-allow-mirror",
            peer(&site.operator_namespace, &site.mirror.pod_labels),
            vec![port("TCP", site.mirror.port)],
        ));
    }
    out.push(policy(
        owner,
        ns,
        "noexit-allow-gateway-desktop",
        NetworkPolicySpec {
            pod_selector: Some(workspace_pods()),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![peer(&site.gateway.namespace, &site.gateway.pod_labels)]),
                ports: Some(vec![port("TCP", site.desktop_port)]),
            }]),
            ..NetworkPolicySpec::default()
        },
    ));
    out
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    let strings = |xs: &[&str]| xs.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    PolicyRule {
        api_groups: Some(strings(groups)),
        resources: Some(strings(resources)),
        verbs: strings(verbs),
        ..PolicyRule::default()
    }
}

/// One Role per kind of access and a binding for the members that need it. Members can read
/// their project's noexit objects; analysts can also file requests; admins can decide them and
/// manage workspaces. Nobody gets pods/exec, secrets or anything outside the namespace.
fn rbac(project: &Project, owner: &Owner, ns: &str) -> Vec<(Role, RoleBinding)> {
    const READ: &[&str] = &["get", "list", "watch"];
    let all_members: Vec<&str> = {
        let mut v: Vec<&str> = project.spec.members.iter().map(|m| m.user.as_str()).collect();
        v.sort_unstable();
        v
    };
    let grants: Vec<(&str, Vec<&str>, Vec<PolicyRule>)> = vec![
        (
            "noexit-member",
            all_members,
            vec![rule(&["noexit.io"], &["workspaces", "workspacerequests"], READ), rule(&[""], &["events"], READ)],
        ),
        (
            "noexit-data-analyst",
            project.spec.users_with(MemberRole::DataAnalyst),
            vec![rule(&["noexit.io"], &["workspacerequests"], &["create"])],
        ),
        (
            "noexit-admin",
            project.spec.users_with(MemberRole::Admin),
            vec![
                rule(&["noexit.io"], &["workspacerequests/status"], &["update", "patch"]),
                rule(&["noexit.io"], &["workspaces"], &["create", "update", "patch", "delete"]),
            ],
        ),
    ];
    grants
        .into_iter()
        .filter(|(_, users, _)| !users.is_empty())
        .map(|(name, users, rules)| {
            let role = Role { metadata: owner.meta(name, Some(ns), "project"), rules: Some(rules) };
            let binding = RoleBinding {
                metadata: owner.meta(name, Some(ns), "project"),
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "Role".into(),
                    name: name.into(),
                },
                subjects: Some(
                    users
                        .into_iter()
                        .map(|u| Subject {
                            api_group: Some("rbac.authorization.k8s.io".into()),
                            kind: "User".into(),
                            name: u.into(),
                            ..Subject::default()
                        })
                        .collect(),
                ),
            };
            (role, binding)
        })
        .collect()
}

/// A read-only PersistentVolume pre-bound to the project's claim, so no other namespace can
/// claim it and the data is never writable through it.
fn dataset_volume(dataset: &Dataset, owner: &Owner, project: &str, ns: &str) -> PersistentVolume {
    let name = dataset.name_any();
    let src = &dataset.spec.source;
    let mut meta = owner.meta(dataset_volume_name(project, &name), None, "dataset");
    meta.labels.get_or_insert_with(BTreeMap::new).insert("noexit.io/dataset".into(), name.clone());
    if let Some(digest) = &dataset.spec.digest {
        meta.annotations = Some(BTreeMap::from([("noexit.io/digest".to_owned(), digest.clone())]));
    }
    PersistentVolume {
        metadata: meta,
        spec: Some(PersistentVolumeSpec {
            capacity: Some(BTreeMap::from([("storage".to_owned(), dataset.spec.size.clone())])),
            access_modes: Some(vec!["ReadOnlyMany".into()]),
            persistent_volume_reclaim_policy: Some("Retain".into()),
            storage_class_name: Some(String::new()),
            claim_ref: Some(ObjectReference {
                namespace: Some(ns.into()),
                name: Some(dataset_claim_name(&name)),
                ..ObjectReference::default()
            }),
            nfs: src.nfs.as_ref().map(|n| NFSVolumeSource {
                server: n.server.clone(),
                path: n.path.clone(),
                read_only: Some(true),
            }),
            csi: src.csi.as_ref().map(|c| CSIPersistentVolumeSource {
                driver: c.driver.clone(),
                volume_handle: c.volume_handle.clone(),
                read_only: Some(true),
                volume_attributes: (!c.volume_attributes.is_empty()).then(|| c.volume_attributes.clone()),
                ..CSIPersistentVolumeSource::default()
            }),
            host_path: src
                .host_path
                .as_ref()
                .map(|h| HostPathVolumeSource { path: h.path.clone(), type_: Some("Directory".into()) }),
            ..PersistentVolumeSpec::default()
        }),
        ..PersistentVolume::default()
    }
}

fn dataset_claim(dataset: &Dataset, owner: &Owner, project: &str, ns: &str) -> PersistentVolumeClaim {
    let name = dataset.name_any();
    let mut meta = owner.meta(dataset_claim_name(&name), Some(ns), "dataset");
    meta.labels.get_or_insert_with(BTreeMap::new).insert("noexit.io/dataset".into(), name.clone());
    PersistentVolumeClaim {
        metadata: meta,
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadOnlyMany".into()]),
            storage_class_name: Some(String::new()),
            volume_name: Some(dataset_volume_name(project, &name)),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_owned(), dataset.spec.size.clone())])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::project::validate;
    use crate::testdata;

    fn children() -> Vec<Child> {
        let p = testdata::project();
        let today = chrono::NaiveDate::from_ymd_opt(2026, 11, 22).expect("date");
        let r = validate(&p, &testdata::datasets(), "noexit-system", today).expect("valid");
        build(&p, &r, &Site::default()).expect("build")
    }

    #[test]
    fn builds_namespace_first_and_every_child_is_labelled_and_owned() {
        let kids = children();
        assert_eq!(kids[0].describe(), "Namespace noexit-ward-7");
        for c in &kids {
            let labels = c.object.metadata.labels.clone().unwrap_or_default();
            assert_eq!(labels.get(labels::MANAGED_BY).map(String::as_str), Some("noexit-operator"), "{}", c.describe());
            assert_eq!(labels.get(labels::OWNER_NAME).map(String::as_str), Some("ward-7"));
            let owners = c.object.metadata.owner_references.clone().unwrap_or_default();
            assert_eq!(owners.len(), 1);
            assert_eq!(owners[0].kind, "Project");
            assert_eq!(c.namespace().is_none(), matches!(c.kind(), "Namespace" | "PersistentVolume"));
        }
    }

    #[test]
    fn namespace_enforces_restricted_pod_security() {
        let ns = &children()[0];
        let labels = ns.object.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels["pod-security.kubernetes.io/enforce"], "restricted");
    }

    #[test]
    fn network_policy_denies_by_default_and_allows_only_named_peers() {
        let kids = children();
        let names: Vec<_> = kids.iter().filter(|c| c.kind() == "NetworkPolicy").map(|c| c.name()).collect();
        assert_eq!(
            names,
            [
                "noexit-default-deny",
                "noexit-allow-dns",
                "noexit-allow-control-plane",
                "noexit-allow-mirror",
                "noexit-allow-gateway-desktop"
            ]
        );
        let deny = &kids.iter().find(|c| c.name() == "noexit-default-deny").expect("deny").object.data["spec"];
        assert_eq!(deny["podSelector"], serde_json::json!({}));
        assert_eq!(deny["policyTypes"], serde_json::json!(["Ingress", "Egress"]));
        assert!(deny.get("ingress").is_none() && deny.get("egress").is_none());
    }

    /// The only DNS a workspace may reach is noexit's own server (authoritative, no
    /// forwarding), on its pods' port; never kube-dns, which forwards any name outside.
    #[test]
    fn dns_allow_names_the_noexit_dns_pods_only() {
        let kids = children();
        let allow = &kids.iter().find(|c| c.name() == "noexit-allow-dns").expect("allow dns").object.data["spec"];
        let site = Site::default();
        let rule = &allow["egress"][0];
        assert_eq!(rule["to"].as_array().expect("to").len(), 1);
        assert_eq!(rule["to"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], "noexit-system");
        assert_eq!(rule["to"][0]["podSelector"]["matchLabels"], serde_json::json!(site.dns.pod_labels));
        assert_eq!(rule["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"], "dns");
        assert_eq!(
            rule["ports"],
            serde_json::json!([{"port": site.dns.port, "protocol": "UDP"}, {"port": site.dns.port, "protocol": "TCP"}])
        );
        assert!(!allow.to_string().contains("kube-dns"));
    }

    #[test]
    fn mirror_off_means_no_mirror_allow() {
        let mut p = testdata::project();
        p.spec.egress.mirror.enabled = false;
        let r = validate::validate(&p, &[], "noexit-system", chrono::NaiveDate::MIN).expect("valid");
        let kids = build(&p, &r, &Site::default()).expect("build");
        assert!(!kids.iter().any(|c| c.name() == "noexit-allow-mirror"));
    }

    #[test]
    fn dataset_volumes_are_read_only_and_pre_bound() {
        let kids = children();
        let pv = kids.iter().find(|c| c.name() == "noexit-ward-7-icu-2019").expect("pv");
        let spec = &pv.object.data["spec"];
        assert_eq!(spec["accessModes"], serde_json::json!(["ReadOnlyMany"]));
        assert_eq!(spec["nfs"]["readOnly"], true);
        assert_eq!(spec["claimRef"]["namespace"], "noexit-ward-7");
        assert_eq!(spec["claimRef"]["name"], "dataset-icu-2019");
        assert_eq!(spec["persistentVolumeReclaimPolicy"], "Retain");
    }

    #[test]
    fn the_controller_is_bound_in_the_namespace_only() {
        let kids = children();
        assert_eq!(kids[0].kind(), "Namespace");
        let binding = &kids[1];
        assert_eq!((binding.kind(), binding.name().as_str()), ("RoleBinding", CONTROLLER_BINDING));
        assert_eq!(binding.namespace(), Some("noexit-ward-7"));
        let data = &binding.object.data;
        assert_eq!(data["roleRef"]["kind"], "ClusterRole");
        assert_eq!(data["roleRef"]["name"], CONTROLLER_PROJECT_ROLE);
        assert_eq!(data["subjects"][0]["name"], CONTROLLER_SERVICE_ACCOUNT);
        assert_eq!(data["subjects"][0]["namespace"], "noexit-system");
    }

    #[test]
    fn the_api_is_bound_in_the_namespace_only_for_the_airlock_mirrors() {
        let kids = children();
        let binding = kids.iter().find(|c| c.kind() == "RoleBinding" && c.name() == API_BINDING).expect("binding");
        assert_eq!(binding.namespace(), Some("noexit-ward-7"));
        let data = &binding.object.data;
        assert_eq!(
            (data["roleRef"]["kind"].as_str(), data["roleRef"]["name"].as_str()),
            (Some("ClusterRole"), Some(API_PROJECT_ROLE))
        );
        assert_eq!(data["subjects"][0]["kind"], "ServiceAccount");
        assert_eq!(data["subjects"][0]["name"], API_SERVICE_ACCOUNT);
        assert_eq!(data["subjects"][0]["namespace"], "noexit-system");
        assert_eq!(data["subjects"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn only_a_namespace_owned_by_this_project_is_ours() {
        let mut p = testdata::project();
        p.metadata.uid = Some("u-1".into());
        let owner = Owner::of(&p, "ward-7");
        let ours = namespace(&owner, "noexit-ward-7");
        assert!(owns_namespace(&p, &ours));
        let mut foreign = ours.clone();
        foreign.metadata.owner_references = None;
        assert!(!owns_namespace(&p, &foreign), "no owner reference: made by someone else");
        let mut labelled_only = foreign.clone();
        labelled_only.metadata.labels = ours.metadata.labels.clone();
        assert!(!owns_namespace(&p, &labelled_only), "labels can be copied; the owner reference counts");
        let mut earlier = p.clone();
        earlier.metadata.uid = Some("u-0".into());
        assert!(!owns_namespace(&p, &namespace(&Owner::of(&earlier, "ward-7"), "noexit-ward-7")));
        let mut other = p.clone();
        other.metadata.name = Some("ward-8".into());
        assert!(!owns_namespace(&other, &ours));
    }

    #[test]
    fn service_account_has_no_token() {
        let kids = children();
        let sa = kids.iter().find(|c| c.kind() == "ServiceAccount").expect("sa");
        assert_eq!(sa.object.data["automountServiceAccountToken"], false);
    }
}
