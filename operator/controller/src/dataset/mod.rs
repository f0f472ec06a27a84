//! Dataset: a steward's registration of read-only data. It has no children of its own (the
//! read-only volumes belong to the Projects it is granted to); the controller validates it and
//! records which projects attach it.

pub mod reconcile;
pub mod validate;

pub use validate::validate;
