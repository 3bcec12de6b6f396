//! Which local connections listen to which track.
//!
//! Sharded by track so that subscribes on different tracks do not contend. Fan-out copies a
//! track's listener list (reference counts only) and delivers outside the lock.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use crate::metrics::Metrics;
use crate::outbox::{ConnId, Outbox};

const SHARDS: usize = 64;

type Audience = HashMap<ConnId, Arc<Outbox>>;

pub struct Registry {
    shards: Box<[Mutex<HashMap<Arc<str>, Audience>>]>,
    metrics: Arc<Metrics>,
}

impl Registry {
    pub fn new(metrics: Arc<Metrics>) -> Registry {
        Registry {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            metrics,
        }
    }

    fn shard(&self, track: &str) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Audience>> {
        let mut hasher = DefaultHasher::new();
        track.hash(&mut hasher);
        let index = (hasher.finish() as usize) % SHARDS;
        self.shards[index].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a listener; returns the shared track name and whether it was new.
    pub fn subscribe(&self, track: &str, outbox: &Arc<Outbox>) -> (Arc<str>, bool) {
        let mut shard = self.shard(track);
        if !shard.contains_key(track) {
            shard.insert(Arc::from(track), Audience::new());
            self.metrics.tracks_with_listeners.inc();
        }
        let name = shard
            .get_key_value(track)
            .map_or_else(|| Arc::from(track), |(name, _)| name.clone());
        let added = shard
            .get_mut(track)
            .is_some_and(|audience| audience.insert(outbox.conn, outbox.clone()).is_none());
        if added {
            self.metrics.subscriptions_active.inc();
        }
        (name, added)
    }

    /// Removes a listener; returns whether it was there.
    pub fn unsubscribe(&self, track: &str, conn: ConnId) -> bool {
        let mut shard = self.shard(track);
        let Some(audience) = shard.get_mut(track) else { return false };
        let removed = audience.remove(&conn).is_some();
        if removed {
            self.metrics.subscriptions_active.dec();
        }
        if audience.is_empty() {
            shard.remove(track);
            self.metrics.tracks_with_listeners.dec();
        }
        removed
    }

    pub fn audience_size(&self, track: &str) -> usize {
        self.shard(track).get(track).map_or(0, HashMap::len)
    }

    /// Copies the track's listeners into `into` (cleared first).
    pub fn listeners(&self, track: &str, into: &mut Vec<Arc<Outbox>>) {
        into.clear();
        if let Some(audience) = self.shard(track).get(track) {
            into.extend(audience.values().cloned());
        }
    }
}
