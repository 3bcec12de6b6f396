//! Rebuilding a track's stored registers and count from its events, and the `rebuilds`
//! collection of requests for it.
//!
//! A rebuild reads only the events of its window: those stamped at or after the lowest stamp
//! among the events of the batches that made it due. Registers only move forward (every write
//! is a merge), so a register can only be behind what the events say, and only by an event
//! whose write was lost — one of those batches' events. The rest of the history is already in
//! the registers. (Until 2026-12-02 a rebuild read every event of its track: O(history) for a
//! hot track, docs/reliability.md.) A request without a window (older workers) reads it all.
//!
//! A rebuild is only safe while no other worker writes the track, so it is done by the worker
//! that holds the track's partition, in its loop. Whoever decides a rebuild is due writes a
//! request; whoever holds the partition takes it up. Before requests, a worker rebuilt only
//! tracks of partitions it still held, so tracks marked just before a rebalance moved their
//! partition were rebuilt by nobody: the new holder had stored nothing of them, the old one
//! no longer held them (a CI fault run ended with counts that disagreed with their events for
//! 30 s). A request also outlives a worker killed before its rebuild.

use anyhow::Context;
use futures_util::TryStreamExt;
use mongodb::bson::{Document, doc};

use crate::worker::archive::MongoArchive;
use crate::worker::register::{Register, number, pair_id};

/// Most requests one idle moment takes up.
const REQUESTS_PER_LOOK: i64 = 1_000;

/// Where a track's rebuild is done (the holder of its partition) and what it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub partition: i32,
    /// Events stamped at or after this are read (`i64::MIN`: the whole history).
    pub since_ms: i64,
}

impl Window {
    /// Takes in another reason for the same rebuild: the earlier start wins.
    pub fn widen(&mut self, since_ms: i64) {
        self.since_ms = self.since_ms.min(since_ms);
    }
}

/// A track whose rebuild another worker asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub track: String,
    pub partition: i32,
    pub since_ms: i64,
    /// When it was asked for (ms): a request made again later is not taken off by the
    /// rebuild of an earlier one.
    pub asked_at_ms: i64,
}

impl MongoArchive {
    /// Brings a track's registers up to its stored events stamped from `since_ms` on (each
    /// user's newest by stamp, then event id, where it is newer than the stored register or
    /// disagrees with an event of the same order) and sets its count from the registers
    /// (`repair`: only while no other worker writes the track; the worker's own loop runs
    /// it, between batches). Each register is set only if it is still the one read, so a
    /// writer that was not supposed to be there (a straggler) is never set back; returns
    /// `false` if one was found, and the track is rebuilt again later.
    pub async fn rebuild_track(&self, track: &str, since_ms: i64) -> anyhow::Result<bool> {
        let filter = if since_ms == i64::MIN {
            doc! { "track": track }
        } else {
            doc! { "track": track, "accepted_at_ms": { "$gte": since_ms } }
        };
        let mut events = self
            .likes
            .find(filter)
            .projection(doc! { "user": 1, "action": 1, "accepted_at_ms": 1, "key": 1 })
            .await?;
        let mut newest: std::collections::HashMap<String, Register> = Default::default();
        while let Some(d) = events.try_next().await? {
            let (Ok(user), Ok(id)) = (d.get_str("user"), d.get_str("_id")) else {
                continue;
            };
            let register = Register {
                liked: d.get_str("action") == Ok("like"),
                stamp: number(&d, "accepted_at_ms"),
                event_id: id.to_owned(),
                key: d.get_str("key").unwrap_or_default().to_owned(),
            };
            match newest.get(user) {
                Some(old) if !register.newer_than(old) => {}
                _ => {
                    newest.insert(user.to_owned(), register);
                }
            }
        }
        // The stored registers, so only those behind the events are written: a rebuild
        // usually finds nothing wrong, and FerretDB answers each upsert with a read and a
        // write of its own (a rebuild that set every register of its track took ≈0.1 s per
        // track at 300 events each; 450 suspect tracks after a rebalance stopped a worker for
        // 50 s in the benchmark).
        let mut stored = self
            .pairs
            .find(doc! { "track": track })
            .projection(doc! { "user": 1, "liked": 1, "stamp": 1, "event": 1, "key": 1 })
            .await
            .context("cannot read the track's registers")?;
        let mut liked = 0i64;
        let mut behind = Vec::new();
        while let Some(d) = stored.try_next().await? {
            let Ok(user) = d.get_str("user") else {
                continue;
            };
            let register = Register::from_document(&d);
            match newest.remove(user) {
                // Behind the window's newest event, or not what an event of the same order
                // says (a lost or half-applied conditional upsert is what a rebuild is for).
                Some(right) if right != register && !register.newer_than(&right) => {
                    liked += i64::from(right.liked);
                    let read = doc! { "stamp": register.stamp, "event": &register.event_id };
                    behind.push((user.to_owned(), right, read));
                }
                // As the events say, or newer than the window's events (from before it, a
                // register stays as it is and counts).
                _ => liked += i64::from(register.liked),
            }
        }
        // Users with events in the window and no register at all.
        liked += newest.values().filter(|r| r.liked).count() as i64;
        let absent = doc! { "stamp": { "$exists": false } };
        behind.extend(
            newest
                .into_iter()
                .map(|(user, r)| (user, r, absent.clone())),
        );
        // Set, not merged: these registers are exactly what the events say — if the register
        // is still the one read (else the upsert meets the stored `_id`: refused).
        let sets = behind
            .iter()
            .map(|(user, r, read)| {
                let mut q = doc! { "_id": pair_id(track, user) };
                q.extend(read.clone());
                doc! { "q": q, "u": { "$set": r.document(track, user) }, "upsert": true }
            })
            .collect();
        let (_, moved) = self.update_guarded("pairs", sets).await?;
        self.update_many_statements(
            "track_counts",
            vec![
                doc! { "q": { "_id": track }, "u": { "$set": { "count": liked } }, "upsert": true },
            ],
        )
        .await?;
        if !moved.is_empty() {
            tracing::info!(%track, registers = moved.len(), "registers moved during a rebuild; rebuilding it again later");
        }
        Ok(moved.is_empty())
    }

    /// Asks whoever holds each track's partition to rebuild it once `after` has passed (wall
    /// clock: workers' clocks only need to agree to well within the 20 s delay); a window
    /// already asked for only widens, and a later ask postpones it (its straggler may still be
    /// writing).
    pub async fn request_rebuilds(
        &self,
        tracks: &[(String, Window, std::time::Duration)],
    ) -> anyhow::Result<()> {
        let now = now_ms();
        let updates = tracks
            .iter()
            .map(|(track, window, after)| {
                let due = now.saturating_add(after.as_millis() as i64);
                doc! {
                    "q": { "_id": track },
                    "u": {
                        "$set": { "partition": window.partition, "asked_at_ms": now },
                        "$min": { "since_ms": window.since_ms },
                        "$max": { "due_ms": due },
                    },
                    "upsert": true,
                }
            })
            .collect();
        self.update_many_statements("rebuilds", updates)
            .await
            .context("cannot hand rebuilds over")?;
        Ok(())
    }

    /// Rebuilds asked for in these partitions that are due (requests of older workers carry
    /// no due time: due at once).
    pub async fn requested_rebuilds(&self, partitions: &[i32]) -> anyhow::Result<Vec<Request>> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let due = doc! { "$or": [
            { "due_ms": { "$lte": now_ms() } },
            { "due_ms": { "$exists": false } },
        ] };
        let mut filter = doc! { "partition": { "$in": partitions } };
        filter.extend(due);
        let found: Vec<Document> = self
            .db
            .collection::<Document>("rebuilds")
            .find(filter)
            .limit(REQUESTS_PER_LOOK)
            .await
            .context("cannot read rebuild requests")?
            .try_collect()
            .await
            .context("cannot read rebuild requests")?;
        Ok(found
            .iter()
            .filter_map(|d| {
                Some(Request {
                    track: d.get_str("_id").ok()?.to_owned(),
                    partition: number(d, "partition") as i32,
                    // Absent in requests of older workers: the whole history.
                    since_ms: d
                        .get("since_ms")
                        .map_or(i64::MIN, |_| number(d, "since_ms")),
                    asked_at_ms: number(d, "asked_at_ms"),
                })
            })
            .collect())
    }

    /// Takes a request off once its rebuild is done (unless it was asked for again since).
    pub async fn rebuild_done(&self, request: &Request) -> anyhow::Result<()> {
        self.db
            .collection::<Document>("rebuilds")
            .delete_one(doc! { "_id": &request.track, "asked_at_ms": request.asked_at_ms })
            .await
            .context("cannot take a rebuild request off")?;
        Ok(())
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
