//! The listener: HTTP routes and the WebSocket upgrade on one port, and the shutdown order.
//!
//! hyper parses HTTP; `/v1/ws` answers 101 itself and hands the upgraded stream to a session
//! task running tokio-tungstenite. Everything else is a small JSON or text response.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::edge::admin;
use crate::edge::auth::Auth;
use crate::edge::limits::{ConnectionGate, RateByKey, Refusal};
use crate::edge::proxy_protocol::ProxyProtocol;
use crate::edge::respond::{Body, asset, json, json_error, text};
use crate::edge::session;
use crate::edge::tls::Tls;
use crate::node::Node;
use fanfare_protocol as protocol;
use tracing::Instrument;

const INDEX_HTML: &str = include_str!("../../static/index.html");
const CLIENT_JS: &str = include_str!("../../static/client.js");

/// The listener's own state, apart from what the node shares: how connections are secured
/// (TLS), who may open one (identity, connection limits) and who says where they come from
/// (a trusted balancer's PROXY header).
pub struct Edge {
    pub tls: Option<Arc<Tls>>,
    pub auth: Arc<Auth>,
    pub gate: Arc<ConnectionGate>,
    pub proxy: Option<ProxyProtocol>,
    pub serves: Serves,
    /// Likes per second per user, over all the user's connections to this node.
    pub user_likes: Arc<RateByKey<Arc<str>>>,
    /// `/v1/tracks/…` reads per second per client address.
    pub http_reads: Arc<RateByKey<std::net::IpAddr>>,
    /// What SIGHUP can change: browser origins allowed to upgrade, and each new connection's
    /// message rate.
    pub allowed_origins: Arc<ArcSwap<Vec<String>>>,
    pub messages_per_second: Arc<AtomicU32>,
}

/// Which routes a listener answers: admin may have an address of its own (`--admin-listen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serves {
    Everything,
    AllButAdmin,
    AdminOnly,
}

impl Edge {
    /// Reads certificates and keys now, so a bad one stops the node before it listens.
    pub fn new(config: &Config) -> anyhow::Result<Arc<Edge>> {
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(Tls::load(cert, key)?),
            _ => None,
        };
        Ok(Arc::new(Edge {
            tls,
            auth: Arc::new(Auth::from_config(config)?),
            gate: ConnectionGate::new(
                config.limits.max_connections,
                config.limits.max_connections_per_ip,
                config.limits.max_connections_per_user,
            ),
            proxy: config
                .proxy_protocol
                .then(|| ProxyProtocol::new(config.trusted_proxies.clone())),
            allowed_origins: Arc::new(ArcSwap::from_pointee(config.allowed_origins.clone())),
            messages_per_second: Arc::new(AtomicU32::new(config.limits.max_messages_per_second)),
            user_likes: Arc::new(RateByKey::new(config.limits.max_likes_per_user)),
            http_reads: Arc::new(RateByKey::new(config.limits.max_http_reads_per_ip)),
            serves: if config.admin_listen.is_some() {
                Serves::AllButAdmin
            } else {
                Serves::Everything
            },
        }))
    }

    /// Takes what SIGHUP may change from a re-read configuration (the config file's values;
    /// flags and environment are those of the start): limits, rates and allowed origins, for
    /// connections and requests from now on.
    pub fn apply(&self, config: &Config) {
        let limits = &config.limits;
        self.gate.set_limits(
            limits.max_connections,
            limits.max_connections_per_ip,
            limits.max_connections_per_user,
        );
        self.user_likes.set_rate(limits.max_likes_per_user);
        self.http_reads.set_rate(limits.max_http_reads_per_ip);
        self.messages_per_second
            .store(limits.max_messages_per_second, Ordering::Relaxed);
        self.allowed_origins
            .store(Arc::new(config.allowed_origins.clone()));
    }

    /// The `--admin-listen` listener's edge: admin only, same TLS, never a PROXY header.
    pub fn admin_only(&self) -> Arc<Edge> {
        Arc::new(Edge {
            tls: self.tls.clone(),
            auth: self.auth.clone(),
            gate: self.gate.clone(),
            proxy: None,
            serves: Serves::AdminOnly,
            user_likes: self.user_likes.clone(),
            http_reads: self.http_reads.clone(),
            allowed_origins: self.allowed_origins.clone(),
            messages_per_second: self.messages_per_second.clone(),
        })
    }
}

/// Accepts connections until shutdown, then stops accepting and lets HTTP requests finish.
pub async fn serve(node: Arc<Node>, edge: Arc<Edge>, listener: TcpListener) {
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = node.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // Usually out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        crate::edge::session::tune_socket(&stream);
        connections.spawn(serve_connection(node.clone(), edge.clone(), peer, stream));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// One accepted connection: its PROXY header if the node sits behind a balancer (the client's
/// address replaces the balancer's from here on), its TLS handshake, then HTTP — together
/// within the handshake deadline.
async fn serve_connection(
    node: Arc<Node>,
    edge: Arc<Edge>,
    peer: SocketAddr,
    mut stream: tokio::net::TcpStream,
) {
    let deadline = tokio::time::Instant::now() + node.config.handshake_timeout();
    let peer = match &edge.proxy {
        None => peer,
        Some(proxy) => match proxy
            .accept(&mut stream, peer, node.config.handshake_timeout())
            .await
        {
            Ok(client) => client,
            Err(err) => {
                node.metrics.proxy_refused(err.reason());
                tracing::debug!(%peer, error = %err, "connection refused");
                return;
            }
        },
    };
    let Some(tls) = &edge.tls else {
        return serve_http(node, edge, peer, stream).await;
    };
    let acceptor = tls.acceptor();
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => serve_http(node, edge, peer, stream).await,
        Ok(Err(err)) => tracing::debug!(%peer, error = %err, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

/// One HTTP/1.1 connection (plain or TLS); upgrades hand the stream to a session.
async fn serve_http<S>(node: Arc<Node>, edge: Arc<Edge>, peer: SocketAddr, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(|req| route(node.clone(), edge.clone(), peer, req));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(node.config.handshake_timeout())
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(err) = result {
                tracing::debug!(%peer, error = %err, "http connection ended");
            }
        }
        _ = node.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

static REQUEST_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Every request runs in a span with its own id, so its log lines can be found together.
async fn route(
    node: Arc<Node>,
    edge: Arc<Edge>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let id = REQUEST_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let span =
        tracing::debug_span!("request", id, %peer, method = %req.method(), path = req.uri().path());
    route_inner(node, edge, peer, req).instrument(span).await
}

async fn route_inner(
    node: Arc<Node>,
    edge: Arc<Edge>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    match (path.starts_with("/admin/"), edge.serves) {
        (true, Serves::AllButAdmin) => {
            return Ok(json_error(
                StatusCode::NOT_FOUND,
                "bad_request",
                "admin is served on --admin-listen",
            ));
        }
        (true, _) => {
            let behind_proxy = edge.proxy.is_some();
            return Ok(admin::serve(&node, behind_proxy, peer, &req, &path).await);
        }
        (false, Serves::AdminOnly) => {
            return Ok(json_error(
                StatusCode::NOT_FOUND,
                "bad_request",
                "only /admin/* here",
            ));
        }
        (false, _) => {}
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is supported here\n",
        ));
    }
    let response = match path.as_str() {
        "/v1/ws" => upgrade(node, &edge, peer, req),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if node.is_ready() => match node.degraded() {
            None => text(StatusCode::OK, "ready\n"),
            // Still serving (an L4 balancer should keep sending traffic), but say what is off.
            Some(reason) => json(
                StatusCode::OK,
                serde_json::json!({ "status": "degraded", "reason": reason }),
            ),
        },
        "/readyz" => match node.degraded() {
            Some(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
            None => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        },
        "/metrics" if node.config.shared.metrics_listen.is_none() => metrics_response(&node),
        "/" => asset(INDEX_HTML, "text/html; charset=utf-8"),
        "/client.js" => asset(CLIENT_JS, "text/javascript; charset=utf-8"),
        _ => match path.strip_prefix("/v1/tracks/") {
            // A stream is a listener: the connection limits apply, not the read rate.
            Some(rest) => match rest.strip_suffix("/events") {
                Some(track) => events(node.clone(), &edge, peer, &req, track).await,
                None => match edge.http_reads.take(&peer.ip()) {
                    Err(retry_ms) => read_limited(&node, retry_ms),
                    Ok(()) => match rest.strip_suffix("/history") {
                        Some(track) => track_history(&node, track, req.uri().query()).await,
                        None => track_count(&node, rest).await,
                    },
                },
            },
            None => json_error(StatusCode::NOT_FOUND, "bad_request", "no such endpoint"),
        },
    };
    Ok(response)
}

/// `GET /v1/tracks/{track}/events`: a read-only event stream, admitted like a WebSocket.
async fn events(
    node: Arc<Node>,
    edge: &Edge,
    peer: SocketAddr,
    req: &Request<Incoming>,
    track: &str,
) -> Response<Body> {
    if !node.is_ready() {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "node is shutting down",
        );
    }
    match admit_listener(&node, edge, peer, req) {
        Ok((_, _, admission)) => {
            crate::edge::sse::open(node, track, req.uri().query(), admission).await
        }
        Err(refused) => *refused,
    }
}

/// 429 for a client address over `--max-http-reads-per-ip`, saying when to come back.
fn read_limited(node: &Node, retry_ms: u32) -> Response<Body> {
    node.metrics.http_reads_limited.inc();
    let mut response = json_error(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "too many requests from your address; retry later",
    );
    let seconds = retry_ms.div_ceil(1000).to_string();
    if let Ok(value) = HeaderValue::from_str(&seconds) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

async fn track_count(node: &Node, track: &str) -> Response<Body> {
    if !protocol::is_valid_track(track) {
        return json_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "track ids match [A-Za-z0-9_.:-]{1,128}",
        );
    }
    match node.ledger.count(track).await {
        Ok(count) => json(
            StatusCode::OK,
            serde_json::json!({
                "track": track,
                "count": count,
                "listeners": node.registry.listening(track),
            }),
        ),
        Err(err) => {
            crate::error_throttled!(error = %err, "cannot read count");
            json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "cannot read the count",
            )
        }
    }
}

/// `GET /v1/tracks/{track}/history?bucket=minute|hour|day&from=…&to=…`
async fn track_history(node: &Node, track: &str, query: Option<&str>) -> Response<Body> {
    if !protocol::is_valid_track(track) {
        return json_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "track ids match [A-Za-z0-9_.:-]{1,128}",
        );
    }
    let params: std::collections::HashMap<String, String> =
        form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let get = |name: &str| params.get(name).map(String::as_str);
    let query =
        match crate::seams::history::Query::new(track, get("bucket"), get("from"), get("to")) {
            Ok(query) => query,
            Err(message) => return json_error(StatusCode::BAD_REQUEST, "bad_request", &message),
        };
    match node.history.buckets(&query).await {
        Ok(rows) => json(
            StatusCode::OK,
            serde_json::json!({
                "track": track,
                "bucket": query.bucket.name(),
                "from": query.start_ms,
                "to": query.end_ms,
                "buckets": rows,
            }),
        ),
        Err(err) => {
            crate::error_throttled!(error = %format!("{err:#}"), "cannot read history");
            json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "history is unavailable right now",
            )
        }
    }
}

/// A listener let in: its user, how it proved it, and its slot in the connection limits.
type Admitted = (
    Arc<str>,
    crate::edge::auth::Identity,
    crate::edge::limits::Admission,
);

/// Who may listen, for a WebSocket and an event stream alike: the browser origin, the
/// identity (token or dev user) and the connection limits. The admission frees its slot when
/// dropped.
pub(crate) fn admit_listener(
    node: &Node,
    edge: &Edge,
    peer: SocketAddr,
    req: &Request<Incoming>,
) -> Result<Admitted, Box<Response<Body>>> {
    let allowed_origins = edge.allowed_origins.load();
    if let Some(origin) = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        && !allowed_origins.is_empty()
        && !allowed_origins.iter().any(|allowed| allowed == origin)
    {
        node.metrics.upgrade_refused("origin");
        return Err(Box::new(json_error(
            StatusCode::FORBIDDEN,
            "unauthorized",
            "origin not allowed",
        )));
    }
    let identity = match edge.auth.authenticate(req.headers(), req.uri().query()) {
        Ok(identity) => identity,
        Err(reason) => {
            node.metrics.upgrade_refused("unauthorized");
            return Err(Box::new(json_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                &reason,
            )));
        }
    };
    let user = match identity.user.clone() {
        None => format!("anon-{:012x}", rand::random::<u64>() >> 16),
        Some(user) if protocol::is_valid_user(&user) => user,
        Some(_) => {
            return Err(Box::new(json_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "user ids match [A-Za-z0-9_.-]{1,64}",
            )));
        }
    };
    let user: Arc<str> = Arc::from(user);
    let admission = edge.gate.admit(peer.ip(), &user).map_err(|refusal| {
        let (reason, status, message) = match refusal {
            Refusal::NodeFull => (
                "node_full",
                StatusCode::SERVICE_UNAVAILABLE,
                "this node is full; try another",
            ),
            Refusal::IpFull => (
                "ip_full",
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections from your address",
            ),
            Refusal::UserFull => (
                "user_full",
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections for this user",
            ),
        };
        node.metrics.upgrade_refused(reason);
        Box::new(json_error(status, "overloaded", message))
    })?;
    Ok((user, identity, admission))
}

/// Answers the WebSocket handshake and spawns the session on the upgraded stream.
fn upgrade(
    node: Arc<Node>,
    edge: &Edge,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Response<Body> {
    if !node.is_ready() {
        node.metrics.upgrade_refused("draining");
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "node is shutting down",
        );
    }
    let headers = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    let key = headers.get(header::SEC_WEBSOCKET_KEY).cloned();
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes() == b"13");
    let (Some(key), true, true, true) = (
        key,
        version_ok,
        has_token(header::CONNECTION, "upgrade"),
        has_token(header::UPGRADE, "websocket"),
    ) else {
        let mut response = json_error(
            StatusCode::UPGRADE_REQUIRED,
            "bad_request",
            "this endpoint needs a WebSocket (version 13) upgrade",
        );
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return response;
    };
    let (user, identity, admission) = match admit_listener(&node, edge, peer, &req) {
        Ok(admitted) => admitted,
        Err(refused) => return *refused,
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_write_buffer_size(1 << 20)
        .max_message_size(Some(node.config.max_frame_bytes))
        .max_frame_size(Some(node.config.max_frame_bytes));
    let credential = session::Credential {
        user,
        auth: edge.auth.clone(),
        expires_at: identity.expires_at,
        likes: edge.user_likes.clone(),
        messages_per_second: edge.messages_per_second.load(Ordering::Relaxed),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let session_node = node.clone();
    node.sessions.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                session::serve(session_node, upgraded, config, credential, admission).await
            }
            Err(err) => tracing::debug!(error = %err, "upgrade failed"),
        }
    });
    let mut response = Response::new(crate::edge::respond::full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Some(protocol) = identity.protocol {
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(protocol),
        );
    }
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

fn metrics_response(node: &Node) -> Response<Body> {
    use http_body_util::BodyExt;
    crate::metrics::http::response(node.metrics.render()).map(|body| body.boxed_unsync())
}
