//! The farm ledger's reconciler: after a reconnect, a failover or a Redis data loss it replays
//! what Redis is missing — the events decided while Redis was away (owed), the node's last
//! minute after a failover, or its whole history into a Redis that lost its data — through
//! the same merge script as live likes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::FarmLedger;
use crate::clock::now_ms;
use crate::farm::keys;
use crate::farm::ledger_script::EventMerge;
use crate::farm::link::Session;
use crate::seams::event_log::LikeEvent;
use crate::tasks::Tasks;

/// After a failover, replay this much recent history (covers asynchronous replication lag).
const FAILOVER_REPLAY: Duration = Duration::from_secs(60);
const REPLAY_BATCH: usize = 500;
/// How soon an owed replay is tried again while Redis is up.
const RETRY_OWED: Duration = Duration::from_millis(250);

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

    async fn reconcile(&self, seen: &mut Seen, session: Session) -> anyhow::Result<u64> {
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
        // Progress for operators: what is left of the store's range and the owed likes.
        let last_seq = self.store.with(|r| r.last_seq())?;
        let remaining = last_seq.saturating_sub(from_seq.saturating_sub(1)) + owed.len() as u64;
        let progress = &self.metrics;
        progress.replay_remaining.set(remaining as i64);
        let result = async {
            let mut replayed = 0u64;
            let mut next = from_seq;
            loop {
                let batch = self.store.with(|r| r.events_from(next, REPLAY_BATCH))?;
                let Some(last) = batch.last() else { break };
                next = last.seq + 1;
                replayed += self.replay(conn, &batch).await?;
                progress
                    .replay_remaining
                    .set((last_seq.saturating_sub(last.seq) + owed.len() as u64) as i64);
            }
            for (i, chunk) in owed.chunks(REPLAY_BATCH).enumerate() {
                replayed += self.replay(conn, chunk).await?;
                let sent = ((i + 1) * REPLAY_BATCH).min(owed.len());
                progress.replay_remaining.set((owed.len() - sent) as i64);
            }
            anyhow::Ok(replayed)
        }
        .await;
        // A failed replay is still owed: its remainder stays visible until a retry succeeds.
        if result.is_ok() {
            progress.replay_remaining.set(0);
        }
        result
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
        self.metrics.replay_events.inc_by(results.len() as u64);
        Ok(results.len() as u64)
    }
}
