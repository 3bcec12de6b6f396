//! A second look at tracks a batch stored around a fault.
//!
//! Registers are merged with conditional upserts, which MongoDB applies atomically per
//! document; FerretDB 1.24 does not (it reads, compares in Go, then writes: 1 of 30 trials of
//! four concurrent writers lost the newest register, measured). One worker writes a track at a
//! time — except around a rebalance, when the worker that lost a partition may still be
//! storing its batch (typically one that was retrying while MongoDB or the broker was away).
//! So the tracks of a batch that needed retries, or that was stored soon after an assignment
//! changed, are rebuilt from their stored events a while later, once such a straggler is
//! done, by the worker that holds their partition. And once a worker has been idle for a few
//! seconds it rebuilds every track it stored since its last rebuild: the backstop that makes
//! the stored counts exact in the end whatever the store did (a fault run on FerretDB once
//! ended with one track's registers 40 s behind its events, cause not found; docs/
//! reliability.md). Both happen rarely: around faults, and when traffic pauses.

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
/// Idle time after which the tracks stored since the last rebuild are rebuilt.
const IDLE: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct Repairs {
    /// Track → (its partition, when to rebuild it).
    due: BTreeMap<String, (i32, Instant)>,
    assignments_seen: u64,
    assignment_changed: Option<Instant>,
    /// Tracks stored since the last idle rebuild, with their partition.
    touched: BTreeMap<String, i32>,
    last_batch: Option<Instant>,
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
        self.last_batch = Some(now);
        for (e, at) in events.iter().zip(positions) {
            if !self.touched.contains_key(&e.track) {
                self.touched.insert(e.track.clone(), at.partition);
            }
        }
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

    /// When the next rebuild is due, if any (the idle rebuild counts from the last batch).
    pub fn next_due(&self) -> Option<Instant> {
        let idle = match (self.touched.is_empty(), self.last_batch) {
            (false, Some(at)) => Some(at + IDLE),
            _ => None,
        };
        self.due.values().map(|(_, at)| *at).chain(idle).min()
    }

    /// Rebuilds the due tracks whose partition this worker still holds; returns how many.
    pub async fn run_due<C: Consumer<X>, X: rdkafka::consumer::ConsumerContext>(
        &mut self,
        archive: &MongoArchive,
        consumer: &C,
    ) -> anyhow::Result<usize> {
        let now = Instant::now();
        let mut due: Vec<(String, i32)> = self
            .due
            .iter()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(track, (partition, _))| (track.clone(), *partition))
            .collect();
        // Taken off the list whatever happens: a failing rebuild must not wake the loop again
        // and again (the idle rebuild comes back to it).
        for (track, _) in &due {
            self.due.remove(track);
        }
        if self
            .last_batch
            .is_some_and(|at| now.duration_since(at) >= IDLE)
        {
            due.extend(std::mem::take(&mut self.touched));
        }
        if due.is_empty() {
            return Ok(0);
        }
        let held: Vec<i32> = consumer
            .assignment()
            .map(|list| list.elements().iter().map(|e| e.partition()).collect())
            .unwrap_or_default();
        let mut rebuilt = 0;
        due.sort();
        due.dedup();
        for (i, (track, partition)) in due.iter().enumerate() {
            if !held.contains(partition) {
                continue;
            }
            if let Err(err) = archive.rebuild_track(track).await {
                // What is left waits for the next idle moment.
                self.touched.extend(due[i..].iter().cloned());
                return Err(err);
            }
            rebuilt += 1;
        }
        Ok(rebuilt)
    }
}
