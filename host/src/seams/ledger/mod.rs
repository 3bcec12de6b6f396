//! The ledger decides what a like means: the once-only rule per (user, track), idempotency
//! keys, and the live count. It answers immediately; durability is the event log's job.
//!
//! The embedded ledger keeps state in memory over the SQLite store; the farm ledger (Redis,
//! server-side script) sits beside it behind the same trait.

mod embedded;

use std::sync::Arc;

use async_trait::async_trait;

pub use embedded::{Decided, EmbeddedLedger};

use crate::seams::Part;
use crate::seams::event_log::LikeEvent;
use fanfare_protocol::LikeRequest;

/// What applying a like or unlike did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The state changed; the event must be made durable before the ack.
    Applied(LikeEvent),
    /// The pair was already in the requested state (`duplicate: true`). The action is still
    /// the user's latest and becomes an event (`changed: false`): it moves the pair's register
    /// forward, so an older opposite action replayed later cannot win over it.
    Unchanged(LikeEvent),
    /// The idempotency key was seen before for this pair: acked again, counted once.
    Resent,
    /// A re-sent key this node has no stored event for (farm mode: the node that applied it
    /// may have died before storing it). The event is stored again under its original id;
    /// the count does not change.
    Restored(LikeEvent),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Track total after this request.
    pub count: u64,
    pub outcome: Outcome,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger storage failed: {0}")]
    Storage(String),
}

#[async_trait]
pub trait Ledger: Part {
    /// Applies a like/unlike by `user` atomically with respect to every other request.
    async fn apply(&self, user: &Arc<str>, request: &LikeRequest) -> Result<Decision, LedgerError>;

    /// The current total of a track.
    async fn count(&self, track: &str) -> Result<u64, LedgerError>;
}
