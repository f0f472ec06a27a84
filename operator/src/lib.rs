//! noexit operator library. Each module has one job; the binaries in `main.rs` and
//! `bin/noexit.rs` only parse arguments and call into these.

pub mod api;
pub mod audit;
pub mod cli;
pub mod controllers;
pub mod dns;
pub mod gateway_store;
pub mod manifests;
pub mod mirror;
pub mod pki;
pub mod render;
pub mod serving;
pub mod single_host;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod webhook;

/// The one field manager noexit uses for server-side apply.
pub const FIELD_MANAGER: &str = "noexit-operator";
