//! Cross-node fan-out over Redis Pub/Sub.
//!
//! A node subscribes to a track's channel only while it has local listeners for that track
//! (the registry reports audiences appearing and vanishing), so traffic scales with interest,
//! not with the farm. Each accepted like is published once — by the ledger's merge script,
//! atomically with the count it changed, or (decided while Redis was away) by this bus;
//! receiving nodes fold it into their own per-track window, so every node sends its listeners
//! one update per window with the newest global count. Publishing never blocks the like path: a bounded queue feeds one
//! publisher task, and while Redis is down updates for other nodes are dropped (and counted);
//! local fan-out goes on.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::keys::channel;
use super::link::RedisLink;
use crate::metrics::Metrics;
use crate::seams::bus::{Bus, BusHandler, Published};
use crate::seams::{Health, Part};
use crate::tasks::Tasks;
use fanfare_protocol::{Action, RecentLike};

const QUEUE: usize = 65_536;
const PUBLISH_BATCH: usize = 512;

/// Told of every global count seen on the bus (keeps degraded-mode counts fresh).
pub type CountObserver = Arc<dyn Fn(&str, u64) + Send + Sync>;

/// The wire form of one like between nodes (short keys: it is sent for every like). The
/// ledger's merge script (`farm::ledger_script::MERGE`) publishes the same JSON for live likes.
#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    n: String,
    t: String,
    c: u64,
    v: u64,
    d: i64,
    u: String,
    k: String,
    a: Action,
}

pub struct RedisBus {
    node: Arc<str>,
    link: Arc<RedisLink>,
    outgoing: mpsc::Sender<Wire>,
    interest: mpsc::Sender<Arc<str>>,
    /// Set when an interest change could not be queued: the subscriber then compares its
    /// channels with the handler's tracks.
    overflowed: Arc<AtomicBool>,
    handler: OnceLock<Arc<dyn BusHandler>>,
    /// Receiving ends, taken by `start`.
    queues: Mutex<Option<Queues>>,
    observe: CountObserver,
    metrics: Arc<Metrics>,
}

struct Queues {
    interest: mpsc::Receiver<Arc<str>>,
    outgoing: mpsc::Receiver<Wire>,
}

impl RedisBus {
    pub fn new(
        node: Arc<str>,
        link: Arc<RedisLink>,
        observe: CountObserver,
        metrics: Arc<Metrics>,
    ) -> RedisBus {
        let (interest, interest_rx) = mpsc::channel(QUEUE);
        let (outgoing, outgoing_rx) = mpsc::channel(QUEUE);
        RedisBus {
            node,
            link,
            outgoing,
            interest,
            overflowed: Arc::new(AtomicBool::new(false)),
            handler: OnceLock::new(),
            queues: Mutex::new(Some(Queues {
                interest: interest_rx,
                outgoing: outgoing_rx,
            })),
            observe,
            metrics,
        }
    }
}

impl Part for RedisBus {
    fn name(&self) -> &'static str {
        "bus (redis pub/sub)"
    }

    fn health(&self) -> Health {
        self.link.health("local fan-out only")
    }
}

impl Bus for RedisBus {
    /// Starts the publisher and the subscriber tasks.
    fn start(&self, handler: Arc<dyn BusHandler>, tasks: &Tasks) {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner()).take();
        let (Some(queues), Ok(())) = (queues, self.handler.set(handler.clone())) else {
            tracing::error!("the bus was started twice; keeping the first start");
            return;
        };
        tasks.spawn(publisher(
            queues.outgoing,
            self.link.clone(),
            self.metrics.clone(),
            tasks.shutdown().clone(),
        ));
        let subscriber = Subscriber {
            node: self.node.clone(),
            link: self.link.clone(),
            handler,
            observe: self.observe.clone(),
            metrics: self.metrics.clone(),
            interest_rx: queues.interest,
            overflowed: self.overflowed.clone(),
        };
        tasks.spawn(subscriber.run(tasks.shutdown().clone()));
    }

    /// This node's listeners at once; the other nodes through the publisher (never waits),
    /// unless the ledger's merge already published it.
    fn publish(&self, like: Published) {
        if like.announced {
            self.metrics.bus_event("published");
        } else {
            let wire = Wire {
                n: self.node.to_string(),
                t: like.track.to_string(),
                c: like.count,
                v: like.version,
                d: like.delta,
                u: like.like.user.clone(),
                k: like.like.id.clone(),
                a: like.like.action,
            };
            if self.outgoing.try_send(wire).is_err() {
                self.metrics.bus_event("dropped");
            }
        }
        if let Some(handler) = self.handler.get() {
            handler.deliver(like);
        }
    }

    fn interest_changed(&self, track: &Arc<str>) {
        if self.interest.try_send(track.clone()).is_err() {
            self.overflowed.store(true, Ordering::Relaxed);
        }
    }
}

async fn publisher(
    mut queue: mpsc::Receiver<Wire>,
    link: Arc<RedisLink>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    loop {
        let received = tokio::select! {
            _ = shutdown.cancelled() => return,
            n = queue.recv_many(&mut batch, PUBLISH_BATCH) => n,
        };
        if received == 0 {
            return;
        }
        let Some(mut conn) = link.connection() else {
            for _ in batch.drain(..) {
                metrics.bus_event("dropped");
            }
            continue;
        };
        let mut pipe = redis::pipe();
        for wire in &batch {
            if let Ok(payload) = serde_json::to_string(wire) {
                pipe.cmd("PUBLISH")
                    .arg(channel(&wire.t))
                    .arg(payload)
                    .ignore();
            }
        }
        match pipe.query_async::<()>(&mut conn).await {
            Ok(()) => {
                for _ in 0..batch.len() {
                    metrics.bus_event("published");
                }
            }
            Err(err) => {
                link.report(&err);
                for _ in 0..batch.len() {
                    metrics.bus_event("dropped");
                }
            }
        }
        batch.clear();
    }
}

struct Subscriber {
    node: Arc<str>,
    link: Arc<RedisLink>,
    handler: Arc<dyn BusHandler>,
    observe: CountObserver,
    metrics: Arc<Metrics>,
    interest_rx: mpsc::Receiver<Arc<str>>,
    overflowed: Arc<AtomicBool>,
}

impl Subscriber {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut generations = self.link.generations();
        loop {
            if let Some(session) = self.link.session() {
                match session.client.get_async_pubsub().await {
                    Ok(pubsub) => {
                        if self.serve(pubsub, &mut generations, &shutdown).await {
                            return;
                        }
                    }
                    Err(err) => self.link.report(&err),
                }
            }
            // Wait for the next (re)connect before subscribing again.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = generations.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            }
        }
    }

    /// Serves one Pub/Sub connection; returns true on shutdown.
    async fn serve(
        &mut self,
        pubsub: redis::aio::PubSub,
        generations: &mut tokio::sync::watch::Receiver<u64>,
        shutdown: &CancellationToken,
    ) -> bool {
        generations.borrow_and_update();
        let (mut sink, mut stream) = pubsub.split();
        let mut subscribed: HashSet<Arc<str>> = HashSet::new();
        // Everything this node listens to now, then changes as they come.
        for track in self.handler.tracks() {
            if sink.subscribe(channel(&track)).await.is_err() {
                return false;
            }
            subscribed.insert(track);
        }
        tracing::info!(tracks = subscribed.len(), "bus subscribed");
        loop {
            self.metrics.bus_channels.set(subscribed.len() as i64);
            if self.overflowed.swap(false, Ordering::Relaxed) {
                let wanted: HashSet<Arc<str>> = self.handler.tracks().into_iter().collect();
                for track in wanted.difference(&subscribed).cloned().collect::<Vec<_>>() {
                    let _ = sink.subscribe(channel(&track)).await;
                    subscribed.insert(track);
                }
                for track in subscribed.difference(&wanted).cloned().collect::<Vec<_>>() {
                    let _ = sink.unsubscribe(channel(&track)).await;
                    subscribed.remove(&track);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return true,
                _ = generations.changed() => {
                    self.metrics.bus_channels.set(0);
                    return false;
                }
                Some(track) = self.interest_rx.recv() => {
                    let wanted = self.handler.listens_to(&track);
                    let result = if wanted && !subscribed.contains(&track) {
                        subscribed.insert(track.clone());
                        sink.subscribe(channel(&track)).await
                    } else if !wanted && subscribed.remove(&track) {
                        sink.unsubscribe(channel(&track)).await
                    } else {
                        Ok(())
                    };
                    if let Err(err) = result {
                        self.link.report(&err);
                        self.metrics.bus_channels.set(0);
                        return false;
                    }
                }
                message = stream.next() => {
                    let Some(message) = message else {
                        tracing::warn!("bus subscription ended");
                        self.metrics.bus_channels.set(0);
                        return false;
                    };
                    self.deliver(message.get_payload_bytes());
                }
            }
        }
    }

    fn deliver(&self, payload: &[u8]) {
        let Ok(wire) = serde_json::from_slice::<Wire>(payload) else {
            self.metrics.bus_event("invalid");
            return;
        };
        if *wire.n == *self.node {
            return; // our own like: already delivered locally
        }
        self.metrics.bus_event("received");
        (self.observe)(&wire.t, wire.c);
        self.handler.deliver(Published {
            track: Arc::from(wire.t.as_str()),
            count: wire.c,
            version: wire.v,
            delta: wire.d,
            like: RecentLike {
                user: wire.u,
                id: wire.k,
                action: wire.a,
            },
            origin: 0,
            announced: true,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::Wire;

    #[test]
    fn the_merge_scripts_json_is_the_wire_form() {
        // As Redis' cjson writes it for MERGE (keys in any order, integers without a point).
        let json =
            r#"{"v":7,"u":"ana","t":"album:x","n":"node0","k":"k1","d":-1,"c":3,"a":"unlike"}"#;
        let wire: Wire = serde_json::from_str(json).expect("the wire form");
        assert_eq!((wire.c, wire.v, wire.d), (3, 7, -1));
        assert_eq!((wire.t.as_str(), wire.u.as_str()), ("album:x", "ana"));
        assert_eq!(wire.a, fanfare_protocol::Action::Unlike);
    }
}
