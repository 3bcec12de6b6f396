//! The life of a like, top to bottom. Every like and unlike a client sends goes through
//! [`handle`] and nowhere else.

use std::sync::Arc;

use crate::broadcast::outbox::ConnId;
use crate::metrics::LikeOutcome;
use crate::node::Node;
use crate::plugins::Gate;
use crate::seams::bus::Published;
use crate::seams::event_log::{EventLogError, LikeEvent};
use crate::seams::ledger::Outcome;
use fanfare_protocol::{Action, ErrorCode, LikeRequest, RecentLike};

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
    let result = run(&node, &user, conn, &request).await;
    Reply { request, result }
}

async fn run(
    node: &Node,
    user: &Arc<str>,
    conn: ConnId,
    request: &LikeRequest,
) -> Result<Ack, Refusal> {
    // 1. Rate limiting (plugin slot; built-in: none). 2. Validation (plugin slot; built-in:
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

    // 3. The ledger applies the once-only rule and gives the new total, without waiting for disk.
    let decision = node.ledger.apply(user, request).await.map_err(|err| {
        node.metrics.like(LikeOutcome::Failed);
        tracing::error!(error = %err, "ledger failed");
        Refusal::new(
            ErrorCode::Internal,
            "the like could not be recorded; retry with the same id",
        )
    })?;

    let unchanged = matches!(decision.outcome, Outcome::Unchanged(_));
    match decision.outcome {
        Outcome::Applied(event) => {
            // 4. Broadcast now; it does not wait for durability.
            let published = Published {
                track: event.track.clone(),
                count: decision.count,
                version: event.version,
                delta: if request.action == Action::Like {
                    1
                } else {
                    -1
                },
                like: RecentLike {
                    user: user.to_string(),
                    id: request.key.clone(),
                    action: request.action,
                },
                origin: conn,
            };
            // This node's listeners at once, the other nodes' (in a farm) through the bus.
            node.bus.publish(published);
            // 5. The ack waits until the event is durable.
            store(node, event)
                .await
                .map_err(|err| durability_error(node, err))?;
            node.metrics.like(LikeOutcome::Accepted);
            Ok(Ack {
                count: decision.count,
                duplicate: false,
            })
        }
        Outcome::Restored(event) | Outcome::Unchanged(event) => {
            // Restored: a re-sent like whose first attempt this node cannot vouch for, stored
            // again under its original event id (idempotent everywhere), acked as a re-send.
            // Unchanged: already in that state, nothing to broadcast, but the action is the
            // pair's newest and is stored like any other, acked as a duplicate.
            store(node, event)
                .await
                .map_err(|err| durability_error(node, err))?;
            node.metrics.like(if unchanged {
                LikeOutcome::Duplicate
            } else {
                LikeOutcome::Resent
            });
            Ok(Ack {
                count: decision.count,
                duplicate: unchanged,
            })
        }
        Outcome::Resent => {
            // Nothing changes, but the state we confirm must itself be durable before the ack.
            node.event_log
                .barrier()
                .await
                .map_err(|err| durability_error(node, err))?;
            node.metrics.like(LikeOutcome::Resent);
            Ok(Ack {
                count: decision.count,
                duplicate: false,
            })
        }
    }
}

/// Appends on a task of its own: once the ledger has decided (and remembered the key), the
/// event reaches the log even if this future is dropped — a session cut at
/// `--shutdown-timeout`, say — because a re-send of the key will be acked as re-sent, and only
/// the stored event makes that ack true.
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
