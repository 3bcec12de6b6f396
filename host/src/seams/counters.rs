//! Shared counters for plugins (`counter-add` in WIT): the state behind rate limits.
//!
//! Plugin instances are pooled and hold no state between calls, so anything a limit must
//! remember lives here. On one node it is memory; in a farm it is Redis, so limits hold
//! across nodes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::Part;

#[async_trait]
pub trait Counters: Part {
    /// Adds `delta` to `key` (created with a lifetime of `ttl_ms` if absent); returns the total.
    async fn add(&self, key: &str, delta: u64, ttl_ms: u64) -> u64;
}

/// Counters in this process's memory; expired entries are swept as the map grows.
#[derive(Default)]
pub struct MemoryCounters {
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    map: HashMap<String, (u64, Instant)>,
    sweep_at: usize,
}

const SWEEP_MIN: usize = 10_000;

impl Part for MemoryCounters {
    fn name(&self) -> &'static str {
        "plugin counters (memory)"
    }
}

#[async_trait]
impl Counters for MemoryCounters {
    async fn add(&self, key: &str, delta: u64, ttl_ms: u64) -> u64 {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.map.len() >= entries.sweep_at.max(SWEEP_MIN) {
            entries.map.retain(|_, (_, expires)| *expires > now);
            entries.sweep_at = entries.map.len() * 2;
        }
        let ttl = Duration::from_millis(ttl_ms.clamp(1, 86_400_000));
        let entry = entries.map.entry(key.to_owned()).or_insert((0, now + ttl));
        if entry.1 <= now {
            *entry = (0, now + ttl);
        }
        entry.0 = entry.0.saturating_add(delta);
        entry.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_and_expires() {
        let counters = MemoryCounters::default();
        assert_eq!(counters.add("a", 1, 50).await, 1);
        assert_eq!(counters.add("a", 2, 50).await, 3);
        assert_eq!(counters.add("a", 0, 50).await, 3);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(
            counters.add("a", 1, 50).await,
            1,
            "expired counter starts over"
        );
    }
}
