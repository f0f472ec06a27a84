//! Children of a Workspace, in apply order: agent Secret, VNC Secret and the gateway's right to
//! read it, home volume, desktop Service, then the pod or the virtual machine.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, KeyToPath, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, Pod, PodDNSConfig, PodSecurityContext, PodSpec,
    ResourceRequirements, SeccompProfile, Secret, SecretVolumeSource, SecurityContext, Service, ServicePort,
    ServiceSpec, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kube::core::{ApiResource, GroupVersionKind};
use noexit_crds::Workspace;
use noexit_crds::workspace::Runtime;
use serde_json::json;

use super::agent_config::{agent_config, cloud_init};
use super::validate::ResolvedWorkspace;
use crate::children::{Child, ConvertError, Owner, annotations, labels, spec_hash};
use crate::project::build::{WORKSPACE_COMPONENT, WORKSPACE_SERVICE_ACCOUNT, dataset_claim_name};
use crate::quantity;
use crate::site::Site;
use noexit_common::pki;

/// The agent's client certificate and key, and the CA that signed them (and the API's cert).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentCredentials {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    /// Hex serial of `cert_pem`.
    pub serial: String,
    /// RFC 3339 expiry of `cert_pem`.
    pub not_after: String,
}

pub fn pod_name(ws: &str) -> String {
    format!("ws-{ws}")
}
pub fn home_claim_name(ws: &str) -> String {
    format!("ws-{ws}-home")
}
pub fn agent_secret_name(ws: &str) -> String {
    format!("ws-{ws}-agent")
}
pub fn desktop_service_name(ws: &str) -> String {
    format!("ws-{ws}-desktop")
}
/// The workspace's VNC Secret: key `password` for the gateway, key `passwd` (TigerVNC's
/// obfuscated password file) for the desktop. Names and keys are the gateway's.
pub use noexit_gateway::directory::{VNC_PASSWD_FILE_KEY, VNC_PASSWORD_KEY, vnc_secret_name};
/// The Role (and its RoleBinding) that lets the gateway read this one workspace's VNC Secret.
pub fn gateway_role_name(ws: &str) -> String {
    format!("ws-{ws}-gateway")
}
/// Where the desktop finds TigerVNC's password file (images/r-desktop/start-desktop).
pub const VNC_DIR: &str = "/etc/noexit/vnc";
/// TigerVNC reads at most 8 characters of a VNC password.
pub const VNC_PASSWORD_LEN: usize = 8;

/// The workspace's VNC password. Made once and kept: the reconciler reuses the live Secret's
/// password ([`VncCredential::reuse_or_new`]), so a reconcile never logs a session out.
#[derive(Clone, PartialEq, Eq)]
pub struct VncCredential {
    pub password: String,
}

impl std::fmt::Debug for VncCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VncCredential(<redacted>)")
    }
}

impl VncCredential {
    /// A new random password: 8 characters from 62 (about 47 bits; TigerVNC's limit).
    pub fn generate() -> Self {
        use rand::Rng as _;
        use rand::distributions::Alphanumeric;
        let password = rand::rngs::OsRng.sample_iter(&Alphanumeric).take(VNC_PASSWORD_LEN).map(char::from).collect();
        Self { password }
    }

    /// The live Secret's password when it holds a usable one (1 to 8 printable ASCII
    /// characters), else a new one; `true` when new.
    pub fn reuse_or_new(live: Option<&Secret>) -> (Self, bool) {
        let usable = live
            .and_then(|s| s.data.as_ref())
            .and_then(|d| d.get(VNC_PASSWORD_KEY))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .filter(|p| (1..=VNC_PASSWORD_LEN).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_graphic()));
        match usable {
            Some(password) => (Self { password }, false),
            None => (Self::generate(), true),
        }
    }

    /// TigerVNC's password file for this password.
    pub fn passwd_file(&self) -> [u8; 8] {
        noexit_gateway::rfb::handshake::password_file(self.password.as_bytes())
    }
}

/// Annotations on the agent Secret that let the reconciler reuse or rotate the certificate.
pub const SERIAL_ANNOTATION: &str = "noexit.io/cert-serial";
pub const NOT_AFTER_ANNOTATION: &str = "noexit.io/certificate-not-after";
/// Key of the cloud-init user data in the agent Secret (VMs).
pub const USERDATA_KEY: &str = "userdata";

/// The KubeVirt VirtualMachine resource (no Rust types are published for it).
pub fn virtual_machine_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("kubevirt.io", "v1", "VirtualMachine"), "virtualmachines")
}

/// Should the pod / VM be running now?
pub fn should_run(ws: &Workspace, resolved: &ResolvedWorkspace) -> bool {
    ws.spec.lifecycle.running && !resolved.expired && resolved.blocked().is_none()
}

pub fn build(
    ws: &Workspace,
    resolved: &ResolvedWorkspace,
    site: &Site,
    creds: &AgentCredentials,
    vnc: &VncCredential,
) -> Result<Vec<Child>, ConvertError> {
    let name = ws.name_any();
    let ns = ws.namespace().unwrap_or_default();
    let owner = Owner::of(ws, &ws.spec.project);
    let mut out = vec![
        Child::from_typed(&agent_secret(ws, resolved, site, creds, vnc, &owner, &ns))?,
        Child::from_typed(&vnc_secret(&name, vnc, &owner, &ns))?,
        Child::from_typed(&gateway_role(&name, &owner, &ns))?,
        Child::from_typed(&gateway_binding(&name, site, &owner, &ns))?,
        Child::from_typed(&home_claim(ws, site, &owner, &ns))?,
        Child::from_typed(&desktop_service(&name, site, &owner, &ns))?,
    ];
    let run = should_run(ws, resolved);
    match ws.spec.runtime {
        Runtime::Pod if run => out.push(Child::from_typed(&pod(ws, resolved, site, &owner, &ns))?),
        Runtime::Pod => {}
        // A stopped VM stays as an object with runStrategy Halted, as KubeVirt users expect.
        Runtime::Vm => out.push(Child::from_value(
            virtual_machine_resource(),
            virtual_machine(ws, resolved, site, &owner, &ns, run),
        )?),
    }
    Ok(out)
}

fn bytes(s: &str) -> ByteString {
    ByteString(s.as_bytes().to_vec())
}

fn agent_secret(
    ws: &Workspace,
    resolved: &ResolvedWorkspace,
    site: &Site,
    creds: &AgentCredentials,
    vnc: &VncCredential,
    owner: &Owner,
    ns: &str,
) -> Secret {
    let config = serde_yaml::to_string(&agent_config(ws, resolved, site)).unwrap_or_default();
    let mut data = BTreeMap::from([
        (pki::CA_CERT_KEY.to_owned(), bytes(&creds.ca_pem)),
        (pki::TLS_CERT_KEY.to_owned(), bytes(&creds.cert_pem)),
        (pki::TLS_KEY_KEY.to_owned(), bytes(&creds.key_pem)),
        (noexit_crds::agent::CONFIG_KEY.to_owned(), bytes(&config)),
    ]);
    if ws.spec.runtime == Runtime::Vm {
        // The guest's desktop reads its VNC password file from cloud-init (KubeVirt mounts
        // no other Secret into a guest); the guest never sees the plain password.
        let user_data = cloud_init(&config, &creds.ca_pem, &creds.cert_pem, &creds.key_pem, &vnc.passwd_file());
        data.insert(USERDATA_KEY.to_owned(), bytes(&user_data));
    }
    let mut meta = owner.meta(agent_secret_name(&ws.name_any()), Some(ns), "agent");
    meta.annotations = Some(BTreeMap::from([
        (SERIAL_ANNOTATION.to_owned(), creds.serial.clone()),
        (NOT_AFTER_ANNOTATION.to_owned(), creds.not_after.clone()),
    ]));
    Secret {
        metadata: meta,
        type_: Some("Opaque".into()),
        data: Some(data),
        immutable: Some(false),
        ..Secret::default()
    }
}

/// The VNC Secret: the gateway reads `password`, the desktop mounts `passwd`.
fn vnc_secret(name: &str, vnc: &VncCredential, owner: &Owner, ns: &str) -> Secret {
    Secret {
        metadata: owner.meta(vnc_secret_name(name), Some(ns), "desktop"),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (VNC_PASSWORD_KEY.to_owned(), bytes(&vnc.password)),
            (VNC_PASSWD_FILE_KEY.to_owned(), ByteString(vnc.passwd_file().to_vec())),
        ])),
        immutable: Some(false),
        ..Secret::default()
    }
}

/// The gateway may `get` this workspace's VNC Secret, by name, and nothing else here: no list,
/// no other Secret (the agent's key lives next to it).
fn gateway_role(name: &str, owner: &Owner, ns: &str) -> Role {
    Role {
        metadata: owner.meta(gateway_role_name(name), Some(ns), "desktop"),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".into()]),
            resource_names: Some(vec![vnc_secret_name(name)]),
            verbs: vec!["get".into()],
            ..PolicyRule::default()
        }]),
    }
}

fn gateway_binding(name: &str, site: &Site, owner: &Owner, ns: &str) -> RoleBinding {
    RoleBinding {
        metadata: owner.meta(gateway_role_name(name), Some(ns), "desktop"),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: gateway_role_name(name),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: site.gateway.service_account.clone(),
            namespace: Some(site.gateway.namespace.clone()),
            ..Subject::default()
        }]),
    }
}

fn home_claim(ws: &Workspace, site: &Site, owner: &Owner, ns: &str) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: owner.meta(home_claim_name(&ws.name_any()), Some(ns), "home"),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: site.storage_class.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_owned(), ws.spec.resources.home_size.clone())])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

/// Labels the pod (or the VM's launcher pod) carries: the Service and NetworkPolicies select them.
fn workload_labels(owner: &Owner) -> BTreeMap<String, String> {
    owner.labels(WORKSPACE_COMPONENT)
}

fn desktop_service(name: &str, site: &Site, owner: &Owner, ns: &str) -> Service {
    let selector = BTreeMap::from([
        (labels::COMPONENT.to_owned(), WORKSPACE_COMPONENT.to_owned()),
        (labels::WORKSPACE.to_owned(), name.to_owned()),
    ]);
    Service {
        metadata: owner.meta(desktop_service_name(name), Some(ns), "desktop"),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some("desktop".into()),
                protocol: Some("TCP".into()),
                port: site.desktop_port.into(),
                target_port: Some(IntOrString::String("desktop".into())),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Restricted-profile container security: no root, no privilege escalation, no capabilities.
fn restricted(uid: i64, read_only_root: bool) -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
        run_as_non_root: Some(true),
        run_as_user: Some(uid),
        run_as_group: Some(uid),
        read_only_root_filesystem: Some(read_only_root),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
        ..SecurityContext::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount { name: name.into(), mount_path: path.into(), read_only: Some(read_only), ..VolumeMount::default() }
}

fn claim_volume(name: &str, claim: &str, read_only: bool) -> Volume {
    Volume {
        name: name.into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.into(),
            read_only: Some(read_only),
        }),
        ..Volume::default()
    }
}

fn empty_dir(name: &str, limit: &str) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity(limit.into())),
            ..EmptyDirVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn resources(cpu: &Quantity, memory: &Quantity) -> ResourceRequirements {
    let both = BTreeMap::from([("cpu".to_owned(), cpu.clone()), ("memory".to_owned(), memory.clone())]);
    ResourceRequirements { requests: Some(both.clone()), limits: Some(both), ..ResourceRequirements::default() }
}

/// The workspace's resolver: noexit's DNS server alone (`dnsPolicy: None`), never the cluster
/// DNS, which forwards any name to the internet's resolvers (query names carry data out).
fn dns_config(site: &Site) -> PodDNSConfig {
    PodDNSConfig { nameservers: Some(vec![site.dns.address.clone()]), options: None, searches: Some(Vec::new()) }
}

fn dataset_volume_name(dataset: &str) -> String {
    format!("dataset-{dataset}")
}

fn pod(ws: &Workspace, resolved: &ResolvedWorkspace, site: &Site, owner: &Owner, ns: &str) -> Pod {
    let name = ws.name_any();
    // The inbox is the agent's to write (approved ingress files); the researcher only reads it.
    let mut workspace_mounts = vec![
        mount("home", "/home/researcher", false),
        mount("outbox", "/outbox", false),
        mount("inbox", "/inbox", true),
        mount("vnc", VNC_DIR, true),
    ];
    let mut volumes = vec![
        claim_volume("home", &home_claim_name(&name), false),
        empty_dir("outbox", "10Gi"),
        empty_dir("inbox", "1Gi"),
        empty_dir("agent-state", "1Gi"),
        // TigerVNC's password file alone (not the plain password); group-readable through
        // fsGroup, for the workspace user who runs the desktop.
        Volume {
            name: "vnc".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(vnc_secret_name(&name)),
                default_mode: Some(0o440),
                items: Some(vec![KeyToPath { key: VNC_PASSWD_FILE_KEY.into(), path: "passwd".into(), mode: None }]),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "agent-config".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(agent_secret_name(&name)),
                default_mode: Some(0o440),
                items: Some(vec![
                    KeyToPath { key: noexit_crds::agent::CONFIG_KEY.into(), path: "agent.yaml".into(), mode: None },
                    KeyToPath { key: pki::CA_CERT_KEY.into(), path: "tls/ca.crt".into(), mode: None },
                    KeyToPath { key: pki::TLS_CERT_KEY.into(), path: "tls/tls.crt".into(), mode: None },
                    KeyToPath { key: pki::TLS_KEY_KEY.into(), path: "tls/tls.key".into(), mode: None },
                ]),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    for d in &resolved.datasets {
        workspace_mounts.push(mount(&dataset_volume_name(d), &format!("/data/{d}"), true));
        volumes.push(claim_volume(&dataset_volume_name(d), &dataset_claim_name(d), true));
    }
    let env = |k: &str, v: String| EnvVar { name: k.into(), value: Some(v), ..EnvVar::default() };
    let mut env_vars = vec![env("NOEXIT_WORKSPACE", format!("{}/{name}", ws.spec.project))];
    if resolved.mirror {
        // R reads this through the image's Rprofile.site: options(repos = c(CRAN = ...)).
        env_vars.push(env("NOEXIT_CRAN_MIRROR", site.mirror_url()));
    }
    let workspace = Container {
        name: "workspace".into(),
        image: Some(ws.spec.image.clone()),
        ports: Some(vec![ContainerPort {
            name: Some("desktop".into()),
            container_port: site.desktop_port.into(),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        env: Some(env_vars),
        resources: Some(resources(&ws.spec.resources.cpu, &ws.spec.resources.memory)),
        security_context: Some(restricted(site.workspace_uid, false)),
        volume_mounts: Some(workspace_mounts),
        ..Container::default()
    };
    let agent = Container {
        name: "agent".into(),
        image: Some(site.agent_image.clone()),
        args: Some(vec!["--config".into(), "/etc/noexit/agent.yaml".into(), "run".into()]),
        resources: Some(resources(&Quantity("100m".into()), &Quantity("64Mi".into()))),
        security_context: Some(restricted(site.agent_uid, true)),
        volume_mounts: Some(vec![
            mount("agent-config", "/etc/noexit", true),
            mount("outbox", "/outbox", false),
            mount("inbox", "/inbox", false),
            mount("agent-state", "/var/lib/noexit-agent", false),
        ]),
        ..Container::default()
    };
    let spec = PodSpec {
        service_account_name: Some(WORKSPACE_SERVICE_ACCOUNT.into()),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        host_network: Some(false),
        host_pid: Some(false),
        host_ipc: Some(false),
        hostname: Some(name.clone()),
        dns_policy: Some("None".into()),
        dns_config: Some(dns_config(site)),
        restart_policy: Some("Always".into()),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            fs_group: Some(site.workspace_uid),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
            ..PodSecurityContext::default()
        }),
        containers: vec![workspace, agent],
        volumes: Some(volumes),
        ..PodSpec::default()
    };
    let mut meta = owner.meta(pod_name(&name), Some(ns), WORKSPACE_COMPONENT);
    meta.labels = Some(workload_labels(owner));
    // Pod specs are mostly immutable: the applier replaces the pod when this hash changes.
    meta.annotations = Some(BTreeMap::from([(annotations::SPEC_HASH.to_owned(), spec_hash(&spec))]));
    Pod { metadata: meta, spec: Some(spec), ..Pod::default() }
}

fn virtual_machine(
    ws: &Workspace,
    resolved: &ResolvedWorkspace,
    site: &Site,
    owner: &Owner,
    ns: &str,
    run: bool,
) -> serde_json::Value {
    let name = ws.name_any();
    let mut disks = vec![
        json!({"name": "rootdisk", "disk": {"bus": "virtio"}, "bootOrder": 1}),
        json!({"name": "home", "disk": {"bus": "virtio"}}),
    ];
    let mut volumes = vec![
        json!({"name": "rootdisk", "containerDisk": {"image": ws.spec.image}}),
        json!({"name": "home", "persistentVolumeClaim": {"claimName": home_claim_name(&name)}}),
    ];
    for d in &resolved.datasets {
        let v = dataset_volume_name(d);
        disks.push(json!({"name": v, "disk": {"bus": "virtio", "readonly": true}}));
        volumes
            .push(json!({"name": v, "persistentVolumeClaim": {"claimName": dataset_claim_name(d), "readOnly": true}}));
    }
    disks.push(json!({"name": "cloudinit", "disk": {"bus": "virtio"}}));
    volumes.push(json!({"name": "cloudinit", "cloudInitNoCloud": {"secretRef": {"name": agent_secret_name(&name)}}}));
    let meta = owner.meta(pod_name(&name), Some(ns), WORKSPACE_COMPONENT);
    json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": meta,
        "spec": {
            "runStrategy": if run { "Always" } else { "Halted" },
            "template": {
                "metadata": {"labels": workload_labels(owner)},
                "spec": {
                    "domain": {
                        "cpu": {"cores": quantity::cpu_cores(&ws.spec.resources.cpu.0)},
                        "resources": {"requests": {"memory": ws.spec.resources.memory, "cpu": ws.spec.resources.cpu}},
                        "devices": {
                            "disks": disks,
                            // The desktop is the guest's own VNC server behind the gateway; no
                            // KubeVirt VNC console, serial console, USB or client passthrough.
                            "autoattachGraphicsDevice": false,
                            "autoattachSerialConsole": false,
                            "interfaces": [{
                                "name": "default",
                                "masquerade": {},
                                "ports": [{"name": "desktop", "port": site.desktop_port, "protocol": "TCP"}]
                            }]
                        }
                    },
                    "networks": [{"name": "default", "pod": {}}],
                    // Handed to the guest by KubeVirt's DHCP; the agent's nftables allow it alone.
                    "dnsPolicy": "None",
                    "dnsConfig": dns_config(site),
                    "volumes": volumes,
                    "terminationGracePeriodSeconds": 60
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata;
    use crate::workspace::validate;

    pub(crate) fn creds() -> AgentCredentials {
        AgentCredentials {
            cert_pem: "-----BEGIN CERTIFICATE-----\nclient\n-----END CERTIFICATE-----\n".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----\nkey\n-----END PRIVATE KEY-----\n".into(),
            ca_pem: "-----BEGIN CERTIFICATE-----\nca\n-----END CERTIFICATE-----\n".into(),
            serial: "0a1b2c".into(),
            not_after: "2026-12-22T10:00:00Z".into(),
        }
    }

    pub(crate) fn vnc() -> VncCredential {
        VncCredential { password: "pw123456".into() }
    }

    fn now() -> chrono::DateTime<chrono::Utc> {
        "2026-11-22T10:00:00Z".parse().expect("time")
    }

    fn build_for(ws: &Workspace) -> Vec<Child> {
        let r = validate(ws, Some(&testdata::project()), &testdata::datasets(), &Default::default(), now());
        build(ws, &r, &Site::default(), &creds(), &vnc()).expect("build")
    }

    fn find<'a>(kids: &'a [Child], kind: &str) -> Option<&'a Child> {
        kids.iter().find(|c| c.kind() == kind)
    }

    #[test]
    fn pod_passes_restricted_pod_security() {
        let kids = build_for(&testdata::workspaces()[0]);
        let pod: Pod =
            serde_json::from_value(serde_json::to_value(&find(&kids, "Pod").expect("pod").object).expect("json"))
                .expect("pod");
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert!(spec.host_network != Some(true) && spec.host_pid != Some(true) && spec.host_ipc != Some(true));
        let psc = spec.security_context.expect("psc");
        assert_eq!(psc.run_as_non_root, Some(true));
        for c in &spec.containers {
            let sc = c.security_context.clone().expect("sc");
            assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
            assert_eq!(sc.capabilities.and_then(|c| c.drop), Some(vec!["ALL".to_owned()]));
            assert_eq!(sc.seccomp_profile.map(|s| s.type_), Some("RuntimeDefault".to_owned()));
            assert_eq!(sc.run_as_non_root, Some(true));
        }
        for v in spec.volumes.unwrap_or_default() {
            assert!(v.host_path.is_none(), "no hostPath volumes");
        }
    }

    #[test]
    fn datasets_are_mounted_read_only_and_home_read_write() {
        let kids = build_for(&testdata::workspaces()[0]);
        let pod = &find(&kids, "Pod").expect("pod").object.data["spec"];
        let mounts = &pod["containers"][0]["volumeMounts"];
        let by_path = |p: &str| mounts.as_array().into_iter().flatten().find(|m| m["mountPath"] == p).cloned();
        assert_eq!(by_path("/home/researcher").expect("home")["readOnly"], false);
        assert_eq!(by_path("/data/icu-2019").expect("icu")["readOnly"], true);
        assert_eq!(by_path("/data/cohort-2024").expect("cohort")["readOnly"], true);
        let vols = pod["volumes"].as_array().expect("volumes");
        let claim = |n: &str| vols.iter().find(|v| v["name"] == n).expect(n)["persistentVolumeClaim"].clone();
        assert_eq!(claim("dataset-icu-2019")["readOnly"], true);
        assert_eq!(claim("dataset-icu-2019")["claimName"], "dataset-icu-2019");
    }

    #[test]
    fn stopped_pod_workspace_keeps_home_secret_and_service_only() {
        let mut ws = testdata::workspaces().remove(0);
        ws.spec.lifecycle.running = false;
        let kinds: Vec<String> = build_for(&ws).iter().map(|c| c.describe()).collect();
        assert_eq!(
            kinds,
            [
                "Secret noexit-ward-7/ws-alice-r-agent",
                "Secret noexit-ward-7/ws-alice-r-vnc",
                "Role noexit-ward-7/ws-alice-r-gateway",
                "RoleBinding noexit-ward-7/ws-alice-r-gateway",
                "PersistentVolumeClaim noexit-ward-7/ws-alice-r-home",
                "Service noexit-ward-7/ws-alice-r-desktop"
            ]
        );
    }

    #[test]
    fn a_blocked_workspace_gets_no_pod_and_a_vm_is_halted() {
        let mut pod_ws = testdata::workspaces().remove(0);
        pod_ws.spec.datasets.push("not-there".into());
        assert!(find(&build_for(&pod_ws), "Pod").is_none());

        let mut vm_ws = testdata::workspaces().remove(1);
        vm_ws.spec.owner = "bob@ward7.example".into();
        let kids = build_for(&vm_ws);
        let vm = find(&kids, "VirtualMachine").expect("vm");
        assert_eq!(vm.object.data["spec"]["runStrategy"], "Halted");
    }

    #[test]
    fn vm_has_read_only_dataset_disks_and_cloud_init_from_the_secret() {
        let kids = build_for(&testdata::workspaces()[1]);
        let vm = find(&kids, "VirtualMachine").expect("vm");
        assert_eq!(vm.resource.api_version, "kubevirt.io/v1");
        let spec = &vm.object.data["spec"];
        assert_eq!(spec["runStrategy"], "Always");
        let disks = spec["template"]["spec"]["domain"]["devices"]["disks"].as_array().expect("disks");
        let icu = disks.iter().find(|d| d["name"] == "dataset-icu-2019").expect("dataset disk");
        assert_eq!(icu["disk"]["readonly"], true);
        let secret = find(&kids, "Secret").expect("secret");
        let data = secret.object.data["data"].as_object().expect("data");
        assert!(data.contains_key(USERDATA_KEY));
    }

    fn secret_named(kids: &[Child], name: &str) -> Secret {
        let child = kids.iter().find(|c| c.describe().ends_with(&format!("/{name}"))).expect(name);
        serde_json::from_value(serde_json::to_value(&child.object).expect("json")).expect("secret")
    }

    #[test]
    fn the_vnc_secret_holds_the_password_for_the_gateway_and_the_file_for_the_desktop() {
        let kids = build_for(&testdata::workspaces()[0]);
        let data = secret_named(&kids, "ws-alice-r-vnc").data.expect("data");
        assert_eq!(data[VNC_PASSWORD_KEY].0, b"pw123456");
        assert_eq!(data[VNC_PASSWD_FILE_KEY].0, noexit_gateway::rfb::handshake::password_file(b"pw123456"));
        // The pod mounts the password file only, read-only, where start-desktop looks.
        let pod = &find(&kids, "Pod").expect("pod").object.data["spec"];
        let vol = pod["volumes"].as_array().expect("volumes").iter().find(|v| v["name"] == "vnc").expect("vnc");
        assert_eq!(vol["secret"]["secretName"], "ws-alice-r-vnc");
        assert_eq!(vol["secret"]["items"], json!([{"key": "passwd", "path": "passwd"}]));
        let mounts = pod["containers"][0]["volumeMounts"].as_array().expect("mounts");
        let m = mounts.iter().find(|m| m["name"] == "vnc").expect("vnc mount");
        assert_eq!((m["mountPath"].as_str(), m["readOnly"].as_bool()), (Some(VNC_DIR), Some(true)));
        // The agent sidecar does not get it.
        assert!(pod["containers"][1]["volumeMounts"].as_array().expect("mounts").iter().all(|m| m["name"] != "vnc"));
    }

    #[test]
    fn a_vm_guest_gets_the_vnc_password_file_through_cloud_init() {
        let kids = build_for(&testdata::workspaces()[1]);
        let data = secret_named(&kids, "ws-alice-vm-agent").data.expect("data");
        let user_data = String::from_utf8(data[USERDATA_KEY].0.clone()).expect("utf8");
        let doc: serde_yaml::Value =
            serde_yaml::from_str(user_data.trim_start_matches("#cloud-config\n")).expect("yaml");
        let files = doc["write_files"].as_sequence().expect("files");
        let f = files.iter().find(|f| f["path"] == "/etc/noexit/vnc/passwd").expect("passwd file");
        assert_eq!(f["encoding"], "b64");
        assert_eq!(f["permissions"], "0400");
        use base64::Engine as _;
        let content =
            base64::engine::general_purpose::STANDARD.decode(f["content"].as_str().expect("content")).expect("b64");
        assert_eq!(content, noexit_gateway::rfb::handshake::password_file(b"pw123456"));
        assert!(!user_data.contains("pw123456"), "the plain password stays out of the guest");
        assert!(secret_named(&kids, "ws-alice-vm-vnc").data.is_some());
    }

    #[test]
    fn the_gateway_may_get_this_workspaces_vnc_secret_by_name_only() {
        let kids = build_for(&testdata::workspaces()[0]);
        let role = kids.iter().find(|c| c.kind() == "Role").expect("role");
        assert_eq!(
            role.object.data["rules"],
            json!([{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["ws-alice-r-vnc"], "verbs": ["get"]}])
        );
        let binding = kids.iter().find(|c| c.kind() == "RoleBinding").expect("binding");
        let site = Site::default();
        assert_eq!(binding.object.data["roleRef"]["name"], "ws-alice-r-gateway");
        assert_eq!(
            binding.object.data["subjects"],
            json!([{"kind": "ServiceAccount", "name": site.gateway.service_account, "namespace": site.gateway.namespace}])
        );
    }

    #[test]
    fn the_vnc_password_is_kept_when_usable_and_made_when_not() {
        let secret = |pw: &[u8]| Secret {
            data: Some(BTreeMap::from([(VNC_PASSWORD_KEY.to_owned(), ByteString(pw.to_vec()))])),
            ..Secret::default()
        };
        assert_eq!(
            VncCredential::reuse_or_new(Some(&secret(b"Ab3dEf9h"))),
            (VncCredential { password: "Ab3dEf9h".into() }, false)
        );
        for bad in [&b""[..], b"toolong-123", b"sp ace", b"\xff\xfe"] {
            let (made, new) = VncCredential::reuse_or_new(Some(&secret(bad)));
            assert!(new && made.password.len() == VNC_PASSWORD_LEN, "{bad:?}");
        }
        let (a, new) = VncCredential::reuse_or_new(None);
        assert!(new && a.password.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, VncCredential::generate(), "random");
        assert_eq!(format!("{a:?}"), "VncCredential(<redacted>)");
    }

    #[test]
    fn agent_config_in_the_secret_round_trips_and_allows_only_the_wall() {
        let kids = build_for(&testdata::workspaces()[0]);
        let secret: Secret =
            serde_json::from_value(serde_json::to_value(&find(&kids, "Secret").expect("secret").object).expect("json"))
                .expect("secret");
        let data = secret.data.expect("data");
        let yaml = String::from_utf8(data[noexit_crds::agent::CONFIG_KEY].0.clone()).expect("utf8");
        let cfg: noexit_crds::agent::AgentConfig = serde_yaml::from_str(&yaml).expect("agent config parses");
        assert_eq!(cfg.workspace.name, "alice-r");
        let names: Vec<_> = cfg.egress.endpoints.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["controlPlane", "mirror"]);
        assert_eq!(cfg.mode, noexit_crds::agent::AgentMode::Pod);
        assert!(cfg.clipboard_in);
    }

    /// Today's (pre-noexit-dns) pods used the cluster resolver (kube-dns, 10.96.0.10), which
    /// forwards: the pod and the VM guest must name noexit's DNS server and nothing else.
    #[test]
    fn pod_and_vm_resolve_through_noexit_dns_only() {
        let site = Site::default();
        let kids = build_for(&testdata::workspaces()[0]);
        let pod = &find(&kids, "Pod").expect("pod").object.data["spec"];
        assert_eq!(pod["dnsPolicy"], "None");
        assert_eq!(pod["dnsConfig"]["nameservers"], json!([site.dns.address]));
        assert_eq!(pod["dnsConfig"]["searches"], json!([]));
        assert_ne!(site.dns.address, "10.96.0.10", "kube-dns is a forwarder");

        let kids = build_for(&testdata::workspaces()[1]);
        let vm = &find(&kids, "VirtualMachine").expect("vm").object.data["spec"]["template"]["spec"];
        assert_eq!(vm["dnsPolicy"], "None");
        assert_eq!(vm["dnsConfig"]["nameservers"], json!([site.dns.address]));
        let secret: Secret =
            serde_json::from_value(serde_json::to_value(&find(&kids, "Secret").expect("secret").object).expect("json"))
                .expect("secret");
        let yaml =
            String::from_utf8(secret.data.expect("data")[noexit_crds::agent::CONFIG_KEY].0.clone()).expect("utf8");
        let cfg: noexit_crds::agent::AgentConfig = serde_yaml::from_str(&yaml).expect("agent config");
        assert_eq!(cfg.egress.resolvers, [site.dns.address.parse::<std::net::IpAddr>().expect("ip")]);
    }

    #[test]
    fn pod_spec_hash_changes_with_the_spec() {
        let a = build_for(&testdata::workspaces()[0]);
        let mut ws = testdata::workspaces().remove(0);
        ws.spec.datasets.pop();
        let b = build_for(&ws);
        let hash = |kids: &[Child]| {
            find(kids, "Pod").expect("pod").object.metadata.annotations.clone().unwrap_or_default()
                [annotations::SPEC_HASH]
                .clone()
        };
        assert_ne!(hash(&a), hash(&b));
    }
}
