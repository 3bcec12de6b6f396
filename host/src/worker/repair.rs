//! A second look at tracks a batch stored around a fault.
//!
//! Registers are merged with conditional upserts, which MongoDB applies atomically per
//! document; FerretDB 1.24 does not (it reads, compares in Go, then writes: 1 of 30 trials of
//! four concurrent writers lost the newest register, measured). One worker writes a track at a
//! time — except around a rebalance, when the worker that lost a partition may still be
//! storing its batch (typically one that was retrying while MongoDB or the broker was away).
//! A straggler always shows: its batch and the new holder's overlap (both start from the
//! committed offset), so whichever writes an event second meets it already stored. So the
//! tracks a batch could not be sure of — events already stored, a register already as new,
//! a refused count increment (`Stored::suspect`) — and every track of a batch that needed
//! retries are rebuilt from their stored events a while later, once such a straggler is
//! done, by the worker that holds their partition. The request is written to the `rebuilds`
//! collection before the batch's offsets are committed, with the time it becomes due: until
//! 2026-12-02 it waited in the worker's memory until then, so a worker killed in those 20 s
//! took it along while the batch that made it due was already committed (docs/reliability.md,
//! found 18). (Rebuilding every track of every batch
//! stored within 30 s of any assignment change, as this first did, rebuilt the whole catalog
//! whenever a worker joined and stopped storing for 20 s at a time in the benchmark.) And
//! once a worker has been idle for a few seconds it rebuilds every track it stored since its
//! last rebuild — if anything unusual happened since (a retried batch, an assignment change,
//! events already stored, registers already newer): the backstop that makes the stored
//! counts exact in the end whatever the store did (a fault run on FerretDB once ended with
//! one track's registers 40 s behind its events, cause not found; docs/reliability.md). A
//! healthy farm never pays for it. A rebuild reads the window of events that made it due
//! (`rebuild::Window`: from their lowest stamp on), not the track's history. Requests are
//! done by whoever holds the track's partition once due (`rebuild`), so a rebalance or a
//! killed worker between the risky batch and its rebuild loses none.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use tokio::time::Instant;

use crate::event::LikeEvent;
use crate::worker::archive::{LogPosition, MongoArchive};
use crate::worker::rebuild::Window;

/// How long after the risky batch its tracks are rebuilt (longer than a straggler's batch).
const DELAY: Duration = Duration::from_secs(20);
/// Idle time after which the tracks stored since the last rebuild are rebuilt.
const IDLE: Duration = Duration::from_secs(5);
/// How often the worker looks for rebuilds handed to it (one small query).
const LOOK_EVERY: Duration = Duration::from_secs(5);
/// Longest the loop rebuilds before it stores a batch again: a rebalance can make hundreds
/// of tracks suspect, and rebuilding them in one go stopped a worker for 50 s in the
/// benchmark while its lag grew.
const TURN: Duration = Duration::from_millis(500);

#[derive(Default)]
pub struct Repairs {
    assignments_seen: u64,
    /// When this worker last saw its assignment change: until `DELAY` after it, the worker
    /// that lost a partition may still be writing it (a straggler).
    assignment_changed_at: Option<Instant>,
    /// Tracks stored since the last idle rebuild, with their partition and the lowest stamp
    /// stored since.
    touched: BTreeMap<String, Window>,
    last_batch: Option<Instant>,
    /// Rebuilds not yet written to the `rebuilds` collection: track → (partition and window,
    /// how long after the write it becomes due).
    unrequested: BTreeMap<String, (Window, Duration)>,
    /// When the first rebuild this worker asked for becomes due (it looks then).
    asked_due: Option<Instant>,
    /// When the `rebuilds` requests were last looked at.
    last_look: Option<Instant>,
    /// Something unusual since the last idle rebuild (see `note`): without it an idle moment
    /// rebuilds nothing, so a healthy farm never pays for reading whole track histories.
    unusual_seen: bool,
}

impl Repairs {
    /// Notes a stored batch; `retried`: it needed more than one attempt; `suspect`: tracks
    /// whose count it could not be sure of — events already stored, registers already as
    /// new, refused increments (replays, late or concurrent writes) — rebuilt after the delay.
    /// The rebuilds are asked for by [`Repairs::ask`], before the batch is committed.
    pub fn note(
        &mut self,
        events: &[LikeEvent],
        positions: &[LogPosition],
        retried: bool,
        suspect: &[(String, i32)],
        assignments: u64,
    ) {
        let now = Instant::now();
        self.last_batch = Some(now);
        self.unusual_seen |= retried || !suspect.is_empty();
        // Per track of the batch: its partition and its events' lowest stamp, where a
        // rebuild for this batch starts reading.
        let mut windows: BTreeMap<&str, Window> = BTreeMap::new();
        for (e, at) in events.iter().zip(positions) {
            windows
                .entry(&e.track)
                .or_insert(Window {
                    partition: at.partition,
                    since_ms: e.accepted_at_ms,
                })
                .widen(e.accepted_at_ms);
        }
        let mut schedule = |track: &str, window: Window| {
            Self::queue(&mut self.unrequested, track, window, DELAY);
        };
        for (track, partition) in suspect {
            let window = windows.get(track.as_str()).copied().unwrap_or(Window {
                partition: *partition,
                since_ms: i64::MIN,
            });
            schedule(track, window);
        }
        if retried {
            for (track, window) in &windows {
                schedule(track, *window);
            }
        }
        for (track, window) in windows {
            self.touched
                .entry(track.to_owned())
                .and_modify(|seen| seen.widen(window.since_ms))
                .or_insert(window);
        }
        self.assignments(assignments, now);
    }

    /// Takes in the consumer's count of assignment changes.
    fn assignments(&mut self, assignments: u64, now: Instant) {
        if assignments != self.assignments_seen {
            self.assignments_seen = assignments;
            self.assignment_changed_at = Some(now);
            self.unusual_seen = true;
        }
    }

    /// Whether a straggler may still write a partition this worker holds.
    fn straggler_possible(&self, now: Instant) -> bool {
        self.assignment_changed_at
            .is_some_and(|at| now.duration_since(at) < DELAY)
    }

    /// Adds a rebuild to ask for: the earlier window start and the longer delay win.
    fn queue(
        unrequested: &mut BTreeMap<String, (Window, Duration)>,
        track: &str,
        window: Window,
        delay: Duration,
    ) {
        unrequested
            .entry(track.to_owned())
            .and_modify(|(queued, after)| {
                queued.widen(window.since_ms);
                *after = (*after).max(delay);
            })
            .or_insert((window, delay));
    }

    /// Writes the rebuilds noted since the last call to the `rebuilds` collection, each due
    /// its delay from now; the worker calls it before it commits the batch that made them
    /// due, and retries until it succeeds (a failed write keeps them).
    pub async fn ask(&mut self, archive: &MongoArchive) -> anyhow::Result<()> {
        if self.unrequested.is_empty() {
            return Ok(());
        }
        // Taken off only once written (a dropped call keeps them).
        let asks: Vec<(String, Window, Duration)> = self
            .unrequested
            .iter()
            .map(|(track, (window, after))| (track.clone(), *window, *after))
            .collect();
        archive.request_rebuilds(&asks).await?;
        self.unrequested.clear();
        let first = asks.iter().map(|(_, _, after)| *after).min();
        if let Some(at) = first.map(|after| Instant::now() + after) {
            self.asked_due = Some(self.asked_due.map_or(at, |due| due.min(at)));
        }
        Ok(())
    }

    /// When the loop should next call [`Repairs::run_due`]: the first rebuild it asked for
    /// becoming due, the idle rebuild (counted from the last batch), or the next look at the
    /// requests.
    pub fn next_due(&self) -> Option<Instant> {
        let idle = match (self.touched.is_empty(), self.last_batch) {
            (false, Some(at)) => Some(at + IDLE),
            _ => None,
        };
        let look = self
            .last_look
            .map_or_else(Instant::now, |at| at + LOOK_EVERY);
        [self.asked_due, idle, Some(look)]
            .into_iter()
            .flatten()
            .min()
    }

    /// After an idle moment, the tracks stored since the last one, if anything unusual
    /// happened meanwhile, are queued to be asked for at once.
    fn queue_idle(&mut self, now: Instant) {
        if self
            .last_batch
            .is_some_and(|at| now.duration_since(at) >= IDLE)
        {
            let touched = std::mem::take(&mut self.touched);
            if std::mem::take(&mut self.unusual_seen) {
                for (track, window) in touched {
                    Self::queue(&mut self.unrequested, &track, window, Duration::ZERO);
                }
            }
        }
    }

    /// Asks for what is queued (an idle moment's rebuilds, or asks that failed before), then
    /// rebuilds what is requested and due in the partitions this worker holds (its own
    /// requests and those of workers that lost a partition since); returns the tracks
    /// rebuilt. A request outlives a worker killed before its rebuild, and one that fails
    /// stays for the next look.
    /// A rebuild that met a register moved under it, or done while a straggler may still be
    /// writing (its count set could land between the straggler's register writes and its
    /// increments), is asked for again, due after the delay.
    pub async fn run_due<C: Consumer<X>, X: rdkafka::consumer::ConsumerContext>(
        &mut self,
        archive: &MongoArchive,
        consumer: &C,
        assignments: u64,
    ) -> anyhow::Result<usize> {
        let now = Instant::now();
        self.assignments(assignments, now);
        self.queue_idle(now);
        if !self.unrequested.is_empty() {
            self.ask(archive).await?;
        }
        if self.asked_due.is_some_and(|at| at <= Instant::now()) {
            self.asked_due = None;
            self.last_look = None; // look at once
        }
        if self.last_look.is_some_and(|at| now < at + LOOK_EVERY) {
            return Ok(0);
        }
        self.last_look = Some(now);
        let held: Vec<i32> = consumer
            .assignment()
            .map(|list| list.elements().iter().map(|e| e.partition()).collect())
            .unwrap_or_default();
        let mut rebuilt = 0;
        for request in archive.requested_rebuilds(&held).await? {
            if now.elapsed() >= TURN {
                self.last_look = None; // the rest after the next batch
                break;
            }
            let sure = archive
                .rebuild_track(&request.track, request.since_ms)
                .await?;
            if !sure || self.straggler_possible(Instant::now()) {
                // Asked again before this one is taken off: the request stays, due later
                // (its `asked_at_ms` changed, so `rebuild_done` leaves it).
                let window = Window {
                    partition: request.partition,
                    since_ms: request.since_ms,
                };
                archive
                    .request_rebuilds(&[(request.track.clone(), window, DELAY)])
                    .await?;
            }
            archive.rebuild_done(&request).await?;
            rebuilt += 1;
        }
        Ok(rebuilt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(track: &str) -> LikeEvent {
        LikeEvent {
            event_id: format!("e-{track}"),
            seq: 0,
            user: "u".into(),
            track: track.into(),
            action: fanfare_protocol::Action::Like,
            accepted_at_ms: 1,
            node: "n".into(),
            version: 1,
            key: "k".to_owned(),
            changed: true,
        }
    }

    /// Notes a batch of one event on `track`; `suspect`: the batch could not be sure of it.
    fn stored(repairs: &mut Repairs, track: &str, retried: bool, suspect: bool, assignments: u64) {
        let at = LogPosition {
            partition: 3,
            offset: 7,
        };
        let suspect: &[(String, i32)] = if suspect {
            &[(track.to_owned(), 3)]
        } else {
            &[]
        };
        repairs.note(&[event(track)], &[at], retried, suspect, assignments);
    }

    /// What the worker would ask for next: (track, window, delay).
    fn queued(repairs: &Repairs) -> Vec<(String, Window, Duration)> {
        repairs
            .unrequested
            .iter()
            .map(|(track, (window, after))| (track.clone(), *window, *after))
            .collect()
    }

    const WINDOW: Window = Window {
        partition: 3,
        since_ms: 1,
    };

    #[test]
    fn a_healthy_worker_rebuilds_nothing_when_idle() {
        let mut repairs = Repairs::default();
        stored(&mut repairs, "a", false, false, 0);
        stored(&mut repairs, "b", false, false, 0);
        repairs.queue_idle(Instant::now() + IDLE + Duration::from_millis(10));
        assert!(queued(&repairs).is_empty());
        assert!(
            repairs.touched.is_empty(),
            "the idle list is cleared either way"
        );
    }

    #[test]
    fn after_anything_unusual_an_idle_moment_rebuilds_every_track_stored_since() {
        let mut repairs = Repairs::default();
        stored(&mut repairs, "a", false, false, 0);
        stored(&mut repairs, "b", false, true, 0); // met a stored event or a newer register
        let later = Instant::now() + IDLE + Duration::from_millis(10);
        repairs.queue_idle(later);
        // a at once; b keeps the delay its suspect batch gave it (a straggler may be writing).
        assert_eq!(
            queued(&repairs),
            vec![
                ("a".to_owned(), WINDOW, Duration::ZERO),
                ("b".to_owned(), WINDOW, DELAY)
            ]
        );
        // The next idle moment, with nothing unusual in between, adds nothing.
        repairs.unrequested.clear();
        stored(&mut repairs, "c", false, false, 0);
        repairs.queue_idle(later + IDLE + Duration::from_secs(1));
        assert!(queued(&repairs).is_empty());
    }

    #[test]
    fn a_suspect_track_is_asked_for_at_once_due_after_the_delay_and_only_it() {
        let mut repairs = Repairs::default();
        let at = LogPosition {
            partition: 3,
            offset: 7,
        };
        let suspect = [("b".to_owned(), 3)];
        repairs.note(&[event("a"), event("b")], &[at, at], false, &suspect, 0);
        // Queued by the note itself (the worker writes it before committing the batch), not
        // kept in memory until due.
        assert_eq!(queued(&repairs), vec![("b".to_owned(), WINDOW, DELAY)]);
    }

    #[test]
    fn a_retried_batch_is_rebuilt_after_the_delay_and_an_assignment_change_counts_as_unusual() {
        let mut repairs = Repairs::default();
        stored(&mut repairs, "a", true, false, 0);
        assert_eq!(queued(&repairs), vec![("a".to_owned(), WINDOW, DELAY)]);
        repairs.unrequested.clear();
        // A rebalance alone asks for nothing at once (a straggler would show as suspect
        // tracks), but the next idle moment rebuilds what was stored.
        stored(&mut repairs, "b", false, false, 1);
        assert!(queued(&repairs).is_empty());
        repairs.queue_idle(Instant::now() + IDLE + Duration::from_millis(10));
        let idle = queued(&repairs);
        assert!(
            idle.contains(&("b".to_owned(), WINDOW, Duration::ZERO)),
            "{idle:?}"
        );
    }

    #[test]
    fn a_rebuild_reads_from_the_lowest_stamp_of_the_batches_that_made_it_due() {
        let mut repairs = Repairs::default();
        let at = LogPosition {
            partition: 3,
            offset: 7,
        };
        let stamped = |stamp: i64, track: &str| LikeEvent {
            accepted_at_ms: stamp,
            ..event(track)
        };
        let suspect = [("a".to_owned(), 3)];
        repairs.note(
            &[stamped(500, "a"), stamped(300, "a"), stamped(100, "b")],
            &[at, at, at],
            false,
            &suspect,
            0,
        );
        // A later batch that makes it due again, with an older event (a spill replayed late).
        repairs.note(&[stamped(200, "a")], &[at], false, &suspect, 0);
        repairs.queue_idle(Instant::now() + IDLE + Duration::from_millis(10));
        let due = queued(&repairs);
        let window = |track: &str| due.iter().find(|(t, _, _)| t == track).map(|(_, w, _)| *w);
        assert_eq!(
            window("a"),
            Some(Window {
                partition: 3,
                since_ms: 200
            })
        );
        // b was only stored (unusual moment, idle): rebuilt from its own lowest stamp.
        assert_eq!(
            window("b"),
            Some(Window {
                partition: 3,
                since_ms: 100
            })
        );
    }
}
