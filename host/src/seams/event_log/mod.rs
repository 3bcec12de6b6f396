//! The event log: where an accepted like becomes durable, and the point the client's ack waits for.
//!
//! The embedded implementation commits to SQLite in groups; the farm one (Kafka) lives beside it
//! behind the same trait. Nothing else on the socket path waits for durability.

pub mod kafka;
mod sqlite;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

pub use kafka::{KafkaEventLog, KafkaSettings};
pub use sqlite::{Committed, Forward, SqliteEventLog};

use fanfare_protocol::Action;

use super::Part;

/// One accepted action on a (user, track) pair: a change of its state, or an action that
/// left the state as it was (`changed: false`, acked `duplicate: true`), which still moves the
/// pair's last-writer-wins register forward (see docs/farm.md, "The pair register"). Only
/// re-sent keys never become events.
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
    /// The pair's stamp for this action (ms; hybrid: never below the pair's previous stamp
    /// + 1 where the deciding ledger knew it). With the event id it orders a pair's actions.
    pub accepted_at_ms: i64,
    pub node: Arc<str>,
    /// Whether the deciding ledger saw the pair's state change (history counts only these).
    pub changed: bool,
}

/// Sequence numbers the ledger handed out whose events the store has not committed yet. The
/// ledger forgets a pair only when the pair's last event is not among them. A batch's highest
/// committed sequence is no watermark — appends commit out of order, so a pair could be
/// forgotten while its event still waited in the queue and a pipelined second like would be
/// decided again from the store — and an action abandoned before its append (a session cut
/// at `--shutdown-timeout`) keeps its pair in memory instead of letting the store decide it.
#[derive(Debug, Default)]
pub struct Uncommitted(Mutex<HashSet<u64>>);

impl Uncommitted {
    pub fn handed_out(&self, seq: u64) {
        self.lock().insert(seq);
    }

    pub fn committed(&self, seqs: impl IntoIterator<Item = u64>) {
        let mut set = self.lock();
        for seq in seqs {
            set.remove(&seq);
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, HashSet<u64>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
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
    /// False for an action that left the pair's state as it was (absent in records written
    /// before it existed: those were all changes).
    #[serde(default = "changed_by_default")]
    pub changed: bool,
}

fn changed_by_default() -> bool {
    true
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
            changed: event.changed,
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
