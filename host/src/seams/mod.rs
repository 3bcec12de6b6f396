//! The seams: one small trait per outside system, each with an embedded twin, so a node runs
//! alone with nothing installed and a farm swaps in Redis, Kafka and MongoDB behind the same
//! names. The composition root (`compose`) picks the implementations; nothing else does.
//!
//! | seam | embedded twin | farm / pipeline |
//! |---|---|---|
//! | [`ledger::Ledger`] (once-only rule, counts) | `EmbeddedLedger` (SQLite) | `farm::ledger::FarmLedger` (Redis) |
//! | [`event_log::EventLog`] (durability before the ack) | `SqliteEventLog` | `KafkaEventLog` (+ spill) |
//! | [`bus::Bus`] (likes between nodes) | `LocalBus` | `farm::bus::RedisBus` (Pub/Sub) |
//! | [`counters::Counters`] (plugin rate-limit counters) | `MemoryCounters` | `farm::counters::RedisCounters` |
//! | [`history::History`] (history endpoint) | `SqliteHistory` | `worker::archive::MongoArchive` |
//! | [`presence::Presence`] (listeners on other nodes) | `Alone` | `farm::presence::RedisPresence` |
//!
//! Every implementation is also a [`Part`]: readiness and shutdown go over the parts without
//! knowing which ones are there.

pub mod bus;
pub mod counters;
pub mod event_log;
pub mod history;
pub mod ledger;
pub mod presence;

use std::sync::Arc;

use async_trait::async_trait;

use self::bus::Bus;
use self::counters::Counters;
use self::event_log::EventLog;
use self::history::History;
use self::ledger::Ledger;
use self::presence::Presence;

/// How a part is doing, for `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Still serving, with a reason an operator can act on (the node stays in the balancer).
    Degraded(String),
    /// Cannot do its job: the node reports not ready.
    Unavailable(String),
}

/// The uniform face of every outside system: a name, its health, and an orderly close.
#[async_trait]
pub trait Part: Send + Sync {
    fn name(&self) -> &'static str;

    fn health(&self) -> Health {
        Health::Healthy
    }

    /// Finishes what was accepted (e.g. flushes the event log) and lets go of the resource.
    async fn close(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// One implementation per seam: what differs between a node alone and a node in a farm.
pub struct Parts {
    pub ledger: Arc<dyn Ledger>,
    pub event_log: Arc<dyn EventLog>,
    pub bus: Arc<dyn Bus>,
    pub counters: Arc<dyn Counters>,
    pub history: Arc<dyn History>,
    pub presence: Arc<dyn Presence>,
}

impl Parts {
    /// Every part, in the order shutdown closes them: the event log first (it flushes what the
    /// last sessions appended), then the rest.
    pub fn all(&self) -> [Arc<dyn Part>; 6] {
        [
            self.event_log.clone(),
            self.ledger.clone(),
            self.bus.clone(),
            self.counters.clone(),
            self.history.clone(),
            self.presence.clone(),
        ]
    }
}
