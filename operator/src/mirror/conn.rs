//! Connection-level protection for the mirror; the pieces live in [`crate::serving`], shared
//! with the API and the webhook.

pub use crate::serving::{Busy, BusyGuard, IdleTimeout, PerClient, Slot};
