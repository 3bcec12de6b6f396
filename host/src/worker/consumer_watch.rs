//! What a worker knows about its own progress: the consumer-lag gauge, partition
//! assignments, and partitions that stop moving. Kept apart from the batch loop because the
//! loop can sit on one batch for a long time (MongoDB down or slow), and that is exactly when
//! the lag must still be measured.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset};

use crate::tasks::Tasks;

/// How often the lag gauge is measured.
const LAG_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for the broker while measuring (the broker may be down).
const ASK_BROKER: Duration = Duration::from_secs(2);

/// Measures the lag (per assigned partition: high watermark − committed offset; before the
/// group's first commit, everything since the partition's start) every second, from its own
/// task, asking the broker directly.
pub fn spawn_lag_sampler(
    consumer: Arc<StreamConsumer<WatchContext>>,
    lag: Gauge<i64, AtomicI64>,
    tasks: &Tasks,
) {
    let shutdown = tasks.shutdown().clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(LAG_EVERY) => {}
            }
            let consumer = consumer.clone();
            match tokio::task::spawn_blocking(move || measure_lag(&consumer)).await {
                Ok(Ok(total)) => {
                    lag.set(total);
                }
                Ok(Err(err)) => tracing::debug!(error = %err, "cannot measure the consumer lag"),
                Err(err) => tracing::warn!(error = %err, "lag measurement failed"),
            }
        }
    });
}

fn measure_lag(consumer: &StreamConsumer<WatchContext>) -> KafkaResult<i64> {
    let assigned = consumer.assignment()?;
    if assigned.count() == 0 {
        return Ok(0);
    }
    let committed = consumer.committed_offsets(assigned, ASK_BROKER)?;
    let mut total = 0;
    for partition in committed.elements() {
        let (low, high) =
            consumer.fetch_watermarks(partition.topic(), partition.partition(), ASK_BROKER)?;
        let done = match partition.offset() {
            Offset::Offset(offset) => offset,
            _ => low,
        };
        total += (high - done).max(0);
    }
    Ok(total)
}

/// Logs assignments, and warns when assigned partitions with lag stop moving: a consumer
/// that holds partitions without fetching them stalls the pipeline silently otherwise.
/// (librdkafka delivers statistics only while the batch loop polls, so the warning can come
/// late; the lag gauge is measured by `spawn_lag_sampler` instead.)
#[derive(Default)]
pub struct WatchContext {
    watch: Mutex<StallWatch>,
    /// Assignments received so far: a change means another worker may still be storing a
    /// batch of a partition this one now holds (or the other way round).
    assignments: std::sync::atomic::AtomicU64,
    /// Partitions held since the last rebalance: librdkafka's statistics keep listing
    /// partitions it no longer fetches (state "stopped", positions frozen), which read as a
    /// stall of partitions another worker is consuming.
    held: Mutex<std::collections::BTreeSet<i32>>,
}

impl WatchContext {
    pub fn assignments(&self) -> u64 {
        self.assignments.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Fetch and committed positions of lagging partitions at the last statistics (either moving
/// is progress: a long batch fetches nothing new but commits at its end), and for how many
/// statistics intervals they have not moved.
#[derive(Default)]
struct StallWatch {
    positions: BTreeMap<i32, (i64, i64)>,
    still_for: u32,
}

/// Statistics intervals (1 s) of no progress before a warning, and between warnings.
const STALL_WARN_AFTER: u32 = 10;

impl ClientContext for WatchContext {
    fn stats(&self, statistics: Statistics) {
        let mut lagging = BTreeMap::new();
        let mut states = Vec::new();
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for p in statistics
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
        {
            if p.partition < 0 || !p.desired || p.hi_offset < 0 || !held.contains(&p.partition) {
                continue;
            }
            let done = if p.committed_offset >= 0 {
                p.committed_offset
            } else {
                p.lo_offset.max(0)
            };
            if p.hi_offset > done {
                lagging.insert(p.partition, (p.next_offset, p.committed_offset));
                states.push(format!(
                    "p{} {} next {} committed {} high {}",
                    p.partition, p.fetch_state, p.next_offset, p.committed_offset, p.hi_offset
                ));
            }
        }
        let mut watch = self.watch.lock().unwrap_or_else(|p| p.into_inner());
        if lagging.is_empty() || lagging != watch.positions {
            watch.positions = lagging;
            watch.still_for = 0;
            return;
        }
        watch.still_for += 1;
        if watch.still_for.is_multiple_of(STALL_WARN_AFTER) {
            tracing::warn!(seconds = watch.still_for, partitions = ?states, "assigned partitions with lag are not moving");
        }
    }
}

impl ConsumerContext for WatchContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                self.assignments
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let partitions: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(?partitions, "partitions assigned");
                let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                held.extend(partitions);
            }
            Rebalance::Revoke(list) => {
                let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                for e in list.elements() {
                    held.remove(&e.partition());
                }
                tracing::info!(partitions = list.count(), "partitions revoked");
            }
            Rebalance::Error(err) => tracing::warn!(error = %err, "rebalance failed"),
        }
    }
}
