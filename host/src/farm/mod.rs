//! Farm mode: many nodes share likes and live counts through Redis.
//!
//! `link` keeps one self-healing connection (direct or via Sentinel), `keys` owns the key
//! schema, `ledger` makes Redis the authority for the once-only rule and global counts (with a
//! degraded fallback and reconciliation), `bus` carries likes between nodes over Pub/Sub, and
//! `counters` backs plugin rate limits so they hold across nodes, `presence` sums listeners
//! over the nodes. Each implements a seam
//! (`crate::seams`); nothing outside the composition root names these types.

pub mod bus;
pub mod counters;
pub mod keys;
pub mod ledger;
pub mod ledger_script;
pub mod link;
pub mod presence;
