//! `listeners` updates: to the subscriptions that asked for them, when only the number of
//! listeners of a track changed. Checked every [`PERIOD`], so a reconnect storm of thousands
//! of sockets on a track costs each watcher at most one frame per period, framed once and
//! shared like every update.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::broadcast::outbox::{Push, Round, Update};
use crate::broadcast::registry::Registry;
use crate::metrics::Metrics;
use crate::tasks::Tasks;
use fanfare_protocol::ServerFrame;

/// At most one `listeners` frame per track and watcher in this period (also the farm's
/// presence refresh, so a farm-wide change shows within about two periods).
pub const PERIOD: Duration = Duration::from_secs(2);

/// Starts the periodic check.
pub fn spawn(registry: Arc<Registry>, metrics: Arc<Metrics>, tasks: &Tasks) {
    let shutdown = tasks.shutdown().clone();
    tasks.spawn(async move {
        let mut every = tokio::time::interval(PERIOD);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The count each watched track last announced (or its first watcher was shown), with
        // the key its frames conflate under in outboxes — not the track's own, so a
        // `listeners` frame never replaces an unsent `likes` update.
        let mut announced: HashMap<Arc<str>, (u64, Arc<str>)> = HashMap::new();
        let mut watchers = Vec::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            let watched: HashMap<Arc<str>, u64> = registry.watched_tracks().into_iter().collect();
            announced.retain(|track, _| watched.contains_key(track));
            for (track, shown) in watched {
                let now = registry.listening(&track);
                let (before, key) = announced
                    .entry(track.clone())
                    .or_insert_with(|| (shown, Arc::from(format!("{track}#listeners"))));
                if *before == now {
                    continue;
                }
                *before = now;
                let frame = Update::new(
                    Utf8Bytes::from(
                        ServerFrame::Listeners {
                            track: &track,
                            listeners: now,
                        }
                        .to_json(),
                    ),
                    Round::new(),
                );
                registry.watchers(&track, &mut watchers);
                let mut queued = 0u64;
                for outbox in &watchers {
                    match outbox.push(key, &frame) {
                        Push::Queued | Push::Written => queued += 1,
                        Push::Conflated => {
                            metrics.outbound_conflated.inc();
                        }
                        Push::Overflowed => {}
                    }
                }
                // Hold no connection past its use: a closed one's socket goes with its outbox.
                watchers.clear();
                metrics.listener_updates.inc();
                metrics.frames_delivered.inc_by(queued);
            }
        }
    });
}
