//! A second look at tracks a batch stored around a fault.
//!
//! Registers are merged with conditional upserts, which MongoDB applies atomically per
//! document; FerretDB 1.24 does not (it reads, compares in Go, then writes: 1 of 30 trials of
//! four concurrent writers lost the newest register, measured). One worker writes a track at a
//! time — except around a rebalance, when the worker that lost a partition may still be
//! storing its batch (typically one that was retrying while MongoDB or the broker was away).
//! So the tracks of a batch that needed retries, or that was stored soon after an assignment
//! changed, are rebuilt from their stored events a while later, once such a straggler is
//! done, by the worker that holds their partition. Cheap: it happens around faults only.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use tokio::time::Instant;

use crate::seams::event_log::EventRecord;
use crate::worker::archive::{LogPosition, MongoArchive};

/// How long after the risky batch its tracks are rebuilt (longer than a straggler's batch).
const DELAY: Duration = Duration::from_secs(20);
/// How long after an assignment change batches count as risky.
const AFTER_ASSIGNMENT: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct Repairs {
    /// Track → (its partition, when to rebuild it).
    due: BTreeMap<String, (i32, Instant)>,
    assignments_seen: u64,
    assignment_changed: Option<Instant>,
}

impl Repairs {
    /// Notes a stored batch; `retried`: it needed more than one attempt.
    pub fn note(
        &mut self,
        events: &[EventRecord],
        positions: &[LogPosition],
        retried: bool,
        assignments: u64,
    ) {
        let now = Instant::now();
        if assignments != self.assignments_seen {
            self.assignments_seen = assignments;
            self.assignment_changed = Some(now);
        }
        let recent_assignment = self
            .assignment_changed
            .is_some_and(|at| now.duration_since(at) < AFTER_ASSIGNMENT);
        if !(retried || recent_assignment) {
            return;
        }
        for (e, at) in events.iter().zip(positions) {
            self.due
                .entry(e.track.clone())
                .or_insert((at.partition, now + DELAY));
        }
    }

    /// When the next rebuild is due, if any.
    pub fn next_due(&self) -> Option<Instant> {
        self.due.values().map(|(_, at)| *at).min()
    }

    /// Rebuilds the due tracks whose partition this worker still holds; returns how many.
    pub async fn run_due<C: Consumer<X>, X: rdkafka::consumer::ConsumerContext>(
        &mut self,
        archive: &MongoArchive,
        consumer: &C,
    ) -> anyhow::Result<usize> {
        let now = Instant::now();
        let due: Vec<(String, i32)> = self
            .due
            .iter()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(track, (partition, _))| (track.clone(), *partition))
            .collect();
        if due.is_empty() {
            return Ok(0);
        }
        let held: Vec<i32> = consumer
            .assignment()
            .map(|list| list.elements().iter().map(|e| e.partition()).collect())
            .unwrap_or_default();
        let mut rebuilt = 0;
        for (track, partition) in due {
            if held.contains(&partition) {
                archive.rebuild_track(&track).await?;
                rebuilt += 1;
            }
            self.due.remove(&track);
        }
        Ok(rebuilt)
    }
}
