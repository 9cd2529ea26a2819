//! Drops events whose id was already seen.
//!
//! Kafka delivers at least once, and a replayed partition repeats what was not committed; clients
//! must see each event once. The window is bounded by count and by age (moka, LRU so a new id is
//! always admitted: TinyLFU could refuse it and let its duplicate through).

use std::time::Duration;

use moka::policy::EvictionPolicy;
use moka::sync::Cache;

pub struct Dedup {
    seen: Cache<String, ()>,
}

impl Dedup {
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        Dedup {
            seen: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .eviction_policy(EvictionPolicy::lru())
                .build(),
        }
    }

    pub fn is_duplicate(&self, id: &str) -> bool {
        self.seen.contains_key(id)
    }

    /// Records `id` as delivered; call once the event was fully processed, so an event that
    /// failed half-way is not mistaken for a duplicate when it is retried.
    pub fn remember(&self, id: &str) {
        self.seen.insert(id.to_owned(), ());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_within_window() {
        let d = Dedup::new(100, Duration::from_secs(60));
        assert!(!d.is_duplicate("a"));
        d.remember("a");
        assert!(d.is_duplicate("a"));
        assert!(!d.is_duplicate("b"));
    }

    #[test]
    fn bounded_by_count() {
        let d = Dedup::new(10, Duration::from_secs(60));
        for i in 0..1000 {
            d.remember(&i.to_string());
        }
        d.seen.run_pending_tasks();
        assert!(d.seen.entry_count() <= 10);
        assert!(d.is_duplicate("999"), "the newest id is always kept");
    }
}
