//! "Listening now": how many sockets listen to a track on the other nodes of a farm. A node's
//! own count is exact (its registry); the others' come from a periodic exchange, so a farm-wide
//! figure is at most one refresh period stale and costs no Redis write per socket.

use std::sync::Arc;

use crate::seams::Part;
use crate::tasks::Tasks;

/// This node's listened tracks with their local listener counts, taken when asked.
pub type LocalCounts = Arc<dyn Fn() -> Vec<(Arc<str>, u64)> + Send + Sync>;

pub trait Presence: Part {
    /// Listeners of `track` on the other nodes, as of the last exchange.
    fn elsewhere(&self, track: &str) -> u64;

    /// Starts exchanging counts with the other nodes; `local` gives this node's.
    fn start(&self, local: LocalCounts, tasks: &Tasks);
}

/// A node alone: nobody else listens.
#[derive(Default)]
pub struct Alone;

impl Part for Alone {
    fn name(&self) -> &'static str {
        "presence (this node only)"
    }
}

impl Presence for Alone {
    fn elsewhere(&self, _track: &str) -> u64 {
        0
    }

    fn start(&self, _local: LocalCounts, _tasks: &Tasks) {}
}
