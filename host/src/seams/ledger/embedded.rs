//! In-memory ledger over the embedded store.
//!
//! State lives in memory behind one mutex, so the once-only rule is a plain check-and-set.
//! A pair or track not seen since start is read from SQLite on first use; that is always
//! correct because every write for a pair touched since start went through this memory.
//! Pairs whose last event is committed may be forgotten again when memory grows.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{Decision, Ledger, LedgerError, Outcome};
use crate::seams::Part;
use crate::seams::event_log::{LikeEvent, Uncommitted};
use crate::store::{Reader, Store};
use fanfare_protocol::{Action, LikeRequest};

/// Keys remembered per pair for resend detection.
const KEYS_PER_PAIR: usize = crate::store::PAIR_EVENTS;
/// Pairs kept in memory before committed ones are evicted.
const PAIR_CAPACITY: usize = 1_000_000;
/// Sequences remembered with their track before the committed ones are dropped.
const PRUNE_PENDING_AT: usize = 4_096;

pub struct EmbeddedLedger {
    state: Mutex<State>,
    node: Arc<str>,
    uncommitted: Arc<Uncommitted>,
}

struct State {
    reader: Reader,
    next_seq: u64,
    /// Counts of tracks this node changed, evicted with the pairs once every event of the
    /// track is committed (the store then holds the count).
    counts: HashMap<Arc<str>, u64>,
    /// The track of each sequence handed out and not known to be committed: appends commit
    /// out of order, so a track's newest event being committed says nothing of its others.
    pending_tracks: HashMap<u64, Arc<str>>,
    prune_at: usize,
    pairs: HashMap<String, Pair>,
    capacity: usize,
    evict_at: usize,
}

struct Pair {
    liked: bool,
    /// Stamp of the pair's newest action (ms), so the next one is stamped after it.
    stamp: i64,
    last_seq: u64,
    /// Most recent applied keys, newest first.
    keys: VecDeque<Box<str>>,
}

impl EmbeddedLedger {
    /// `uncommitted` comes from the event log: a pair whose last event is in it stays.
    pub fn open(
        store: &Store,
        node: Arc<str>,
        uncommitted: Arc<Uncommitted>,
    ) -> anyhow::Result<Self> {
        Self::with_capacity(store, node, uncommitted, PAIR_CAPACITY)
    }

    /// `open` with another number of pairs kept before eviction (tests).
    pub fn with_capacity(
        store: &Store,
        node: Arc<str>,
        uncommitted: Arc<Uncommitted>,
        capacity: usize,
    ) -> anyhow::Result<Self> {
        let reader = store.reader()?;
        let next_seq = reader.last_seq()? + 1;
        Ok(EmbeddedLedger {
            state: Mutex::new(State {
                reader,
                next_seq,
                counts: HashMap::new(),
                pending_tracks: HashMap::new(),
                prune_at: PRUNE_PENDING_AT,
                pairs: HashMap::new(),
                capacity,
                evict_at: capacity,
            }),
            node,
            uncommitted,
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
    reader: &Reader,
    counts: &HashMap<Arc<str>, u64>,
    track: &str,
) -> Result<(Arc<str>, u64), LedgerError> {
    if let Some((name, count)) = counts.get_key_value(track) {
        return Ok((name.clone(), *count));
    }
    let stored = reader.track_count(track).map_err(storage)?;
    Ok((Arc::from(track), stored))
}

fn load_pair(reader: &Reader, user: &str, track: &str) -> Result<Pair, LedgerError> {
    let events = reader.recent_pair_events(user, track).map_err(storage)?;
    let liked = events.first().is_some_and(|e| e.action == "like");
    let stamp = events.iter().map(|e| e.accepted_at_ms).max().unwrap_or(0);
    let keys = events.into_iter().map(|e| e.key.into_boxed_str()).collect();
    Ok(Pair {
        liked,
        stamp,
        last_seq: 0,
        keys,
    })
}

impl State {
    fn evict_committed(&mut self, uncommitted: &Uncommitted) {
        if self.pending_tracks.len() >= self.prune_at {
            // Toggling a few pairs never fills `pairs`, but hands out sequences all along.
            let pending = uncommitted.lock();
            self.pending_tracks.retain(|seq, _| pending.contains(seq));
            drop(pending);
            self.prune_at = (self.pending_tracks.len() * 2).max(PRUNE_PENDING_AT);
        }
        if self.pairs.len() < self.evict_at {
            return;
        }
        let pending = uncommitted.lock();
        self.pairs
            .retain(|_, pair| pending.contains(&pair.last_seq));
        self.pending_tracks.retain(|seq, _| pending.contains(seq));
        drop(pending);
        let busy: std::collections::HashSet<&Arc<str>> = self.pending_tracks.values().collect();
        self.counts.retain(|track, _| busy.contains(track));
        self.evict_at = (self.pairs.len() * 2).max(self.capacity);
        tracing::debug!(kept = self.pairs.len(), "evicted committed ledger pairs");
    }
}

/// What another authority (the farm ledger's Redis script) decided about an action.
pub struct Decided {
    pub changed: bool,
    pub stamp: i64,
    pub event_id: String,
    pub version: u64,
}

impl EmbeddedLedger {
    /// Records an action another authority already decided: the pair memory (state, stamp,
    /// keys) and the sequence move as if it had been decided here, so local decisions stay
    /// informed if that authority becomes unreachable. `None` when this node has recorded the
    /// key for the pair already (a re-send pipelined behind its first attempt).
    pub fn record(
        &self,
        user: &Arc<str>,
        request: &LikeRequest,
        decided: Decided,
    ) -> Result<Option<LikeEvent>, LedgerError> {
        match self.decide_with(user, request, Some(decided))?.outcome {
            Outcome::Applied(event) | Outcome::Unchanged(event) => Ok(Some(event)),
            _ => Ok(None),
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

    fn decide_with(
        &self,
        user: &Arc<str>,
        request: &LikeRequest,
        decided: Option<Decided>,
    ) -> Result<Decision, LedgerError> {
        let track = request.track.as_str();
        // '\n' cannot occur in user or track ids, so the joined key is unambiguous.
        let pair_key = format!("{user}\n{track}");
        let mut guard = self.lock();
        guard.evict_committed(&self.uncommitted);
        let State {
            reader,
            next_seq,
            counts,
            pending_tracks,
            pairs,
            ..
        } = &mut *guard;
        let (track_name, count) = load_count(reader, &*counts, track)?;
        let pair = match pairs.entry(pair_key) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => entry.insert(load_pair(reader, user, track)?),
        };

        if pair.keys.iter().any(|k| **k == *request.key) {
            return Ok(Decision {
                count,
                outcome: Outcome::Resent,
                to_merge: false,
            });
        }
        let wants_liked = request.action == Action::Like;
        let (changed, stamp, event_id, version) = match decided {
            Some(d) => (d.changed, d.stamp, d.event_id, Some(d.version)),
            None => (
                pair.liked != wants_liked,
                now_ms().max(pair.stamp + 1),
                uuid::Uuid::now_v7().to_string(),
                None,
            ),
        };
        let seq = *next_seq;
        *next_seq += 1;
        self.uncommitted.handed_out(seq);
        // After any accepted action the pair is in the state it asked for.
        pair.liked = wants_liked;
        pair.stamp = pair.stamp.max(stamp);
        pair.last_seq = seq;
        pair.keys.push_front(request.key.clone().into_boxed_str());
        pair.keys.truncate(KEYS_PER_PAIR);
        let count = match (changed, wants_liked) {
            (false, _) => count,
            (true, true) => count + 1,
            (true, false) => count.saturating_sub(1),
        };
        counts.insert(track_name.clone(), count);
        pending_tracks.insert(seq, track_name.clone());
        let event = LikeEvent {
            event_id,
            seq,
            version: version.unwrap_or(seq),
            user: user.clone(),
            track: track_name,
            action: request.action,
            key: request.key.clone(),
            accepted_at_ms: stamp,
            node: self.node.clone(),
            changed,
        };
        let outcome = if changed {
            Outcome::Applied(event)
        } else {
            Outcome::Unchanged(event)
        };
        Ok(Decision {
            count,
            outcome,
            to_merge: false,
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
    async fn decide(
        &self,
        user: &Arc<str>,
        request: &LikeRequest,
    ) -> Result<Decision, LedgerError> {
        self.decide_with(user, request, None)
    }

    async fn count(&self, track: &str) -> Result<u64, LedgerError> {
        let guard = self.lock();
        // Read through: only tracks this node changed are kept in memory, not every id
        // anyone asks about.
        match guard.counts.get(track) {
            Some(count) => Ok(*count),
            None => guard.reader.track_count(track).map_err(storage),
        }
    }
}

use crate::clock::now_ms;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seams::event_log::{EventLog, SqliteEventLog};

    /// A store, its event log and a ledger keeping `capacity` pairs, in a fresh directory.
    fn node(
        capacity: usize,
    ) -> anyhow::Result<(tempfile::TempDir, SqliteEventLog, EmbeddedLedger)> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let log = SqliteEventLog::start(&store, None, Default::default())?;
        let ledger =
            EmbeddedLedger::with_capacity(&store, "n1".into(), log.uncommitted(), capacity)?;
        Ok((dir, log, ledger))
    }

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
        let store = Store::open(dir.path())?;
        let ana: Arc<str> = Arc::from("ana");
        {
            let log = SqliteEventLog::start(&store, None, Default::default())?;
            let ledger = EmbeddedLedger::open(&store, "n1".into(), log.uncommitted())?;
            let first = ledger
                .decide(&ana, &request(Action::Like, "t", "k1"))
                .await?;
            assert_eq!(first.count, 1);
            let Outcome::Applied(event) = first.outcome else {
                panic!("expected applied")
            };
            log.append(event.clone()).await?;
            let again = ledger
                .decide(&ana, &request(Action::Like, "t", "k2"))
                .await?;
            assert_eq!(again.count, 1);
            let Outcome::Unchanged(again) = again.outcome else {
                panic!("expected unchanged, got {:?}", again.outcome)
            };
            assert!(!again.changed && again.accepted_at_ms > event.accepted_at_ms);
            log.append(again).await?;
            let resent = ledger
                .decide(&ana, &request(Action::Like, "t", "k1"))
                .await?;
            assert_eq!(
                resent,
                Decision {
                    count: 1,
                    outcome: Outcome::Resent,
                    to_merge: false,
                }
            );
            log.close().await?;
        }
        // A new process sees the committed state: the like and its key.
        let log = SqliteEventLog::start(&store, None, Default::default())?;
        let ledger = EmbeddedLedger::open(&store, "n1".into(), log.uncommitted())?;
        assert_eq!(ledger.count("t").await?, 1);
        let resent = ledger
            .decide(&ana, &request(Action::Like, "t", "k1"))
            .await?;
        assert_eq!(resent.outcome, Outcome::Resent);
        let unlike = ledger
            .decide(&ana, &request(Action::Unlike, "t", "k3"))
            .await?;
        assert_eq!(unlike.count, 0);
        assert!(matches!(unlike.outcome, Outcome::Applied(ref e) if e.seq == 3));
        Ok(())
    }

    /// Finding 4 of issue 16: a batch's highest committed sequence used to stand for "all
    /// below are durable". Pair A's like (seq 1) still waits for its append while B's (seq 2)
    /// commits; at the pair cap A used to be forgotten, re-read from the store (which does
    /// not have its like yet), and a second like of A was counted again.
    #[tokio::test]
    async fn a_pair_whose_event_is_not_committed_is_never_forgotten() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(dir.path())?;
        let log = SqliteEventLog::start(&store, None, Default::default())?;
        let ledger = EmbeddedLedger::with_capacity(&store, "n1".into(), log.uncommitted(), 1)?;
        let (ana, ben): (Arc<str>, Arc<str>) = (Arc::from("ana"), Arc::from("ben"));
        let first = ledger
            .decide(&ana, &request(Action::Like, "t", "a1"))
            .await?;
        let Outcome::Applied(pending) = first.outcome else {
            panic!("expected applied")
        };
        let other = ledger
            .decide(&ben, &request(Action::Like, "t", "b1"))
            .await?;
        let Outcome::Applied(committed) = other.outcome else {
            panic!("expected applied")
        };
        log.append(committed).await?;
        // The cap is reached: eviction runs before this decision.
        let again = ledger
            .decide(&ana, &request(Action::Like, "t", "a2"))
            .await?;
        assert!(
            matches!(again.outcome, Outcome::Unchanged(_)),
            "ana's first like is still pending, so her second changes nothing: {:?}",
            again.outcome
        );
        assert_eq!(again.count, 2);
        log.append(pending).await?;
        log.close().await?;
        Ok(())
    }

    /// Finding 4 of issue 16: the count of every track ever liked stayed in memory; now it
    /// goes with the pairs once its events are committed, and is read back right.
    #[tokio::test]
    async fn counts_of_committed_tracks_are_evicted_and_read_back() -> anyhow::Result<()> {
        let (_dir, log, ledger) = node(50)?;
        let ana: Arc<str> = Arc::from("ana");
        for t in 0..200 {
            let decision = ledger
                .decide(
                    &ana,
                    &request(Action::Like, &format!("t{t}"), &format!("k{t}")),
                )
                .await?;
            let Outcome::Applied(event) = decision.outcome else {
                anyhow::bail!("like {t} was not applied");
            };
            log.append(event).await?;
        }
        let kept = ledger.lock().counts.len();
        assert!(kept <= 100, "{kept} track counts kept for a capacity of 50");
        // A track with an event not yet committed keeps its count, however old the event.
        let held = ledger
            .decide(&ana, &request(Action::Like, "held", "h"))
            .await?;
        let Outcome::Applied(held) = held.outcome else {
            anyhow::bail!("the held like was not applied");
        };
        for t in 200..400 {
            let decision = ledger
                .decide(
                    &ana,
                    &request(Action::Like, &format!("t{t}"), &format!("k{t}")),
                )
                .await?;
            if let Outcome::Applied(event) = decision.outcome {
                log.append(event).await?;
            }
        }
        assert_eq!(ledger.lock().counts.get("held"), Some(&1));
        assert!(
            ledger.lock().counts.len() <= 100,
            "one pending event kept every count"
        );
        log.append(held).await?;
        for t in 0..400 {
            assert_eq!(ledger.count(&format!("t{t}")).await?, 1, "track t{t}");
        }
        // An evicted count moves on from the stored one.
        let bob: Arc<str> = Arc::from("bob");
        let again = ledger
            .decide(&bob, &request(Action::Like, "t0", "b0"))
            .await?;
        assert_eq!(again.count, 2);
        log.close().await?;
        Ok(())
    }

    #[tokio::test]
    async fn toggling_one_pair_keeps_no_growing_list() -> anyhow::Result<()> {
        let (_dir, log, ledger) = node(PAIR_CAPACITY)?;
        let ana: Arc<str> = Arc::from("ana");
        for n in 0..10_000 {
            let action = [Action::Like, Action::Unlike][n % 2];
            let decision = ledger
                .decide(&ana, &request(action, "t", &format!("k{n}")))
                .await?;
            if let Outcome::Applied(event) = decision.outcome {
                log.append(event).await?;
            }
        }
        let remembered = ledger.lock().pending_tracks.len();
        assert!(
            remembered <= PRUNE_PENDING_AT,
            "{remembered} sequences remembered"
        );
        assert_eq!(ledger.count("t").await?, 0);
        log.close().await?;
        Ok(())
    }

    /// Finding 4 of issue 16: asking for the count of any track id kept it in memory.
    #[tokio::test]
    async fn counts_asked_for_are_not_kept() -> anyhow::Result<()> {
        let (_dir, log, ledger) = node(PAIR_CAPACITY)?;
        for t in 0..1000 {
            assert_eq!(ledger.count(&format!("nobody-{t}")).await?, 0);
        }
        assert_eq!(ledger.lock().counts.len(), 0);
        log.close().await?;
        Ok(())
    }
}
