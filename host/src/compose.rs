//! The composition root: the one place that picks an implementation for every seam and wires
//! a node together. `embedded` and `farm` build the same [`Parts`]; [`node`] adds what every
//! node has (plugins, registry, fan-out) and registers the fan-out on the bus.

use std::sync::Arc;
use std::time::Duration;

use crate::broadcast::fanout::Fanout;
use crate::broadcast::registry::Registry;
use crate::config::Config;
use crate::farm::bus::RedisBus;
use crate::farm::counters::RedisCounters;
use crate::farm::ledger::FarmLedger;
use crate::farm::link::RedisLink;
use crate::farm::presence::RedisPresence;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::plugins::Plugins;
use crate::seams::Parts;
use crate::seams::bus::LocalBus;
use crate::seams::counters::MemoryCounters;
use crate::seams::event_log::{EventLog, KafkaEventLog, SqliteEventLog};
use crate::seams::history::{History, SqliteHistory};
use crate::seams::ledger::EmbeddedLedger;
use crate::seams::presence::Alone;
use crate::store::Store;
use crate::tasks::Tasks;
use crate::worker::archive::MongoArchive;

/// How long a starting node waits for Redis before serving degraded.
const STARTUP_REDIS_WAIT: Duration = Duration::from_secs(3);

/// What the builders share.
pub struct Context<'a> {
    pub config: &'a Config,
    pub id: Arc<str>,
    pub metrics: Arc<Metrics>,
    pub tasks: &'a Tasks,
}

/// A node alone: SQLite decides and stores, likes go straight to this node's listeners.
pub async fn embedded(cx: &Context<'_>) -> anyhow::Result<Parts> {
    let store = Store::open(&cx.config.data_dir)?;
    let (event_log, durable_seq) = event_log(cx, &store)?;
    let ledger = EmbeddedLedger::open(&store, cx.id.clone(), durable_seq)?;
    Ok(Parts {
        ledger: Arc::new(ledger),
        event_log,
        bus: Arc::new(LocalBus::default()),
        counters: Arc::new(MemoryCounters::default()),
        history: history(cx.config, store).await?,
        presence: Arc::new(Alone),
    })
}

/// A node of a farm: Redis decides (with the embedded ledger as its fallback) and carries likes
/// between nodes; plugin counters are shared.
pub async fn farm(cx: &Context<'_>, redis_url: &str) -> anyhow::Result<Parts> {
    let store = Store::open(&cx.config.data_dir)?;
    let (event_log, durable_seq) = event_log(cx, &store)?;
    let local = EmbeddedLedger::open(&store, cx.id.clone(), durable_seq)?;
    let link = RedisLink::new(redis_url, cx.config.shared.redis_ca.as_deref())?;
    link.spawn_maintainer(cx.tasks, cx.metrics.clone());
    let ledger = FarmLedger::new(
        link.clone(),
        local,
        store.clone(),
        cx.config.max_clock_skew,
        cx.metrics.clone(),
    )?;
    ledger.spawn_reconciler(cx.tasks);
    let observer = ledger.clone();
    let bus = RedisBus::new(
        cx.id.clone(),
        link.clone(),
        Arc::new(move |track: &str, count: u64| observer.observe(track, count)),
        cx.metrics.clone(),
    );
    link.wait_connected(STARTUP_REDIS_WAIT).await;
    Ok(Parts {
        ledger,
        event_log,
        bus: Arc::new(bus),
        counters: Arc::new(RedisCounters::new(link.clone())),
        history: history(cx.config, store).await?,
        presence: Arc::new(RedisPresence::new(link, cx.id.clone())),
    })
}

/// Kafka (with its local spill) when configured, else the embedded SQLite log; with the
/// watermark the ledger uses to know which events are durable.
fn event_log(
    cx: &Context<'_>,
    store: &Store,
) -> anyhow::Result<(Arc<dyn EventLog>, Arc<crate::seams::event_log::Uncommitted>)> {
    Ok(match cx.config.kafka_settings() {
        Some(kafka) => {
            let log = KafkaEventLog::start(store, kafka, cx.metrics.clone())?;
            let durable = log.uncommitted();
            (Arc::new(log), durable)
        }
        None => {
            let log = SqliteEventLog::start(store, None, cx.metrics.event_log_queue_depth.clone())?;
            let durable = log.uncommitted();
            (Arc::new(log), durable)
        }
    })
}

/// History from the workers' MongoDB when configured, else from this node's own events.
async fn history(config: &Config, store: Store) -> anyhow::Result<Arc<dyn History>> {
    Ok(match &config.shared.mongo {
        Some(url) => Arc::new(MongoArchive::connect(url, &config.shared.mongo_database).await?),
        None => Arc::new(SqliteHistory::new(store)),
    })
}

/// Builds a node from its configuration (farm mode with `--redis`).
pub async fn node(config: Config) -> anyhow::Result<Arc<Node>> {
    let id: Arc<str> = match &config.node_id {
        Some(id) => Arc::from(id.as_str()),
        None => Arc::from(format!("node-{:08x}", rand::random::<u32>())),
    };
    crate::clock::set_test_offset_ms(config.test_clock_offset_ms);
    crate::seams::event_log::set_test_commit_delay_ms(config.test_commit_delay_ms);
    let tasks = Tasks::new();
    let metrics = Arc::new(Metrics::new());
    let cx = Context {
        config: &config,
        id: id.clone(),
        metrics: metrics.clone(),
        tasks: &tasks,
    };
    let parts = match &config.shared.redis {
        Some(url) => farm(&cx, url).await?,
        None => embedded(&cx).await?,
    };
    assemble(config, id, parts, metrics, tasks).await
}

/// What every node has around its parts: plugins (over the parts' counters), the registry
/// (telling the bus about interest) and the fan-out (registered on the bus).
/// Tests call it with parts of their own.
pub async fn assemble(
    config: Config,
    id: Arc<str>,
    parts: Parts,
    metrics: Arc<Metrics>,
    tasks: Tasks,
) -> anyhow::Result<Arc<Node>> {
    let plugins = Arc::new(Plugins::new(
        config.plugins.clone(),
        config.data_dir.join("plugin-cache"),
        parts.counters.clone(),
        metrics.clone(),
    ));
    plugins.load_initial().await?;
    let registry = Arc::new(Registry::new(
        metrics.clone(),
        parts.bus.clone(),
        parts.presence.clone(),
    ));
    crate::broadcast::listeners::spawn(registry.clone(), metrics.clone(), &tasks);
    let counted = registry.clone();
    parts
        .presence
        .start(Arc::new(move || counted.local_counts()), &tasks);
    let fanout = Arc::new(Fanout::new(
        registry.clone(),
        metrics.clone(),
        plugins.clone(),
        config.broadcast_window(),
        tasks.clone(),
    ));
    parts.bus.start(Arc::new(fanout.clone()), &tasks);
    Ok(Arc::new(Node::new(
        config, id, parts, registry, fanout, plugins, metrics, tasks,
    )))
}
