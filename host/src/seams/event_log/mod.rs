//! The event log: where an accepted like becomes durable, and the point the client's ack waits for.
//!
//! The embedded implementation commits to SQLite in groups; the farm one (Kafka) lives beside it
//! behind the same trait. Nothing else on the socket path waits for durability.

pub mod kafka;
mod sqlite;

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use futures_util::future::BoxFuture;

pub use kafka::{KafkaEventLog, KafkaSettings};
pub use sqlite::{Committed, Forward, SqliteEventLog, set_test_commit_delay_ms};

pub use crate::event::LikeEvent;

use super::Part;

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
/// The second half of an append: resolves once the ack may rely on the event (embedded: it is
/// already; Kafka: its delivery report, or the spill after the ack timeout).
pub type Shipped = BoxFuture<'static, Result<(), EventLogError>>;

#[async_trait]
pub trait EventLog: Part {
    /// Resolves once the event is committed on this node's disk (it survives a crash of the
    /// process and is shipped from there): the point after which the ledger may make it count
    /// where other nodes see it. The returned [`Shipped`] is what the client's ack waits for.
    async fn commit(&self, event: LikeEvent) -> Result<Shipped, EventLogError>;

    /// Resolves once the event is durable: committed, then shipped.
    async fn append(&self, event: LikeEvent) -> Result<(), EventLogError> {
        self.commit(event).await?.await
    }

    /// Resolves once everything appended before this call is durable.
    async fn barrier(&self) -> Result<(), EventLogError>;

    /// Checked before a like is applied, so a full spill refuses it before it is counted.
    fn admit(&self) -> Result<(), EventLogError> {
        Ok(())
    }
}
