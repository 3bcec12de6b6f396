//! Per-track broadcast: likes that arrive within one window are summed into one update,
//! serialized once, and the same bytes are queued on every local listener's outbox.
//!
//! The window adapts to the audience: a track with a handful of listeners flushes after a
//! couple of milliseconds, a track with thousands waits up to `--broadcast-window`, which
//! trades a little latency for far fewer frames. And to the load: a track's next update
//! waits until its previous round has been taken by every listener that was not already
//! behind (at most `ROUND_WAIT`), so when one core cannot touch every socket within a window,
//! windows stretch to the round time and counts stay fresh instead of queuing. Delivery never
//! awaits a socket.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::broadcast::outbox::{ConnId, Push, Round, Update};
use crate::broadcast::registry::Registry;
use crate::broadcast::sharded::ShardedMap;
use crate::metrics::Metrics;
use crate::plugins::Plugins;
use crate::seams::bus::{BusHandler, Published};
use crate::tasks::Tasks;
use fanfare_protocol::{LikesFrame, RecentLike};

/// Likes shown per update in `recent`.
pub const RECENT_LIMIT: usize = 10;
/// Audience at which the window reaches its configured maximum.
const FULL_WINDOW_AUDIENCE: u64 = 5_000;
/// Shortest window for any audience (unless batching is switched off with a window of 0).
const MIN_WINDOW: Duration = Duration::from_millis(2);
/// Longest a track's update waits for its previous round: past it, listeners still holding
/// the previous update get the new one in its place (conflation).
const ROUND_WAIT: Duration = Duration::from_millis(250);

struct Pending {
    count: u64,
    version: u64,
    delta: i64,
    recent: Vec<RecentLike>,
    origin: Origin,
    since: Instant,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    One(ConnId),
    Many,
}

/// Locks that keep a track's flushes in order (by track hash, so tracks flush in parallel).
const FLUSH_ORDER_LOCKS: usize = 64;

pub struct Fanout {
    pending: ShardedMap<Pending>,
    /// The newest (version, count) each listened track has delivered: likes reach `publish`
    /// from concurrent tasks, not in version order, so a window can open with an older count
    /// than the one before it delivered; it shows the newer one (seen as 4 runs in 50 of
    /// `concurrent_likes_from_many_users_give_exact_counts`: a listener left on an old count).
    delivered: ShardedMap<(u64, u64)>,
    /// Each listened track's last round, which its next flush waits for.
    rounds: ShardedMap<Arc<Round>>,
    /// A flush holds its track's lock from taking the window to queuing the frame, so a newer
    /// window never queues before an older one still shaping.
    flush_order: Box<[tokio::sync::Mutex<()>]>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    plugins: Arc<Plugins>,
    max_window: Duration,
    tasks: Tasks,
}

impl Fanout {
    pub fn new(
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        plugins: Arc<Plugins>,
        max_window: Duration,
        tasks: Tasks,
    ) -> Fanout {
        Fanout {
            pending: ShardedMap::default(),
            delivered: ShardedMap::default(),
            rounds: ShardedMap::default(),
            flush_order: (0..FLUSH_ORDER_LOCKS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            registry,
            metrics,
            plugins,
            max_window,
            tasks,
        }
    }

    /// How long likes on a track with this many listeners are summed before delivery.
    pub fn window_for(&self, audience: usize) -> Duration {
        if self.max_window.is_zero() {
            return Duration::ZERO;
        }
        let share = (audience as u64).min(FULL_WINDOW_AUDIENCE);
        let scaled = self
            .max_window
            .mul_f64(share as f64 / FULL_WINDOW_AUDIENCE as f64);
        scaled.max(MIN_WINDOW.min(self.max_window))
    }

    /// Folds a like into its track's open window, opening one (and its timer) if needed.
    pub fn publish(self: &Arc<Self>, like: Published) {
        let audience = self.registry.audience_size(&like.track);
        if audience == 0 {
            // Bounded by the tracks someone listens to.
            self.delivered.lock(&like.track).remove(&like.track);
            self.rounds.lock(&like.track).remove(&like.track);
            return;
        }
        let track = like.track.clone();
        let opened = {
            let mut shard = self.pending.lock(&track);
            match shard.get_mut(&track) {
                Some(pending) => {
                    pending.fold(like);
                    false
                }
                None => {
                    shard.insert(track.clone(), Pending::open(like));
                    true
                }
            }
        };
        if opened {
            let window = self.window_for(audience);
            let fanout = self.clone();
            self.tasks.spawn(async move {
                if !window.is_zero() {
                    tokio::time::sleep(window).await;
                }
                let previous = fanout.rounds.lock(&track).get(&track).cloned();
                if let Some(previous) = previous {
                    previous.finished(ROUND_WAIT).await;
                }
                fanout.flush(&track).await;
            });
        }
    }

    /// Closes the track's window: shape once, serialize once, queue everywhere.
    async fn flush(&self, track: &Arc<str>) {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&**track, &mut hasher);
        let order = std::hash::Hasher::finish(&hasher) as usize % self.flush_order.len();
        let _in_order = self.flush_order[order].lock().await;
        let Some(mut pending) = self.pending.lock(track).remove(track) else {
            return;
        };
        {
            let mut delivered = self.delivered.lock(track);
            let newest = delivered
                .entry(track.clone())
                .or_insert((pending.version, pending.count));
            if pending.version >= newest.0 {
                *newest = (pending.version, pending.count);
            } else {
                pending.count = newest.1;
            }
        }
        // Shape once (plugin, or the built-in frame), serialize once.
        let shaped = self
            .plugins
            .shape(track, pending.count, pending.delta, &pending.recent)
            .await;
        let text = match shaped {
            Some(text) => text,
            None => {
                let frame = LikesFrame {
                    kind: "likes",
                    track,
                    count: pending.count,
                    delta: pending.delta,
                    recent: &pending.recent,
                    listeners: self.registry.listening(track),
                };
                match serde_json::to_string(&frame) {
                    Ok(text) => text,
                    Err(err) => {
                        crate::error_throttled!(error = %err, %track, "cannot serialize update");
                        return;
                    }
                }
            }
        };
        let round = Round::new();
        let update = Update::new(Utf8Bytes::from(text), round.clone());
        let mut listeners = Vec::new();
        self.registry.listeners(track, &mut listeners);
        let skip = match pending.origin {
            Origin::One(conn) => Some(conn),
            Origin::Many => None,
        };
        let (mut delivered, mut written) = (0u64, 0u64);
        for outbox in listeners.iter().filter(|o| Some(o.conn) != skip) {
            match outbox.push(track, &update) {
                Push::Queued => delivered += 1,
                Push::Written => {
                    delivered += 1;
                    written += 1;
                }
                Push::Conflated => {
                    self.metrics.outbound_conflated.inc();
                }
                Push::Overflowed => {}
            }
        }
        round.release();
        self.rounds.lock(track).insert(track.clone(), round);
        self.metrics.broadcast_updates.inc();
        self.metrics.frames_delivered.inc_by(delivered);
        self.metrics.frames_written_directly.inc_by(written);
        self.metrics
            .broadcast_lag
            .observe(pending.since.elapsed().as_secs_f64());
    }
}

/// The bus delivers every like (this node's and, in a farm, the others') here.
impl BusHandler for Arc<Fanout> {
    fn deliver(&self, like: Published) {
        self.publish(like);
    }

    fn tracks(&self) -> Vec<Arc<str>> {
        self.registry.tracks()
    }

    fn listens_to(&self, track: &str) -> bool {
        self.registry.audience_size(track) > 0
    }
}

impl Pending {
    fn open(like: Published) -> Pending {
        Pending {
            count: like.count,
            version: like.version,
            delta: like.delta,
            origin: Origin::One(like.origin),
            recent: vec![like.like],
            since: Instant::now(),
        }
    }

    fn fold(&mut self, like: Published) {
        if like.version >= self.version {
            self.count = like.count;
            self.version = like.version;
        }
        self.delta += like.delta;
        if self.origin != Origin::One(like.origin) {
            self.origin = Origin::Many;
        }
        if self.recent.len() == RECENT_LIMIT {
            self.recent.remove(0);
        }
        self.recent.push(like.like);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_grows_with_audience_within_bounds() {
        let metrics = Arc::new(Metrics::new());
        let bus: Arc<dyn crate::seams::bus::Bus> = Arc::new(crate::seams::bus::LocalBus::default());
        let registry = Arc::new(Registry::new(
            metrics.clone(),
            bus,
            Arc::new(crate::seams::presence::Alone),
        ));
        let counters = Arc::new(crate::seams::counters::MemoryCounters::default());
        let plugins = Arc::new(Plugins::new(
            None,
            "unused".into(),
            counters,
            metrics.clone(),
        ));
        let fanout = Fanout::new(
            registry,
            metrics,
            plugins,
            Duration::from_millis(50),
            Tasks::new(),
        );
        assert_eq!(fanout.window_for(1), Duration::from_millis(2));
        assert_eq!(fanout.window_for(2_500), Duration::from_millis(25));
        assert_eq!(fanout.window_for(1_000_000), Duration::from_millis(50));
    }
}
