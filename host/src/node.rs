//! Everything one node shares between its connections, built once from the configuration.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::event_log::{EventLog, SqliteEventLog};
use crate::fanout::Fanout;
use crate::ledger::{EmbeddedLedger, Ledger};
use crate::metrics::Metrics;
use crate::outbox::ConnId;
use crate::plugins::Plugins;
use crate::plugins::counters::MemoryCounters;
use crate::registry::Registry;

pub struct Node {
    pub config: Config,
    pub id: Arc<str>,
    pub ledger: Arc<dyn Ledger>,
    pub event_log: Arc<dyn EventLog>,
    pub registry: Arc<Registry>,
    pub fanout: Arc<Fanout>,
    pub plugins: Arc<Plugins>,
    pub metrics: Arc<Metrics>,
    /// The one shutdown signal every loop listens to.
    pub shutdown: CancellationToken,
    /// Every WebSocket session, so shutdown can wait for their in-flight likes.
    pub sessions: TaskTracker,
    next_conn: AtomicU64,
}

impl Node {
    /// Opens the embedded store and wires the parts together.
    pub async fn embedded(config: Config) -> anyhow::Result<Arc<Node>> {
        let id: Arc<str> = match &config.node_id {
            Some(id) => Arc::from(id.as_str()),
            None => Arc::from(format!("node-{:08x}", rand::random::<u32>())),
        };
        let event_log = SqliteEventLog::start(&config.data_dir)?;
        let ledger = EmbeddedLedger::open(&config.data_dir, id.clone(), event_log.durable_seq())?;
        let metrics = Arc::new(Metrics::new());
        let registry = Arc::new(Registry::new(metrics.clone()));
        let counters = Arc::new(MemoryCounters::default());
        let plugins = Arc::new(Plugins::new(
            config.plugins.clone(),
            config.data_dir.join("plugin-cache"),
            counters,
            metrics.clone(),
        ));
        plugins.load_initial().await?;
        let fanout = Arc::new(Fanout::new(
            registry.clone(),
            metrics.clone(),
            plugins.clone(),
            config.broadcast_window(),
        ));
        Ok(Arc::new(Node {
            id,
            ledger: Arc::new(ledger),
            event_log: Arc::new(event_log),
            registry,
            fanout,
            plugins,
            metrics,
            shutdown: CancellationToken::new(),
            sessions: TaskTracker::new(),
            next_conn: AtomicU64::new(1),
            config,
        }))
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    pub fn is_ready(&self) -> bool {
        !self.shutdown.is_cancelled() && self.event_log.healthy()
    }
}
