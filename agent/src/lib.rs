//! noexit-agent: the in-guest agent of a noexit workspace. It holds the egress lock (VM) or
//! probes the wall (pod), hardens the desktop, reports sessions and heartbeats to the control
//! plane, keeps undelivered events in a durable spool, and submits files from the outbox to the
//! airlock after a DLP scan; it writes the reviewers' decisions next to the outbox and places
//! approved ingress files, read-only, in the inbox.

pub mod agent;
pub mod client;
pub mod config;
pub mod decisions;
pub mod dlp;
pub mod egress;
pub mod guards;
pub mod hardening;
pub mod inbox;
pub mod outbox;
pub mod probe;
pub mod sessions;
pub mod spool;
