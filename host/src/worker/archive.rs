//! MongoDB, where persistence workers keep every like for analytics, and nodes read history.
//!
//! Collections (see `docs/events.md`):
//! - `likes`: one document per event, `_id` = event id. Inserted unordered in bulk; a
//!   duplicate-key error (11000) means "already stored", which is what makes replays harmless.
//! - `pairs`: each (track, user) pair's last-writer-wins register — its newest event by
//!   (stamp, event id): state, stamp, event id (`_id` = track, newline, user).
//! - `track_counts`: per-track `count` (pairs whose register says liked).
//! - `track_minutes`: likes/unlikes per track per UTC minute that changed a pair's state as
//!   the deciding node saw it, for history.
//!
//! A batch merges each pair's newest event into its register (an insert for a new pair, else
//! an upsert that only takes a newer one), then moves each touched track's count by the
//! register changes it made, guarded so a replay cannot add twice; whatever it cannot be sure
//! of is rebuilt later (see `store`). So replays after a crash, re-sent events and two
//! workers storing one batch at a rebalance all end in the same registers and counts.
//! History minutes are incremented for newly inserted events and recounted from `likes` when
//! a batch meets an already-stored one.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use anyhow::Context;
use async_trait::async_trait;
use futures_util::{StreamExt, TryStreamExt};
use mongodb::bson::{Document, doc};
use mongodb::error::ErrorKind;
use mongodb::{Client, Collection, Database, IndexModel};

use crate::event::LikeEvent;
use crate::seams::Part;
use crate::seams::history::{History, Query, RollUp, Row};
use crate::worker::register::{Register, number};

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
/// Not more: at 4, two workers' totals (2 × 2 × 4 × 16 = 256 > 200) emptied FerretDB's pool
/// in the benchmark and both workers hung for good (200 idle PostgreSQL connections).
const UPDATES_IN_FLIGHT: usize = 2;

#[derive(Clone)]
pub struct MongoArchive {
    pub(super) db: Database,
    pub(super) likes: Collection<Document>,
    pub(super) pairs: Collection<Document>,
    minutes: Collection<Document>,
    /// Pairs known to have a register (pairs are never deleted): their next register skips
    /// the bulk insert, which FerretDB retries row by row once any row of a hundred exists
    /// (≈1 500 rows/s). Only a hint: the conditional upsert is right either way.
    pub(super) known_pairs: moka::sync::Cache<String, ()>,
}

/// Pairs the worker remembers as stored (≈100 B each).
const KNOWN_PAIRS: u64 = 200_000;

/// What one batch changed.
#[derive(Debug, Default)]
pub struct Stored {
    pub inserted: usize,
    pub duplicates: usize,
    /// Requests this batch sent to MongoDB.
    pub round_trips: usize,
    /// Tracks (with their partition) whose count this batch could not be sure of: to be
    /// rebuilt from their events.
    pub suspect: Vec<(String, i32)>,
    /// Time spent per step, in [`STEPS`] order.
    pub step_times: [std::time::Duration; 3],
}

/// The steps of [`MongoArchive::store`], for the worker's time-per-step metric.
pub const STEPS: [&str; 3] = ["insert_events", "merge_registers", "set_totals"];

/// Where an event sits in the topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogPosition {
    pub partition: i32,
    pub offset: i64,
}

/// The offsets of one batch's events for one totals document (a track, or a track-minute; a
/// track's events share a partition). Each totals document records, per partition, the last
/// offset it was brought up to (`log.<partition>`): an increment applies only if the
/// document is not already past the batch's first event, and a recount only if it is not
/// past the batch's last. So when two workers write the same events at a rebalance, one
/// increments and the other recounts, or both recount, and a total is never counted twice.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    partition: i32,
    first: i64,
    last: i64,
}

impl Span {
    fn widen<K>(entry: std::collections::btree_map::Entry<'_, K, Span>, at: &LogPosition)
    where
        K: Ord,
    {
        let span = entry.or_insert(Span {
            partition: at.partition,
            first: at.offset,
            last: at.offset,
        });
        span.first = span.first.min(at.offset);
        span.last = span.last.max(at.offset);
    }

    fn field(&self) -> String {
        format!("log.{}", self.partition)
    }

    fn increment(&self, id: &str, inc: Document, mut set: Document) -> Document {
        set.insert(self.field(), self.last);
        doc! {
            "q": { "_id": id, "$or": [
                { self.field(): { "$lt": self.first } },
                { self.field(): { "$exists": false } },
            ] },
            "u": { "$inc": inc, "$set": set },
            "upsert": true,
        }
    }

    fn replace(&self, id: &str, mut set: Document) -> Document {
        set.insert(self.field(), self.last);
        doc! {
            "q": { "_id": id, "$or": [
                { self.field(): { "$lte": self.last } },
                { self.field(): { "$exists": false } },
            ] },
            "u": { "$set": set },
            "upsert": true,
        }
    }
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
            pairs: db.collection("pairs"),
            known_pairs: moka::sync::Cache::new(KNOWN_PAIRS),
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
        if self.is_ferretdb().await {
            // FerretDB 1.24 serves no query from a secondary index (it pushes an equality
            // down as `_jsonb->'f' @> …`, which only the GIN indexes of
            // scripts/ferretdb-postgres.sql serve): these would only cost a PostgreSQL btree
            // write per document.
            return Ok(());
        }
        self.likes
            .create_index(index(doc! { "track": 1, "action": 1, "minute": 1 }))
            .await?;
        // A rebuild reads a track's events from a stamp on (`rebuild`).
        self.likes
            .create_index(index(doc! { "track": 1, "accepted_at_ms": 1 }))
            .await?;
        self.minutes
            .create_index(index(doc! { "track": 1, "minute": 1 }))
            .await?;
        self.pairs
            .create_index(index(doc! { "track": 1, "liked": 1 }))
            .await?;
        Ok(())
    }

    /// FerretDB says so in `buildInfo`; a server that does not answer counts as MongoDB.
    async fn is_ferretdb(&self) -> bool {
        self.db
            .run_command(doc! { "buildInfo": 1 })
            .await
            .is_ok_and(|info| info.contains_key("ferretdbVersion"))
    }

    /// Writes one batch (`positions[i]` is where `batch[i]` sits in the topic); returns only
    /// once MongoDB acknowledged all of it. Safe to repeat, and safe while another worker
    /// writes the same events (the moment of a rebalance):
    ///
    /// 1. the events are inserted (a duplicate key = already stored);
    /// 2. each pair's newest event of the batch becomes its register: one bulk insert for the
    ///    pairs that have none (most: a first like), an upsert that only takes a newer
    ///    register for the rest (a round trip and a PostgreSQL commit each in FerretDB), so
    ///    any number of writers, in any order, replays included, leave the same registers;
    /// 3. each touched track's count moves by the register changes step 2 made (an insert,
    ///    or an upsert's previous register), guarded by the log offset the count was brought
    ///    up to ([`Span`]), so a replayed batch cannot add twice.
    ///
    /// A count is never read back per batch: FerretDB counts by decoding every matching
    /// document, so a recount per batch grows with a track's likers (52 % of the store's
    /// time at 300 000 pairs, docs/benchmarks.md). Whatever an increment cannot be sure of
    /// — an event already stored or a register already as new as ours (a replay: did the
    /// first attempt add its change? a second writer?), a refused increment — names the track in
    /// [`Stored::suspect`], and the worker rebuilds it from its events a while later
    /// (`repair`). Two workers that read one count and incremented around each other is how
    /// the first version of this went wrong (docs/reliability.md, found 10); an increment here
    /// only ever adds changes that the same worker's register write made.
    pub async fn store(
        &self,
        batch: &[LikeEvent],
        positions: &[LogPosition],
    ) -> anyhow::Result<Stored> {
        let mut stored = Stored::default();
        if batch.is_empty() {
            return Ok(stored);
        }
        anyhow::ensure!(batch.len() == positions.len(), "one position per event");
        let mut step = std::time::Instant::now();
        let mut lap = |stored: &mut Stored, i: usize| {
            stored.step_times[i] += step.elapsed();
            step = std::time::Instant::now();
        };
        let duplicate = self.insert_events(batch).await?;
        lap(&mut stored, 0);
        stored.round_trips += 1;
        stored.duplicates = duplicate.len();
        stored.inserted = batch.len() - duplicate.len();

        let mut track_spans: BTreeMap<&str, Span> = BTreeMap::new();
        let mut minute_spans: BTreeMap<(&str, i64), Span> = BTreeMap::new();
        let mut newest: BTreeMap<(&str, &str), &LikeEvent> = BTreeMap::new();
        for (e, at) in batch.iter().zip(positions) {
            Span::widen(track_spans.entry(&e.track), at);
            Span::widen(minute_spans.entry((&e.track, minute_of(e))), at);
            let slot = newest.entry((&e.track, &e.user)).or_insert(e);
            if Register::of(e).newer_than(&Register::of(slot)) {
                *slot = e;
            }
        }
        // History: minutes touched by a duplicate are recounted, the rest incremented.
        let mut recount_minutes: BTreeMap<(&str, i64), Span> = BTreeMap::new();
        for &i in &duplicate {
            let e = &batch[i];
            if e.changed {
                let minute = (&*e.track, minute_of(e));
                recount_minutes.insert(minute, minute_spans[&minute]);
            }
        }
        let mut minute_inc: BTreeMap<(&str, i64), [i64; 2]> = BTreeMap::new();
        for (i, e) in batch.iter().enumerate() {
            let minute = (&*e.track, minute_of(e));
            if duplicate.contains(&i) || !e.changed || recount_minutes.contains_key(&minute) {
                continue;
            }
            minute_inc.entry(minute).or_default()[usize::from(!e.liked())] += 1;
        }

        let newest: Vec<((&str, &str), Register)> = newest
            .into_iter()
            .map(|(pair, e)| (pair, Register::of(e)))
            .collect();
        let registers = self.write_registers(&newest).await?;
        stored.round_trips += registers.round_trips;
        // An event already stored (a replay or a second writer, which may or may not have
        // counted its change), or a register already as new as ours.
        let mut suspect: BTreeSet<&str> = duplicate.iter().map(|&i| &*batch[i].track).collect();
        suspect.extend(registers.refused);
        let mut change = registers.count_change;
        lap(&mut stored, 1);

        // A suspect track's guard is brought up to this batch even with nothing to add, so the
        // other writer's increment, if it comes later, is refused and makes it suspect too
        // (its rebuild then comes after its own write, not only after ours).
        for track in &suspect {
            change.entry(track).or_insert(0);
        }
        change.retain(|track, by| *by != 0 || suspect.contains(track));
        let count_keys: Vec<&str> = change.keys().copied().collect();
        let count_updates = change
            .iter()
            .map(|(track, by)| {
                track_spans[track].increment(track, doc! { "count": by }, Document::new())
            })
            .collect();
        let minute_keys: Vec<(&str, i64)> = minute_inc.keys().copied().collect();
        let minute_updates = minute_inc
            .iter()
            .map(|(&(track, minute), [likes, unlikes])| {
                minute_spans[&(track, minute)].increment(
                    &minute_id(track, minute),
                    doc! { "likes": likes, "unlikes": unlikes },
                    doc! { "track": track, "minute": minute },
                )
            })
            .collect();
        let ((counts, refused_counts), (minutes, refused_minutes)) = futures_util::try_join!(
            self.update_guarded("track_counts", count_updates),
            self.update_guarded("track_minutes", minute_updates),
        )?;
        stored.round_trips += counts + minutes;
        suspect.extend(refused_counts.iter().filter_map(|&i| count_keys.get(i)));
        stored.suspect = suspect
            .into_iter()
            .map(|track| (track.to_owned(), track_spans[track].partition))
            .collect();
        // A refused increment: another worker already brought that minute past this batch's
        // first event; recounting after our events are stored is right either way.
        for i in refused_minutes {
            if let Some(minute) = minute_keys.get(i) {
                recount_minutes.insert(*minute, minute_spans[minute]);
            }
        }
        for ((track, minute), span) in &recount_minutes {
            stored.round_trips += self.recount_minute(track, *minute, span).await?;
        }
        lap(&mut stored, 2);
        Ok(stored)
    }

    /// Inserts the events unordered; returns the batch indexes that were already stored.
    async fn insert_events(&self, batch: &[LikeEvent]) -> anyhow::Result<HashSet<usize>> {
        let docs = batch.iter().map(|e| {
            doc! {
                "_id": &e.event_id, "user": &*e.user, "track": &*e.track, "action": e.action.as_str(),
                "accepted_at_ms": e.accepted_at_ms, "minute": minute_of(e), "node": &*e.node,
                "version": e.version as i64, "key": &e.key, "changed": e.changed,
            }
        });
        insert_unordered(&self.likes, docs)
            .await
            .context("cannot insert like events")
    }

    /// `update` commands of at most `STATEMENTS_PER_UPDATE` statements, `UPDATES_IN_FLIGHT`
    /// at a time; duplicate-key errors of upserts that lost to a newer version are expected
    /// and ignored. Returns the requests sent.
    pub(super) async fn update_many_statements(
        &self,
        collection: &str,
        updates: Vec<Document>,
    ) -> anyhow::Result<usize> {
        Ok(self.update_guarded(collection, updates).await?.0)
    }

    /// Like `update_many_statements`, and also returns the indexes of the statements that
    /// were refused with a duplicate key (a guarded upsert whose condition did not hold).
    pub(super) async fn update_guarded(
        &self,
        collection: &str,
        updates: Vec<Document>,
    ) -> anyhow::Result<(usize, Vec<usize>)> {
        let chunks: Vec<(usize, &[Document])> = updates
            .chunks(STATEMENTS_PER_UPDATE)
            .enumerate()
            .map(|(i, chunk)| (i * STATEMENTS_PER_UPDATE, chunk))
            .collect();
        let requests = chunks.len();
        let refused: Vec<Vec<usize>> = futures_util::stream::iter(chunks)
            .map(|(start, chunk)| async move {
                let refused = self.update_command(collection, chunk).await?;
                Ok::<_, anyhow::Error>(refused.into_iter().map(|i| start + i).collect())
            })
            .buffer_unordered(UPDATES_IN_FLIGHT)
            .try_collect()
            .await?;
        Ok((requests, refused.into_iter().flatten().collect()))
    }

    /// Returns the statements refused with a duplicate key; fails on any other error.
    async fn update_command(
        &self,
        collection: &str,
        chunk: &[Document],
    ) -> anyhow::Result<Vec<usize>> {
        let reply = self
            .db
            .run_command(doc! { "update": collection, "updates": chunk, "ordered": false })
            .await
            .with_context(|| format!("cannot update {collection}"))?;
        let mut refused = Vec::new();
        if let Ok(errors) = reply.get_array("writeErrors") {
            for error in errors.iter().filter_map(|e| e.as_document()) {
                let code = error.get_i32("code").unwrap_or_default();
                if code != DUPLICATE_KEY {
                    anyhow::bail!("MongoDB refused an update of {collection}: {error}");
                }
                refused.push(number(error, "index").max(0) as usize);
            }
        }
        if let Ok(error) = reply.get_document("writeConcernError") {
            anyhow::bail!("MongoDB write concern failed on {collection}: {error}");
        }
        Ok(refused)
    }

    async fn recount_minute(&self, track: &str, minute: i64, span: &Span) -> anyhow::Result<usize> {
        let mut totals = [0i64; 2];
        for (slot, action) in ["like", "unlike"].iter().enumerate() {
            totals[slot] = self
                .likes
                .count_documents(
                    doc! { "track": track, "action": *action, "minute": minute, "changed": { "$ne": false } },
                )
                .await? as i64;
        }
        let set =
            doc! { "track": track, "minute": minute, "likes": totals[0], "unlikes": totals[1] };
        let updates = self
            .update_many_statements(
                "track_minutes",
                vec![span.replace(&minute_id(track, minute), set)],
            )
            .await?;
        Ok(2 + updates)
    }
}

/// Every stored register, as (track, user, register), for refilling a Redis that lost its
/// data.
pub type Registers = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = anyhow::Result<(String, String, Register)>> + Send>,
>;

impl MongoArchive {
    pub async fn all_registers(&self) -> anyhow::Result<Registers> {
        let cursor = self
            .pairs
            .find(doc! {})
            .await
            .context("cannot read pair registers")?;
        Ok(Box::pin(cursor.map(|d| {
            let d = d.context("cannot read pair registers")?;
            let track = d.get_str("track").unwrap_or_default().to_owned();
            let user = d.get_str("user").unwrap_or_default().to_owned();
            Ok((track, user, Register::from_document(&d)))
        })))
    }

    /// The Redis epoch this store's registers were last merged into (see `redis_merge`).
    pub async fn refilled_epoch(&self) -> anyhow::Result<Option<String>> {
        let meta = self.db.collection::<Document>("meta");
        let found = meta
            .find_one(doc! { "_id": "redis_refilled_epoch" })
            .await?;
        Ok(found.and_then(|d| d.get_str("epoch").ok().map(str::to_owned)))
    }

    pub async fn set_refilled_epoch(&self, epoch: &str) -> anyhow::Result<()> {
        self.db
            .collection::<Document>("meta")
            .update_one(
                doc! { "_id": "redis_refilled_epoch" },
                doc! { "$set": { "epoch": epoch } },
            )
            .upsert(true)
            .await?;
        Ok(())
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
        // Streamed: at most MAX_RANGE_DAYS of minute documents pass through, one at a time.
        let mut minutes = self
            .minutes
            .find(doc! {
                "track": &query.track,
                "minute": { "$gte": query.start_ms, "$lt": query.end_ms },
            })
            .await
            .context("cannot query MongoDB history")?;
        let mut rows = RollUp::new(query.bucket);
        while let Some(d) = minutes
            .try_next()
            .await
            .context("cannot read MongoDB history")?
        {
            rows.add(Row {
                start_ms: number(&d, "minute"),
                likes: number(&d, "likes").max(0) as u64,
                unlikes: number(&d, "unlikes").max(0) as u64,
            });
        }
        Ok(rows.finish())
    }
}

fn minute_id(track: &str, minute: i64) -> String {
    format!("{track}/{minute}")
}

fn minute_of(e: &LikeEvent) -> i64 {
    e.accepted_at_ms.div_euclid(MINUTE_MS) * MINUTE_MS
}

/// Inserts unordered; returns the indexes of the documents whose `_id` (or another unique
/// key) was already stored. Any other failure is an error.
pub(super) async fn insert_unordered(
    collection: &Collection<Document>,
    docs: impl IntoIterator<Item = Document>,
) -> mongodb::error::Result<HashSet<usize>> {
    match collection.insert_many(docs).ordered(false).await {
        Ok(_) => Ok(HashSet::new()),
        Err(err) => duplicate_indexes(&err).ok_or(err),
    }
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

pub(super) fn is_duplicate_key(err: &mongodb::error::Error) -> bool {
    match &*err.kind {
        ErrorKind::Command(e) => e.code == DUPLICATE_KEY,
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(e)) => e.code == DUPLICATE_KEY,
        _ => false,
    }
}
