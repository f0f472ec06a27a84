//! Token buckets in a bounded table: one per query source (queries) and one per workspace
//! (audit rows). Pure: the caller passes the time, so tests need no clock.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// `per_second` tokens a second, at most `burst` saved up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

impl Rate {
    pub fn new(per_second: f64, burst: u32) -> Self {
        Self { per_second: per_second.max(0.0), burst: f64::from(burst.max(1)) }
    }
}

#[derive(Clone, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    /// Takes refused since the last one allowed.
    refused: u64,
}

/// What [`Buckets::take`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// Go ahead; `refused_before` takes were refused since the last allowed one (for the audit
    /// row that says how many were left out).
    Allowed {
        refused_before: u64,
    },
    Refused,
}

/// Token buckets keyed by `K`, at most `capacity` of them. A full table first forgets buckets
/// that have refilled (they hold nothing a new bucket would not), then the one idle longest:
/// memory stays bounded whatever the number of sources.
#[derive(Debug)]
pub struct Buckets<K> {
    rate: Rate,
    capacity: usize,
    map: HashMap<K, Bucket>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    pub fn new(rate: Rate, capacity: usize) -> Self {
        Self { rate, capacity: capacity.max(1), map: HashMap::new() }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn refill(rate: &Rate, b: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate.per_second).min(rate.burst);
        b.last = now;
    }

    fn make_room(&mut self, now: Instant) {
        let rate = self.rate;
        // Time after which any bucket is full again.
        let full_after = if rate.per_second > 0.0 {
            Duration::from_secs_f64((rate.burst / rate.per_second).min(86_400.0))
        } else {
            Duration::MAX
        };
        self.map.retain(|_, b| now.saturating_duration_since(b.last) < full_after);
        if self.map.len() >= self.capacity
            && let Some(oldest) = self.map.iter().min_by_key(|(_, b)| b.last).map(|(k, _)| k.clone())
        {
            self.map.remove(&oldest);
        }
    }

    /// Take one token from `key`'s bucket at `now`.
    pub fn take(&mut self, key: &K, now: Instant) -> Take {
        if !self.map.contains_key(key) && self.map.len() >= self.capacity {
            self.make_room(now);
        }
        let rate = self.rate;
        let b = self.map.entry(key.clone()).or_insert(Bucket { tokens: rate.burst, last: now, refused: 0 });
        Self::refill(&rate, b, now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Take::Allowed { refused_before: std::mem::take(&mut b.refused) }
        } else {
            b.refused += 1;
            Take::Refused
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(t: Take) -> bool {
        matches!(t, Take::Allowed { .. })
    }

    #[test]
    fn a_burst_then_the_steady_rate() {
        let t0 = Instant::now();
        let mut b = Buckets::new(Rate::new(10.0, 5), 16);
        let key = "10.0.0.1";
        let first: Vec<bool> = (0..8).map(|_| allowed(b.take(&key, t0))).collect();
        assert_eq!(first, [true, true, true, true, true, false, false, false]);
        // 100 ms later one token is back, and the allowed take reports the three refused.
        assert_eq!(b.take(&key, t0 + Duration::from_millis(100)), Take::Allowed { refused_before: 3 });
        assert_eq!(b.take(&key, t0 + Duration::from_millis(100)), Take::Refused);
        // Over 10 s at most burst + 10/s * 10 s are allowed, however hard it is asked.
        let mut n = 0;
        for ms in 0..10_000u64 {
            for _ in 0..10 {
                n += usize::from(allowed(b.take(&key, t0 + Duration::from_millis(200 + ms))));
            }
        }
        assert!((95..=106).contains(&n), "{n} allowed in 10 s at 10/s");
    }

    #[test]
    fn sources_have_their_own_buckets() {
        let t0 = Instant::now();
        let mut b = Buckets::new(Rate::new(1.0, 2), 16);
        assert!(allowed(b.take(&1, t0)) && allowed(b.take(&1, t0)));
        assert!(!allowed(b.take(&1, t0)));
        assert!(allowed(b.take(&2, t0)), "another source is not held back by the first");
    }

    #[test]
    fn the_table_stays_bounded_and_forgets_the_idlest() {
        let t0 = Instant::now();
        let mut b = Buckets::new(Rate::new(1.0, 3), 4);
        for k in 0..4u32 {
            for _ in 0..3 {
                b.take(&k, t0 + Duration::from_millis(u64::from(k)));
            }
        }
        assert_eq!(b.len(), 4);
        // A fifth source evicts the one idle longest (key 0); the others keep their empty buckets.
        assert!(allowed(b.take(&99, t0 + Duration::from_millis(10))));
        assert_eq!(b.len(), 4);
        assert!(!allowed(b.take(&3, t0 + Duration::from_millis(10))), "key 3 still empty");
        assert!(allowed(b.take(&0, t0 + Duration::from_millis(11))), "key 0 was forgotten: a fresh bucket");
        for k in 1000..11_000u32 {
            b.take(&k, t0 + Duration::from_millis(20));
        }
        assert!(b.len() <= 4);
    }

    #[test]
    fn a_zero_rate_allows_the_burst_only() {
        let t0 = Instant::now();
        let mut b = Buckets::new(Rate::new(0.0, 2), 4);
        let n = (0..100u64).filter(|s| allowed(b.take(&"k", t0 + Duration::from_secs(*s)))).count();
        assert_eq!(n, 2);
    }
}
