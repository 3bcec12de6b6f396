//! A map keyed by track name, split into independently locked shards so that work on
//! different tracks does not contend on one lock.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};

const SHARDS: usize = 64;

type Shard<V> = Mutex<HashMap<Arc<str>, V>>;

pub struct ShardedMap<V> {
    shards: Box<[Shard<V>]>,
}

impl<V> Default for ShardedMap<V> {
    fn default() -> Self {
        ShardedMap {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl<V> ShardedMap<V> {
    /// Locks the shard that holds `key`. Hold the guard briefly: never across an await.
    pub fn lock(&self, key: &str) -> MutexGuard<'_, HashMap<Arc<str>, V>> {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        let index = (hasher.finish() as usize) % self.shards.len();
        // A panic elsewhere while holding a shard must not take every later caller down too.
        self.shards[index].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A snapshot of every key with a value derived from its entry, one shard at a time.
    pub fn collect<T>(&self, value: impl Fn(&V) -> T) -> Vec<(Arc<str>, T)> {
        let mut all = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            all.extend(shard.iter().map(|(key, v)| (key.clone(), value(v))));
        }
        all
    }

    /// A snapshot of every key, one shard at a time.
    pub fn collect_keys(&self) -> Vec<Arc<str>> {
        let mut keys = Vec::new();
        for shard in self.shards.iter() {
            keys.extend(
                shard
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .keys()
                    .cloned(),
            );
        }
        keys
    }
}
