//! Everything one node shares between its connections: the seams' parts, broadcast, plugins,
//! metrics, and the one shutdown signal. Built by the composition root (`compose::node`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broadcast::fanout::Fanout;
use crate::broadcast::outbox::ConnId;
use crate::broadcast::registry::Registry;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::plugins::Plugins;
use crate::seams::bus::Bus;
use crate::seams::event_log::EventLog;
use crate::seams::history::History;
use crate::seams::ledger::Ledger;
use crate::seams::{Health, Part, Parts};
use crate::tasks::Tasks;

pub struct Node {
    pub config: Config,
    pub id: Arc<str>,
    pub ledger: Arc<dyn Ledger>,
    pub event_log: Arc<dyn EventLog>,
    /// Carries accepted likes to every node's listeners (this node's included).
    pub bus: Arc<dyn Bus>,
    /// Where `/v1/tracks/{track}/history` reads from.
    pub history: Arc<dyn History>,
    pub registry: Arc<Registry>,
    pub fanout: Arc<Fanout>,
    pub plugins: Arc<Plugins>,
    pub metrics: Arc<Metrics>,
    /// The one shutdown signal every loop listens to (the same as `tasks.shutdown()`).
    pub shutdown: CancellationToken,
    /// Every background task; shutdown waits for them last.
    pub tasks: Tasks,
    /// Every WebSocket session, so shutdown can wait for their in-flight likes.
    pub sessions: TaskTracker,
    /// Every part, for readiness and shutdown (in close order).
    parts: [Arc<dyn Part>; 6],
    next_conn: AtomicU64,
}

impl Node {
    #[allow(clippy::too_many_arguments)] // called once, by the composition root, by name
    pub fn new(
        config: Config,
        id: Arc<str>,
        parts: Parts,
        registry: Arc<Registry>,
        fanout: Arc<Fanout>,
        plugins: Arc<Plugins>,
        metrics: Arc<Metrics>,
        tasks: Tasks,
    ) -> Node {
        let all = parts.all();
        let Parts {
            ledger,
            event_log,
            bus,
            counters: _,
            history,
            presence: _,
        } = parts;
        Node {
            config,
            id,
            ledger,
            event_log,
            bus,
            history,
            registry,
            fanout,
            plugins,
            metrics,
            shutdown: tasks.shutdown().clone(),
            tasks,
            sessions: TaskTracker::new(),
            parts: all,
            next_conn: AtomicU64::new(1),
        }
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Accepting work: not shutting down, and no part unavailable.
    pub fn is_ready(&self) -> bool {
        !self.shutdown.is_cancelled()
            && !self
                .parts
                .iter()
                .any(|part| matches!(part.health(), Health::Unavailable(_)))
    }

    /// `None` when healthy; otherwise what is degraded (the node keeps serving).
    pub fn degraded(&self) -> Option<String> {
        let reasons: Vec<String> = self
            .parts
            .iter()
            .filter_map(|part| match part.health() {
                Health::Healthy => None,
                Health::Degraded(reason) | Health::Unavailable(reason) => Some(reason),
            })
            .collect();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    /// Closes every part in order (the event log first: it flushes what sessions appended).
    pub async fn close_parts(&self) -> anyhow::Result<()> {
        let mut first_error = None;
        for part in &self.parts {
            if let Err(err) = part.close().await {
                tracing::error!(
                    part = part.name(),
                    error = format!("{err:#}"),
                    "close failed"
                );
                first_error.get_or_insert(err.context(format!("cannot close the {}", part.name())));
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
