//! What every operator component shares, and nothing Kubernetes-controller specific: the
//! operator's CA ([`pki`]), limits and TLS plumbing of its servers ([`serving`]), metrics,
//! health and logging ([`telemetry`]), YAML manifests of noexit's kinds ([`manifests`]), and
//! the site file ([`site`], with its workspace [`images`] allowlist).

pub mod images;
pub mod manifests;
pub mod pki;
pub mod serving;
pub mod site;
pub mod telemetry;
