//! Connection-level protection for the mirror; the pieces live in
//! [`noexit_common::serving`], shared with the API and the webhook.

pub use noexit_common::serving::{Busy, BusyGuard, IdleTimeout, PerClient, Slot};
