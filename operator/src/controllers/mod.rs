//! Controllers: one directory per kind, each `validate` (pure) → `build` (pure) → `apply` →
//! `status`. The pure halves are also what `noexit-operator render` prints.

pub mod apply;
pub mod ca;
pub mod children;
pub mod conditions;
pub mod context;
pub mod dataset;
pub mod error;
pub mod finalizers;
pub mod images;
pub mod invalid;
pub mod leader;
pub mod mirror_config;
pub mod project;
pub mod quantity;
pub mod revoke;
pub mod run;
pub mod site;
#[cfg(test)]
pub mod testdata;
pub mod workspace;
pub mod workspace_request;

pub use children::Child;
pub use invalid::{Invalid, Reason};
pub use run::{Args, run};
pub use site::Site;
