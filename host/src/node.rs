//! Everything one node shares between its connections, built once from the configuration.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Auth;
use crate::config::Config;
use crate::event_log::{EventLog, KafkaEventLog, SqliteEventLog};
use crate::fanout::Fanout;
use crate::farm::bus::RedisBus;
use crate::farm::counters::RedisCounters;
use crate::farm::ledger::FarmLedger;
use crate::farm::link::RedisLink;
use crate::ledger::{EmbeddedLedger, Ledger};
use crate::limits::ConnectionGate;
use crate::metrics::Metrics;
use crate::outbox::ConnId;
use crate::plugins::Plugins;
use crate::plugins::counters::{Counters, MemoryCounters};
use crate::registry::Registry;

/// How long a starting node waits for Redis before serving degraded.
const STARTUP_REDIS_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

pub struct Node {
    pub config: Config,
    pub id: Arc<str>,
    pub ledger: Arc<dyn Ledger>,
    pub event_log: Arc<dyn EventLog>,
    /// Where `/v1/tracks/{track}/history` reads from (SQLite alone, MongoDB in a farm).
    pub history: Arc<dyn crate::history::History>,
    pub registry: Arc<Registry>,
    pub fanout: Arc<Fanout>,
    pub plugins: Arc<Plugins>,
    /// Farm mode: the cross-node bus and the Redis link (None when alone).
    pub bus: Option<Arc<RedisBus>>,
    pub redis: Option<Arc<RedisLink>>,
    pub metrics: Arc<Metrics>,
    pub auth: Auth,
    pub gate: Arc<ConnectionGate>,
    /// The one shutdown signal every loop listens to.
    pub shutdown: CancellationToken,
    /// Every WebSocket session, so shutdown can wait for their in-flight likes.
    pub sessions: TaskTracker,
    next_conn: AtomicU64,
}

impl Node {
    /// Opens the embedded store and wires the parts together; with `--redis`, in farm mode.
    pub async fn start(config: Config) -> anyhow::Result<Arc<Node>> {
        let id: Arc<str> = match &config.node_id {
            Some(id) => Arc::from(id.as_str()),
            None => Arc::from(format!("node-{:08x}", rand::random::<u32>())),
        };
        let shutdown = CancellationToken::new();
        let auth = Auth::from_config(&config)?;
        let gate = ConnectionGate::new(config.max_connections, config.max_connections_per_ip);
        let metrics = Arc::new(Metrics::new());
        let (event_log, durable_seq): (Arc<dyn EventLog>, _) = match config.kafka_settings() {
            Some(kafka) => {
                let log = KafkaEventLog::start(&config.data_dir, kafka, metrics.clone())?;
                let durable = log.durable_seq();
                (Arc::new(log), durable)
            }
            None => {
                let log = SqliteEventLog::start(&config.data_dir, None)?;
                let durable = log.durable_seq();
                (Arc::new(log), durable)
            }
        };
        let mut local = Some(EmbeddedLedger::open(
            &config.data_dir,
            id.clone(),
            durable_seq,
        )?);
        let history = crate::history::for_config(&config).await?;

        let farm = match &config.redis {
            Some(url) => {
                let link = RedisLink::new(url)?;
                link.spawn_maintainer(shutdown.clone(), metrics.clone());
                let (bus, interest, parts) = RedisBus::new(id.clone(), metrics.clone());
                let embedded = local.take().context("ledger already taken")?;
                let ledger = FarmLedger::new(link.clone(), embedded, config.data_dir.clone())?;
                Some((link, bus, interest, parts, ledger))
            }
            None => None,
        };
        let interest = farm.as_ref().map(|(_, _, interest, _, _)| interest.clone());
        let registry = Arc::new(Registry::new(metrics.clone(), interest));
        let counters: Arc<dyn Counters> = match &farm {
            Some((link, ..)) => Arc::new(RedisCounters::new(link.clone())),
            None => Arc::new(MemoryCounters::default()),
        };
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

        let (ledger, bus, link): (Arc<dyn Ledger>, _, _) = match farm {
            Some((link, bus, _, parts, ledger)) => {
                ledger.spawn_reconciler(shutdown.clone());
                let observer = ledger.clone();
                let observe =
                    Arc::new(move |track: &str, count: u64| observer.observe(track, count));
                bus.spawn(
                    parts,
                    link.clone(),
                    registry.clone(),
                    fanout.clone(),
                    observe,
                    shutdown.clone(),
                );
                link.wait_connected(STARTUP_REDIS_WAIT).await;
                (ledger as Arc<dyn Ledger>, Some(bus), Some(link))
            }
            None => {
                let embedded = local.take().context("ledger already taken")?;
                (Arc::new(embedded) as Arc<dyn Ledger>, None, None)
            }
        };
        Ok(Arc::new(Node {
            id,
            ledger,
            event_log,
            history,
            registry,
            fanout,
            plugins,
            bus,
            redis: link,
            metrics,
            auth,
            gate,
            shutdown,
            sessions: TaskTracker::new(),
            next_conn: AtomicU64::new(1),
            config,
        }))
    }

    /// `None` when healthy; otherwise what is degraded (the node keeps serving).
    pub fn degraded(&self) -> Option<String> {
        let mut reasons = Vec::new();
        if let Some(link) = &self.redis
            && !link.is_up()
        {
            reasons.push(
                "redis unreachable: local fan-out only, counts reconcile on return".to_owned(),
            );
        }
        reasons.extend(self.event_log.degraded());
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    pub fn is_ready(&self) -> bool {
        !self.shutdown.is_cancelled() && self.event_log.healthy()
    }
}
