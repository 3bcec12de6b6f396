//! MongoDB, where persistence workers keep every like for analytics, and nodes read history.
//!
//! Collections (see `docs/events.md`):
//! - `likes`: one document per event, `_id` = event id. Inserted unordered in bulk; a
//!   duplicate-key error (11000) means "already stored", which is what makes replays harmless.
//!
//! The state of a (track, user) pair is its newest stored event (highest `version`); it is not
//! kept a second time (see `docs/events.md`, "Pair state").
//! - `track_counts`: per-track totals (`count`, `likes`, `unlikes`, `events`, and `digest_a`/
//!   `digest_b`, sums of `event_digest` over the stored events, for the Redis write-back).
//! - `track_minutes`: likes/unlikes per track per UTC minute, for history.
//!
//! Totals are `$inc`remented for events this batch inserted. When a batch meets an event that
//! was already stored (a replay after a crash, or a node re-sending after a Kafka outage) the
//! increments of the first attempt may or may not have happened, so the totals it touches are
//! recomputed from `likes` instead. Events of one track share a partition, so
//! one worker at a time writes a track's totals.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use anyhow::Context;
use async_trait::async_trait;
use futures_util::{StreamExt, TryStreamExt};
use mongodb::bson::{Document, doc};
use mongodb::error::ErrorKind;
use mongodb::{Client, Collection, Database, IndexModel};

use crate::seams::Part;
use crate::seams::event_log::{EventRecord, event_digest};
use crate::seams::history::{History, Query, Row, roll_up};

const DUPLICATE_KEY: i32 = 11000;
const MINUTE_MS: i64 = 60_000;
/// Statements per `update` command. FerretDB (on PostgreSQL) holds a pool connection for each
/// statement that matched a document until the command ends, and waits forever once its pool
/// is empty (50 by default; two workers sending 32 each hung it in a benchmark). Run FerretDB
/// with `pool_max_conns` ≥ 16 × workers + readers (the suites use 200). A real mongod takes
/// any number; the extra round trips cost little next to the writes.
const STATEMENTS_PER_UPDATE: usize = 16;
/// `update` commands one collection's totals keep in flight: FerretDB answers each with a
/// few PostgreSQL round trips, so one at a time leaves both servers mostly waiting. With the
/// two totals collections written together a worker holds ≤ 2 × 2 × 16 pool connections.
const UPDATES_IN_FLIGHT: usize = 2;

#[derive(Clone)]
pub struct MongoArchive {
    db: Database,
    likes: Collection<Document>,
    counts: Collection<Document>,
    minutes: Collection<Document>,
}

/// What one batch changed.
#[derive(Debug, Default)]
pub struct Stored {
    pub inserted: usize,
    pub duplicates: usize,
    /// Tracks whose totals changed, for the Redis write-back.
    pub tracks: BTreeSet<String>,
    /// Requests this batch sent to MongoDB (a handful per batch, whatever its size).
    pub round_trips: usize,
}

/// A track's totals as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackTotals {
    pub track: String,
    pub count: i64,
    /// Effective events stored for the track (likes + unlikes).
    pub events: i64,
    /// Sums of `event_digest` over the stored events.
    pub digest: [i64; 2],
}

impl MongoArchive {
    /// Connects lazily (the driver retries); index creation is best effort.
    pub async fn connect(url: &str, database: &str) -> anyhow::Result<MongoArchive> {
        let client = Client::with_uri_str(url)
            .await
            .with_context(|| format!("invalid MongoDB URL {url}"))?;
        let db = client.database(database);
        Ok(MongoArchive {
            likes: db.collection("likes"),
            counts: db.collection("track_counts"),
            minutes: db.collection("track_minutes"),
            db,
        })
    }

    /// The unique (track, user, key) index is part of "exactly once": two nodes can turn one
    /// client key into two events (a frozen node that had applied it, and the node its client
    /// re-sent it to after Redis lost the key), and MongoDB keeps the first.
    pub async fn ensure_indexes(&self) -> mongodb::error::Result<()> {
        let index = |keys: Document| IndexModel::builder().keys(keys).build();
        let one_per_key = mongodb::options::IndexOptions::builder()
            .unique(true)
            .name("one_event_per_key".to_owned())
            .build();
        self.likes
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "track": 1, "user": 1, "key": 1 })
                    .options(one_per_key)
                    .build(),
            )
            .await?;
        self.likes
            .create_index(index(doc! { "track": 1, "action": 1, "minute": 1 }))
            .await?;
        self.minutes
            .create_index(index(doc! { "track": 1, "minute": 1 }))
            .await?;
        Ok(())
    }

    /// Writes one batch; returns only once MongoDB acknowledged all of it. Safe to repeat.
    pub async fn store(&self, batch: &[EventRecord]) -> anyhow::Result<Stored> {
        let mut stored = Stored::default();
        if batch.is_empty() {
            return Ok(stored);
        }
        let digests: Vec<[i64; 2]> = batch.iter().map(|e| event_digest(&e.event_id)).collect();
        let duplicate = self.insert_events(batch, &digests).await?;
        stored.round_trips += 1;
        stored.duplicates = duplicate.len();
        stored.inserted = batch.len() - duplicate.len();

        // Totals: tracks and minutes touched by a duplicate are recomputed, the rest incremented.
        let mut recount_tracks: BTreeSet<&str> = BTreeSet::new();
        let mut recount_minutes: BTreeSet<(&str, i64)> = BTreeSet::new();
        for (i, e) in batch.iter().enumerate() {
            if duplicate.contains(&i) {
                recount_tracks.insert(&e.track);
                recount_minutes.insert((&e.track, minute_of(e)));
            }
        }
        let mut track_inc: BTreeMap<&str, [i64; 5]> = BTreeMap::new();
        let mut minute_inc: BTreeMap<(&str, i64), [i64; 2]> = BTreeMap::new();
        for (i, e) in batch.iter().enumerate() {
            if !stored.tracks.contains(&e.track) {
                stored.tracks.insert(e.track.clone());
            }
            if duplicate.contains(&i) {
                continue;
            }
            let like = e.action == "like";
            if !recount_tracks.contains(e.track.as_str()) {
                let t = track_inc.entry(&e.track).or_default();
                t[0] += if like { 1 } else { -1 };
                t[usize::from(!like) + 1] += 1;
                let [a, b] = digests[i];
                t[3] += a;
                t[4] += b;
            }
            if !recount_minutes.contains(&(e.track.as_str(), minute_of(e))) {
                minute_inc.entry((&e.track, minute_of(e))).or_default()[usize::from(!like)] += 1;
            }
        }
        let track_updates = track_inc
            .iter()
            .map(|(track, [count, likes, unlikes, digest_a, digest_b])| {
                doc! {
                    "q": { "_id": *track },
                    "u": { "$inc": { "count": count, "likes": likes, "unlikes": unlikes,
                                     "events": likes + unlikes,
                                     "digest_a": digest_a, "digest_b": digest_b } },
                    "upsert": true,
                }
            })
            .collect();
        let minute_updates = minute_inc
            .iter()
            .map(|((track, minute), [likes, unlikes])| {
                doc! {
                    "q": { "_id": minute_id(track, *minute) },
                    "u": { "$inc": { "likes": likes, "unlikes": unlikes },
                           "$set": { "track": *track, "minute": minute } },
                    "upsert": true,
                }
            })
            .collect();
        let (counts, minutes) = futures_util::try_join!(
            self.update_many_statements("track_counts", track_updates),
            self.update_many_statements("track_minutes", minute_updates),
        )?;
        stored.round_trips += counts + minutes;
        for track in &recount_tracks {
            stored.round_trips += self.recount_track(track).await?;
        }
        for (track, minute) in &recount_minutes {
            stored.round_trips += self.recount_minute(track, *minute).await?;
        }
        Ok(stored)
    }

    /// Inserts the events unordered; returns the batch indexes that were already stored.
    async fn insert_events(
        &self,
        batch: &[EventRecord],
        digests: &[[i64; 2]],
    ) -> anyhow::Result<HashSet<usize>> {
        let docs = batch.iter().zip(digests).map(|(e, [digest_a, digest_b])| {
            doc! {
                "_id": &e.event_id, "user": &e.user, "track": &e.track, "action": &e.action,
                "accepted_at_ms": e.accepted_at_ms, "minute": minute_of(e), "node": &e.node,
                "version": e.version as i64, "key": &e.key,
                "digest_a": digest_a, "digest_b": digest_b,
            }
        });
        match self.likes.insert_many(docs).ordered(false).await {
            Ok(_) => Ok(HashSet::new()),
            Err(err) => match duplicate_indexes(&err) {
                Some(duplicates) => Ok(duplicates),
                None => Err(anyhow::Error::new(err).context("cannot insert like events")),
            },
        }
    }

    /// `update` commands of at most `STATEMENTS_PER_UPDATE` statements, `UPDATES_IN_FLIGHT`
    /// at a time; duplicate-key errors of upserts that lost to a newer version are expected
    /// and ignored. Returns the requests sent.
    async fn update_many_statements(
        &self,
        collection: &str,
        updates: Vec<Document>,
    ) -> anyhow::Result<usize> {
        let chunks: Vec<&[Document]> = updates.chunks(STATEMENTS_PER_UPDATE).collect();
        let requests = chunks.len();
        futures_util::stream::iter(chunks)
            .map(|chunk| self.update_command(collection, chunk))
            .buffer_unordered(UPDATES_IN_FLIGHT)
            .try_collect::<()>()
            .await?;
        Ok(requests)
    }

    async fn update_command(&self, collection: &str, chunk: &[Document]) -> anyhow::Result<()> {
        let reply = self
            .db
            .run_command(doc! { "update": collection, "updates": chunk, "ordered": false })
            .await
            .with_context(|| format!("cannot update {collection}"))?;
        if let Ok(errors) = reply.get_array("writeErrors") {
            for error in errors.iter().filter_map(|e| e.as_document()) {
                let code = error.get_i32("code").unwrap_or_default();
                if code != DUPLICATE_KEY {
                    anyhow::bail!("MongoDB refused an update of {collection}: {error}");
                }
            }
        }
        if let Ok(error) = reply.get_document("writeConcernError") {
            anyhow::bail!("MongoDB write concern failed on {collection}: {error}");
        }
        Ok(())
    }

    /// The count is likes − unlikes of the stored events (every event is a change, and each
    /// user's events alternate), the same rule the increments follow. Not the pairs' newest
    /// events: versions restart when Redis loses its data, so those can trail.
    async fn recount_track(&self, track: &str) -> anyhow::Result<usize> {
        // One aggregation: counts and digest sums per action, computed by the server.
        let mut groups = self
            .likes
            .aggregate(vec![
                doc! { "$match": { "track": track } },
                doc! { "$group": { "_id": "$action", "n": { "$sum": 1 },
                "a": { "$sum": "$digest_a" }, "b": { "$sum": "$digest_b" } } },
            ])
            .await?;
        let [mut likes, mut unlikes, mut digest_a, mut digest_b] = [0i64; 4];
        while let Some(group) = groups.try_next().await? {
            match group.get_str("_id") {
                Ok("like") => likes += number(&group, "n"),
                Ok("unlike") => unlikes += number(&group, "n"),
                _ => continue,
            }
            digest_a += number(&group, "a");
            digest_b += number(&group, "b");
        }
        let totals = doc! { "count": likes - unlikes, "likes": likes, "unlikes": unlikes,
        "events": likes + unlikes, "digest_a": digest_a, "digest_b": digest_b };
        let updates = self
            .update_many_statements(
                "track_counts",
                vec![doc! { "q": { "_id": track }, "u": { "$set": totals }, "upsert": true }],
            )
            .await?;
        Ok(1 + updates)
    }

    async fn recount_minute(&self, track: &str, minute: i64) -> anyhow::Result<usize> {
        let mut totals = [0i64; 2];
        for (slot, action) in ["like", "unlike"].iter().enumerate() {
            totals[slot] = self
                .likes
                .count_documents(doc! { "track": track, "action": *action, "minute": minute })
                .await? as i64;
        }
        let set =
            doc! { "track": track, "minute": minute, "likes": totals[0], "unlikes": totals[1] };
        let updates = self
            .update_many_statements(
                "track_minutes",
                vec![doc! { "q": { "_id": minute_id(track, minute) }, "u": { "$set": set }, "upsert": true }],
            )
            .await?;
        Ok(2 + updates)
    }

    pub async fn totals(&self, tracks: &BTreeSet<String>) -> anyhow::Result<Vec<TrackTotals>> {
        let ids: Vec<&str> = tracks.iter().map(String::as_str).collect();
        let docs: Vec<Document> = self
            .counts
            .find(doc! { "_id": { "$in": ids } })
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .iter()
            .filter_map(|d| {
                Some(TrackTotals {
                    track: d.get_str("_id").ok()?.to_owned(),
                    count: number(d, "count"),
                    events: number(d, "events"),
                    digest: [number(d, "digest_a"), number(d, "digest_b")],
                })
            })
            .collect())
    }
}

impl Part for MongoArchive {
    fn name(&self) -> &'static str {
        "history (mongodb)"
    }
}

#[async_trait]
impl History for MongoArchive {
    async fn buckets(&self, query: &Query) -> anyhow::Result<Vec<Row>> {
        let minutes: Vec<Document> = self
            .minutes
            .find(doc! {
                "track": &query.track,
                "minute": { "$gte": query.start_ms, "$lt": query.end_ms },
            })
            .await
            .context("cannot query MongoDB history")?
            .try_collect()
            .await
            .context("cannot read MongoDB history")?;
        let rows = minutes.iter().map(|d| Row {
            start_ms: number(d, "minute"),
            likes: number(d, "likes").max(0) as u64,
            unlikes: number(d, "unlikes").max(0) as u64,
        });
        Ok(roll_up(rows, query.bucket)
            .into_iter()
            .filter(|r| r.likes + r.unlikes > 0)
            .collect())
    }
}

fn minute_id(track: &str, minute: i64) -> String {
    format!("{track}/{minute}")
}

fn minute_of(e: &EventRecord) -> i64 {
    e.accepted_at_ms.div_euclid(MINUTE_MS) * MINUTE_MS
}

/// The batch indexes an unordered `insert_many` found already stored, when duplicate keys
/// are all that went wrong; `None` for any other failure.
fn duplicate_indexes(err: &mongodb::error::Error) -> Option<HashSet<usize>> {
    let ErrorKind::InsertMany(failure) = &*err.kind else {
        return None;
    };
    if failure.write_concern_error.is_some() {
        return None;
    }
    let mut duplicates = HashSet::new();
    for write in failure.write_errors.iter().flatten() {
        if write.code != DUPLICATE_KEY {
            return None;
        }
        duplicates.insert(write.index);
    }
    Some(duplicates)
}

/// Integer fields may come back as int32, int64 or double depending on the server.
fn number(d: &Document, key: &str) -> i64 {
    match d.get(key) {
        Some(mongodb::bson::Bson::Int32(v)) => i64::from(*v),
        Some(mongodb::bson::Bson::Int64(v)) => *v,
        Some(mongodb::bson::Bson::Double(v)) => *v as i64,
        _ => 0,
    }
}
