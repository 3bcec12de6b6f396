//! `fanfare worker`: the persistence worker. Consumes like events from Kafka in a consumer
//! group, writes them to MongoDB in batches, and commits offsets only after MongoDB
//! acknowledged the batch. Run more of them to scale; a crash means a replay, and replays
//! change nothing (see `archive`).
//!
//! Its own module: `archive` (MongoDB) and `consumer_watch` (assignment, stalls, lag) are the
//! worker's; nodes use `archive` only as a history source, through the composition root.

pub mod archive;
pub mod consumer_watch;
pub mod merge;
pub mod rebuild;
pub mod redis_merge;
pub mod register;
pub mod repair;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::config::SharedArgs;
use crate::tasks::Tasks;

use crate::event::LikeEvent;
use crate::farm::link::RedisLink;
use crate::worker::archive::{LogPosition, MongoArchive};
use crate::worker::consumer_watch::{WatchContext, spawn_lag_sampler};

/// Fanfare persistence worker: Kafka → MongoDB, exactly once in effect.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "fanfare worker",
    version,
    about = "Fanfare persistence worker: Kafka → MongoDB, exactly once in effect",
    long_about = None
)]
pub struct WorkerConfig {
    /// Consumer group; every worker of one deployment uses the same.
    #[arg(
        long,
        env = "FANFARE_WORKER_GROUP",
        default_value = "fanfare-workers",
        value_name = "NAME"
    )]
    pub group: String,

    /// How long the group waits for a silent worker before giving its partitions to others.
    #[arg(
        long,
        env = "FANFARE_WORKER_SESSION_TIMEOUT",
        default_value_t = 10_000,
        value_name = "MS"
    )]
    pub session_timeout: u64,

    /// Kafka, Redis, MongoDB, metrics address and log filter, as for the node.
    #[command(flatten)]
    pub shared: SharedArgs,

    /// Most events per MongoDB batch. Batches only grow this large while the store is behind
    /// (a batch takes what has arrived); then more events share each touched track's total
    /// writes (end to end 4 670 likes/s against 3 381 at 5 000, docs/benchmarks.md).
    #[arg(
        long,
        env = "FANFARE_BATCH_MAX",
        default_value_t = 20_000,
        value_name = "N"
    )]
    pub batch_max: usize,

    /// Longest a batch waits to fill after its first event.
    #[arg(
        long,
        env = "FANFARE_BATCH_WAIT",
        default_value_t = 100,
        value_name = "MS"
    )]
    pub batch_wait: u64,
}

impl WorkerConfig {
    pub fn validated(self) -> anyhow::Result<WorkerConfig> {
        if self.shared.kafka.is_none() {
            anyhow::bail!("fanfare worker needs --kafka (the brokers to consume likes from)");
        }
        if self.shared.mongo.is_none() {
            anyhow::bail!("fanfare worker needs --mongo (the MongoDB to store likes in)");
        }
        if self.batch_max == 0 || self.batch_wait == 0 || self.session_timeout < 1000 {
            anyhow::bail!(
                "--batch-max and --batch-wait must be positive, --session-timeout at least 1000 ms"
            );
        }
        Ok(self)
    }
}

/// The worker's Prometheus metrics.
struct WorkerMetrics {
    registry: Registry,
    batches: Counter,
    events_inserted: Counter,
    events_duplicate: Counter,
    events_malformed: Counter,
    mongo_failures: Counter,
    mongo_requests: Counter,
    redis_corrections: Counter,
    tracks_rebuilt: Counter,
    /// Seconds spent storing batches, per step of `archive::MongoArchive::store`.
    store_seconds: Family<[(&'static str, &'static str); 1], Counter<f64, AtomicU64>>,
    /// Sum over assigned partitions of (high watermark − committed offset), from librdkafka
    /// statistics (refreshed every second).
    consumer_lag: Gauge<i64, AtomicI64>,
}

impl WorkerMetrics {
    fn new() -> WorkerMetrics {
        let mut registry = Registry::default();
        let m = WorkerMetrics {
            registry: Registry::default(),
            batches: Counter::default(),
            events_inserted: Counter::default(),
            events_duplicate: Counter::default(),
            events_malformed: Counter::default(),
            mongo_failures: Counter::default(),
            mongo_requests: Counter::default(),
            redis_corrections: Counter::default(),
            tracks_rebuilt: Counter::default(),
            store_seconds: Family::default(),
            consumer_lag: Gauge::default(),
        };
        let counters = [
            (
                "fanfare_worker_batches",
                "Batches written to MongoDB and committed",
                &m.batches,
            ),
            (
                "fanfare_worker_events_inserted",
                "Like events newly stored",
                &m.events_inserted,
            ),
            (
                "fanfare_worker_events_duplicate",
                "Like events that were already stored (replays)",
                &m.events_duplicate,
            ),
            (
                "fanfare_worker_events_malformed",
                "Messages on the topic that are not like events (skipped)",
                &m.events_malformed,
            ),
            (
                "fanfare_worker_mongo_failures",
                "Failed MongoDB batch attempts (retried)",
                &m.mongo_failures,
            ),
            (
                "fanfare_worker_mongo_requests",
                "Requests sent to MongoDB by stored batches (bulk: a handful per batch)",
                &m.mongo_requests,
            ),
            (
                "fanfare_worker_redis_corrections",
                "Stored events whose merge changed a Redis register (no node had merged them)",
                &m.redis_corrections,
            ),
            (
                "fanfare_worker_tracks_rebuilt",
                "Tracks whose registers and count were rebuilt from their stored events",
                &m.tracks_rebuilt,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "fanfare_worker_store_seconds",
            "Seconds spent storing batches, per step (where MongoDB time goes)",
            m.store_seconds.clone(),
        );
        registry.register(
            "fanfare_worker_consumer_lag",
            "Events on the topic not yet committed by this worker's partitions",
            m.consumer_lag.clone(),
        );
        WorkerMetrics { registry, ..m }
    }

    fn render(&self) -> String {
        let mut text = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(error = %err, "cannot encode metrics");
        }
        text
    }
}

/// A guard against a MongoDB call that never returns (a server frozen mid-answer), not a
/// latency bound: a big batch on a slow server can take tens of seconds, and abandoning it
/// only makes the retry slower (it meets its own half-written events and recounts).
const STORE_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait for merging one batch into Redis (pipelined scripts); the merge is best
/// effort, so it is skipped rather than waited on.
const REDIS_MERGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs until `shutdown`; what is not committed is consumed again by the next worker.
pub async fn run(config: WorkerConfig, tasks: &Tasks) -> anyhow::Result<()> {
    let shutdown = tasks.shutdown();
    let metrics = Arc::new(WorkerMetrics::new());
    if let Some(addr) = config.shared.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for metrics on {addr}"))?;
        let render = metrics.clone();
        crate::metrics::http::spawn(Arc::new(move || render.render()), listener, tasks);
    }
    let kafka = config
        .shared
        .kafka
        .as_deref()
        .context("fanfare worker needs --kafka")?;
    let topic = config.shared.kafka_topic.as_str();
    let mongo = config
        .shared
        .mongo
        .as_deref()
        .context("fanfare worker needs --mongo")?;
    let archive = MongoArchive::connect(mongo, &config.shared.mongo_database).await?;
    let redis = match &config.shared.redis {
        Some(url) => {
            let link = RedisLink::new(url, config.shared.redis_ca.as_deref())?;
            link.spawn_maintainer(tasks, Arc::new(crate::metrics::Metrics::new()));
            redis_merge::spawn_refill(link.clone(), archive.clone(), tasks);
            Some(link)
        }
        None => None,
    };
    let options = &config.shared.kafka_options;
    if let Err(err) = crate::seams::event_log::kafka::ensure_topic(kafka, options, topic).await {
        tracing::warn!(error = %format!("{err:#}"), "cannot create the topic yet (nodes create it too)");
    }
    let consumer: StreamConsumer<WatchContext> =
        crate::seams::event_log::kafka::client_config(kafka, options)
            .set("group.id", &config.group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", config.session_timeout.to_string())
            .set("statistics.interval.ms", "1000")
            // Fewer, fuller fetches: the broker answers when 256 KiB are there or after 100 ms
            // (Kafka's CPU in the benchmark: 0.32–0.69 → 0.17–0.23 cores; docs/benchmarks.md).
            .set("fetch.wait.max.ms", "100")
            .set("fetch.min.bytes", "262144")
            .create_with_context(WatchContext::default())
            .context("cannot create the Kafka consumer")?;
    let consumer = Arc::new(consumer);
    consumer
        .subscribe(&[topic])
        .context("cannot subscribe to the like topic")?;
    spawn_lag_sampler(consumer.clone(), metrics.consumer_lag.clone(), tasks);
    tracing::info!(%topic, group = %config.group, "fanfare worker consuming");
    println!("fanfare worker consuming {topic}");

    let batch_wait = Duration::from_millis(config.batch_wait);
    let mut indexed = false;
    let mut repairs = repair::Repairs::default();
    loop {
        let wake = repairs.next_due();
        let Some(batch) = next_batch(
            &consumer,
            config.batch_max,
            batch_wait,
            wake,
            shutdown,
            &metrics,
        )
        .await
        else {
            break;
        };
        if batch.events.is_empty() {
            // Woken for due repairs (in this loop: they must not race its own batches).
            run_repairs(&mut repairs, &archive, &consumer, &metrics).await;
            continue;
        }
        let Some((stored, attempts)) =
            store_until_done(&archive, &mut indexed, &batch, &metrics, shutdown).await
        else {
            break; // shutting down mid-retry: nothing committed, the batch is replayed later
        };
        repairs.note(
            &batch.events,
            &batch.positions,
            attempts > 1,
            &stored.suspect,
            consumer.context().assignments(),
        );
        // The rebuilds this batch made due are on record before its offsets are committed.
        if !ask_until_done(&mut repairs, &archive, shutdown).await {
            break; // shutting down: not committed, the batch is replayed and asks again
        }
        if let Some(link) = &redis {
            let merged =
                tokio::time::timeout(REDIS_MERGE_TIMEOUT, redis_merge::merge(link, &batch.events));
            match merged.await {
                Ok(Ok(changed)) => {
                    metrics.redis_corrections.inc_by(changed);
                }
                Ok(Err(err)) => {
                    tracing::debug!(error = %format!("{err:#}"), "merge into Redis skipped")
                }
                Err(_) => crate::warn_throttled!("merge into Redis skipped: no answer in time"),
            }
        }
        // Counted once the batch is fully handled (stored and merged into Redis).
        metrics.batches.inc();
        metrics.events_inserted.inc_by(stored.inserted as u64);
        metrics.mongo_requests.inc_by(stored.round_trips as u64);
        metrics.events_duplicate.inc_by(stored.duplicates as u64);
        for (step, time) in archive::STEPS.iter().zip(stored.step_times) {
            metrics
                .store_seconds
                .get_or_create(&[("step", *step)])
                .inc_by(time.as_secs_f64());
        }
        // Asynchronous: a broker that does not answer must not block the worker; a commit
        // that is lost only means a replay, and replays change nothing.
        if let Err(err) = consumer.commit(&batch.offsets, CommitMode::Async) {
            // Harmless: the next commit covers it, or the batch is replayed (idempotent).
            tracing::warn!(error = %err, "cannot commit offsets");
        }
        tracing::debug!(
            inserted = stored.inserted,
            duplicates = stored.duplicates,
            "batch stored"
        );
        run_repairs(&mut repairs, &archive, &consumer, &metrics).await;
    }
    tracing::info!("worker stopped");
    Ok(())
}

/// Retries with backoff until the noted rebuilds are written; `false` on shutdown.
async fn ask_until_done(
    repairs: &mut repair::Repairs,
    archive: &MongoArchive,
    shutdown: &CancellationToken,
) -> bool {
    let mut backoff = Duration::from_millis(100);
    loop {
        match tokio::time::timeout(STORE_TIMEOUT, repairs.ask(archive)).await {
            Ok(Ok(())) => return true,
            Ok(Err(err)) => {
                tracing::warn!(error = %format!("{err:#}"), retry_in = ?backoff, "cannot ask for rebuilds")
            }
            Err(_) => tracing::warn!(retry_in = ?backoff, "cannot ask for rebuilds: no answer"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Runs the rebuilds that are due; a failure is logged and left for a later round.
async fn run_repairs(
    repairs: &mut repair::Repairs,
    archive: &MongoArchive,
    consumer: &StreamConsumer<WatchContext>,
    metrics: &WorkerMetrics,
) {
    match repairs
        .run_due(archive, consumer, consumer.context().assignments())
        .await
    {
        Ok(0) => {}
        Ok(rebuilt) => {
            metrics.tracks_rebuilt.inc_by(rebuilt as u64);
            tracing::info!(rebuilt, "tracks rebuilt from stored events");
        }
        Err(err) => tracing::warn!(error = %format!("{err:#}"), "track rebuild failed"),
    }
}

struct Batch {
    events: Vec<LikeEvent>,
    /// Where each event sits in the topic (the totals' guard against a second worker).
    positions: Vec<LogPosition>,
    offsets: TopicPartitionList,
}

/// Waits for one event, then takes more until the batch is full or `wait` has passed.
async fn next_batch(
    consumer: &StreamConsumer<WatchContext>,
    max: usize,
    wait: Duration,
    wake: Option<tokio::time::Instant>,
    shutdown: &CancellationToken,
    metrics: &WorkerMetrics,
) -> Option<Batch> {
    let mut events = Vec::new();
    let mut positions = Vec::new();
    let mut next_offsets: HashMap<(String, i32), i64> = HashMap::new();
    let mut deadline = None;
    while events.len() < max {
        // Until the batch is full or `wait` after its first event; with no event yet, until
        // `wake` (repairs due) if given.
        let sleep = async {
            match deadline.or(wake) {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let message = tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = sleep => break,
            message = consumer.recv() => message,
        };
        let message = match message {
            Ok(message) => message,
            Err(err) => {
                crate::warn_throttled!(error = %err, "Kafka consumer error");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        deadline.get_or_insert_with(|| tokio::time::Instant::now() + wait);
        next_offsets.insert(
            (message.topic().to_owned(), message.partition()),
            message.offset() + 1,
        );
        match message.payload().map(serde_json::from_slice::<LikeEvent>) {
            Some(Ok(event)) => {
                tracing::trace!(partition = message.partition(), offset = message.offset(), user = %event.user, key = %event.key, "consumed");
                events.push(event);
                positions.push(LogPosition {
                    partition: message.partition(),
                    offset: message.offset(),
                });
            }
            other => {
                metrics.events_malformed.inc();
                crate::warn_throttled!(
                    partition = message.partition(),
                    offset = message.offset(),
                    error = ?other.and_then(Result::err).map(|e| e.to_string()),
                    "skipping a message that is not a like event"
                );
            }
        }
    }
    let mut offsets = TopicPartitionList::new();
    for ((topic, partition), next) in next_offsets {
        if let Err(err) = offsets.add_partition_offset(&topic, partition, Offset::Offset(next)) {
            tracing::warn!(error = %err, "cannot record an offset");
        }
    }
    Some(Batch {
        events,
        positions,
        offsets,
    })
}

/// Creates the indexes before the first batch is stored (the unique key index is what keeps
/// one event per client key); while MongoDB is unreachable this fails like the batch would,
/// and is retried with it. An index MongoDB refuses is logged and the worker goes on.
async fn ensure_indexes(archive: &MongoArchive, indexed: &mut bool) -> anyhow::Result<()> {
    if *indexed {
        return Ok(());
    }
    match archive.ensure_indexes().await {
        Ok(()) => {}
        Err(err)
            if matches!(
                *err.kind,
                mongodb::error::ErrorKind::Io(_)
                    | mongodb::error::ErrorKind::ServerSelection { .. }
            ) =>
        {
            return Err(anyhow::Error::new(err).context("cannot create the MongoDB indexes"));
        }
        Err(err) => {
            tracing::warn!(error = %err, "MongoDB refused an index (continuing without it)")
        }
    }
    *indexed = true;
    Ok(())
}

/// Retries with backoff until MongoDB acknowledges the batch; `None` on shutdown.
async fn store_until_done(
    archive: &MongoArchive,
    indexed: &mut bool,
    batch: &Batch,
    metrics: &WorkerMetrics,
    shutdown: &CancellationToken,
) -> Option<(crate::worker::archive::Stored, u32)> {
    let mut backoff = Duration::from_millis(100);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let attempt = tokio::time::timeout(STORE_TIMEOUT, async {
            ensure_indexes(archive, indexed).await?;
            archive.store(&batch.events, &batch.positions).await
        })
        .await
        .unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "no answer from MongoDB within {STORE_TIMEOUT:?}"
            ))
        });
        match attempt {
            Ok(stored) => return Some((stored, attempts)),
            Err(err) => {
                metrics.mongo_failures.inc();
                tracing::warn!(error = %format!("{err:#}"), retry_in = ?backoff, events = batch.events.len(), "MongoDB batch failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
