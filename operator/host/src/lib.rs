//! noexit single-host mode: the same Project / Dataset / Workspace manifests as on Kubernetes,
//! run as libvirt VMs on one Linux host.
//!
//! Pure parts (no I/O, unit-tested): [`model`] (addresses, names), [`render`] (libvirt domain and
//! network XML, the host nftables table, the seed's files) and [`plan`] (desired vs actual).
//! Thin I/O at the edges: [`libvirt`] (the `virt` crate), [`nft`] (the `nft` program, one atomic
//! transaction per table), [`files`] (home disks with `qemu-img`, the seed ISO with `xorriso`)
//! and [`state`] (SQLite: subnet and address allocations, VNC passwords, phases).

pub mod files;
pub mod libvirt;
pub mod model;
pub mod nft;
pub mod plan;
pub mod render;
pub mod state;

/// XML namespace of the `<metadata>` element noexit puts on every domain and network it makes.
/// An object without it was not made by noexit and is never touched.
pub const XMLNS: &str = "https://noexit.io/xmlns/libvirt/v1";
/// Prefix used with [`XMLNS`].
pub const XMLNS_PREFIX: &str = "noexit";
