//! noexit-airlock: what the control plane decides about a file that wants to leave a
//! workspace, as pure functions. It knows nothing of Kubernetes, HTTP or the database; the API
//! stores and serves what these functions return.
//!
//! - [`checks::run`]: the automatic checks (DLP, statistical disclosure control, ACRO's own
//!   verdicts beside ours) on one submitted file.
//! - [`render`]: the file as a reviewer sees it, with the checks' findings marked.

pub mod checks;
pub mod lifecycle;
pub mod receipt;
pub mod render;
pub mod seal;
