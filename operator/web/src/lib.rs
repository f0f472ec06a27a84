//! Serving pieces shared by the operator's servers (API, webhook) and the remote-desktop
//! gateway, with no Kubernetes in them: the accept loop and the shutdown signal ([`serve`]),
//! and the server certificate that is re-read when its files change ([`tls`]). The gateway
//! crate cannot depend on the operator crate (the operator runs the gateway), so what both
//! need lives here, once.

pub mod serve;
pub mod tls;
