//! The Redis key schema, in one place: the farm ledger, the bus, the plugin counters and the
//! workers' merges all name their keys through this module (docs/farm.md lists them).
//!
//! Every key of one track carries the track as a hash tag (`{track}`), so a track's keys live
//! on one slot and the ledger script stays valid on Redis Cluster.

/// Marks the life of one Redis dataset; a new value means Redis lost what it had.
pub const EPOCH: &str = "ff:epoch";

/// The keys of one track.
pub struct TrackKeys {
    /// Hash user → `1|0:stamp:event id`: each pair's last-writer-wins register.
    pub pairs: String,
    /// The live count.
    pub count: String,
    /// Incremented on every change of the count: orders a track's updates on every node.
    pub version: String,
}

impl TrackKeys {
    pub fn new(track: &str) -> TrackKeys {
        TrackKeys {
            pairs: format!("ff:{{{track}}}:pairs"),
            count: format!("ff:{{{track}}}:count"),
            version: format!("ff:{{{track}}}:version"),
        }
    }
}

/// List of a user's last idempotency keys on a track, each with the event it made.
pub fn user_keys(track: &str, user: &str) -> String {
    format!("ff:{{{track}}}:keys:{user}")
}

/// Pub/Sub channel of a track's likes between nodes.
pub fn channel(track: &str) -> String {
    format!("ff:t:{track}")
}

/// A plugin counter (rate limits shared by the farm).
pub fn counter(key: &str) -> String {
    format!("ff:counter:{key}")
}

/// Sorted set of the nodes sharing listener counts, scored by their last refresh (ms).
pub const PRESENCE_NODES: &str = "ff:presence:nodes";

/// Hash track → listeners on one node (expires when the node stops refreshing it).
pub fn presence(node: &str) -> String {
    format!("ff:presence:{node}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tracks_keys_share_one_hash_tag() {
        let keys = TrackKeys::new("album:x");
        for key in [&keys.pairs, &keys.count, &keys.version] {
            assert!(key.starts_with("ff:{album:x}:"), "{key}");
        }
        assert_eq!(user_keys("album:x", "ana"), "ff:{album:x}:keys:ana");
    }
}
