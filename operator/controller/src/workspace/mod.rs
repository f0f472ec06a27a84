//! Workspace: a researcher's pod or VM, its home volume, desktop Service and agent credentials.

pub mod agent_config;
pub mod build;
pub mod reconcile;
pub mod status;
pub mod validate;

pub use build::{AgentCredentials, build};
pub use validate::{ResolvedWorkspace, validate};
