//! Project: a namespace with its quota, limits, network walls, RBAC and dataset volumes.

pub mod build;
pub mod reconcile;
pub mod status;
pub mod validate;

pub use build::build;
pub use validate::{ResolvedProject, validate};
