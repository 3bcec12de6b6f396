//! Broadcast: from an accepted like to bytes queued on every listening socket.
//!
//! `registry` knows which local connections listen to which track, `fanout` sums the likes of
//! one window into one update, frames it once and queues the same bytes on each listener's
//! `outbox` (bounded, conflating), `listeners` tells subscriptions that asked when only the
//! number of listeners changed, and `sharded` is the lock-splitting map both use. The bus
//! (`crate::seams::bus`) delivers likes here; nothing here knows whether a farm exists.

pub mod fanout;
pub mod listeners;
pub mod outbox;
pub mod registry;
pub mod sharded;
