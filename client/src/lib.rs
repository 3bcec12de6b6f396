//! Rust client for Fanfare protocol v1 (see `docs/protocol.md`).
//!
//! One background task owns the socket. It pings at the interval the node announces,
//! reconnects with exponential backoff and full jitter (or after a random spread when the node
//! drains with 1001), resubscribes every track and resends every unacked like with its original
//! key on return, so nothing is lost or counted twice.
//!
//! With `--auth jwt`, [`Client::connect_with_tokens`] takes a token source: it is asked for a
//! token at every connect, and again before the session's `expires_at` (at 80 % of the time
//! left), which the client sends as a `refresh`; after close 4001 (`token expired`) it
//! reconnects at once with a fresh one.
//!
//! ```no_run
//! # async fn demo() -> Result<(), fanfare_client::ClientError> {
//! let client = fanfare_client::Client::connect("ws://127.0.0.1:8080/v1/ws?user=ana");
//! let count = client.subscribe("demo:track-1").await?;
//! let ack = client.like("demo:track-1", "key-1").await?;
//! let mut updates = client.updates();
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fanfare_protocol::{Action, ClientFrame, LikeRequest};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
const DRAIN_SPREAD: Duration = Duration::from_secs(5);

/// Where the client gets a JWT (e.g. from the application's login service): called at every
/// connect and before the session ends. An `Err` is retried by the next connect attempt.
pub type TokenSource =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<String, String>> + Send>> + Send + Sync>;

/// Close code of a session whose token expired without a refresh.
const TOKEN_EXPIRED: u16 = 4001;
/// The earliest a refresh is sent after a session (re)starts or was refreshed.
const REFRESH_MIN: Duration = Duration::from_secs(1);

/// Connection state, observable with [`Client::state`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Connecting,
    Connected { user: String },
    Reconnecting { attempt: u32, retry_in: Duration },
    Closed,
}

/// A like's acknowledgement: the total after it, and whether it changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub count: u64,
    pub duplicate: bool,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ClientError {
    #[error("refused ({code}): {message}")]
    Refused {
        code: String,
        message: String,
        retry_after_ms: Option<u64>,
    },
    #[error("client closed")]
    Closed,
}

enum Command {
    /// A track, whether `listeners` frames are wanted, who waits for the count.
    Subscribe(String, bool, oneshot::Sender<u64>),
    Unsubscribe(String),
    Like(
        ClientFrame,
        String,
        oneshot::Sender<Result<Ack, ClientError>>,
    ),
    Close,
}

/// A handle to the connection task; cheap to clone.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    state: watch::Receiver<State>,
    updates: broadcast::Sender<Value>,
}

impl Client {
    /// Starts connecting to a `/v1/ws` URL (with `?user=` or `?token=`); returns at once.
    pub fn connect(url: impl Into<String>) -> Client {
        Client::start(url.into(), None)
    }

    /// Starts connecting to a `/v1/ws` URL with tokens from `get_token` (its `token=` is set
    /// on every connect) and refreshes the session before it ends; returns at once.
    pub fn connect_with_tokens<F, Fut>(url: impl Into<String>, get_token: F) -> Client
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        let source: TokenSource = Arc::new(move || Box::pin(get_token()));
        Client::start(url.into(), Some(source))
    }

    fn start(url: String, tokens: Option<TokenSource>) -> Client {
        let (commands, inbox) = mpsc::channel(1024);
        let (state_tx, state) = watch::channel(State::Connecting);
        let (updates, _) = broadcast::channel(1024);
        let driver = Driver {
            url,
            tokens,
            inbox,
            state: state_tx,
            updates: updates.clone(),
            tracks: HashMap::new(),
            pending: HashMap::new(),
            waiting: HashMap::new(),
        };
        tokio::spawn(driver.run());
        Client {
            commands,
            state,
            updates,
        }
    }

    /// Subscribes (and stays subscribed across reconnects); resolves with the current count.
    pub async fn subscribe(&self, track: &str) -> Result<u64, ClientError> {
        self.subscribe_with(track, false).await
    }

    /// Subscribes, also receiving `listeners` frames in [`Client::updates`] when only the
    /// number of listeners changes (at most every 2 s); resolves with the current count.
    pub async fn subscribe_with_listeners(&self, track: &str) -> Result<u64, ClientError> {
        self.subscribe_with(track, true).await
    }

    async fn subscribe_with(&self, track: &str, listeners: bool) -> Result<u64, ClientError> {
        let (done, count) = oneshot::channel();
        self.send(Command::Subscribe(track.to_owned(), listeners, done))
            .await?;
        count.await.map_err(|_| ClientError::Closed)
    }

    pub async fn unsubscribe(&self, track: &str) -> Result<(), ClientError> {
        self.send(Command::Unsubscribe(track.to_owned())).await
    }

    /// Likes a track; resolves once the node acked it (durably), across reconnects.
    pub async fn like(&self, track: &str, key: &str) -> Result<Ack, ClientError> {
        self.request(Action::Like, track, key).await
    }

    pub async fn unlike(&self, track: &str, key: &str) -> Result<Ack, ClientError> {
        self.request(Action::Unlike, track, key).await
    }

    /// Frames come from the protocol crate, the node's own definition; ids it would refuse are
    /// refused here, before they travel.
    async fn request(&self, action: Action, track: &str, key: &str) -> Result<Ack, ClientError> {
        if !fanfare_protocol::is_valid_track(track) || !fanfare_protocol::is_valid_key(key) {
            return Err(ClientError::Refused {
                code: "bad_request".to_owned(),
                message: "invalid track or key (see docs/protocol.md, id rules)".to_owned(),
                retry_after_ms: None,
            });
        }
        let frame = ClientFrame::Like(LikeRequest {
            action,
            track: track.to_owned(),
            key: key.to_owned(),
        });
        let (done, ack) = oneshot::channel();
        self.send(Command::Like(frame, key.to_owned(), done))
            .await?;
        ack.await.map_err(|_| ClientError::Closed)?
    }

    /// Every frame that carries a track's count, as JSON: `likes` updates, the `subscribed`
    /// confirmations that bring the current count after each (re)subscribe (both carry
    /// `listeners`, listening now), and `listeners` frames where asked for.
    pub fn updates(&self) -> broadcast::Receiver<Value> {
        self.updates.subscribe()
    }

    pub fn state(&self) -> watch::Receiver<State> {
        self.state.clone()
    }

    pub async fn close(&self) {
        let _ = self.commands.send(Command::Close).await;
    }

    async fn send(&self, command: Command) -> Result<(), ClientError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| ClientError::Closed)
    }
}

struct Driver {
    url: String,
    tokens: Option<TokenSource>,
    inbox: mpsc::Receiver<Command>,
    state: watch::Sender<State>,
    updates: broadcast::Sender<Value>,
    /// Subscribed tracks with their last known count and whether `listeners` frames are wanted.
    tracks: HashMap<String, (u64, bool)>,
    /// Unacked likes by key: the frame to resend and who waits.
    pending: HashMap<String, (ClientFrame, oneshot::Sender<Result<Ack, ClientError>>)>,
    waiting: HashMap<String, Vec<oneshot::Sender<u64>>>,
}

enum Next {
    Reconnect { drained: Option<Duration> },
    Stop,
}

/// The delay a draining node asks for in its close reason (`reconnect_after_ms=N`), or a
/// random spread when it gives none.
fn drain_delay(reason: &str) -> Duration {
    reason
        .split("reconnect_after_ms=")
        .nth(1)
        .and_then(|n| n.trim().parse().ok())
        .map(Duration::from_millis)
        .unwrap_or_else(|| DRAIN_SPREAD.mul_f64(rand::random::<f64>()))
}

/// `url` with its `token=` parameter set to `token` (added, or replacing one).
fn with_token(url: &str, token: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut params: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("token="))
        .collect();
    let token = format!("token={token}");
    params.push(&token);
    format!("{base}?{}", params.join("&"))
}

/// When to refresh a session that ends at `expires_at` (Unix seconds): at 80 % of the time
/// left, never sooner than [`REFRESH_MIN`].
fn refresh_delay(expires_at: u64) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_secs(expires_at)
        .saturating_sub(now)
        .mul_f64(0.8)
        .max(REFRESH_MIN)
}

impl Driver {
    /// The URL of the next connect: with a fresh token when there is a source.
    async fn connect_url(&self) -> Result<String, String> {
        match &self.tokens {
            None => Ok(self.url.clone()),
            Some(source) => Ok(with_token(&self.url, &source().await?)),
        }
    }

    async fn run(mut self) {
        let mut attempt: u32 = 0;
        loop {
            let next = match self.connect_url().await {
                Err(err) => {
                    tracing::debug!(error = %err, "no token to connect with");
                    Next::Reconnect { drained: None }
                }
                Ok(url) => match tokio_tungstenite::connect_async(url.as_str()).await {
                    Ok((socket, _)) => self.serve(socket, &mut attempt).await,
                    Err(err) => {
                        tracing::debug!(error = %err, "connect failed");
                        Next::Reconnect { drained: None }
                    }
                },
            };
            let delay = match next {
                Next::Stop => break,
                Next::Reconnect {
                    drained: Some(delay),
                } => delay,
                Next::Reconnect { drained: None } => {
                    let ceiling = BACKOFF_MIN
                        .saturating_mul(1 << attempt.min(10))
                        .min(BACKOFF_MAX);
                    ceiling.mul_f64(rand::random::<f64>())
                }
            };
            attempt += 1;
            let _ = self.state.send(State::Reconnecting {
                attempt,
                retry_in: delay,
            });
            // Commands keep arriving while we wait: queue them for the next connection.
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    command = self.inbox.recv() => match command {
                        None | Some(Command::Close) => { self.stop(); return; }
                        Some(command) => {
                            self.remember(command);
                        }
                    },
                }
            }
        }
        self.stop();
    }

    fn stop(&mut self) {
        for (_, (_, done)) in self.pending.drain() {
            let _ = done.send(Err(ClientError::Closed));
        }
        let _ = self.state.send(State::Closed);
    }

    /// Records a command so that it is (re)sent on the next connection.
    fn remember(&mut self, command: Command) -> Option<ClientFrame> {
        match command {
            Command::Subscribe(track, listeners, done) => {
                self.tracks.entry(track.clone()).or_insert((0, listeners)).1 = listeners;
                self.waiting.entry(track.clone()).or_default().push(done);
                Some(ClientFrame::Subscribe { track, listeners })
            }
            Command::Unsubscribe(track) => {
                self.tracks.remove(&track);
                Some(ClientFrame::Unsubscribe { track })
            }
            Command::Like(frame, key, done) => {
                self.pending.insert(key, (frame.clone(), done));
                Some(frame)
            }
            Command::Close => None,
        }
    }

    async fn serve<S>(
        &mut self,
        mut socket: tokio_tungstenite::WebSocketStream<S>,
        attempt: &mut u32,
    ) -> Next
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut heartbeat = tokio::time::interval(Duration::from_secs(30));
        heartbeat.tick().await;
        // The session's next refresh (with a token source and `--auth jwt`), and the token
        // being fetched for it (fetched apart, so frames keep flowing meanwhile).
        let refresh = tokio::time::sleep(Duration::MAX);
        tokio::pin!(refresh);
        let mut refresh_due = false;
        let mut fetching: Option<oneshot::Receiver<Result<String, String>>> = None;
        loop {
            tokio::select! {
                _ = &mut refresh, if refresh_due => {
                    refresh_due = false;
                    if let Some(source) = self.tokens.clone() {
                        let (done, fetched) = oneshot::channel();
                        tokio::spawn(async move { let _ = done.send(source().await); });
                        fetching = Some(fetched);
                    }
                }
                fetched = async {
                    match fetching.as_mut() {
                        Some(fetched) => fetched.await,
                        None => std::future::pending().await,
                    }
                }, if fetching.is_some() => {
                    fetching = None;
                    match fetched {
                        Ok(Ok(token)) => {
                            let frame = ClientFrame::Refresh { token };
                            if socket.send(Message::text(frame.to_json())).await.is_err() {
                                return Next::Reconnect { drained: None };
                            }
                        }
                        // The session ends with 4001 and the reconnect asks again.
                        Ok(Err(err)) => tracing::warn!(error = %err, "no token to refresh the session with"),
                        Err(_) => {}
                    }
                }
                command = self.inbox.recv() => {
                    let Some(command) = command else { return Next::Stop };
                    if matches!(command, Command::Close) {
                        let _ = socket.close(None).await;
                        return Next::Stop;
                    }
                    if let Some(frame) = self.remember(command)
                        && socket.send(Message::text(frame.to_json())).await.is_err()
                    {
                        return Next::Reconnect { drained: None };
                    }
                }
                _ = heartbeat.tick() => {
                    if socket.send(Message::text(ClientFrame::Ping.to_json())).await.is_err() {
                        return Next::Reconnect { drained: None };
                    }
                }
                message = socket.next() => match message {
                    Some(Ok(Message::Text(text))) => {
                        let Ok(frame) = serde_json::from_str::<Value>(&text) else { continue };
                        // A session's end, from `welcome` and `refreshed` (with `--auth jwt`).
                        let ends_at = match frame["type"].as_str() {
                            Some("welcome" | "refreshed") => frame["expires_at"].as_u64(),
                            _ => None,
                        };
                        if let Some(expires_at) = ends_at.filter(|_| self.tokens.is_some()) {
                            refresh.as_mut().reset(tokio::time::Instant::now() + refresh_delay(expires_at));
                            refresh_due = true;
                        }
                        if frame["type"] == "welcome" {
                            *attempt = 0;
                            let every = Duration::from_millis(frame["heartbeat_ms"].as_u64().unwrap_or(30_000).max(100));
                            heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                            let user = frame["user"].as_str().unwrap_or_default().to_owned();
                            let _ = self.state.send(State::Connected { user });
                            if self.resume(&mut socket).await.is_err() {
                                return Next::Reconnect { drained: None };
                            }
                        } else {
                            self.dispatch(frame);
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let drained = frame.and_then(|f| match u16::from(f.code) {
                            1001 => Some(drain_delay(&f.reason)),
                            // Token expired: come back at once with a fresh one.
                            TOKEN_EXPIRED if self.tokens.is_some() => Some(Duration::ZERO),
                            _ => None,
                        });
                        return Next::Reconnect { drained };
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return Next::Reconnect { drained: None },
                },
            }
        }
    }

    /// After (re)connecting: resubscribe everything, resend every unacked like as it was.
    async fn resume<S>(
        &mut self,
        socket: &mut tokio_tungstenite::WebSocketStream<S>,
    ) -> Result<(), ()>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut frames: Vec<String> = self
            .tracks
            .iter()
            .map(|(track, (_, listeners))| {
                ClientFrame::Subscribe {
                    track: track.clone(),
                    listeners: *listeners,
                }
                .to_json()
            })
            .collect();
        frames.extend(self.pending.values().map(|(frame, _)| frame.to_json()));
        for frame in frames {
            socket.feed(Message::text(frame)).await.map_err(|_| ())?;
        }
        socket.flush().await.map_err(|_| ())
    }

    fn dispatch(&mut self, frame: Value) {
        let track = frame["track"].as_str().unwrap_or_default().to_owned();
        let count = frame["count"].as_u64().unwrap_or(0);
        match frame["type"].as_str() {
            Some("subscribed") => {
                if let Some((known, _)) = self.tracks.get_mut(&track) {
                    *known = count;
                }
                for done in self.waiting.remove(&track).unwrap_or_default() {
                    let _ = done.send(count);
                }
                // After a reconnect this is how the current count arrives: pass it on.
                let _ = self.updates.send(frame);
            }
            Some("likes") => {
                if let Some((known, _)) = self.tracks.get_mut(&track) {
                    *known = count;
                }
                let _ = self.updates.send(frame);
            }
            Some("listeners") => {
                let _ = self.updates.send(frame);
            }
            Some("ack") => {
                let key = frame["id"].as_str().unwrap_or_default();
                if let Some((_, done)) = self.pending.remove(key) {
                    let duplicate = frame["duplicate"].as_bool().unwrap_or(false);
                    let _ = done.send(Ok(Ack { count, duplicate }));
                }
            }
            Some("error") => {
                let code = frame["code"].as_str().unwrap_or("internal").to_owned();
                let key = frame["id"].as_str().unwrap_or_default();
                // Overloaded and internal are transient: keep the like for the next resend.
                if !matches!(code.as_str(), "overloaded" | "internal")
                    && let Some((_, done)) = self.pending.remove(key)
                {
                    let _ = done.send(Err(ClientError::Refused {
                        code,
                        message: frame["message"].as_str().unwrap_or_default().to_owned(),
                        retry_after_ms: frame["retry_after_ms"].as_u64(),
                    }));
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_parameter_is_set_or_replaced() {
        assert_eq!(
            with_token("ws://h/v1/ws", "a.b.c"),
            "ws://h/v1/ws?token=a.b.c"
        );
        assert_eq!(
            with_token("ws://h/v1/ws?token=old&x=1", "new"),
            "ws://h/v1/ws?x=1&token=new"
        );
    }

    #[test]
    fn refreshes_come_at_80_percent_of_the_time_left_and_not_too_soon() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let delay = refresh_delay(now + 100);
        assert!(
            delay > Duration::from_secs(78) && delay <= Duration::from_secs(80),
            "{delay:?}"
        );
        assert_eq!(refresh_delay(now.saturating_sub(5)), REFRESH_MIN);
    }
}
