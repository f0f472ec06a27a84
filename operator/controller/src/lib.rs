//! Controllers: one directory per kind, each `validate` (pure) → `build` (pure) → `apply` →
//! `status`. The pure halves are also what `noexit-operator render` prints ([`render`]); the
//! admission webhook ([`webhook`]) runs the same validations before objects are stored.

pub mod apply;
pub mod ca;
pub mod children;
pub mod conditions;
pub mod context;
pub mod dataset;
pub mod error;
pub mod finalizers;
pub mod invalid;
pub mod leader;
pub mod mirror_config;
pub mod project;
pub mod quantity;
pub mod render;
pub mod revoke;
pub mod run;
#[cfg(test)]
pub mod testdata;
#[cfg(feature = "testing")]
pub mod testing;
pub mod webhook;
pub mod workspace;
pub mod workspace_request;

// The site file and its image allowlist live in `noexit-common`: the DNS server reads the site too.
pub use noexit_common::{images, site};

pub use children::Child;
pub use invalid::{Invalid, Reason};
pub use run::{Args, run};
pub use site::Site;

/// The one field manager noexit uses for server-side apply.
pub const FIELD_MANAGER: &str = "noexit-operator";
