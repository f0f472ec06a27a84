//! Revoked certificate serials, in memory so the check on every request costs a hash lookup.
//! The database is the record; this set is filled from it at start and updated on every
//! revocation before the revocation is acknowledged, so a revoked agent is refused at once.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use crate::pki::normalize_serial;

#[derive(Clone, Debug, Default)]
pub struct RevocationSet {
    serials: Arc<RwLock<HashSet<String>>>,
}

impl RevocationSet {
    pub fn new(serials: impl IntoIterator<Item = String>) -> Self {
        let set = serials.into_iter().map(|s| normalize_serial(&s)).collect();
        Self { serials: Arc::new(RwLock::new(set)) }
    }

    pub fn insert(&self, serial: &str) {
        self.serials.write().unwrap_or_else(|p| p.into_inner()).insert(normalize_serial(serial));
    }

    pub fn contains(&self, serial: &str) -> bool {
        self.serials.read().unwrap_or_else(|p| p.into_inner()).contains(&normalize_serial(serial))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_ignore_case_and_leading_zero_bytes() {
        let set = RevocationSet::new(["00AB12".to_owned()]);
        assert!(set.contains("ab12"));
        assert!(!set.contains("ab13"));
        set.insert("CD");
        assert!(set.clone().contains("00cd"));
    }
}
