//! The life of a like, top to bottom. Every like and unlike a client sends goes through
//! [`handle`] and nowhere else.

use std::sync::Arc;

use crate::event_log::EventLogError;
use crate::fanout::Published;
use crate::ledger::Outcome;
use crate::metrics::LikeOutcome;
use crate::node::Node;
use crate::outbox::ConnId;
use crate::protocol::{Action, ErrorCode, LikeRequest, RecentLike};

/// What the liker is told: an ack, or an error with a code.
pub struct Reply {
    pub request: LikeRequest,
    pub result: Result<Ack, (ErrorCode, String)>,
}

pub struct Ack {
    pub count: u64,
    pub duplicate: bool,
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
) -> Result<Ack, (ErrorCode, String)> {
    // 1. Rate limiting and 2. validation: ids are already checked by the protocol decoder;
    //    deployment-specific slots (plugins) hook in here.

    // 3. The ledger applies the once-only rule and gives the new total, without waiting for disk.
    let decision = node.ledger.apply(user, request).await.map_err(|err| {
        node.metrics.like(LikeOutcome::Failed);
        tracing::error!(error = %err, "ledger failed");
        (
            ErrorCode::Internal,
            "the like could not be recorded".to_owned(),
        )
    })?;

    match decision.outcome {
        Outcome::Applied(event) => {
            // 4. Broadcast now; it does not wait for durability.
            node.fanout.publish(Published {
                track: event.track.clone(),
                count: decision.count,
                version: event.seq,
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
            });
            // 5. The ack waits until the event is durable.
            node.event_log
                .append(event)
                .await
                .map_err(|err| durability_error(node, err))?;
            node.metrics.like(LikeOutcome::Accepted);
            Ok(Ack {
                count: decision.count,
                duplicate: false,
            })
        }
        Outcome::Duplicate | Outcome::Resent => {
            // Nothing changes, but the state we confirm must itself be durable before the ack.
            node.event_log
                .barrier()
                .await
                .map_err(|err| durability_error(node, err))?;
            let duplicate = decision.outcome == Outcome::Duplicate;
            node.metrics.like(if duplicate {
                LikeOutcome::Duplicate
            } else {
                LikeOutcome::Resent
            });
            Ok(Ack {
                count: decision.count,
                duplicate,
            })
        }
    }
}

fn durability_error(node: &Node, err: EventLogError) -> (ErrorCode, String) {
    match err {
        EventLogError::Closed => {
            node.metrics.like(LikeOutcome::Overloaded);
            (
                ErrorCode::Overloaded,
                "the node is shutting down, retry with the same id".to_owned(),
            )
        }
    }
}
