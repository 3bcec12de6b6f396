//! One WebSocket connection: its read loop, its writes, its heartbeat and its subscriptions.
//!
//! A single task owns the socket. It reads frames, runs up to `--max-inflight` likes
//! concurrently (acks go out as each becomes durable), drains its outbox of broadcast updates,
//! and closes the connection when the client goes silent, floods garbage, or stops reading.

use std::collections::HashSet;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tracing::Instrument;

use crate::broadcast::outbox::{Outbox, Update, push_ws_text_frame};
use crate::edge::auth::Auth;
use crate::edge::direct::DirectTcp;
use crate::edge::limits::{Admission, MessageBucket, RateByKey};
use crate::edge::session_end::{End, read_error};
use crate::like::{self, Reply};
use crate::node::Node;
use fanfare_protocol::{self as protocol, ClientFrame, ErrorCode, FrameError, ServerFrame};

/// Bad frames tolerated per [`GARBAGE_PERIOD`] before the connection is closed with 1008.
const GARBAGE_LIMIT: u32 = 20;
const GARBAGE_PERIOD: Duration = Duration::from_secs(10);
/// How long a closing handshake may take before the socket is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

struct Session<S> {
    node: Arc<Node>,
    ws: WebSocketStream<S>,
    user: Arc<str>,
    outbox: Arc<Outbox>,
    tracks: HashSet<Arc<str>>,
    inflight: FuturesUnordered<BoxFuture<'static, Reply>>,
    bad_frames: u32,
    bad_since: Instant,
    inbound: MessageBucket,
    auth: Arc<Auth>,
    /// When the session ends unless refreshed (Unix seconds; none without tokens).
    expires_at: Option<u64>,
    user_likes: Arc<RateByKey<Arc<str>>>,
    /// Several queued updates copied into one write; empty (no capacity) while idle.
    coalesced: Vec<u8>,
}

/// A coalescing buffer larger than this is dropped after its write, not kept.
const COALESCE_KEEP: usize = 16 * 1024;

/// Unsent bytes the kernel may hold per socket (`TCP_NOTSENT_LOWAT`): beyond, the socket is
/// not writable and updates wait in the outbox, where a newer one replaces an older one,
/// instead of seconds of stale updates sitting in a send buffer.
const NOTSENT_LOWAT: u32 = 16 * 1024;

/// Socket options for an accepted connection: no Nagle delay, a small unsent backlog.
pub fn tune_socket(stream: &tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(stream).set_tcp_notsent_lowat(NOTSENT_LOWAT);
}

/// A write that does not finish within the slow-consumer timeout ends the session.
async fn within_write_timeout(
    node: &Node,
    write: impl std::future::Future<Output = std::io::Result<()>>,
) -> Result<(), End> {
    match tokio::time::timeout(node.config.slow_consumer_timeout(), write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::Broken),
        Err(_) => {
            node.metrics.slow_consumer_disconnects.inc();
            Err(End::SlowConsumer)
        }
    }
}

/// Who the connection proved to be at the upgrade, and until when.
pub struct Credential {
    pub user: Arc<str>,
    pub auth: Arc<Auth>,
    pub expires_at: Option<u64>,
    /// The user's likes per second on this node, shared by all their connections.
    pub likes: Arc<RateByKey<Arc<str>>>,
    /// Inbound messages per second this connection may send.
    pub messages_per_second: u32,
}

/// Serves one upgraded connection until it ends: plain TCP through [`DirectTcp`] (fan-out
/// writes updates to it itself), anything else (TLS) as hyper hands it over. The session runs
/// as a task of its own and this one ends: an idle socket then holds only the session's
/// future, not also the upgrade's.
pub async fn serve(
    node: Arc<Node>,
    upgraded: hyper::upgrade::Upgraded,
    config: WebSocketConfig,
    credential: Credential,
    admission: Admission,
) {
    // One unsent update per track and per track's listener count, plus the margin.
    let outbox = Arc::new(Outbox::new(
        node.next_conn_id(),
        node.config.outbound_queue + 2 * node.config.max_subscriptions,
    ));
    let sessions = node.sessions.clone();
    match upgraded.downcast::<TokioIo<tokio::net::TcpStream>>() {
        Ok(parts) => {
            let stream = DirectTcp::new(parts.io.into_inner(), outbox.clone());
            // A copy of what hyper read past the request; its own buffer (≥ 8 KiB) is freed
            // here, not held for the life of the connection.
            let read = parts.read_buf.to_vec();
            drop(parts.read_buf);
            let ws = WebSocketStream::from_partially_read(stream, read, Role::Server, Some(config))
                .await;
            sessions.spawn(run(node, ws, credential, outbox, admission));
        }
        Err(upgraded) => {
            let ws = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(config),
            )
            .await;
            sessions.spawn(run(node, ws, credential, outbox, admission));
        }
    }
}

/// The connection's session, made before its future so that the future holds it once (an
/// `async fn` keeps its arguments and the session made from them side by side): an idle
/// socket's memory is mostly this future.
fn run<S>(
    node: Arc<Node>,
    ws: WebSocketStream<S>,
    credential: Credential,
    outbox: Arc<Outbox>,
    admission: Admission,
) -> impl std::future::Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = outbox.conn;
    let node_rate = credential.messages_per_second;
    node.metrics.connections_opened.inc();
    node.metrics.connections_active.inc();
    let mut session = Session {
        node,
        ws,
        user: credential.user,
        outbox,
        tracks: HashSet::new(),
        inflight: FuturesUnordered::new(),
        bad_frames: 0,
        bad_since: Instant::now(),
        inbound: MessageBucket::new(node_rate),
        auth: credential.auth,
        expires_at: credential.expires_at,
        user_likes: credential.likes,
        coalesced: Vec::new(),
    };
    // Every log line of this connection carries its id and user (fields in JSON logs).
    let span = tracing::info_span!("conn", id = conn, user = %session.user);
    async move {
        // The connection's slot in the limits, freed when the session ends.
        let _admission = admission;
        let end = session.serve().await;
        tracing::debug!(?end, "session ended");
        Box::pin(session.finish(end)).await;
    }
    .instrument(span)
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    async fn serve(&mut self) -> End {
        let welcome = ServerFrame::Welcome {
            user: &self.user,
            heartbeat_ms: self.node.config.heartbeat_interval,
            expires_at: self.expires_at,
        };
        if let Err(end) = Box::pin(self.send(welcome.to_json())).await {
            return end;
        }
        let timeout = self.node.config.heartbeat_timeout();
        let shutdown = self.node.shutdown.clone();
        let max_inflight = self.node.config.max_inflight;
        let mut updates = Vec::new();
        // Three deadlines share one timer (an idle socket's memory is mostly this future): the
        // heartbeat, moved on every message without touching the timer; on shutdown, this
        // connection's own random moment within the drain period, so closes (and reconnects)
        // spread out instead of stampeding; and the token's expiry. The timer fires at the
        // earliest it was told of; a deadline that moved later is found then and re-armed.
        let mut heartbeat_at = Instant::now() + timeout;
        let mut drain_at: Option<Instant> = None;
        let mut armed = self.expires_at;
        let mut expiry_at = instant_of(armed);
        let earliest = |heartbeat_at: Instant, drain_at: Option<Instant>, expiry_at: Instant| {
            let first = heartbeat_at.min(expiry_at);
            drain_at.map_or(first, |at| at.min(first))
        };
        let mut timer = pin!(tokio::time::sleep_until(earliest(
            heartbeat_at,
            drain_at,
            expiry_at
        )));
        loop {
            if self.expires_at != armed {
                armed = self.expires_at;
                expiry_at = instant_of(armed);
            }
            let next = earliest(heartbeat_at, drain_at, expiry_at);
            if next < timer.deadline() {
                timer.as_mut().reset(next);
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if drain_at.is_none() => {
                    let period = self.node.config.drain_period();
                    drain_at = Some(Instant::now() + period.mul_f64(rand::random::<f64>()));
                }
                _ = &mut timer => {
                    let now = Instant::now();
                    if drain_at.is_some_and(|at| at <= now) {
                        let spread = self.node.config.drain_period().max(Duration::from_secs(1));
                        return End::Shutdown(spread.mul_f64(rand::random::<f64>()).as_millis() as u64);
                    }
                    if heartbeat_at <= now {
                        self.node.metrics.heartbeat_reaps.inc();
                        return End::HeartbeatTimeout;
                    }
                    if armed.is_some() && expiry_at <= now {
                        self.node.metrics.tokens_expired.inc();
                        return End::TokenExpired;
                    }
                    timer.as_mut().reset(earliest(heartbeat_at, drain_at, expiry_at));
                }
                Some(reply) = self.inflight.next(), if !self.inflight.is_empty() => {
                    // Likes of one group commit finish together, but each on its own task,
                    // and the runtime runs the task a finishing like wakes (this one) first:
                    // yield once so the rest of the batch finishes, then answer them all in one
                    // write instead of one syscall each.
                    let mut frames = vec![self.reply_frame(reply)];
                    if !self.inflight.is_empty() {
                        tokio::task::yield_now().await;
                    }
                    while let Some(Some(reply)) = self.inflight.next().now_or_never() {
                        frames.push(self.reply_frame(reply));
                    }
                    if let Err(end) = Box::pin(self.send_all(&mut frames)).await {
                        return end;
                    }
                }
                _ = self.outbox.wait() => {
                    if !self.outbox.take(&mut updates) {
                        self.node.metrics.slow_consumer_disconnects.inc();
                        return End::SlowConsumer;
                    }
                    if let Err(end) = Box::pin(self.send_updates(&mut updates)).await {
                        return end;
                    }
                }
                message = self.ws.next(), if self.inflight.len() < max_inflight => {
                    heartbeat_at = Instant::now() + timeout;
                    let result = match message {
                        None => Err(End::ClientClosed),
                        Some(Err(err)) => Err(read_error(err)),
                        Some(Ok(message)) => Box::pin(self.on_message(message)).await,
                    };
                    if let Err(end) = result {
                        return end;
                    }
                }
            }
        }
    }

    async fn on_message(&mut self, message: Message) -> Result<(), End> {
        if matches!(message, Message::Text(_) | Message::Binary(_)) && !self.inbound.take() {
            self.node.metrics.messages_rate_limited.inc();
            let limit = self.inbound.rate();
            let err = FrameError {
                code: ErrorCode::RateLimited,
                message: format!("more than {limit} messages per second; this one was dropped"),
                key: None,
            };
            return self.on_bad_frame(err).await;
        }
        match message {
            Message::Text(text) => match protocol::decode(&text) {
                Ok(frame) => self.on_frame(frame).await,
                Err(err) => self.on_bad_frame(err).await,
            },
            Message::Binary(_) => {
                let err = FrameError {
                    code: ErrorCode::BadRequest,
                    message: "binary frames are not supported; send JSON text frames".into(),
                    key: None,
                };
                self.on_bad_frame(err).await
            }
            // WebSocket pings are answered by tungstenite; like pongs they only prove liveness.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(()),
            Message::Close(_) => Err(End::ClientClosed),
        }
    }

    async fn on_frame(&mut self, frame: ClientFrame) -> Result<(), End> {
        match frame {
            ClientFrame::Ping => self.send(ServerFrame::Pong.to_json()).await,
            ClientFrame::Like(request) => {
                if let Err(retry_after_ms) = self.user_likes.take(&self.user) {
                    self.node
                        .metrics
                        .protocol_error(ErrorCode::RateLimited.as_str());
                    let limit = self.node.config.limits.max_likes_per_user;
                    let message = format!("more than {limit} likes per second for this user");
                    let frame = ServerFrame::Error {
                        code: ErrorCode::RateLimited,
                        message: &message,
                        id: Some(&request.key),
                        retry_after_ms: Some(retry_after_ms),
                    };
                    return self.send(frame.to_json()).await;
                }
                let work = like::handle(
                    self.node.clone(),
                    self.user.clone(),
                    self.outbox.conn,
                    request,
                );
                self.inflight.push(Box::pin(work));
                Ok(())
            }
            ClientFrame::Subscribe { track, listeners } => self.subscribe(track, listeners).await,
            ClientFrame::Refresh { token } => self.refresh(&token).await,
            ClientFrame::Unsubscribe { track } => {
                if let Some(name) = self.tracks.take(track.as_str()) {
                    self.node.registry.unsubscribe(&name, self.outbox.conn);
                }
                self.send(ServerFrame::Unsubscribed { track: &track }.to_json())
                    .await
            }
        }
    }

    /// A newer token for this session's user moves its end; anything else is refused and the
    /// session keeps its current end.
    async fn refresh(&mut self, token: &str) -> Result<(), End> {
        let refused = |message: String| FrameError {
            code: ErrorCode::Unauthorized,
            message,
            key: None,
        };
        if !self.auth.uses_tokens() {
            let err = refused("this node does not use tokens (--auth dev)".into());
            return self.on_bad_frame(err).await;
        }
        match self.auth.verify(token) {
            Ok((user, expires_at)) if *user == *self.user => {
                self.expires_at = Some(expires_at);
                self.send(ServerFrame::Refreshed { expires_at }.to_json())
                    .await
            }
            Ok(_) => {
                let err = refused("the token is for another user".into());
                self.on_bad_frame(err).await
            }
            Err(reason) => self.on_bad_frame(refused(reason)).await,
        }
    }

    async fn subscribe(&mut self, track: String, watch_listeners: bool) -> Result<(), End> {
        let limit = self.node.config.max_subscriptions;
        if !self.tracks.contains(track.as_str()) && self.tracks.len() >= limit {
            let message = format!("subscription limit of {limit} tracks per connection reached");
            return self.send_error(ErrorCode::Overloaded, &message, None).await;
        }
        // Register first, then read the count: no update can fall between the two.
        let (name, _) = self.node.registry.subscribe(&track, &self.outbox);
        self.node
            .registry
            .watch_listeners(&name, &self.outbox, watch_listeners);
        self.tracks.insert(name);
        match self.node.ledger.count(&track).await {
            Ok(count) => {
                self.send(
                    ServerFrame::Subscribed {
                        track: &track,
                        count,
                        listeners: self.node.registry.listening(&track),
                    }
                    .to_json(),
                )
                .await
            }
            Err(err) => {
                crate::error_throttled!(error = %err, "cannot read track count");
                self.send_error(ErrorCode::Internal, "cannot read the track count", None)
                    .await
            }
        }
    }

    async fn on_bad_frame(&mut self, err: FrameError) -> Result<(), End> {
        if self.bad_since.elapsed() > GARBAGE_PERIOD {
            self.bad_frames = 0;
            self.bad_since = Instant::now();
        }
        self.bad_frames += 1;
        self.send_error(err.code, &err.message, err.key.as_deref())
            .await?;
        if self.bad_frames > GARBAGE_LIMIT {
            self.node.metrics.garbage_disconnects.inc();
            return Err(End::Garbage);
        }
        Ok(())
    }

    /// The ack or refusal a finished like is answered with.
    fn reply_frame(&self, reply: Reply) -> Utf8Bytes {
        let request = &reply.request;
        let text = match reply.result {
            Ok(ack) => ServerFrame::Ack {
                id: &request.key,
                track: &request.track,
                count: ack.count,
                duplicate: ack.duplicate,
            }
            .to_json(),
            Err(refusal) => {
                self.node.metrics.protocol_error(refusal.code.as_str());
                ServerFrame::Error {
                    code: refusal.code,
                    message: &refusal.message,
                    id: Some(&request.key),
                    retry_after_ms: refusal.retry_after_ms,
                }
                .to_json()
            }
        };
        Utf8Bytes::from(text)
    }

    async fn send_error(
        &mut self,
        code: ErrorCode,
        message: &str,
        id: Option<&str>,
    ) -> Result<(), End> {
        self.node.metrics.protocol_error(code.as_str());
        let frame = ServerFrame::Error {
            code,
            message,
            id,
            retry_after_ms: None,
        };
        self.send(frame.to_json()).await
    }

    async fn send(&mut self, text: String) -> Result<(), End> {
        self.send_all(&mut vec![Utf8Bytes::from(text)]).await
    }

    /// Writes frames with one flush (several: framed here into one buffer and written under
    /// the WebSocket in one write, as [`Self::send_updates`] does — tungstenite, with no write
    /// buffer, would make one syscall per frame); a write that does not finish within the
    /// slow-consumer timeout ends the session.
    async fn send_all(&mut self, frames: &mut Vec<Utf8Bytes>) -> Result<(), End> {
        let (ws, buffer) = (&mut self.ws, &mut self.coalesced);
        let write = async move {
            if frames.len() == 1 {
                for frame in frames.drain(..) {
                    ws.feed(Message::Text(frame))
                        .await
                        .map_err(std::io::Error::other)?;
                }
                return ws.flush().await.map_err(std::io::Error::other);
            }
            ws.flush().await.map_err(std::io::Error::other)?;
            buffer.clear();
            for frame in frames.drain(..) {
                push_ws_text_frame(buffer, frame.as_bytes());
            }
            let stream = ws.get_mut();
            stream.write_all(buffer).await?;
            if buffer.capacity() > COALESCE_KEEP {
                *buffer = Vec::new();
            }
            stream.flush().await
        };
        within_write_timeout(&self.node, write).await
    }

    /// Broadcast updates: the frames fan-out built once, written under the WebSocket in one
    /// write (several queued updates coalesced into one buffer). Tungstenite is flushed first
    /// so nothing of its own (a pong) is half-written; between its writes its buffer is
    /// empty, which makes the raw write safe.
    async fn send_updates(&mut self, updates: &mut Vec<Arc<Update>>) -> Result<(), End> {
        let (ws, buffer) = (&mut self.ws, &mut self.coalesced);
        let write = async move {
            ws.flush().await.map_err(std::io::Error::other)?;
            let stream = ws.get_mut();
            match updates.as_slice() {
                [one] => stream.write_all(one.ws_frame()).await?,
                many => {
                    buffer.clear();
                    for update in many {
                        buffer.extend_from_slice(update.ws_frame());
                    }
                    stream.write_all(buffer).await?;
                    if buffer.capacity() > COALESCE_KEEP {
                        *buffer = Vec::new();
                    }
                }
            }
            updates.clear();
            stream.flush().await
        };
        within_write_timeout(&self.node, write).await
    }

    /// Leaves the registry, lets in-flight likes finish (their acks still go out when the
    /// socket allows), then closes with the code that says why.
    async fn finish(&mut self, end: End) {
        for track in self.tracks.drain() {
            self.node.registry.unsubscribe(&track, self.outbox.conn);
        }
        self.outbox.close();
        let deadline = Instant::now() + self.node.config.shutdown_timeout();
        let socket_usable = !matches!(end, End::Broken | End::SlowConsumer | End::ClientClosed);
        // Draining: no more reading; what was accepted finishes and is acked below.
        while let Ok(Some(reply)) = tokio::time::timeout_at(deadline, self.inflight.next()).await {
            if socket_usable {
                let mut frame = vec![self.reply_frame(reply)];
                let _ = self.send_all(&mut frame).await;
            }
        }
        if end == End::TooLarge {
            let message = format!(
                "frames are limited to {} bytes",
                self.node.config.max_frame_bytes
            );
            let _ = self.send_error(ErrorCode::TooLarge, &message, None).await;
        }
        if end == End::ClientClosed {
            // The client's close frame was read, and tungstenite queued the answer: send it, or
            // the client sees the connection end abnormally (1006 in a browser) instead of 1000.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.ws.flush()).await;
        }
        if let Some(frame) = end.close_frame() {
            let ws = &mut self.ws;
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async move {
                if ws.close(Some(frame)).await.is_ok() && socket_usable {
                    // Finish the closing handshake: read and drop what the client still sends
                    // until its Close. A socket closed with unread data is reset by the kernel,
                    // and the reset can cost the client the acks and the close frame already
                    // on their way (seen under shutdown with pipelined likes).
                    while let Some(Ok(_)) = ws.next().await {}
                }
            })
            .await;
        }
        // The outbox may outlive the session (a fan-out or the listener-count task still holds
        // it for a moment); the socket must not, or the client waits for a FIN after the close
        // handshake (seen with Python's websockets: 10 s).
        self.outbox.detach();
        self.node.metrics.connections_active.dec();
    }
}

/// The moment a session ending at `expires_at` (Unix seconds) ends; far away for none.
fn instant_of(expires_at: Option<u64>) -> Instant {
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let Some(at) = expires_at else { return far };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let left = Duration::from_secs(at).saturating_sub(now);
    Instant::now().checked_add(left).unwrap_or(far)
}
