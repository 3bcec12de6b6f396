//! Farm mode: many nodes share likes and live counts through Redis.
//!
//! `link` keeps one self-healing connection (direct or via Sentinel), `ledger` makes Redis
//! the authority for the once-only rule and global counts (with a degraded fallback and
//! reconciliation), `bus` carries likes between nodes over Pub/Sub, and `counters` backs
//! plugin rate limits so they hold across nodes.

pub mod bus;
pub mod counters;
pub mod ledger;
pub mod link;
