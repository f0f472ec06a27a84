//! The mirror's Kubernetes objects (pure): a Deployment of `noexit-operator mirror`, its
//! Service (at the site's fixed ClusterIP, which the agents' nftables allowlists name), the
//! cache volume, and the ConfigMap with the policy and clients files the mirror reloads.
//!
//! The Project NetworkPolicy `noexit-allow-mirror` selects the pods by `site.mirror.podLabels`
//! in `site.operatorNamespace` on port `site.mirror.port`: the pod carries those labels and
//! listens on that port (NetworkPolicy ports are pod ports, so the Service's targetPort is the
//! same number). Pod-to-Service traffic keeps the workspace's pod address as its source (no
//! SNAT in kube-proxy or common CNIs), which is what attribution by address relies on.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    KeyToPath, PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector, SecretVolumeSource,
    SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use noexit_crds::Project;

use crate::children::{Child, ConvertError, labels};
use crate::site::Site;
use noexit_mirror::clients::{ClientId, clients_yaml};
use noexit_mirror::policy::policy_from_projects;

/// Image of `noexit-operator` (the mirror is one of its subcommands).
pub const IMAGE: &str = "ghcr.io/noexit/operator:0.1.0";
/// Upstream the Deployment reads through; an air-gapped site swaps it for `--snapshot`.
pub const UPSTREAM: &str = "https://cloud.r-project.org";
pub const CONFIG_MAP: &str = "noexit-mirror-config";
pub const CACHE_CLAIM: &str = "noexit-mirror-cache";
pub const CACHE_SIZE: &str = "50Gi";
const CONFIG_DIR: &str = "/etc/noexit-mirror";
const CACHE_DIR: &str = "/var/cache/noexit-mirror";
const UID: i64 = 65532;

fn meta(site: &Site, name: &str) -> ObjectMeta {
    let mut l: BTreeMap<String, String> = site.mirror.pod_labels.clone();
    l.insert(labels::MANAGED_BY.into(), labels::MANAGER.into());
    l.insert(labels::PART_OF.into(), "noexit".into());
    l.insert(labels::COMPONENT.into(), "mirror".into());
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(site.operator_namespace.clone()),
        labels: Some(l),
        ..ObjectMeta::default()
    }
}

/// The mirror's objects with an empty policy (every project refused) and no clients; the
/// operator calls [`children_for`] with the Projects and workspace addresses it knows.
pub fn children(site: &Site) -> Result<Vec<Child>, ConvertError> {
    children_for(site, &[], &[])
}

/// The mirror's objects, the ConfigMap rendered from `projects` and `clients`.
pub fn children_for(
    site: &Site,
    projects: &[Project],
    clients: &[(IpAddr, ClientId)],
) -> Result<Vec<Child>, ConvertError> {
    Ok(vec![
        Child::from_typed(&config_map(site, projects, clients))?,
        Child::from_typed(&cache_claim(site))?,
        Child::from_typed(&service(site))?,
        Child::from_typed(&deployment(site))?,
    ])
}

/// `policy.yaml` (the Projects' `spec.egress.mirror`) and `clients.yaml` (address →
/// workspace), the two files the mirror watches.
pub fn config_map(site: &Site, projects: &[Project], clients: &[(IpAddr, ClientId)]) -> ConfigMap {
    ConfigMap {
        metadata: meta(site, CONFIG_MAP),
        data: Some(BTreeMap::from([
            ("policy.yaml".to_owned(), policy_from_projects(projects).to_yaml()),
            ("clients.yaml".to_owned(), clients_yaml(clients)),
        ])),
        ..ConfigMap::default()
    }
}

fn cache_claim(site: &Site) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: meta(site, CACHE_CLAIM),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: site.storage_class.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_owned(), Quantity(CACHE_SIZE.into()))])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

fn service(site: &Site) -> Service {
    Service {
        metadata: meta(site, &site.mirror.service),
        spec: Some(ServiceSpec {
            // Fixed: the workspace agents' nftables allowlist names this address.
            cluster_ip: Some(site.mirror.address.clone()),
            selector: Some(site.mirror.pod_labels.clone()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: i32::from(site.mirror.port),
                target_port: Some(IntOrString::Int(i32::from(site.mirror.port))),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The Secret holding the mirror's audit database URL as its own role (key `url`; chart value
/// `audit.mirror.databaseSecretName`).
const AUDIT_DB_SECRET: &str = "noexit-audit-db-mirror";
/// The Secret holding the mirror's audit signing key (key `key.pem`; chart value
/// `audit.mirror.keySecretName`).
const AUDIT_KEY_SECRET: &str = "noexit-audit-key-mirror";
const AUDIT_KEY_DIR: &str = "/audit-key";

fn deployment(site: &Site) -> Deployment {
    let port = i32::from(site.mirror.port);
    let args: Vec<String> = [
        "mirror".to_owned(),
        format!("--listen=0.0.0.0:{port}"),
        format!("--upstream={UPSTREAM}"),
        format!("--cache-dir={CACHE_DIR}/packages"),
        format!("--policy={CONFIG_DIR}/policy.yaml"),
        format!("--clients={CONFIG_DIR}/clients.yaml"),
        "--log-json".to_owned(),
    ]
    .into();
    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(port),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        ..Probe::default()
    };
    let mut pod_meta = meta(site, "noexit-mirror");
    pod_meta.name = None;
    pod_meta.namespace = None;
    Deployment {
        metadata: meta(site, "noexit-mirror"),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            // One pod owns the ReadWriteOnce cache: stop the old before starting the new.
            strategy: Some(DeploymentStrategy { type_: Some("Recreate".into()), ..DeploymentStrategy::default() }),
            selector: LabelSelector { match_labels: Some(site.mirror.pod_labels.clone()), ..LabelSelector::default() },
            template: PodTemplateSpec {
                metadata: Some(pod_meta),
                spec: Some(PodSpec {
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(UID),
                        run_as_group: Some(UID),
                        fs_group: Some(UID),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![Container {
                        name: "mirror".into(),
                        image: Some(IMAGE.into()),
                        args: Some(args),
                        // Fetches go into the API's tamper-evident audit log, as the mirror's own
                        // database role and signed with the mirror's own key.
                        env: Some(vec![
                            EnvVar {
                                name: "NOEXIT_DATABASE_URL".into(),
                                value_from: Some(EnvVarSource {
                                    secret_key_ref: Some(SecretKeySelector {
                                        name: AUDIT_DB_SECRET.into(),
                                        key: "url".into(),
                                        optional: Some(false),
                                    }),
                                    ..EnvVarSource::default()
                                }),
                                ..EnvVar::default()
                            },
                            EnvVar {
                                name: "NOEXIT_AUDIT_KEY".into(),
                                value: Some(format!("{AUDIT_KEY_DIR}/key.pem")),
                                ..EnvVar::default()
                            },
                        ]),
                        ports: Some(vec![ContainerPort {
                            name: Some("http".into()),
                            container_port: port,
                            protocol: Some("TCP".into()),
                            ..ContainerPort::default()
                        }]),
                        readiness_probe: Some(probe("/healthz", 5)),
                        liveness_probe: Some(probe("/healthz", 20)),
                        resources: Some(ResourceRequirements {
                            requests: Some(BTreeMap::from([
                                ("cpu".to_owned(), Quantity("100m".into())),
                                ("memory".to_owned(), Quantity("128Mi".into())),
                            ])),
                            limits: Some(BTreeMap::from([("memory".to_owned(), Quantity("512Mi".into()))])),
                            ..ResourceRequirements::default()
                        }),
                        security_context: Some(SecurityContext {
                            allow_privilege_escalation: Some(false),
                            read_only_root_filesystem: Some(true),
                            capabilities: Some(Capabilities {
                                drop: Some(vec!["ALL".into()]),
                                ..Capabilities::default()
                            }),
                            ..SecurityContext::default()
                        }),
                        volume_mounts: Some(vec![
                            VolumeMount {
                                name: "config".into(),
                                mount_path: CONFIG_DIR.into(),
                                read_only: Some(true),
                                ..VolumeMount::default()
                            },
                            VolumeMount {
                                name: "cache".into(),
                                mount_path: CACHE_DIR.into(),
                                ..VolumeMount::default()
                            },
                            VolumeMount {
                                name: "audit-key".into(),
                                mount_path: AUDIT_KEY_DIR.into(),
                                read_only: Some(true),
                                ..VolumeMount::default()
                            },
                        ]),
                        ..Container::default()
                    }],
                    volumes: Some(vec![
                        Volume {
                            name: "config".into(),
                            config_map: Some(ConfigMapVolumeSource {
                                name: CONFIG_MAP.into(),
                                ..ConfigMapVolumeSource::default()
                            }),
                            ..Volume::default()
                        },
                        Volume {
                            name: "cache".into(),
                            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                                claim_name: CACHE_CLAIM.into(),
                                read_only: Some(false),
                            }),
                            ..Volume::default()
                        },
                        Volume {
                            name: "audit-key".into(),
                            secret: Some(SecretVolumeSource {
                                secret_name: Some(AUDIT_KEY_SECRET.into()),
                                items: Some(vec![KeyToPath {
                                    key: "key.pem".into(),
                                    path: "key.pem".into(),
                                    mode: None,
                                }]),
                                ..SecretVolumeSource::default()
                            }),
                            ..Volume::default()
                        },
                    ]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::project::build as project_build;

    #[test]
    fn every_child_matches_its_snapshot() {
        let site = Site::default();
        let project = crate::testdata::project();
        let clients = [("10.244.1.17".parse().unwrap(), "ward-7/alice-r".parse().unwrap())];
        let kids = children_for(&site, &[project], &clients).unwrap();
        let names: Vec<String> = kids.iter().map(Child::describe).collect();
        assert_eq!(
            names,
            [
                "ConfigMap noexit-system/noexit-mirror-config",
                "PersistentVolumeClaim noexit-system/noexit-mirror-cache",
                "Service noexit-system/noexit-mirror",
                "Deployment noexit-system/noexit-mirror",
            ]
        );
        for kid in &kids {
            insta::assert_yaml_snapshot!(format!("mirror-{}", kid.kind().to_lowercase()), kid.object);
        }
    }

    /// The Project's `noexit-allow-mirror` NetworkPolicy must select these pods on this port.
    #[test]
    fn project_network_policy_reaches_the_mirror_pods() {
        let site = Site::default();
        let project = crate::testdata::project();
        let resolved = crate::project::validate(
            &project,
            &crate::testdata::datasets(),
            &site.operator_namespace,
            chrono::NaiveDate::from_ymd_opt(2025, 1, 1).unwrap(),
        )
        .unwrap();
        let kids = project_build::build(&project, &resolved, &site).unwrap();
        let policy = kids.iter().find(|c| c.name() == "noexit-allow-mirror").unwrap();
        let to = &policy.object.data["spec"]["egress"][0];
        let dep = deployment(&site);
        let pod_labels = dep.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().labels.clone().unwrap();
        for (k, v) in to["to"][0]["podSelector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(pod_labels.get(k).map(String::as_str), v.as_str(), "pod label {k}");
        }
        assert_eq!(
            to["to"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
            site.operator_namespace.as_str()
        );
        let container_port =
            dep.spec.unwrap().template.spec.unwrap().containers[0].ports.as_ref().unwrap()[0].container_port;
        assert_eq!(to["ports"][0]["port"], container_port);
        let svc = service(&site).spec.unwrap();
        assert_eq!(svc.cluster_ip.as_deref(), Some(site.mirror.address.as_str()));
        assert_eq!(svc.selector.as_ref(), Some(&site.mirror.pod_labels));
    }

    #[test]
    fn config_map_carries_files_the_mirror_parses() {
        let site = Site::default();
        let project = crate::testdata::project();
        let clients = [("10.244.1.17".parse().unwrap(), "ward-7/alice-r".parse().unwrap())];
        let cm = config_map(&site, std::slice::from_ref(&project), &clients);
        let data = cm.data.unwrap();
        let policy = noexit_mirror::policy::PolicyFile::from_yaml(&data["policy.yaml"]).unwrap();
        assert_eq!(policy.project("ward-7"), Some(&project.spec.egress.mirror));
        let map = noexit_mirror::clients::ClientMap::from_yaml(&data["clients.yaml"]).unwrap();
        assert_eq!(map.lookup(clients[0].0), Some(&clients[0].1));
    }
}
