//! The life of a like, top to bottom. Every like and unlike a client sends goes through
//! [`handle`] and nowhere else: gates, admission, decision, then durable first — committed,
//! merged, broadcast — and the ack once shipped.

use std::sync::Arc;

use crate::broadcast::outbox::ConnId;
use crate::metrics::LikeOutcome;
use crate::node::Node;
use crate::plugins::Gate;
use crate::seams::bus::Published;
use crate::seams::event_log::{EventLogError, LikeEvent};
use crate::seams::ledger::{Decision, Merged, Outcome};
use fanfare_protocol::{ErrorCode, LikeRequest, RecentLike};

/// What the liker is told: an ack, or a refusal.
pub struct Reply {
    pub request: LikeRequest,
    pub result: Result<Ack, Refusal>,
}

pub struct Ack {
    pub count: u64,
    pub duplicate: bool,
}

pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: Option<u32>,
}

impl Refusal {
    fn new(code: ErrorCode, message: &str) -> Refusal {
        Refusal {
            code,
            message: message.to_owned(),
            retry_after_ms: None,
        }
    }
}

pub async fn handle(node: Arc<Node>, user: Arc<str>, conn: ConnId, request: LikeRequest) -> Reply {
    let started = std::time::Instant::now();
    let result = run(&node, &user, conn, &request).await;
    if result.is_ok() {
        node.metrics
            .ack_latency
            .observe(started.elapsed().as_secs_f64());
    }
    Reply { request, result }
}

async fn run(
    node: &Arc<Node>,
    user: &Arc<str>,
    conn: ConnId,
    request: &LikeRequest,
) -> Result<Ack, Refusal> {
    // 1. Rate limiting (plugin slot; the host's own per-user rate, --max-likes-per-user, was
    //    taken at the edge before this like got here). 2. Validation (plugin slot; built-in:
    //    the id rules the protocol decoder already enforced).
    for gate in [
        node.plugins.rate_limit(user, request).await,
        node.plugins.validate(user, request).await,
    ] {
        if let Gate::Refuse {
            code,
            message,
            retry_after_ms,
        } = gate
        {
            node.metrics.like(match code {
                ErrorCode::RateLimited => LikeOutcome::RateLimited,
                _ => LikeOutcome::Rejected,
            });
            return Err(Refusal {
                code,
                message,
                retry_after_ms,
            });
        }
    }

    // A full spill (Kafka long gone) refuses the like before it is counted anywhere.
    node.event_log
        .admit()
        .map_err(|err| durability_error(node, err))?;

    // 3. The ledger decides what the action means (the once-only rule, the pair's stamp) and
    //    the event that records it; nothing another node sees has changed yet.
    let decision = node.ledger.decide(user, request).await.map_err(|err| {
        node.metrics.like(LikeOutcome::Failed);
        crate::error_throttled!(error = %err, "ledger failed");
        Refusal::new(
            ErrorCode::Internal,
            "the like could not be recorded; retry with the same id",
        )
    })?;

    let event = match &decision.outcome {
        Outcome::Applied(event) | Outcome::Unchanged(event) => event.clone(),
        Outcome::Restored(event) => {
            // A re-sent like whose first attempt this node cannot vouch for (farm: merged by a
            // node that may have died before shipping it), stored again under its original
            // event id (idempotent everywhere), acked as a re-send.
            store(node, event.clone())
                .await
                .map_err(|err| durability_error(node, err))?;
            node.metrics.like(LikeOutcome::Resent);
            return Ok(Ack {
                count: decision.count,
                duplicate: false,
            });
        }
        Outcome::Resent => {
            // Nothing changes, but the state we confirm must itself be durable before the ack.
            node.event_log
                .barrier()
                .await
                .map_err(|err| durability_error(node, err))?;
            node.metrics.like(LikeOutcome::Resent);
            return Ok(Ack {
                count: decision.count,
                duplicate: false,
            });
        }
    };

    // 4. Durable first: committed, 5. merged where every node sees it, 6. broadcast if the
    //    pair's state changed; 7. the ack once the event is shipped.
    let like = RecentLike {
        user: user.to_string(),
        id: request.key.clone(),
        action: request.action,
    };
    let merged = settle(node, decision, event, like, conn)
        .await
        .map_err(|err| durability_error(node, err))?;
    node.metrics.like(if merged.changed {
        LikeOutcome::Accepted
    } else {
        LikeOutcome::Duplicate
    });
    Ok(Ack {
        count: merged.count,
        // Already in that state (or overtaken by the same user's newer action meanwhile): the
        // action is still stored, as the pair's newest word at its stamp.
        duplicate: !merged.changed,
    })
}

/// Steps 4–7 on a task of their own: once the ledger has decided (and remembered the key), the
/// event is committed, merged and broadcast even if this future is dropped — a session cut at
/// `--shutdown-timeout`, say — because a re-send of the key will be acked as re-sent, and only
/// the stored event makes that ack true.
async fn settle(
    node: &Arc<Node>,
    decision: Decision,
    event: LikeEvent,
    like: RecentLike,
    origin: ConnId,
) -> Result<Merged, EventLogError> {
    let (done, settled) = tokio::sync::oneshot::channel();
    let task_node = node.clone();
    node.tasks.spawn(async move {
        let node = task_node;
        let result = async {
            let shipped = node.event_log.commit(event.clone()).await?;
            let merged = node.ledger.merge(&decision, &event).await;
            if merged.changed {
                // This node's listeners at once, the other nodes' (in a farm) through the bus.
                node.bus.publish(Published {
                    track: event.track.clone(),
                    count: merged.count,
                    version: merged.version,
                    delta: if event.liked() { 1 } else { -1 },
                    like,
                    origin,
                    announced: merged.announced,
                });
            }
            shipped.await?;
            Ok(merged)
        }
        .await;
        let _ = done.send(result);
    });
    settled.await.unwrap_or(Err(EventLogError::Closed))
}

/// Appends on a task of its own, for the same reason as [`settle`].
async fn store(node: &Node, event: LikeEvent) -> Result<(), EventLogError> {
    let (done, stored) = tokio::sync::oneshot::channel();
    let log = node.event_log.clone();
    node.tasks.spawn(async move {
        let _ = done.send(log.append(event).await);
    });
    stored.await.unwrap_or(Err(EventLogError::Closed))
}

fn durability_error(node: &Node, err: EventLogError) -> Refusal {
    node.metrics.like(LikeOutcome::Overloaded);
    match err {
        EventLogError::Closed => Refusal::new(
            ErrorCode::Overloaded,
            "the node is shutting down; retry with the same id",
        ),
        EventLogError::Overloaded(_) => Refusal {
            code: ErrorCode::Overloaded,
            message: "likes cannot be stored right now (event log backlog full); retry later"
                .to_owned(),
            retry_after_ms: Some(5_000),
        },
    }
}
