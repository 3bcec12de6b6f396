//! The farm's event log: every accepted like goes to Kafka, and the client's ack waits for
//! Kafka's delivery report — or, when Kafka is down or slow, for the local spill.
//!
//! Each event is first committed to the node's SQLite store (the same group-commit path as the
//! embedded mode, which the farm ledger needs for its own replays) together with a row in the
//! `kafka_outbox` table. That outbox is the spill: an append-only, fsync-batched local log of the
//! events Kafka has not confirmed yet. One shipper task sends outbox events to Kafka in commit
//! order, advances a persisted cursor as deliveries are confirmed, and after any failure (or a
//! restart) replays from the cursor, in order, until it has caught up. Kafka may see an event
//! twice after a failure; consumers are idempotent by event id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use rdkafka::ClientConfig;
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::sqlite::{Committed, Forward, SqliteEventLog};
use super::{EventLog, EventLogError, LikeEvent, Shipped};
use crate::metrics::Metrics;
use crate::seams::{Health, Part};
use crate::store::Store;

/// Meta key of the highest outbox position Kafka confirmed (everything up to it is shipped).
const SHIPPED_POS: &str = "kafka_shipped_pos";
/// Sends awaiting their delivery report at once; beyond this the shipper stops taking more.
const MAX_IN_FLIGHT: usize = 50_000;
/// Outbox rows read per replay round.
const REPLAY_PAGE: usize = 2_000;
/// Committed events handed to the shipper at most at once; beyond, it reads them back from
/// the spill (bounded RAM while Kafka is away).
const HAND_OFF: usize = 8_192;

/// What a node needs to know about Kafka.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `host:port[,host:port…]`
    pub brokers: String,
    pub topic: String,
    /// How long an ack waits for Kafka before it is given from the spill.
    pub ack_timeout: Duration,
    /// Most events the spill holds; beyond it likes are refused with `overloaded`.
    pub spill_max_events: u64,
    /// Idempotent producer; without it, one request in flight keeps the order.
    pub idempotence: bool,
    /// `--kafka-option` settings (security, tuning) for every client.
    pub options: Vec<(String, String)>,
}

/// A client config for `brokers` with the operator's `--kafka-option` settings; each client
/// then sets what its role needs.
pub fn client_config(brokers: &str, options: &[(String, String)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (key, value) in options {
        config.set(key, value);
    }
    config.set("bootstrap.servers", brokers);
    config
}

type Delivery = (u64, u64, Result<(), String>);

struct Shared {
    /// Appends waiting for Kafka, by event sequence number.
    waiters: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    shipped_pos: AtomicU64,
    committed_pos: Arc<AtomicU64>,
    /// False after an ack had to come from the spill; the next confirmed delivery sets it again.
    kafka_ok: AtomicBool,
    settings: KafkaSettings,
    metrics: Arc<Metrics>,
}

impl Shared {
    fn spilled(&self) -> u64 {
        self.committed_pos
            .load(Ordering::Acquire)
            .saturating_sub(self.shipped_pos.load(Ordering::Acquire))
    }

    fn set_kafka_ok(&self, ok: bool) {
        self.kafka_ok.store(ok, Ordering::Relaxed);
        self.metrics.kafka_up.set(i64::from(ok));
    }
}

pub struct KafkaEventLog {
    local: SqliteEventLog,
    shared: Arc<Shared>,
    shipper: Mutex<Option<JoinHandle<()>>>,
}

impl KafkaEventLog {
    /// Opens the local store and spill and starts shipping (first whatever a previous run
    /// left in the spill). Kafka does not have to be reachable.
    pub fn start(
        store: &Store,
        settings: KafkaSettings,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<KafkaEventLog> {
        let (shipped, last) =
            store.with(|r| Ok((r.meta_get(SHIPPED_POS)?.unwrap_or(0), r.last_spill_pos()?)))?;
        let committed_pos = Arc::new(AtomicU64::new(last.unwrap_or(shipped).max(shipped)));
        let (committed, inbox) = mpsc::channel(HAND_OFF);
        let local = SqliteEventLog::start(
            store,
            Some(Forward {
                committed,
                committed_pos: committed_pos.clone(),
            }),
            metrics.event_log_queue_depth.clone(),
        )?;
        let producer = producer(&settings)?;
        let shared = Arc::new(Shared {
            waiters: Mutex::new(HashMap::new()),
            shipped_pos: AtomicU64::new(shipped),
            committed_pos,
            kafka_ok: AtomicBool::new(true),
            settings,
            metrics,
        });
        shared.set_kafka_ok(true);
        let spilled = shared.spilled();
        if spilled > 0 {
            tracing::info!(events = spilled, "replaying the spill to Kafka");
        }
        let shipper = Shipper {
            producer,
            shared: shared.clone(),
            store: store.clone(),
            inbox,
            in_flight: FuturesOrdered::new(),
            sent_through: shipped,
            confirmed: shipped,
            topic_ready: false,
        };
        let handle = tokio::spawn(shipper.run());
        tokio::spawn(measure_spill(Arc::downgrade(&shared), store.clone()));
        Ok(KafkaEventLog {
            local,
            shared,
            shipper: Mutex::new(Some(handle)),
        })
    }

    /// What is not committed locally yet (for the ledger's eviction).
    pub fn uncommitted(&self) -> Arc<super::Uncommitted> {
        self.local.uncommitted()
    }
}

#[async_trait]
impl EventLog for KafkaEventLog {
    async fn commit(&self, event: LikeEvent) -> Result<Shipped, EventLogError> {
        let seq = event.seq;
        let (delivered, wait) = oneshot::channel();
        lock(&self.shared.waiters).insert(seq, delivered);
        if let Err(err) = self.local.append(event).await {
            lock(&self.shared.waiters).remove(&seq);
            return Err(err);
        }
        // Committed to the spill: durable. Normally Kafka confirms within milliseconds; when it
        // does not, the spill is the ack and the shipper catches up later.
        let shared = self.shared.clone();
        Ok(Box::pin(async move {
            if shared.kafka_ok.load(Ordering::Relaxed)
                && tokio::time::timeout(shared.settings.ack_timeout, wait)
                    .await
                    .is_ok_and(|r| r.is_ok())
            {
                shared.metrics.durable_ack("kafka");
                return Ok(());
            }
            if lock(&shared.waiters).remove(&seq).is_some()
                && shared.kafka_ok.swap(false, Ordering::Relaxed)
            {
                shared.metrics.kafka_up.set(0);
                crate::warn_throttled!(timeout = ?shared.settings.ack_timeout, "Kafka is slow: acking from the local spill");
            }
            shared.metrics.durable_ack("spill");
            Ok(())
        }))
    }

    async fn barrier(&self) -> Result<(), EventLogError> {
        self.local.barrier().await
    }

    fn admit(&self) -> Result<(), EventLogError> {
        let spilled = self.shared.spilled();
        if spilled >= self.shared.settings.spill_max_events {
            return Err(EventLogError::Overloaded(spilled));
        }
        Ok(())
    }
}

#[async_trait]
impl Part for KafkaEventLog {
    fn name(&self) -> &'static str {
        "event log (kafka + spill)"
    }

    fn health(&self) -> Health {
        match self.local.health() {
            Health::Healthy if !self.shared.kafka_ok.load(Ordering::Relaxed) => {
                Health::Degraded(format!(
                    "kafka slow or unreachable: acking from the local spill ({} events waiting)",
                    self.shared.spilled()
                ))
            }
            other => other,
        }
    }

    async fn close(&self) -> anyhow::Result<()> {
        let result = self.local.close().await;
        // The writer is gone, so the shipper's inbox ends; give it a moment to ship the tail.
        // What it cannot ship stays in the spill for the next start.
        let handle = lock(&self.shipper).take();
        if let Some(handle) = handle
            && tokio::time::timeout(Duration::from_secs(5), handle)
                .await
                .is_err()
        {
            tracing::warn!(
                events = self.shared.spilled(),
                "Kafka did not confirm everything before shutdown; the rest stays in the spill"
            );
        }
        result
    }
}

/// Ships the outbox to Kafka in commit order; owns the only producer.
struct Shipper {
    producer: FutureProducer,
    shared: Arc<Shared>,
    store: Store,
    inbox: mpsc::Receiver<Committed>,
    in_flight: FuturesOrdered<DeliveryWait>,
    /// Highest outbox position handed to the producer.
    sent_through: u64,
    /// Highest outbox position Kafka confirmed, with everything before it.
    confirmed: u64,
    /// The topic exists (checked once, on the first replay that reaches Kafka).
    topic_ready: bool,
}

type DeliveryWait = std::pin::Pin<Box<dyn std::future::Future<Output = Delivery> + Send + Sync>>;

impl Shipper {
    async fn run(mut self) {
        let mut persist = tokio::time::interval(Duration::from_millis(200));
        let mut persisted = self.confirmed;
        let mut backoff = Duration::from_millis(100);
        // Start by replaying whatever the spill holds beyond the cursor.
        let mut replaying = true;
        loop {
            if replaying {
                match self.replay().await {
                    Ok(()) => {
                        replaying = false;
                        backoff = Duration::from_millis(100);
                    }
                    Err(err) => {
                        self.shared.set_kafka_ok(false);
                        tracing::warn!(error = %err, retry_in = ?backoff, spilled = self.shared.spilled(), "Kafka replay failed");
                        // A fresh producer id: after timeouts the old one's sequence numbers
                        // may no longer match what the broker has (it then refuses them).
                        match producer(&self.shared.settings) {
                            Ok(fresh) => self.producer = fresh,
                            Err(err) => {
                                tracing::warn!(error = %format!("{err:#}"), "cannot recreate the Kafka producer")
                            }
                        }
                        self.persist(&mut persisted).await;
                        if self.inbox.is_closed() && self.inbox.is_empty() {
                            return; // shutting down: the spill keeps the rest
                        }
                        // Everything handed over meanwhile is in the spill, read back by the
                        // next replay: the queue is emptied so the writer's hand-offs go on.
                        while self.inbox.try_recv().is_ok() {}
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
                continue;
            }
            tokio::select! {
                item = self.inbox.recv(), if self.in_flight.len() < MAX_IN_FLIGHT => match item {
                    Some(item) if item.pos <= self.sent_through => {} // replayed already
                    Some(item) if item.pos == self.sent_through + 1 => {
                        if let Err(err) = self.send(item.pos, &item.event) {
                            crate::warn_throttled!(error = %err, "cannot hand a like to Kafka");
                            replaying = true;
                        }
                    }
                    Some(_) => replaying = true, // a gap: read it back from the spill
                    None => break,
                },
                Some((pos, seq, result)) = self.in_flight.next() => {
                    if let Err(err) = result {
                        crate::warn_throttled!(error = %err, "Kafka did not confirm a like; replaying from the spill");
                        replaying = true;
                    } else {
                        self.confirm(pos, seq);
                    }
                }
                _ = persist.tick() => {
                    self.persist(&mut persisted).await;
                    // A hand-off the full queue dropped, with nothing after it to show the gap.
                    if self.inbox.is_empty()
                        && self.shared.committed_pos.load(Ordering::Acquire) > self.sent_through
                    {
                        replaying = true;
                    }
                }
            }
            if replaying {
                self.restart_from_confirmed();
            }
        }
        // Closing: the tail in flight gets a short chance to be confirmed.
        while let Ok(Some((pos, seq, result))) =
            tokio::time::timeout(Duration::from_secs(3), self.in_flight.next()).await
        {
            if result.is_err() {
                break;
            }
            self.confirm(pos, seq);
        }
        self.persist(&mut persisted).await;
    }

    fn send(&mut self, pos: u64, event: &LikeEvent) -> Result<(), String> {
        let payload = serde_json::to_vec(event).map_err(|e| e.to_string())?;
        let record = FutureRecord::to(&self.shared.settings.topic)
            .key(&*event.track)
            .payload(&payload);
        let delivery = self
            .producer
            .send_result(record)
            .map_err(|(err, _)| err.to_string())?;
        tracing::trace!(pos, user = %event.user, key = %event.key, "sent to Kafka");
        self.sent_through = pos;
        self.in_flight
            .push_back(Box::pin(wait_delivery(pos, event.seq, delivery)));
        Ok(())
    }

    fn confirm(&mut self, pos: u64, seq: u64) {
        self.confirmed = pos;
        self.shared.shipped_pos.store(pos, Ordering::Release);
        if let Some(waiter) = lock(&self.shared.waiters).remove(&seq) {
            let _ = waiter.send(());
        }
        if !self.shared.kafka_ok.swap(true, Ordering::Relaxed) {
            self.shared.metrics.kafka_up.set(1);
            tracing::info!("Kafka confirms likes again");
        }
    }

    /// Forgets what is in flight (it may still arrive: harmless duplicates) and goes back to
    /// the last confirmed position.
    fn restart_from_confirmed(&mut self) {
        self.in_flight = FuturesOrdered::new();
        self.sent_through = self.confirmed;
    }

    /// Sends the spill from the confirmed position, page by page, until it is empty.
    async fn replay(&mut self) -> Result<(), String> {
        self.restart_from_confirmed();
        if !self.topic_ready {
            let settings = &self.shared.settings;
            ensure_topic(&settings.brokers, &settings.options, &settings.topic)
                .await
                .map_err(|e| format!("{e:#}"))?;
            self.topic_ready = true;
        }
        loop {
            let from = self.confirmed;
            let page = self
                .store
                .with_async(move |r| r.spill_after(from, REPLAY_PAGE))
                .await
                .map_err(|e| format!("{e:#}"))?;
            if page.is_empty() {
                return Ok(());
            }
            for spilled in &page {
                self.send(spilled.pos, &spilled.event)?;
            }
            while let Some((pos, seq, result)) = self.in_flight.next().await {
                result?;
                self.confirm(pos, seq);
            }
        }
    }

    /// Stores the confirmed position and drops shipped rows from the spill.
    async fn persist(&self, persisted: &mut u64) {
        let confirmed = self.confirmed;
        if confirmed == *persisted {
            return;
        }
        let result = self
            .store
            .with_async(move |r| r.spill_shipped(SHIPPED_POS, confirmed))
            .await;
        match result {
            Ok(()) => *persisted = confirmed,
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "cannot store the Kafka cursor")
            }
        }
    }
}

/// Waits for Kafka's report on one event and judges it ([`stored_at`]).
/// How often the spill's gauges are measured.
const SPILL_GAUGE_PERIOD: Duration = Duration::from_millis(250);

/// Keeps `fanfare_kafka_spill_events` and `fanfare_kafka_spill_oldest_seconds` current, apart
/// from the shipper (which may wait seconds on an unreachable broker), until the log is gone.
async fn measure_spill(shared: std::sync::Weak<Shared>, store: Store) {
    loop {
        tokio::time::sleep(SPILL_GAUGE_PERIOD).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let spilled = shared.spilled();
        shared.metrics.kafka_spill_events.set(spilled as i64);
        // The spill ships in order: the oldest unconfirmed like is the one after the cursor.
        let age = if spilled == 0 {
            0.0
        } else {
            let from = shared.shipped_pos.load(Ordering::Acquire);
            match store.with_async(move |r| r.spill_after(from, 1)).await {
                Ok(oldest) => oldest.first().map_or(0.0, |s| {
                    (crate::clock::now_ms() - s.event.accepted_at_ms).max(0) as f64 / 1000.0
                }),
                Err(err) => {
                    crate::warn_throttled!(error = %format!("{err:#}"), "cannot read the spill's oldest like");
                    continue;
                }
            }
        };
        shared.metrics.kafka_spill_oldest_seconds.set(age);
    }
}

async fn wait_delivery(pos: u64, seq: u64, delivery: DeliveryFuture) -> Delivery {
    let result = match delivery.await {
        Ok(report) => stored_at(report).map(|(partition, offset)| {
            tracing::trace!(pos, partition, offset, "Kafka holds the event");
        }),
        Err(_) => Err("the producer dropped the message".to_owned()),
    };
    (pos, seq, result)
}

/// Where Kafka stored the event, or why the report is not proof that it did.
///
/// A delivery counts only with the offset Kafka stored it at. librdkafka's idempotent
/// producer also reports success without one: for a batch it "implicitly acks" because a
/// later batch of the partition succeeded, even when the broker had refused it (Not leader:
/// a partition not yet loaded after its topic was created, or a leader change) — measured
/// here as lost first likes, and an open upstream report (confluent-kafka-go#921). Such an
/// event is sent again from the spill: at worst a second copy in Kafka, which the workers
/// store once (by event id).
fn stored_at(report: OwnedDeliveryResult) -> Result<(i32, i64), String> {
    match report {
        Ok(delivery) if delivery.offset < 0 => Err(format!(
            "Kafka acked partition {} without an offset (an implicit ack, not proof)",
            delivery.partition
        )),
        Ok(delivery) => Ok((delivery.partition, delivery.offset)),
        Err((err, _)) => Err(err.to_string()),
    }
}

/// The idempotent producer: acks from all in-sync replicas, no duplicates or reordering from
/// its own retries, lz4 batches, and a short linger so acks stay fast. Without idempotence,
/// one request in flight per broker keeps the order, and retries may duplicate (harmless:
/// stores keep one copy per event id).
fn producer(settings: &KafkaSettings) -> anyhow::Result<FutureProducer> {
    let mut config = client_config(&settings.brokers, &settings.options);
    if !settings.idempotence {
        config.set("max.in.flight.requests.per.connection", "1");
    }
    config
        .set("enable.idempotence", settings.idempotence.to_string())
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "10000")
        .set("queue.buffering.max.messages", "200000");
    // librdkafka's own debug contexts ("eos,msg,protocol"), for a look at what the broker said.
    if let Ok(contexts) = std::env::var("FANFARE_KAFKA_DEBUG") {
        config.set("debug", contexts);
    }
    config.create().context("cannot create the Kafka producer")
}

/// Partitions of a topic the node or worker creates (key = track spreads tracks over them,
/// and workers scale up to this number).
pub const TOPIC_PARTITIONS: i32 = 12;

/// Creates the topic unless it exists. Fails when the broker cannot be reached.
pub async fn ensure_topic(
    brokers: &str,
    options: &[(String, String)],
    topic: &str,
) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::types::RDKafkaErrorCode;
    let admin: AdminClient<DefaultClientContext> = client_config(brokers, options)
        .create()
        .context("cannot create a Kafka admin client")?;
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(5)));
    let new = NewTopic::new(topic, TOPIC_PARTITIONS, TopicReplication::Fixed(-1));
    let results = admin
        .create_topics([&new], &options)
        .await
        .context("cannot reach Kafka to create the topic")?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => anyhow::bail!("cannot create topic {name}: {code}"),
        }
    }
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use rdkafka::Timestamp;
    use rdkafka::producer::future_producer::Delivery as Report;

    use super::stored_at;

    #[test]
    fn a_report_without_an_offset_is_not_proof_of_storage() {
        let implicit = Report {
            partition: 4,
            offset: -1001,
            timestamp: Timestamp::NotAvailable,
        };
        assert!(stored_at(Ok(implicit)).is_err());
        let stored = Report {
            partition: 4,
            offset: 7,
            timestamp: Timestamp::CreateTime(1),
        };
        assert_eq!(stored_at(Ok(stored)), Ok((4, 7)));
    }
}
