//! noexit-agent: the in-guest agent of a noexit workspace. It reports sessions and heartbeats to
//! the control plane, keeps undelivered events in a durable spool, and submits files from the
//! outbox to the airlock after a DLP scan.

pub mod agent;
pub mod client;
pub mod config;
pub mod dlp;
pub mod guards;
pub mod outbox;
pub mod sessions;
pub mod spool;
