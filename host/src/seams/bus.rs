//! The bus carries accepted likes to every node's listeners, this node's included.
//!
//! The shape of centrifuge's `Broker` and `BrokerEventHandler`: the bus never knows the
//! broadcast machinery; the composition root registers a [`BusHandler`] (the node's fan-out)
//! when it starts the bus, and the registry tells the bus when a track's local audience
//! appears or vanishes. Alone, [`LocalBus`] hands each like straight to the handler; in a
//! farm, `farm::bus::RedisBus` also carries it to the other nodes over Pub/Sub.

use std::sync::{Arc, OnceLock};

use fanfare_protocol::RecentLike;

use super::Part;
use crate::tasks::Tasks;

/// Identifies one WebSocket connection on this node (0 for likes from other nodes).
pub type ConnId = u64;

/// One accepted like on its way to listeners: the one event of the broadcast path.
#[derive(Debug, Clone)]
pub struct Published {
    pub track: Arc<str>,
    /// Track total after this like.
    pub count: u64,
    /// Orders counts: an update never shows an older total than one already folded in.
    pub version: u64,
    pub delta: i64,
    pub like: RecentLike,
    /// The liker's connection, which is not sent an update holding only its own likes.
    pub origin: ConnId,
    /// The other nodes have it already (farm: the ledger's merge published it atomically with
    /// the count); the bus delivers it to this node only.
    pub announced: bool,
}

/// Where the bus delivers likes: this node's broadcast, registered once at start.
pub trait BusHandler: Send + Sync {
    /// A like accepted on this node or another one; never waits.
    fn deliver(&self, like: Published);

    /// Every track with a local listener now (a bus subscribes to all of them on reconnect).
    fn tracks(&self) -> Vec<Arc<str>>;

    /// Whether a track has a local listener now.
    fn listens_to(&self, track: &str) -> bool;
}

pub trait Bus: Part {
    /// Starts delivering likes to `handler`; called once, by the composition root.
    fn start(&self, handler: Arc<dyn BusHandler>, tasks: &Tasks);

    /// A like accepted on this node: delivered to this node's handler at once and to the other
    /// nodes' as soon as it can be (never waits; while the other nodes are unreachable they
    /// miss the update, not the count).
    fn publish(&self, like: Published);

    /// A track's local audience appeared or vanished (never waits).
    fn interest_changed(&self, track: &Arc<str>);
}

/// The bus of a node that is alone: every like goes straight to this node's handler.
#[derive(Default)]
pub struct LocalBus {
    handler: OnceLock<Arc<dyn BusHandler>>,
}

impl Part for LocalBus {
    fn name(&self) -> &'static str {
        "bus (in-process)"
    }
}

impl Bus for LocalBus {
    fn start(&self, handler: Arc<dyn BusHandler>, _tasks: &Tasks) {
        if self.handler.set(handler).is_err() {
            tracing::error!("the bus was started twice; keeping the first handler");
        }
    }

    fn publish(&self, like: Published) {
        if let Some(handler) = self.handler.get() {
            handler.deliver(like);
        }
    }

    fn interest_changed(&self, _track: &Arc<str>) {}
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use fanfare_protocol::Action;

    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Published>>);

    impl BusHandler for Recorder {
        fn deliver(&self, like: Published) {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).push(like);
        }
        fn tracks(&self) -> Vec<Arc<str>> {
            Vec::new()
        }
        fn listens_to(&self, _track: &str) -> bool {
            true
        }
    }

    #[test]
    fn the_local_bus_delivers_to_its_handler() {
        let bus = LocalBus::default();
        let recorder = Arc::new(Recorder::default());
        bus.start(recorder.clone(), &Tasks::new());
        bus.publish(Published {
            track: "t".into(),
            count: 1,
            version: 1,
            delta: 1,
            like: RecentLike {
                user: "ana".into(),
                id: "k1".into(),
                action: Action::Like,
            },
            origin: 7,
            announced: false,
        });
        let delivered = recorder.0.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(delivered.len(), 1);
        assert_eq!((delivered[0].count, delivered[0].origin), (1, 7));
    }
}
