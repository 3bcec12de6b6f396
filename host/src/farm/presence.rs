//! Listening now, across the farm: every [`REFRESH`] each node writes the tracks whose local
//! listener count changed into its own hash (one pipeline, whatever the number of sockets),
//! keeps that hash and its entry in the node set alive, and reads the other live nodes'
//! counts for the tracks it serves. A node gone without a word drops out after [`NODE_TTL`];
//! one that closes removes itself at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use super::keys;
use super::link::RedisLink;
use crate::clock::now_ms;
use crate::seams::presence::{LocalCounts, Presence};
use crate::seams::{Health, Part};
use crate::tasks::Tasks;

/// How often counts are exchanged: the staleness of the other nodes' share.
pub const REFRESH: Duration = Duration::from_secs(2);
/// A node that has not refreshed for this long no longer counts.
const NODE_TTL: Duration = Duration::from_secs(10);

pub struct RedisPresence {
    link: Arc<RedisLink>,
    node: Arc<str>,
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    /// Listeners on the other nodes, per track this node serves.
    elsewhere: RwLock<HashMap<Arc<str>, u64>>,
    /// What this node's hash holds (so only changes are written).
    written: Mutex<HashMap<Arc<str>, u64>>,
}

impl RedisPresence {
    pub fn new(link: Arc<RedisLink>, node: Arc<str>) -> RedisPresence {
        RedisPresence {
            link,
            node,
            state: Arc::default(),
        }
    }
}

impl Part for RedisPresence {
    fn name(&self) -> &'static str {
        "presence (redis)"
    }

    fn health(&self) -> Health {
        self.link.health("listener counts show this node only")
    }
}

impl Presence for RedisPresence {
    fn elsewhere(&self, track: &str) -> u64 {
        read(&self.state.elsewhere).get(track).copied().unwrap_or(0)
    }

    fn start(&self, local: LocalCounts, tasks: &Tasks) {
        let (link, node, state) = (self.link.clone(), self.node.clone(), self.state.clone());
        let shutdown = tasks.shutdown().clone();
        tasks.spawn(async move {
            let mut every = tokio::time::interval(REFRESH);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = every.tick() => {}
                }
                let Some(mut conn) = link.connection() else {
                    // Redis away: the other nodes' share is unknown; show this node's only.
                    write(&state.elsewhere).clear();
                    lock(&state.written).clear();
                    continue;
                };
                match exchange(&mut conn, &node, &state, local()).await {
                    Ok(()) => {}
                    Err(err) => {
                        link.report(&err);
                        lock(&state.written).clear(); // rewrite everything next time
                        crate::warn_throttled!(error = %err, "cannot exchange listener counts");
                    }
                }
            }
            // Leaving: the other nodes stop counting this node's listeners at once.
            if let Some(mut conn) = link.connection() {
                let _: Result<(), _> = redis::pipe()
                    .del(keys::presence(&node))
                    .ignore()
                    .zrem(keys::PRESENCE_NODES, &*node)
                    .ignore()
                    .query_async(&mut conn)
                    .await;
            }
        });
    }
}

/// One round: this node's changes and heartbeat, then the other nodes' counts.
async fn exchange(
    conn: &mut redis::aio::MultiplexedConnection,
    node: &str,
    state: &State,
    local: Vec<(Arc<str>, u64)>,
) -> redis::RedisResult<()> {
    let now = now_ms();
    let own = keys::presence(node);
    let current: HashMap<Arc<str>, u64> = local.into_iter().filter(|(_, n)| *n > 0).collect();
    let mut pipe = redis::pipe();
    {
        let written = lock(&state.written);
        let changed: Vec<(&str, u64)> = current
            .iter()
            .filter(|(track, n)| written.get(*track) != Some(n))
            .map(|(track, n)| (&**track, *n))
            .collect();
        let gone: Vec<&str> = written
            .keys()
            .filter(|track| !current.contains_key(*track))
            .map(|track| &**track)
            .collect();
        if !changed.is_empty() {
            pipe.hset_multiple(&own, &changed).ignore();
        }
        if !gone.is_empty() {
            pipe.hdel(&own, gone).ignore();
        }
    }
    pipe.pexpire(&own, NODE_TTL.as_millis() as i64)
        .ignore()
        .zadd(keys::PRESENCE_NODES, node, now)
        .ignore()
        .zrembyscore(
            keys::PRESENCE_NODES,
            "-inf",
            now - NODE_TTL.as_millis() as i64,
        )
        .ignore()
        .zrange(keys::PRESENCE_NODES, 0, -1);
    let (nodes,): (Vec<String>,) = pipe.query_async(conn).await?;
    *lock(&state.written) = current.clone();

    // The other nodes' counts of the tracks this node serves, one HMGET per node.
    let tracks: Vec<Arc<str>> = current.into_keys().collect();
    let others: Vec<String> = nodes.into_iter().filter(|n| n != node).collect();
    let mut elsewhere: HashMap<Arc<str>, u64> = HashMap::with_capacity(tracks.len());
    if !tracks.is_empty() && !others.is_empty() {
        let mut pipe = redis::pipe();
        for other in &others {
            pipe.cmd("HMGET")
                .arg(keys::presence(other))
                .arg(tracks.iter().map(|t| &**t).collect::<Vec<_>>());
        }
        let counts: Vec<Vec<Option<u64>>> = pipe.query_async(conn).await?;
        for per_node in counts {
            for (track, count) in tracks.iter().zip(per_node) {
                *elsewhere.entry(track.clone()).or_default() += count.unwrap_or(0);
            }
        }
    }
    *write(&state.elsewhere) = elsewhere;
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}
