//! noexit-airlock: what the control plane decides about a file that wants to leave a
//! workspace, as pure functions. It knows nothing of Kubernetes, HTTP or the database; the API
//! stores and serves what these functions return.

pub mod checks;
pub mod seal;
