//! In-memory ledger over the embedded store.
//!
//! State lives in memory behind one mutex, so the once-only rule is a plain check-and-set.
//! A pair or track not seen since start is read from SQLite on first use; that is always
//! correct because every write for a pair touched since start went through this memory.
//! Pairs whose last event is committed may be forgotten again when memory grows.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::Connection;

use super::{Decision, Ledger, LedgerError, Outcome};
use crate::seams::Part;
use crate::seams::event_log::LikeEvent;
use fanfare_protocol::{Action, LikeRequest};

/// Keys remembered per pair for resend detection.
const KEYS_PER_PAIR: usize = 4;
/// Pairs kept in memory before committed ones are evicted.
const PAIR_CAPACITY: usize = 1_000_000;

pub struct EmbeddedLedger {
    state: Mutex<State>,
    node: Arc<str>,
    durable_seq: Arc<AtomicU64>,
}

struct State {
    reader: Connection,
    next_seq: u64,
    counts: HashMap<Arc<str>, u64>,
    pairs: HashMap<String, Pair>,
    evict_at: usize,
}

struct Pair {
    liked: bool,
    last_seq: u64,
    /// Most recent applied keys, newest first.
    keys: VecDeque<Box<str>>,
}

impl EmbeddedLedger {
    /// `durable_seq` comes from the event log: pairs at or below it may be evicted.
    pub fn open(
        data_dir: &Path,
        node: Arc<str>,
        durable_seq: Arc<AtomicU64>,
    ) -> anyhow::Result<Self> {
        let reader = crate::store::open_reader(data_dir)?;
        let next_seq = crate::store::last_seq(&reader)? + 1;
        Ok(EmbeddedLedger {
            state: Mutex::new(State {
                reader,
                next_seq,
                counts: HashMap::new(),
                pairs: HashMap::new(),
                evict_at: PAIR_CAPACITY,
            }),
            node,
            durable_seq,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than stopping the node would, so keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn storage(err: rusqlite::Error) -> LedgerError {
    LedgerError::Storage(err.to_string())
}

/// The count of a track, read from the store on first use; returns the shared track name too.
fn load_count(
    reader: &Connection,
    counts: &mut HashMap<Arc<str>, u64>,
    track: &str,
) -> Result<(Arc<str>, u64), LedgerError> {
    if let Some((name, count)) = counts.get_key_value(track) {
        return Ok((name.clone(), *count));
    }
    let stored = crate::store::track_count(reader, track).map_err(storage)?;
    let name: Arc<str> = Arc::from(track);
    counts.insert(name.clone(), stored);
    Ok((name, stored))
}

fn load_pair(reader: &Connection, user: &str, track: &str) -> Result<Pair, LedgerError> {
    let events =
        crate::store::recent_pair_events(reader, user, track, KEYS_PER_PAIR).map_err(storage)?;
    let liked = events.first().is_some_and(|(_, action)| action == "like");
    let keys = events
        .into_iter()
        .map(|(key, _)| key.into_boxed_str())
        .collect();
    Ok(Pair {
        liked,
        last_seq: 0,
        keys,
    })
}

impl State {
    fn evict_committed(&mut self, durable: u64) {
        if self.pairs.len() < self.evict_at {
            return;
        }
        self.pairs.retain(|_, pair| pair.last_seq > durable);
        self.evict_at = (self.pairs.len() * 2).max(PAIR_CAPACITY);
        tracing::debug!(kept = self.pairs.len(), "evicted committed ledger pairs");
    }
}

impl EmbeddedLedger {
    /// Records a state change another authority (the farm ledger) already decided: no
    /// once-only check, but the pair memory, keys and sequence move as if it had been applied
    /// here, so local decisions stay informed if that authority becomes unreachable.
    pub fn record(&self, user: &Arc<str>, request: &LikeRequest) -> Result<LikeEvent, LedgerError> {
        match self.decide(user, request, true)?.outcome {
            Outcome::Applied(event) => Ok(event),
            _ => Err(LedgerError::Storage("forced record was not applied".into())),
        }
    }

    /// Whether this node recorded `key` for the pair (stored, or on its way to the store).
    pub fn knows_key(&self, user: &str, track: &str, key: &str) -> Result<bool, LedgerError> {
        let pair_key = format!("{user}\n{track}");
        let mut guard = self.lock();
        let State { reader, pairs, .. } = &mut *guard;
        let pair = match pairs.entry(pair_key) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => entry.insert(load_pair(reader, user, track)?),
        };
        Ok(pair.keys.iter().any(|k| **k == *key))
    }

    fn decide(
        &self,
        user: &Arc<str>,
        request: &LikeRequest,
        force: bool,
    ) -> Result<Decision, LedgerError> {
        let track = request.track.as_str();
        // '\n' cannot occur in user or track ids, so the joined key is unambiguous.
        let pair_key = format!("{user}\n{track}");
        let mut guard = self.lock();
        guard.evict_committed(self.durable_seq.load(Ordering::Acquire));
        let State {
            reader,
            next_seq,
            counts,
            pairs,
            ..
        } = &mut *guard;
        let (track_name, count) = load_count(reader, counts, track)?;
        let pair = match pairs.entry(pair_key) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => entry.insert(load_pair(reader, user, track)?),
        };

        if !force && pair.keys.iter().any(|k| **k == *request.key) {
            return Ok(Decision {
                count,
                outcome: Outcome::Resent,
            });
        }
        let wants_liked = request.action == Action::Like;
        if !force && pair.liked == wants_liked {
            return Ok(Decision {
                count,
                outcome: Outcome::Duplicate,
            });
        }
        let seq = *next_seq;
        *next_seq += 1;
        pair.liked = wants_liked;
        pair.last_seq = seq;
        pair.keys.push_front(request.key.clone().into_boxed_str());
        pair.keys.truncate(KEYS_PER_PAIR);
        let count = if wants_liked {
            count + 1
        } else {
            count.saturating_sub(1)
        };
        counts.insert(track_name.clone(), count);
        let event = LikeEvent {
            event_id: uuid::Uuid::now_v7().to_string(),
            seq,
            version: seq,
            user: user.clone(),
            track: track_name,
            action: request.action,
            key: request.key.clone(),
            accepted_at_ms: now_ms(),
            node: self.node.clone(),
        };
        Ok(Decision {
            count,
            outcome: Outcome::Applied(event),
        })
    }
}

impl Part for EmbeddedLedger {
    fn name(&self) -> &'static str {
        "ledger (embedded)"
    }
}

#[async_trait]
impl Ledger for EmbeddedLedger {
    async fn apply(&self, user: &Arc<str>, request: &LikeRequest) -> Result<Decision, LedgerError> {
        self.decide(user, request, false)
    }

    async fn count(&self, track: &str) -> Result<u64, LedgerError> {
        let mut guard = self.lock();
        let State { reader, counts, .. } = &mut *guard;
        Ok(load_count(reader, counts, track)?.1)
    }
}

use crate::clock::now_ms;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seams::event_log::{EventLog, SqliteEventLog};

    fn request(action: Action, track: &str, key: &str) -> LikeRequest {
        LikeRequest {
            action,
            track: track.into(),
            key: key.into(),
        }
    }

    #[tokio::test]
    async fn once_only_rule_keys_and_restart() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let ana: Arc<str> = Arc::from("ana");
        {
            let log = SqliteEventLog::start(dir.path(), None)?;
            let ledger = EmbeddedLedger::open(dir.path(), "n1".into(), log.durable_seq())?;
            let first = ledger
                .apply(&ana, &request(Action::Like, "t", "k1"))
                .await?;
            assert_eq!(first.count, 1);
            let Outcome::Applied(event) = first.outcome else {
                panic!("expected applied")
            };
            log.append(event).await?;
            let again = ledger
                .apply(&ana, &request(Action::Like, "t", "k2"))
                .await?;
            assert_eq!(
                again,
                Decision {
                    count: 1,
                    outcome: Outcome::Duplicate
                }
            );
            let resent = ledger
                .apply(&ana, &request(Action::Like, "t", "k1"))
                .await?;
            assert_eq!(
                resent,
                Decision {
                    count: 1,
                    outcome: Outcome::Resent
                }
            );
            log.close().await?;
        }
        // A new process sees the committed state: the like and its key.
        let log = SqliteEventLog::start(dir.path(), None)?;
        let ledger = EmbeddedLedger::open(dir.path(), "n1".into(), log.durable_seq())?;
        assert_eq!(ledger.count("t").await?, 1);
        let resent = ledger
            .apply(&ana, &request(Action::Like, "t", "k1"))
            .await?;
        assert_eq!(resent.outcome, Outcome::Resent);
        let unlike = ledger
            .apply(&ana, &request(Action::Unlike, "t", "k3"))
            .await?;
        assert_eq!(unlike.count, 0);
        assert!(matches!(unlike.outcome, Outcome::Applied(ref e) if e.seq == 2));
        Ok(())
    }
}
