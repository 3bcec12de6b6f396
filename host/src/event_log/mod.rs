//! The event log: where an accepted like becomes durable, and the point the client's ack waits for.
//!
//! The embedded implementation commits to SQLite in groups; the farm one (Kafka) lives beside it
//! behind the same trait. Nothing else on the socket path waits for durability.

mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

pub use sqlite::SqliteEventLog;

use crate::protocol::Action;

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

#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    #[error("event log is closed")]
    Closed,
}

#[async_trait]
pub trait EventLog: Send + Sync {
    /// Resolves once the event is durable.
    async fn append(&self, event: LikeEvent) -> Result<(), EventLogError>;

    /// Resolves once everything appended before this call is durable.
    async fn barrier(&self) -> Result<(), EventLogError>;

    /// Makes everything appended durable and stops; later appends fail with `Closed`.
    async fn close(&self) -> Result<(), EventLogError>;

    /// False while writes are failing (and being retried).
    fn healthy(&self) -> bool;
}
