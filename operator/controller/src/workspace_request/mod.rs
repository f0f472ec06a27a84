//! WorkspaceRequest: an analyst asks, an admin (not the requester) decides, the operator
//! creates the Workspace — the CertificateSigningRequest pattern.

pub mod build;
pub mod reconcile;
pub mod validate;

pub use build::build;
pub use validate::{decision, validate};
