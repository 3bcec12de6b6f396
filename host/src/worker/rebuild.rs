//! Rebuilding a track's stored registers and count from its events, and the `rebuilds`
//! collection of requests for it.
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

/// A track whose rebuild another worker asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub track: String,
    pub partition: i32,
    /// When it was asked for (ms): a request made again later is not taken off by the
    /// rebuild of an earlier one.
    pub asked_at_ms: i64,
}

impl MongoArchive {
    /// Rebuilds a track's registers from its stored events (each user's newest by stamp, then
    /// event id) and sets its count from them (`repair`: only while no other worker writes
    /// the track; the worker's own loop runs it, between batches).
    pub async fn rebuild_track(&self, track: &str) -> anyhow::Result<()> {
        let mut events = self
            .likes
            .find(doc! { "track": track })
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
        // The stored registers, so only those that differ from what the events say are
        // written: a rebuild usually finds nothing wrong, and FerretDB answers each upsert
        // with a read and a write of its own (a rebuild that set every register of its track
        // took ≈0.1 s per track at 300 events each; 450 suspect tracks after a rebalance
        // stopped a worker for 50 s in the benchmark).
        let mut stored = self
            .pairs
            .find(doc! { "track": track })
            .projection(doc! { "user": 1, "liked": 1, "stamp": 1, "event": 1, "key": 1 })
            .await
            .context("cannot read the track's registers")?;
        let counted_likes = newest.values().filter(|r| r.liked).count() as i64;
        let mut liked = 0i64;
        while let Some(d) = stored.try_next().await? {
            let Ok(user) = d.get_str("user") else {
                continue;
            };
            let register = Register::from_document(&d);
            match newest.get(user) {
                Some(right) if *right == register => {
                    newest.remove(user);
                }
                Some(_) => {}
                // A register no stored event explains stays as it is, and counts.
                None => liked += i64::from(register.liked),
            }
        }
        // Set, not merged: the registers are exactly what the events say (a lost or refused
        // conditional upsert is what a rebuild is for).
        let sets = newest
            .iter()
            .map(|(user, r)| {
                doc! {
                    "q": { "_id": pair_id(track, user) },
                    "u": { "$set": r.document(track, user) },
                    "upsert": true,
                }
            })
            .collect();
        self.update_many_statements("pairs", sets).await?;
        let count = liked + counted_likes;
        self.update_many_statements(
            "track_counts",
            vec![
                doc! { "q": { "_id": track }, "u": { "$set": { "count": count } }, "upsert": true },
            ],
        )
        .await?;
        Ok(())
    }

    /// Asks whoever holds each track's partition to rebuild it.
    pub async fn request_rebuilds(&self, tracks: &[(String, i32)]) -> anyhow::Result<()> {
        let now = now_ms();
        let updates = tracks
            .iter()
            .map(|(track, partition)| {
                doc! {
                    "q": { "_id": track },
                    "u": { "$set": { "partition": partition, "asked_at_ms": now } },
                    "upsert": true,
                }
            })
            .collect();
        self.update_many_statements("rebuilds", updates)
            .await
            .context("cannot hand rebuilds over")?;
        Ok(())
    }

    /// Rebuilds asked for in these partitions.
    pub async fn requested_rebuilds(&self, partitions: &[i32]) -> anyhow::Result<Vec<Request>> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let found: Vec<Document> = self
            .db
            .collection::<Document>("rebuilds")
            .find(doc! { "partition": { "$in": partitions } })
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
