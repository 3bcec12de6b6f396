//! The ledger decides what a like means: the once-only rule per (user, track), idempotency
//! keys, the pair's stamp, and the live count. Durability is the event log's job, and it comes
//! first: a decided action is committed, then merged where every node sees it, then published
//! (`like.rs`), so no shared state ever holds an action no store has.
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
    /// Track total after this request (in a farm, as expected until the merge says).
    pub count: u64,
    pub outcome: Outcome,
    /// The event still has to be merged into the shared state once committed (a farm
    /// decision Redis answered); false where the decision is already final (embedded, or
    /// decided locally while Redis is away: those are replayed by the reconciler).
    pub to_merge: bool,
}

/// What merging a committed event did to the shared state: what to publish and ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Merged {
    pub count: u64,
    /// The pair's state changed (publish); false for an action that left it as it was, or
    /// one a newer action of the same user overtook between decision and merge.
    pub changed: bool,
    /// The track's version after the merge (orders broadcasts).
    pub version: u64,
    /// The merge itself told the other nodes (farm: the script published the change).
    pub announced: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger storage failed: {0}")]
    Storage(String),
}

#[async_trait]
pub trait Ledger: Part {
    /// Decides a like/unlike by `user` atomically with respect to every other request: what it
    /// means and the event that records it. Nothing another node sees changes yet.
    async fn decide(&self, user: &Arc<str>, request: &LikeRequest)
    -> Result<Decision, LedgerError>;

    /// Makes a decided event count everywhere, once the event log has committed it. Never
    /// fails: a merge that cannot reach the shared state is owed and replayed later.
    async fn merge(&self, decision: &Decision, event: &LikeEvent) -> Merged {
        Merged {
            count: decision.count,
            changed: event.changed,
            version: event.version,
            announced: false,
        }
    }

    /// The current total of a track.
    async fn count(&self, track: &str) -> Result<u64, LedgerError>;
}
