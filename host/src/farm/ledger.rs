//! The farm ledger: Redis holds the once-only rule's keys, the pair registers and the global
//! counts, so every node broadcasts the same totals.
//!
//! Durable first: a live like reads the pair (one script: remembered key, register, count), is
//! stamped after the register, committed to the node's store, and only then merged into Redis
//! (the second script) — Redis never holds an action no store has, so it is a cache that can be
//! rebuilt from the stores. The merge is the same one replays and workers use.
//!
//! While Redis is unreachable the node keeps deciding with its embedded ledger (its own
//! history) and shows the last global counts it saw, adjusted; every accepted like is still
//! durable locally. When Redis is back, the node replays the events it accepted meanwhile
//! through the same script (idempotent: keys and per-pair timestamps make replays no-ops).
//! If Redis lost its data (its epoch key changed, or differs from the one the node's store
//! says its history was last replayed into) the node replays its whole history, and
//! after a failover it replays its last minute, so counts converge without a restart.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;

use super::keys;
use super::ledger_script::{EventMerge, Found, MERGE, Original, READ, Register, script_keys};
use super::link::RedisLink;
use crate::clock::now_ms;
use crate::seams::event_log::LikeEvent;
use crate::seams::ledger::{
    Decided, Decision, EmbeddedLedger, Ledger, LedgerError, Merged, Outcome,
};
use crate::seams::{Health, Part};
use crate::store::Store;
use crate::tasks::Tasks;
use fanfare_protocol::{Action, LikeRequest};

/// After a failover, replay this much recent history (covers asynchronous replication lag).
const FAILOVER_REPLAY: Duration = Duration::from_secs(60);
const REPLAY_BATCH: usize = 500;
/// Tracks whose last global count the node keeps for degraded mode.
const KNOWN_TRACKS: usize = 100_000;
/// How soon an owed replay is tried again while Redis is up.
const RETRY_OWED: Duration = Duration::from_millis(250);

pub struct FarmLedger {
    link: Arc<RedisLink>,
    local: EmbeddedLedger,
    read: Script,
    script: Script,
    /// Last global count seen per track (from Redis replies and the bus).
    known: Mutex<HashMap<Arc<str>, u64>>,
    /// First local sequence number accepted while Redis was down (0 = none).
    degraded_from: AtomicU64,
    /// Highest local sequence number handed out so far.
    last_seq: AtomicU64,
    /// Likes decided while degraded and not yet replayed, recorded at decision time: the
    /// store may not have committed them when a replay reads it, and sequence numbers can
    /// commit out of order, so the store alone cannot say what is owed.
    owed: Mutex<Vec<LikeEvent>>,
    /// Wakes the reconciler when a like is owed while the link stays up (Redis answering but
    /// refusing writes), when no reconnect would.
    owed_added: tokio::sync::Notify,
    store: Store,
    /// Beyond this clock difference with Redis (ms) the node reports not ready.
    max_clock_skew: u64,
}

/// What the reconciler knows about the Redis it last talked to.
#[derive(Default)]
struct Seen {
    epoch: Option<String>,
    addr: Option<String>,
    /// A replay that is still owed, from this sequence number on.
    pending_from: Option<u64>,
}

/// Meta key of the fingerprint of the last Redis epoch this node's whole history was
/// replayed into. A node restarted while Redis lost its data must replay too, even though
/// another node has already stamped the new Redis with an epoch.
const SYNCED_EPOCH_META: &str = "farm.synced_epoch";

/// 63 bits of SHA-256(epoch), to fit the store's integer meta table.
fn epoch_fingerprint(epoch: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let hash = Sha256::digest(epoch.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    u64::from_be_bytes(first) & (u64::MAX >> 1)
}

impl FarmLedger {
    pub fn new(
        link: Arc<RedisLink>,
        local: EmbeddedLedger,
        store: Store,
        max_clock_skew: u64,
    ) -> anyhow::Result<Arc<FarmLedger>> {
        let (degraded_from, last_seq) = store.with(|r| {
            Ok((
                r.meta_get("farm.degraded_from")?.unwrap_or(0),
                r.last_seq()?,
            ))
        })?;
        Ok(Arc::new(FarmLedger {
            link,
            local,
            read: Script::new(READ),
            script: Script::new(MERGE),
            known: Mutex::new(HashMap::new()),
            degraded_from: AtomicU64::new(degraded_from),
            last_seq: AtomicU64::new(last_seq),
            owed: Mutex::new(Vec::new()),
            owed_added: tokio::sync::Notify::new(),
            store,
            max_clock_skew,
        }))
    }

    fn remember(&self, track: &str, count: u64) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        match known.get_mut(track) {
            Some(slot) => *slot = count,
            None => {
                // Only a hint for degraded mode: past the cap it starts afresh rather than
                // grow with every track id anyone ever asked about.
                if known.len() >= KNOWN_TRACKS {
                    known.clear();
                }
                known.insert(Arc::from(track), count);
            }
        }
    }

    /// Bus updates from other nodes keep the degraded-mode counts fresh.
    pub fn observe(&self, track: &str, count: u64) {
        self.remember(track, count);
    }

    fn known(&self, track: &str) -> Option<u64> {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(track)
            .copied()
    }

    /// The pair as Redis has it: a remembered key, or the register (one `EVALSHA`, no writes).
    async fn read_pair(
        &self,
        user: &str,
        request: &LikeRequest,
    ) -> Result<(u64, Found), redis::RedisError> {
        let mut conn = self.connection()?;
        let [pairs, count, keys, _] = script_keys(&request.track, user);
        let result: Result<(u64, u8, String), _> = self
            .read
            .key(pairs)
            .key(count)
            .key(keys)
            .arg(user)
            .arg(&request.key)
            .invoke_async(&mut conn)
            .await;
        match result {
            Ok((count, 2, original)) => Ok((count, Found::Resent(Original::parse(&original)))),
            Ok((count, _, register)) => Ok((count, Found::Pair(Register::parse(&register)))),
            Err(err) => {
                self.link.report(&err);
                Err(err)
            }
        }
    }

    /// Merges a committed event into Redis: (count, changed, version). A change is published to
    /// the other nodes by the script itself.
    async fn merge_event(&self, event: &LikeEvent) -> Result<(u64, bool, u64), redis::RedisError> {
        let mut conn = self.connection()?;
        let merge = EventMerge {
            track: &event.track,
            user: &event.user,
            key: &event.key,
            like: event.liked(),
            stamp: event.accepted_at_ms,
            event_id: &event.event_id,
            announce_as: Some(&event.node),
        };
        let result: Result<(u64, u8, u64, String), _> =
            merge.invocation(&self.script).invoke_async(&mut conn).await;
        match result {
            Ok((count, kind, version, _)) => {
                self.link.write_accepted();
                Ok((count, kind == 0, version))
            }
            Err(err) => {
                self.link.report(&err);
                Err(err)
            }
        }
    }

    fn connection(&self) -> Result<redis::aio::MultiplexedConnection, redis::RedisError> {
        self.link
            .connection()
            .ok_or_else(|| redis::RedisError::from((redis::ErrorKind::IoError, "redis is down")))
    }

    /// Redis is unreachable: decide locally, remember where the gap began.
    async fn apply_degraded(
        &self,
        user: &Arc<str>,
        request: &LikeRequest,
    ) -> Result<Decision, LedgerError> {
        let local = self.local.decide(user, request).await?;
        let mut count = self.known(&request.track).unwrap_or(local.count);
        if let Outcome::Applied(event) | Outcome::Unchanged(event) = &local.outcome {
            self.note_seq(event.seq);
            self.owe(event);
            if event.changed {
                count = match request.action {
                    Action::Like => count + 1,
                    Action::Unlike => count.saturating_sub(1),
                };
                self.remember(&request.track, count);
            }
        }
        Ok(Decision {
            count,
            outcome: local.outcome,
            to_merge: false,
        })
    }

    /// An event Redis has not merged: the reconciler replays it (and the store from it on).
    fn owe(&self, event: &LikeEvent) {
        self.owed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event.clone());
        if self.degraded_from.load(Ordering::Relaxed) == 0 {
            self.degraded_from.store(event.seq, Ordering::Relaxed);
            self.persist_degraded(event.seq);
        }
        self.owed_added.notify_one();
    }

    /// Records locally what this node decided from Redis' answer (the pair memory stays
    /// informed for degraded mode); `None` if this node recorded the key already.
    fn record(
        &self,
        user: &Arc<str>,
        request: &LikeRequest,
        decided: Decided,
    ) -> Result<Option<LikeEvent>, LedgerError> {
        let event = self.local.record(user, request, decided)?;
        if let Some(event) = &event {
            self.note_seq(event.seq);
        }
        Ok(event)
    }

    fn note_seq(&self, seq: u64) {
        self.last_seq.fetch_max(seq, Ordering::Relaxed);
    }

    fn persist_degraded(&self, seq: u64) {
        let result = self.store.with(|r| r.meta_set("farm.degraded_from", seq));
        if let Err(err) = result {
            tracing::error!(
                error = format!("{err:#}"),
                "cannot persist the degraded-mode marker"
            );
        }
    }

    /// Watches reconnects and replays what Redis is missing.
    pub fn spawn_reconciler(self: &Arc<Self>, tasks: &Tasks) {
        let ledger = self.clone();
        let shutdown = tasks.shutdown().clone();
        let mut generations = self.link.generations();
        // The link may have connected before this task subscribed: treat the current
        // connection as new too, or its epoch would never be recorded and a later loss of
        // Redis data would go unnoticed.
        generations.mark_changed();
        tasks.spawn(async move {
            let mut seen = Seen::default();
            loop {
                // Wait for a (re)connect, or retry soon while a replay is still owed (a failed
                // attempt, or likes decided while degraded that were not yet committed).
                let owed = !ledger
                    .owed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_empty()
                    || ledger.degraded_from.load(Ordering::Relaxed) != 0
                    || seen.pending_from.is_some();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    changed = generations.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(RETRY_OWED), if owed && ledger.link.is_up() => {}
                    _ = ledger.owed_added.notified(), if !owed => {
                        tokio::time::sleep(RETRY_OWED).await;
                    }
                }
                let Some(session) = ledger.link.session() else {
                    continue;
                };
                match ledger.reconcile(&mut seen, session).await {
                    Ok(0) => {}
                    Ok(replayed) => tracing::info!(replayed, "reconciled counts with Redis"),
                    Err(err) => {
                        tracing::warn!(error = format!("{err:#}"), "reconcile failed; retrying")
                    }
                }
            }
        });
    }

    async fn reconcile(
        &self,
        seen: &mut Seen,
        session: super::link::Session,
    ) -> anyhow::Result<u64> {
        let mut conn = session.conn.clone();
        let fresh = uuid::Uuid::now_v7().to_string();
        let set: bool = redis::cmd("SET")
            .arg(keys::EPOCH)
            .arg(&fresh)
            .arg("NX")
            .query_async::<Option<String>>(&mut conn)
            .await?
            .is_some();
        let current: String = redis::cmd("GET")
            .arg(keys::EPOCH)
            .query_async(&mut conn)
            .await?;
        // What this reconnect needs replayed is remembered until a replay succeeds, so a
        // failed attempt (Redis flapping) is not forgotten on the next reconnect. On the first
        // connection after a start, the epoch the history was last fully replayed into (kept
        // in the store) says whether this Redis has it.
        let lost = match &seen.epoch {
            Some(epoch) => *epoch != current,
            None => {
                self.store.with(|r| r.meta_get(SYNCED_EPOCH_META))?
                    != Some(epoch_fingerprint(&current))
            }
        };
        if set || lost {
            seen.pending_from = Some(1); // Redis lost its data: replay everything.
        }
        if seen.addr.as_ref().is_some_and(|a| *a != session.addr) {
            let since = now_ms() - FAILOVER_REPLAY.as_millis() as i64;
            if let Some(recent) = self.store.with(|r| r.first_seq_since(since))? {
                seen.pending_from = Some(seen.pending_from.map_or(recent, |p| p.min(recent)));
            }
        }
        seen.epoch = Some(current.clone());
        seen.addr = Some(session.addr.clone());

        let gap = self.degraded_from.load(Ordering::Relaxed);
        let from_seq = match (gap, seen.pending_from) {
            (0, None) => {
                self.note_synced(&current)?;
                return Ok(0);
            }
            (0, Some(p)) => p,
            (g, None) => g,
            (g, Some(p)) => g.min(p),
        };
        seen.pending_from = Some(from_seq);
        // Replays pipeline EVALSHA, so the merge script must be in Redis' cache first.
        self.script.prepare_invoke().load_async(&mut conn).await?;
        // The store first (it survives a crash), then the likes decided while degraded that
        // the store may not have had yet; replays are idempotent, so overlap is harmless.
        let owed: Vec<LikeEvent> =
            std::mem::take(&mut *self.owed.lock().unwrap_or_else(|p| p.into_inner()));
        let replayed = match self.replay_from(&mut conn, from_seq, &owed).await {
            Ok(replayed) => replayed,
            Err(err) => {
                // Still owed: put them back for the next attempt.
                self.owed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(owed);
                return Err(err);
            }
        };
        // Likes decided while degraded during this replay stay owed, and the marker keeps
        // pointing at the first of them in case of a crash.
        let still_owed = self
            .owed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|e| e.seq)
            .min()
            .unwrap_or(0);
        seen.pending_from = None;
        self.degraded_from.store(still_owed, Ordering::Relaxed);
        self.store
            .with(|r| r.meta_set("farm.degraded_from", still_owed))?;
        self.note_synced(&current)?;
        Ok(replayed)
    }

    /// Records that this Redis epoch holds the node's whole history (only after a replay
    /// succeeded, so a crash mid-replay replays again on the next start).
    fn note_synced(&self, epoch: &str) -> anyhow::Result<()> {
        let fingerprint = epoch_fingerprint(epoch);
        self.store.with(|r| {
            if r.meta_get(SYNCED_EPOCH_META)? != Some(fingerprint) {
                r.meta_set(SYNCED_EPOCH_META, fingerprint)?;
            }
            Ok(())
        })
    }

    /// Replays the store from `from_seq` to its end, then `owed`.
    async fn replay_from(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
        from_seq: u64,
        owed: &[LikeEvent],
    ) -> anyhow::Result<u64> {
        let mut replayed = 0u64;
        let mut next = from_seq;
        loop {
            let batch = self.store.with(|r| r.events_from(next, REPLAY_BATCH))?;
            let Some(last) = batch.last() else { break };
            next = last.seq + 1;
            replayed += self.replay(conn, &batch).await?;
        }
        for chunk in owed.chunks(REPLAY_BATCH) {
            replayed += self.replay(conn, chunk).await?;
        }
        Ok(replayed)
    }

    /// Replays stored events through the ledger script, pipelined in one round trip.
    async fn replay(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
        events: &[LikeEvent],
    ) -> anyhow::Result<u64> {
        let mut pipe = redis::pipe();
        for event in events {
            let merge = EventMerge {
                track: &event.track,
                user: &event.user,
                key: &event.key,
                like: event.liked(),
                stamp: event.accepted_at_ms,
                event_id: &event.event_id,
                announce_as: None,
            };
            merge.push(&mut pipe, self.script.get_hash());
        }
        let results: Vec<(u64, u8, u64, String)> = match pipe.query_async(conn).await {
            Ok(results) => {
                self.link.write_accepted();
                results
            }
            Err(err) => {
                self.link.report(&err);
                return Err(err.into());
            }
        };
        for (event, (count, ..)) in events.iter().zip(&results) {
            self.remember(&event.track, *count);
        }
        Ok(results.len() as u64)
    }
}

impl Part for FarmLedger {
    fn name(&self) -> &'static str {
        "ledger (redis)"
    }

    fn health(&self) -> Health {
        let skew = self.link.clock_skew_ms();
        if self.link.is_up() && skew.unsigned_abs() > self.max_clock_skew {
            return Health::Unavailable(format!(
                "clock {skew} ms off Redis' (more than --max-clock-skew {} ms): fix NTP",
                self.max_clock_skew
            ));
        }
        self.link
            .health("likes decided locally, counts reconcile on return")
    }
}

#[async_trait]
impl Ledger for FarmLedger {
    async fn decide(
        &self,
        user: &Arc<str>,
        request: &LikeRequest,
    ) -> Result<Decision, LedgerError> {
        if !self.link.is_up() {
            return self.apply_degraded(user, request).await;
        }
        let Ok((count, found)) = self.read_pair(user, request).await else {
            return self.apply_degraded(user, request).await;
        };
        self.remember(&request.track, count);
        let decided = |changed, stamp, event_id, version| Decided {
            changed,
            stamp,
            event_id,
            version,
        };
        let (count, outcome, to_merge) = match found {
            Found::Pair(register) => {
                // Stamped after the register, never against another node's clock: the user's
                // latest action is the newest whatever the skew. The version comes with the
                // merge (0 in the stored event).
                let (liked, last) = register.map_or((false, 0), |r| (r.liked, r.stamp));
                let wants_liked = request.action == Action::Like;
                let changed = liked != wants_liked;
                let stamp = now_ms().max(last + 1);
                let event_id = uuid::Uuid::now_v7().to_string();
                let recorded = self.record(user, request, decided(changed, stamp, event_id, 0))?;
                // A re-send pipelined behind its first attempt on this node (both read before
                // either merged): the first one's event is the one.
                let Some(event) = recorded else {
                    return Ok(Decision {
                        count,
                        outcome: Outcome::Resent,
                        to_merge: false,
                    });
                };
                match (changed, wants_liked) {
                    (false, _) => (count, Outcome::Unchanged(event), true),
                    (true, true) => (count + 1, Outcome::Applied(event), true),
                    (true, false) => (count.saturating_sub(1), Outcome::Applied(event), true),
                }
            }
            Found::Resent(Some(original))
                if !self.local.knows_key(user, &request.track, &request.key)? =>
            {
                // Merged in Redis by a node that may have died before shipping it: store it
                // again under its original id (stores downstream keep one).
                let mut replayed = request.clone();
                replayed.action = original.action;
                let changed = original.version > 0;
                let recorded = self.record(
                    user,
                    &replayed,
                    decided(changed, original.at_ms, original.event_id, original.version),
                )?;
                match recorded {
                    Some(event) => (count, Outcome::Restored(event), false),
                    None => (count, Outcome::Resent, false),
                }
            }
            Found::Resent(_) => (count, Outcome::Resent, false),
        };
        Ok(Decision {
            count,
            outcome,
            to_merge,
        })
    }

    async fn merge(&self, decision: &Decision, event: &LikeEvent) -> Merged {
        if !decision.to_merge {
            return Merged {
                count: decision.count,
                changed: event.changed,
                version: event.version,
                announced: false,
            };
        }
        match self.merge_event(event).await {
            Ok((count, changed, version)) => {
                self.remember(&event.track, count);
                Merged {
                    count,
                    changed,
                    version,
                    announced: true,
                }
            }
            Err(err) => {
                // Committed but not merged (Redis went away since the read): owed, replayed on
                // its return; meanwhile the count is the one expected.
                tracing::warn!(error = %err, "merge failed; the like is replayed when Redis answers");
                self.owe(event);
                self.remember(&event.track, decision.count);
                Merged {
                    count: decision.count,
                    changed: event.changed,
                    version: event.version,
                    announced: false,
                }
            }
        }
    }

    async fn count(&self, track: &str) -> Result<u64, LedgerError> {
        if let Some(mut conn) = self.link.connection() {
            let result: Result<Option<u64>, _> = redis::cmd("GET")
                .arg(keys::TrackKeys::new(track).count)
                .query_async(&mut conn)
                .await;
            match result {
                Ok(count) => {
                    // A track nobody liked is not remembered (anyone may ask about any id).
                    if let Some(count) = count {
                        self.remember(track, count);
                    }
                    return Ok(count.unwrap_or(0));
                }
                Err(err) => self.link.report(&err),
            }
        }
        match self.known(track) {
            Some(count) => Ok(count),
            None => self.local.count(track).await,
        }
    }
}
