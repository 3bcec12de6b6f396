//! The event log: where an accepted like becomes durable, and the point the client's ack waits for.
//!
//! The embedded implementation commits to SQLite in groups; the farm one (Kafka) lives beside it
//! behind the same trait. Nothing else on the socket path waits for durability.

pub mod kafka;
mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

pub use kafka::{KafkaEventLog, KafkaSettings};
pub use sqlite::{Committed, Forward, SqliteEventLog};

use fanfare_protocol::Action;

use super::Part;

/// One effective state change of a (user, track) pair. Duplicates never become events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LikeEvent {
    /// Globally unique id (UUIDv7), the idempotency key for every downstream store.
    pub event_id: String,
    /// Order of acceptance on this node's ledger.
    pub seq: u64,
    /// Orders updates of one track for broadcasts: the local sequence on one node, the
    /// track's Redis version in a farm (the same on every node).
    pub version: u64,
    pub user: Arc<str>,
    pub track: Arc<str>,
    pub action: Action,
    /// The client's idempotency key.
    pub key: String,
    pub accepted_at_ms: i64,
    pub node: Arc<str>,
}

/// Two 28-bit halves of SHA-1(event id). Summed per track by the ledger script in Redis and by
/// the worker in MongoDB, they say whether both applied the same set of events (sums do not
/// depend on order, and a Redis that lost its data starts again from zero): the worker only
/// corrects a live count that provably covers exactly what MongoDB holds.
pub fn event_digest(event_id: &str) -> [i64; 2] {
    use sha1::{Digest, Sha1};
    let hash = Sha1::digest(event_id.as_bytes());
    // The same bits the script reads: the first 7 and the next 7 hex digits.
    let high = u32::from_be_bytes([hash[0], hash[1], hash[2], hash[3]]);
    let low = u32::from_be_bytes([hash[3], hash[4], hash[5], hash[6]]);
    [i64::from(high >> 4), i64::from(low & 0x0fff_ffff)]
}

/// The wire form of an event on the Kafka topic (JSON; key = track). Documented in
/// `docs/events.md`; consumers must ignore fields they do not know.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EventRecord {
    pub event_id: String,
    pub user: String,
    pub track: String,
    /// `like` or `unlike`
    pub action: String,
    pub accepted_at_ms: i64,
    pub node: String,
    /// Per-track order of this event (the track's Redis version in a farm).
    pub version: u64,
    /// The client's idempotency key.
    pub key: String,
}

impl From<&LikeEvent> for EventRecord {
    fn from(event: &LikeEvent) -> EventRecord {
        EventRecord {
            event_id: event.event_id.clone(),
            user: event.user.to_string(),
            track: event.track.to_string(),
            action: event.action.as_str().to_owned(),
            accepted_at_ms: event.accepted_at_ms,
            node: event.node.to_string(),
            version: event.version,
            key: event.key.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    #[error("event log is closed")]
    Closed,
    /// The spill (events Kafka has not confirmed) is full; the like is refused, not lost.
    #[error("the local spill is full ({0} events waiting for Kafka)")]
    Overloaded(u64),
}

/// Also a [`Part`]: its `close` makes everything appended durable and stops (later appends
/// fail with `Closed`); its health is unavailable while writes are failing (and retried), and
/// degraded while acks come from the local spill.
#[async_trait]
pub trait EventLog: Part {
    /// Resolves once the event is durable.
    async fn append(&self, event: LikeEvent) -> Result<(), EventLogError>;

    /// Resolves once everything appended before this call is durable.
    async fn barrier(&self) -> Result<(), EventLogError>;

    /// Checked before a like is applied, so a full spill refuses it before it is counted.
    fn admit(&self) -> Result<(), EventLogError> {
        Ok(())
    }
}
