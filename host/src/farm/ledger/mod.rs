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

mod reconcile;

use async_trait::async_trait;
use redis::Script;

use super::keys;
use super::ledger_script::{EventMerge, Found, MERGE, Original, READ, Register, script_keys};
use super::link::RedisLink;
use crate::clock::now_ms;
use crate::metrics::Metrics;
use crate::seams::event_log::LikeEvent;
use crate::seams::ledger::{
    Decided, Decision, EmbeddedLedger, Ledger, LedgerError, Merged, Outcome,
};
use crate::seams::{Health, Part};
use crate::store::Store;
use fanfare_protocol::{Action, LikeRequest};

/// Tracks whose last global count the node keeps for degraded mode.
const KNOWN_TRACKS: usize = 100_000;

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
    metrics: Arc<Metrics>,
}

impl FarmLedger {
    pub fn new(
        link: Arc<RedisLink>,
        local: EmbeddedLedger,
        store: Store,
        max_clock_skew: u64,
        metrics: Arc<Metrics>,
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
            metrics,
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
        let started = std::time::Instant::now();
        let result: Result<(u64, u8, String), _> = self
            .read
            .key(pairs)
            .key(count)
            .key(keys)
            .arg(user)
            .arg(&request.key)
            .invoke_async(&mut conn)
            .await;
        self.metrics
            .redis_script("read", started.elapsed().as_secs_f64());
        match result {
            Ok((count, 2, original)) => Ok((count, Found::Resent(Original::parse(&original)))),
            Ok((count, _, register)) => Ok((count, Found::Pair(Register::parse(&register)))),
            Err(err) => {
                self.link.report(&err);
                Err(err)
            }
        }
    }

    /// Merges a committed event into Redis. A change is published to the other nodes by the
    /// script itself (`announced`).
    async fn merge_event(&self, event: &LikeEvent) -> Result<Merged, redis::RedisError> {
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
        let started = std::time::Instant::now();
        let result: Result<(u64, u8, u64, String), _> =
            merge.invocation(&self.script).invoke_async(&mut conn).await;
        self.metrics
            .redis_script("merge", started.elapsed().as_secs_f64());
        match result {
            Ok((count, 2, version, merged_id)) if merged_id == event.event_id => {
                // This very event, merged first by this node's replay (Redis came back between
                // its commit and this merge) or by a worker: what it changed stands, and the
                // other nodes still have to hear of it (replays publish nothing).
                self.link.write_accepted();
                Ok(Merged {
                    count,
                    changed: event.changed,
                    version,
                    announced: false,
                })
            }
            Ok((count, kind, version, _)) => {
                self.link.write_accepted();
                Ok(Merged {
                    count,
                    changed: kind == 0,
                    version,
                    announced: true,
                })
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
            Ok(merged) => {
                self.remember(&event.track, merged.count);
                merged
            }
            Err(err) => {
                // Committed but not merged (Redis went away since the read): owed, replayed on
                // its return; meanwhile the count is the one expected.
                crate::warn_throttled!(error = %err, "merge failed; the like is replayed when Redis answers");
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
