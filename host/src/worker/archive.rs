//! MongoDB, where persistence workers keep every like for analytics, and nodes read history.
//!
//! Collections (see `docs/events.md`):
//! - `likes`: one document per event, `_id` = event id. Inserted unordered in bulk; a
//!   duplicate-key error (11000) means "already stored", which is what makes replays harmless.
//! - `pairs`: each (track, user) pair's last-writer-wins register — its newest event by
//!   (stamp, event id): state, stamp, event id (`_id` = track, newline, user).
//! - `track_counts`: per-track `count` (pairs whose register says liked) and `events` (stored
//!   events).
//! - `track_minutes`: likes/unlikes per track per UTC minute that changed a pair's state as
//!   the deciding node saw it, for history.
//!
//! A batch's new events are merged into the registers of their pairs; the count moves only
//! when a register's state does (the same rule as the Redis script, so both agree whatever
//! order events arrive in). When a batch meets an event that was already stored (a replay
//! after a crash, or a node re-sending after a Kafka outage) the first attempt may or may not
//! have reached the registers and totals, so the tracks it touches are recounted from `likes`
//! instead. Events of one track share a partition, so one worker at a time writes a track's
//! registers and totals.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::Context;
use async_trait::async_trait;
use futures_util::{StreamExt, TryStreamExt};
use mongodb::bson::{Document, doc};
use mongodb::error::ErrorKind;
use mongodb::{Client, Collection, Database, IndexModel};

use crate::seams::Part;
use crate::seams::event_log::EventRecord;
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

/// Register reads in flight per batch (one `find` by `_id` each).
const READS_IN_FLIGHT: usize = 16;

#[derive(Clone)]
pub struct MongoArchive {
    db: Database,
    likes: Collection<Document>,
    pairs: Collection<Document>,
    minutes: Collection<Document>,
}

/// What one batch changed.
#[derive(Debug, Default)]
pub struct Stored {
    pub inserted: usize,
    pub duplicates: usize,
    /// Registers whose state this batch changed (a like or unlike that counted).
    pub transitions: usize,
    /// Requests this batch sent to MongoDB.
    pub round_trips: usize,
}

/// A pair's register: its newest event, ordered by (stamp, event id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Register {
    pub liked: bool,
    pub stamp: i64,
    pub event_id: String,
    /// The client key of that event (so a refilled Redis still recognises its re-send).
    pub key: String,
}

impl Register {
    fn of(e: &EventRecord) -> Register {
        Register {
            liked: e.action == "like",
            stamp: e.accepted_at_ms,
            event_id: e.event_id.clone(),
            key: e.key.clone(),
        }
    }

    /// The last-writer-wins order (the Redis script compares the same way: stamps as numbers,
    /// then event ids as byte strings).
    pub fn newer_than(&self, other: &Register) -> bool {
        (self.stamp, self.event_id.as_str()) > (other.stamp, other.event_id.as_str())
    }

    /// An upsert that takes this register only if it is newer than the stored one (a refused
    /// upsert is a duplicate-key error, ignored): registers only move forward, whoever writes.
    fn merge_statement(&self, track: &str, user: &str) -> Document {
        doc! {
            "q": { "_id": pair_id(track, user), "$or": [
                { "stamp": { "$lt": self.stamp } },
                { "stamp": self.stamp, "event": { "$lt": &self.event_id } },
            ] },
            "u": { "$set": self.document(track, user) },
            "upsert": true,
        }
    }

    fn document(&self, track: &str, user: &str) -> Document {
        doc! { "track": track, "user": user, "liked": self.liked, "stamp": self.stamp,
        "event": &self.event_id, "key": &self.key }
    }
}

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

fn pair_id(track: &str, user: &str) -> String {
    // Neither ids may contain a newline, so the joined id is unambiguous.
    format!("{track}\n{user}")
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

    /// Writes one batch (`positions[i]` is where `batch[i]` sits in the topic); returns only
    /// once MongoDB acknowledged all of it. Safe to repeat, and safe while another worker
    /// writes the same events (the moment of a rebalance): see [`Span`].
    pub async fn store(
        &self,
        batch: &[EventRecord],
        positions: &[LogPosition],
    ) -> anyhow::Result<Stored> {
        let mut stored = Stored::default();
        if batch.is_empty() {
            return Ok(stored);
        }
        anyhow::ensure!(batch.len() == positions.len(), "one position per event");
        let duplicate = self.insert_events(batch).await?;
        stored.round_trips += 1;
        stored.duplicates = duplicate.len();
        stored.inserted = batch.len() - duplicate.len();

        // Tracks and minutes touched by a duplicate are recounted, the rest merged.
        let mut recount_tracks: BTreeMap<&str, Span> = BTreeMap::new();
        let mut recount_minutes: BTreeMap<(&str, i64), Span> = BTreeMap::new();
        let mut track_spans: BTreeMap<&str, Span> = BTreeMap::new();
        let mut minute_spans: BTreeMap<(&str, i64), Span> = BTreeMap::new();
        for (e, at) in batch.iter().zip(positions) {
            Span::widen(track_spans.entry(&e.track), at);
            Span::widen(minute_spans.entry((&e.track, minute_of(e))), at);
        }
        for &i in &duplicate {
            let e = &batch[i];
            recount_tracks.insert(&e.track, track_spans[e.track.as_str()]);
            if e.changed {
                let minute = (e.track.as_str(), minute_of(e));
                recount_minutes.insert(minute, minute_spans[&minute]);
            }
        }
        // Each pair's newest new event, and per track the events it gained.
        let mut newest: BTreeMap<(&str, &str), &EventRecord> = BTreeMap::new();
        let mut track_events: BTreeMap<&str, i64> = BTreeMap::new();
        let mut minute_inc: BTreeMap<(&str, i64), [i64; 2]> = BTreeMap::new();
        for (i, e) in batch.iter().enumerate() {
            if duplicate.contains(&i) {
                continue;
            }
            if e.changed && !recount_minutes.contains_key(&(e.track.as_str(), minute_of(e))) {
                let slot = usize::from(e.action != "like");
                minute_inc.entry((&e.track, minute_of(e))).or_default()[slot] += 1;
            }
            if recount_tracks.contains_key(e.track.as_str()) {
                continue;
            }
            *track_events.entry(&e.track).or_default() += 1;
            let slot = newest.entry((&e.track, &e.user)).or_insert(e);
            if Register::of(e).newer_than(&Register::of(slot)) {
                *slot = e;
            }
        }
        let pairs: Vec<(&str, &str)> = newest.keys().copied().collect();
        let (registers, reads) = self.read_registers(&pairs).await?;
        stored.round_trips += reads;

        let mut count_inc: BTreeMap<&str, i64> = BTreeMap::new();
        let mut register_updates = Vec::new();
        for ((track, user), e) in &newest {
            let new = Register::of(e);
            let old = registers.get(&pair_id(track, user));
            if old.is_some_and(|old| !new.newer_than(old)) {
                continue;
            }
            let was_liked = old.is_some_and(|old| old.liked);
            if was_liked != new.liked {
                *count_inc.entry(track).or_default() += if new.liked { 1 } else { -1 };
                stored.transitions += 1;
            }
            register_updates.push(new.merge_statement(track, user));
        }
        let track_keys: Vec<&str> = track_events.keys().copied().collect();
        let track_updates = track_events
            .iter()
            .map(|(track, events)| {
                let count = count_inc.get(track).copied().unwrap_or(0);
                track_spans[track].increment(
                    track,
                    doc! { "count": count, "events": events },
                    doc! {},
                )
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
        // Registers first: a crash before the totals leaves the events stored, so the replay
        // recounts these tracks.
        stored.round_trips += self
            .update_many_statements("pairs", register_updates)
            .await?;
        let ((counts, refused_tracks), (minutes, refused_minutes)) = futures_util::try_join!(
            self.update_guarded("track_counts", track_updates),
            self.update_guarded("track_minutes", minute_updates),
        )?;
        stored.round_trips += counts + minutes;
        // Refused increments: another worker already brought these totals past this batch's
        // first event (it recounted them, or stored the same events first), and may not have
        // seen all of ours. Recounting after our events are stored is right either way.
        for i in refused_tracks {
            if let Some(track) = track_keys.get(i) {
                recount_tracks.insert(track, track_spans[track]);
            }
        }
        for i in refused_minutes {
            if let Some(minute) = minute_keys.get(i) {
                recount_minutes.insert(*minute, minute_spans[minute]);
            }
        }
        for (track, span) in &recount_tracks {
            stored.round_trips += self.recount_track(track, span).await?;
        }
        for ((track, minute), span) in &recount_minutes {
            stored.round_trips += self.recount_minute(track, *minute, span).await?;
        }
        Ok(stored)
    }

    /// The stored registers of `pairs`, by pair id; one `find` by `_id` each, a few in flight
    /// (an `$in` over many ids is not pushed down to PostgreSQL by FerretDB 1.24: it reads
    /// the whole collection). Returns the requests sent too.
    async fn read_registers(
        &self,
        pairs: &[(&str, &str)],
    ) -> anyhow::Result<(HashMap<String, Register>, usize)> {
        let found: Vec<Option<(String, Register)>> = futures_util::stream::iter(pairs)
            .map(|(track, user)| async move {
                let id = pair_id(track, user);
                let found = self
                    .pairs
                    .find_one(doc! { "_id": &id })
                    .await
                    .context("cannot read pair registers")?;
                Ok::<_, anyhow::Error>(found.map(|d| (id, register_of(&d))))
            })
            .buffer_unordered(READS_IN_FLIGHT)
            .try_collect()
            .await?;
        Ok((found.into_iter().flatten().collect(), pairs.len()))
    }

    /// Inserts the events unordered; returns the batch indexes that were already stored.
    async fn insert_events(&self, batch: &[EventRecord]) -> anyhow::Result<HashSet<usize>> {
        let docs = batch.iter().map(|e| {
            doc! {
                "_id": &e.event_id, "user": &e.user, "track": &e.track, "action": &e.action,
                "accepted_at_ms": e.accepted_at_ms, "minute": minute_of(e), "node": &e.node,
                "version": e.version as i64, "key": &e.key, "changed": e.changed,
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
        Ok(self.update_guarded(collection, updates).await?.0)
    }

    /// Like `update_many_statements`, and also returns the indexes of the statements that
    /// were refused with a duplicate key (a guarded upsert whose condition did not hold).
    async fn update_guarded(
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

    /// Rebuilds a track's count and registers from its stored events: each user's newest
    /// event by (stamp, event id) is the pair's register; the count is how many say liked.
    async fn recount_track(&self, track: &str, span: &Span) -> anyhow::Result<usize> {
        let mut events = self
            .likes
            .find(doc! { "track": track })
            .projection(doc! { "user": 1, "action": 1, "accepted_at_ms": 1, "key": 1 })
            .await?;
        let mut registers: HashMap<String, Register> = HashMap::new();
        let mut stored_events = 0i64;
        while let Some(d) = events.try_next().await? {
            stored_events += 1;
            let (Ok(user), Ok(id)) = (d.get_str("user"), d.get_str("_id")) else {
                continue;
            };
            let register = Register {
                liked: d.get_str("action") == Ok("like"),
                stamp: number(&d, "accepted_at_ms"),
                event_id: id.to_owned(),
                key: d.get_str("key").unwrap_or_default().to_owned(),
            };
            match registers.get_mut(user) {
                Some(old) if !register.newer_than(old) => {}
                Some(old) => *old = register,
                None => {
                    registers.insert(user.to_owned(), register);
                }
            }
        }
        let count = registers.values().filter(|r| r.liked).count() as i64;
        let register_updates = registers
            .iter()
            .map(|(user, r)| r.merge_statement(track, user))
            .collect();
        let mut requests = 1 + self
            .update_many_statements("pairs", register_updates)
            .await?;
        let totals = doc! { "count": count, "events": stored_events };
        requests += self
            .update_many_statements("track_counts", vec![span.replace(track, totals)])
            .await?;
        Ok(requests)
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
            Ok((track, user, register_of(&d)))
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

fn register_of(d: &Document) -> Register {
    Register {
        liked: d.get_bool("liked").unwrap_or(false),
        stamp: number(d, "stamp"),
        event_id: d.get_str("event").unwrap_or_default().to_owned(),
        key: d.get_str("key").unwrap_or_default().to_owned(),
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
