//! Serving pieces shared by the operator's servers (API, webhook) and the remote-desktop
//! gateway, with no Kubernetes in them: the accept loop and the shutdown signal ([`serve`]),
//! the server certificate that is re-read when its files change ([`tls`]), and what both
//! token checks agree on ([`oidc`]: algorithms, second factors). The gateway
//! crate cannot depend on the operator crate (the operator runs the gateway), so what both
//! need lives here, once.

pub mod oidc;
pub mod serve;
pub mod tls;
