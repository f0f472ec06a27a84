//! noexit operator library. The components are crates under `operator/` (see
//! docs/architecture.md); this crate re-exports them under their old module names and adds
//! what only the binaries need: the gateway's store ([`gateway_store`]) and single-host mode
//! ([`single_host`]). The binaries in `main.rs` and `bin/noexit.rs` only parse arguments and
//! call into these.

pub use noexit_api as api;
pub use noexit_audit as audit;
pub use noexit_cli as cli;
pub use noexit_common::{manifests, pki, serving, telemetry};
pub use noexit_controller as controllers;
#[cfg(feature = "testing")]
pub use noexit_controller::testing;
pub use noexit_controller::{FIELD_MANAGER, render, webhook};
pub use noexit_dns as dns;
pub use noexit_mirror as mirror;

pub mod gateway_store;
pub mod single_host;
