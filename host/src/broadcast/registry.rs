//! Which local connections listen to which track.
//!
//! Sharded by track so that subscribes on different tracks do not contend. Fan-out copies a
//! track's listener list (reference counts only) and delivers outside the lock.

use std::collections::HashMap;
use std::sync::Arc;

use crate::broadcast::outbox::{ConnId, Outbox};
use crate::broadcast::sharded::ShardedMap;
use crate::metrics::Metrics;
use crate::seams::bus::Bus;
use crate::seams::presence::Presence;

type Audience = HashMap<ConnId, Arc<Outbox>>;

pub struct Registry {
    tracks: ShardedMap<Audience>,
    metrics: Arc<Metrics>,
    /// Told when a track's local audience appears or vanishes (a farm bus subscribes then).
    bus: Arc<dyn Bus>,
    /// Listeners on the other nodes of a farm.
    presence: Arc<dyn Presence>,
    /// Connections that asked for `listeners` updates, per track (a subset of `tracks`),
    /// with the number of listeners when the first of them asked (what it was shown).
    watchers: ShardedMap<(Audience, u64)>,
}

impl Registry {
    pub fn new(metrics: Arc<Metrics>, bus: Arc<dyn Bus>, presence: Arc<dyn Presence>) -> Registry {
        Registry {
            tracks: ShardedMap::default(),
            metrics,
            bus,
            presence,
            watchers: ShardedMap::default(),
        }
    }

    /// Listening now: this node's listeners of `track` (exact) plus the other nodes' (as of
    /// the last presence exchange).
    pub fn listening(&self, track: &str) -> u64 {
        self.audience_size(track) as u64 + self.presence.elsewhere(track)
    }

    /// Every listened track with its local listener count (for the presence exchange).
    pub fn local_counts(&self) -> Vec<(Arc<str>, u64)> {
        self.tracks.collect(|audience| audience.len() as u64)
    }

    /// Every track some connection wants `listeners` updates of, with the number of listeners
    /// its first watcher was shown.
    pub fn watched_tracks(&self) -> Vec<(Arc<str>, u64)> {
        self.watchers.collect(|(_, shown)| *shown)
    }

    /// Asks for (or stops) `listeners` updates of a track the connection listens to.
    pub fn watch_listeners(&self, track: &Arc<str>, outbox: &Arc<Outbox>, watch: bool) {
        // Read before taking the watchers' lock: `unsubscribe` takes the two the other way.
        let shown = if watch { self.listening(track) } else { 0 };
        let mut shard = self.watchers.lock(track);
        if watch {
            shard
                .entry(track.clone())
                .or_insert_with(|| (Audience::new(), shown))
                .0
                .insert(outbox.conn, outbox.clone());
        } else if let Some((watching, _)) = shard.get_mut(&**track) {
            watching.remove(&outbox.conn);
            if watching.is_empty() {
                shard.remove(&**track);
            }
        }
    }

    /// Copies the connections that want `listeners` updates of `track` into `into`.
    pub fn watchers(&self, track: &str, into: &mut Vec<Arc<Outbox>>) {
        into.clear();
        if let Some((watching, _)) = self.watchers.lock(track).get(track) {
            into.extend(watching.values().cloned());
        }
    }

    /// Every track with at least one local listener.
    pub fn tracks(&self) -> Vec<Arc<str>> {
        self.tracks.collect_keys()
    }

    fn interest_changed(&self, track: &Arc<str>) {
        self.bus.interest_changed(track);
    }

    /// Adds a listener; returns the shared track name and whether it was new.
    pub fn subscribe(&self, track: &str, outbox: &Arc<Outbox>) -> (Arc<str>, bool) {
        let mut shard = self.tracks.lock(track);
        let mut appeared = None;
        if !shard.contains_key(track) {
            let name: Arc<str> = Arc::from(track);
            shard.insert(name.clone(), Audience::new());
            self.metrics.tracks_with_listeners.inc();
            appeared = Some(name);
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
        drop(shard);
        if let Some(track) = appeared {
            self.interest_changed(&track);
        }
        (name, added)
    }

    /// Removes a listener; returns whether it was there.
    pub fn unsubscribe(&self, track: &str, conn: ConnId) -> bool {
        let mut shard = self.tracks.lock(track);
        let Some(audience) = shard.get_mut(track) else {
            return false;
        };
        let removed = audience.remove(&conn).is_some();
        if removed {
            self.metrics.subscriptions_active.dec();
            let mut watching = self.watchers.lock(track);
            if let Some((watchers, _)) = watching.get_mut(track) {
                watchers.remove(&conn);
                if watchers.is_empty() {
                    watching.remove(track);
                }
            }
        }
        if audience.is_empty()
            && let Some((name, _)) = shard.remove_entry(track)
        {
            drop(shard);
            self.metrics.tracks_with_listeners.dec();
            self.interest_changed(&name);
        }
        removed
    }

    pub fn audience_size(&self, track: &str) -> usize {
        self.tracks.lock(track).get(track).map_or(0, HashMap::len)
    }

    /// Copies the track's listeners into `into` (cleared first).
    pub fn listeners(&self, track: &str, into: &mut Vec<Arc<Outbox>>) {
        into.clear();
        if let Some(audience) = self.tracks.lock(track).get(track) {
            into.extend(audience.values().cloned());
        }
    }
}
