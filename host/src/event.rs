//! The one event type: an accepted action as the node decides it, the SQLite store keeps it,
//! Kafka carries it (its serde form is the topic's JSON, documented in docs/events.md;
//! consumers ignore fields they do not know; key = track) and the workers store it.

use std::sync::Arc;

use fanfare_protocol::Action;
use serde::{Deserialize, Serialize};

/// One accepted action on a (user, track) pair: a change of its state, or an action that
/// left the state as it was (`changed: false`, acked `duplicate: true`), which still moves the
/// pair's last-writer-wins register forward (see docs/farm.md, "The pair register"). Only
/// re-sent keys never become events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LikeEvent {
    /// Globally unique id (UUIDv7), the idempotency key for every downstream store.
    pub event_id: String,
    /// Order of acceptance on this node's ledger (node-local: not on the wire, 0 when read
    /// from it).
    #[serde(skip)]
    pub seq: u64,
    /// Orders updates of one track for broadcasts on one node (its local sequence). 0 for an
    /// action decided in a farm: it is committed before its merge gives the track's Redis
    /// version, which the broadcast carries.
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
    /// Whether the deciding ledger saw the pair's state change (history counts only these;
    /// absent in records written before it existed: those were all changes).
    #[serde(default = "changed_by_default")]
    pub changed: bool,
}

fn changed_by_default() -> bool {
    true
}

impl LikeEvent {
    pub fn liked(&self) -> bool {
        self.action == Action::Like
    }
}
