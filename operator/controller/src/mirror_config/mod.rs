//! Mirror config: keeps the ConfigMap `noexit-mirror-config` (which the Helm chart creates
//! empty, failing closed) equal to what the Projects and the running workspace pods say.
//! `policy.yaml` is every Project's `spec.egress.mirror`; `clients.yaml` maps each workspace
//! pod's address to `<project>/<workspace>`, which is how the mirror attributes a request.
//!
//! VM workspaces are covered by the same pod watch: KubeVirt copies the VM template's labels
//! (ours) onto the `virt-launcher` pod, and with the masquerade binding the guest's traffic
//! leaves with that pod's address, the one the mirror sees. No VMI lookup is needed; a VM
//! given a bridge or Multus interface instead would need one (not supported here).

pub mod deploy;
pub mod reconcile;
pub mod render;
pub mod watch;

pub use render::{desired_config, workspace_clients};
