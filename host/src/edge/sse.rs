//! Read-only streams for embeds and widgets: `GET /v1/tracks/{t}/events` as server-sent
//! events. The stream is a listener like a WebSocket (same auth and connection limits, counted
//! in `listeners`, the same shared update bytes through an outbox that conflates when the
//! reader is slow); it never likes.
//!
//! Events: first `subscribed` (the current count and listeners, also after every reconnect —
//! a `Last-Event-ID` gets the current state, there is no replay), then `likes` updates and,
//! with `?listeners=true`, `listeners` frames; `data:` is the same JSON a WebSocket receives.
//! A comment line every [`KEEP_ALIVE`] keeps proxies from closing an idle stream.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use tokio::sync::mpsc;

use crate::broadcast::outbox::Outbox;
use crate::edge::limits::Admission;
use crate::edge::respond::{Body, json_error};
use crate::node::Node;
use fanfare_protocol::{self as protocol, ServerFrame};

/// A comment line this often while nothing else is sent.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Events buffered between the stream's task and the socket; beyond, the outbox conflates.
const BUFFERED_EVENTS: usize = 8;

/// Opens a stream for `track` for an admitted listener.
pub async fn open(
    node: Arc<Node>,
    track: &str,
    query: Option<&str>,
    admission: Admission,
) -> Response<Body> {
    if !protocol::is_valid_track(track) {
        return json_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "track ids match [A-Za-z0-9_.:-]{1,128}",
        );
    }
    let watch_listeners = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .any(|pair| pair == "listeners=true" || pair == "listeners=1");
    // One track and its listener count: at most two unsent updates.
    let outbox = Arc::new(Outbox::new(node.next_conn_id(), 2));
    // Register first, then read the count: no update can fall between the two.
    let (name, _) = node.registry.subscribe(track, &outbox);
    node.registry
        .watch_listeners(&name, &outbox, watch_listeners);
    let count = match node.ledger.count(track).await {
        Ok(count) => count,
        Err(err) => {
            node.registry.unsubscribe(&name, outbox.conn);
            crate::error_throttled!(error = %err, "cannot read track count");
            return json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "cannot read the track count",
            );
        }
    };
    let first = ServerFrame::Subscribed {
        track,
        count,
        listeners: node.registry.listening(track),
    }
    .to_json();
    let (events, stream) = mpsc::channel::<Bytes>(BUFFERED_EVENTS);
    let _ = events.try_send(event("subscribed", 1, &first));
    node.metrics.connections_opened.inc();
    node.metrics.connections_active.inc();
    let task_node = node.clone();
    node.sessions.spawn(async move {
        let _admission = admission;
        forward(&task_node, &outbox, events).await;
        task_node.registry.unsubscribe(&name, outbox.conn);
        outbox.close();
        task_node.metrics.connections_active.dec();
    });
    let body = StreamBody::new(futures_util::stream::unfold(stream, |mut stream| async {
        let bytes = stream.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(bytes)), stream))
    }));
    let mut response = Response::new(body.boxed_unsync());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx and similar buffer responses unless told not to.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// Moves what the outbox collects into the stream until the reader goes away, falls behind
/// past the slow-consumer timeout, overflows, or the node stops.
async fn forward(node: &Node, outbox: &Outbox, events: mpsc::Sender<Bytes>) {
    let shutdown = node.tasks.shutdown().clone();
    let slow = node.config.slow_consumer_timeout();
    let mut keep_alive = tokio::time::interval(KEEP_ALIVE);
    keep_alive.tick().await;
    let mut frames = Vec::new();
    let mut id = 1u64;
    loop {
        let next: Vec<Bytes> = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = events.closed() => return,
            _ = keep_alive.tick() => vec![Bytes::from_static(b": keep-alive\n\n")],
            _ = outbox.wait() => {
                if !outbox.take(&mut frames) {
                    return;
                }
                frames
                    .drain(..)
                    .map(|frame| {
                        id += 1;
                        let kind = if frame.text.as_str().starts_with(r#"{"type":"listeners""#) {
                            "listeners"
                        } else {
                            "likes"
                        };
                        event(kind, id, frame.text.as_str())
                    })
                    .collect()
            }
        };
        for bytes in next {
            match tokio::time::timeout(slow, events.send(bytes)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return, // the reader is gone
                Err(_) => {
                    node.metrics.slow_consumer_disconnects.inc();
                    return;
                }
            }
        }
        keep_alive.reset();
    }
}

/// One server-sent event. `data` is one line of JSON (serde never writes a raw newline).
fn event(kind: &str, id: u64, data: &str) -> Bytes {
    Bytes::from(format!("event: {kind}\nid: {id}\ndata: {data}\n\n"))
}
