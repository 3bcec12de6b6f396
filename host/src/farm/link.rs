//! One shared, self-healing connection to the farm's Redis (direct or through Sentinel).
//!
//! Commands take a cheap clone of the current multiplexed connection or learn at once that
//! Redis is down (`None`): nothing on the like path waits for a reconnect. A maintainer task
//! pings, notices failures, reconnects with backoff (asking Sentinel for the current master
//! each time), and bumps a generation counter that the bus and the ledger watch to
//! resubscribe and reconcile.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use redis::aio::MultiplexedConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{AsyncConnectionConfig, Client, RedisError};
use redis::{ConnectionAddr, IntoConnectionInfo};
use tokio::sync::{Mutex, Notify, watch};

use crate::metrics::Metrics;
use crate::seams::Health;
use crate::tasks::Tasks;

const COMMAND_TIMEOUT: Duration = Duration::from_millis(1000);
const PING_EVERY: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

enum Target {
    Direct(Client),
    Sentinel(Mutex<SentinelClient>),
}

/// A live connection and where it points.
#[derive(Clone)]
pub struct Session {
    pub conn: MultiplexedConnection,
    pub client: Client,
    pub addr: String,
}

pub struct RedisLink {
    target: Target,
    pub description: String,
    current: std::sync::Mutex<Option<Session>>,
    up: AtomicBool,
    failed: Notify,
    generation: watch::Sender<u64>,
    /// This process's wall clock minus Redis `TIME` (ms), from the last ping.
    skew_ms: AtomicI64,
    /// Redis answers but refuses writes (`OOM`: maxmemory reached with `noeviction`); cleared
    /// by the next write it accepts.
    refusing_writes: AtomicBool,
}

impl RedisLink {
    /// `redis[s]://[user:password@]host:port[/db]`, or
    /// `redis+sentinel://[user:password@]host:port[,host:port…]/master-name` (the credentials
    /// are the master's and its replicas'; the sentinels are asked without any, as their
    /// usual setup has none — `sentinel auth-pass` gives them the master's). `ca`: a PEM file of the certificate
    /// authorities a `rediss://` server's certificate must chain to (default: the system's).
    pub fn new(url: &str, ca: Option<&Path>) -> anyhow::Result<Arc<RedisLink>> {
        let target = if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            let (credentials, rest) = match rest.rsplit_once('@') {
                Some((credentials, rest)) => (Some(credentials), rest),
                None => (None, rest),
            };
            let (hosts, master) = rest
                .split_once('/')
                .context("a sentinel URL needs the master name: redis+sentinel://h:p,h:p/name")?;
            if master.is_empty() || hosts.is_empty() {
                bail!("a sentinel URL needs hosts and a master name");
            }
            let userinfo = credentials.map(|c| format!("{c}@")).unwrap_or_default();
            let sentinels: Vec<String> = hosts.split(',').map(|h| format!("redis://{h}")).collect();
            // The master's login, read the way the crate reads it from a URL.
            let master_info = match credentials {
                Some(_) => Some(
                    format!("redis://{userinfo}127.0.0.1")
                        .as_str()
                        .into_connection_info()
                        .context("invalid credentials in the sentinel URL")?
                        .redis,
                ),
                None => None,
            };
            let client = SentinelClient::build(
                sentinels,
                master.to_owned(),
                Some(SentinelNodeConnectionInfo {
                    tls_mode: None,
                    redis_connection_info: master_info,
                }),
                SentinelServerType::Master,
            )
            .context("invalid sentinel addresses")?;
            Target::Sentinel(Mutex::new(client))
        } else {
            let invalid = || format!("invalid Redis URL {}", redacted(url));
            let info = url.into_connection_info().with_context(invalid)?;
            let client = match (&info.addr, ca) {
                (ConnectionAddr::TcpTls { .. }, Some(ca)) => {
                    let root_cert = std::fs::read(ca)
                        .with_context(|| format!("cannot read --redis-ca {}", ca.display()))?;
                    let certificates = redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root_cert),
                    };
                    Client::build_with_tls(info, certificates).with_context(invalid)?
                }
                (_, Some(_)) => bail!("--redis-ca is for rediss:// URLs"),
                (_, None) => Client::open(info).with_context(invalid)?,
            };
            Target::Direct(client)
        };
        Ok(Arc::new(RedisLink {
            target,
            description: redacted(url),
            current: std::sync::Mutex::new(None),
            up: AtomicBool::new(false),
            failed: Notify::new(),
            generation: watch::channel(0).0,
            skew_ms: AtomicI64::new(0),
            refusing_writes: AtomicBool::new(false),
        }))
    }

    /// The current connection, or `None` at once while Redis is unreachable.
    pub fn session(&self) -> Option<Session> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn connection(&self) -> Option<MultiplexedConnection> {
        self.session().map(|s| s.conn)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The health of a part that depends on this link: degraded, with what that means for the
    /// part, while Redis is unreachable.
    pub fn health(&self, while_down: &str) -> Health {
        if !self.is_up() {
            Health::Degraded(format!("redis unreachable: {while_down}"))
        } else if self.refusing_writes.load(Ordering::Relaxed) {
            Health::Degraded(format!(
                "redis refuses writes (OOM: maxmemory reached): {while_down}"
            ))
        } else {
            Health::Healthy
        }
    }

    /// A write went through: Redis is not (or no longer) out of memory.
    pub fn write_accepted(&self) {
        if self.refusing_writes.swap(false, Ordering::Relaxed) {
            tracing::info!(redis = %self.description, "Redis accepts writes again");
        }
    }

    /// This process's wall clock minus Redis' (ms): what the skew guard watches. Stamps do
    /// not depend on it (the ledger script orders a pair's actions by its stored stamp).
    pub fn clock_skew_ms(&self) -> i64 {
        self.skew_ms.load(Ordering::Relaxed)
    }

    /// `TIME` doubles as the liveness ping: the skew is our clock at the midpoint of the
    /// round trip minus Redis' answer.
    async fn ping(&self, metrics: &Metrics) {
        let Some(mut conn) = self.connection() else {
            return;
        };
        let sent = crate::clock::now_ms();
        let time: Result<(i64, i64), RedisError> = redis::cmd("TIME").query_async(&mut conn).await;
        match time {
            Ok((seconds, micros)) => {
                let midpoint = sent + (crate::clock::now_ms() - sent) / 2;
                let skew = midpoint - (seconds * 1000 + micros / 1000);
                self.skew_ms.store(skew, Ordering::Relaxed);
                metrics.clock_skew_ms.set(skew);
            }
            Err(err) => self.report(&err),
        }
    }

    /// Changes on every successful (re)connect.
    pub fn generations(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Called by users of the connection when a command failed: connection-level errors (and
    /// a master that turned replica) drop the connection and wake the maintainer.
    pub fn report(&self, err: &RedisError) {
        if err.code() == Some("OOM") {
            if !self.refusing_writes.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %err, redis = %self.description, "Redis refuses writes (out of memory); deciding likes locally");
            }
            return;
        }
        let fatal = err.is_io_error()
            || err.is_timeout()
            || err.is_connection_dropped()
            || err.is_connection_refusal()
            || err.code() == Some("READONLY")
            || err.code() == Some("MASTERDOWN");
        if fatal && self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = %err, redis = %self.description, "Redis connection lost; degraded");
            *self.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
            self.failed.notify_one();
        }
    }

    async fn connect(&self) -> anyhow::Result<Session> {
        let client = match &self.target {
            Target::Direct(client) => client.clone(),
            Target::Sentinel(sentinel) => sentinel.lock().await.async_get_client().await?,
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(COMMAND_TIMEOUT)
            .set_response_timeout(COMMAND_TIMEOUT);
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        // A master demoted by a failover still accepts connections: make sure we can write.
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
        if let Some(redis::Value::BulkString(role)) = role.first()
            && role.as_slice() != b"master"
        {
            bail!(
                "{} is a replica, not the master",
                client.get_connection_info().addr
            );
        }
        let addr = client.get_connection_info().addr.to_string();
        Ok(Session { conn, client, addr })
    }

    /// Waits (bounded) for the first connection.
    pub async fn wait_connected(&self, patience: Duration) {
        let mut generations = self.generations();
        let _ = tokio::time::timeout(patience, generations.wait_for(|g| *g > 0)).await;
    }

    /// Keeps the connection alive until shutdown.
    pub fn spawn_maintainer(self: &Arc<Self>, tasks: &Tasks, metrics: Arc<Metrics>) {
        let link = self.clone();
        let shutdown = tasks.shutdown().clone();
        tasks.spawn(async move {
            let mut backoff = Duration::from_millis(50);
            loop {
                if shutdown.is_cancelled() {
                    return;
                }
                if !link.is_up() {
                    metrics.redis_up.set(0);
                    match link.connect().await {
                        Ok(session) => {
                            tracing::info!(redis = %link.description, addr = %session.addr, "Redis connected");
                            *link.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(session);
                            link.up.store(true, Ordering::Relaxed);
                            metrics.redis_up.set(1);
                            link.ping(&metrics).await;
                            link.generation.send_modify(|g| *g += 1);
                            backoff = Duration::from_millis(50);
                        }
                        Err(err) => {
                            tracing::debug!(error = format!("{err:#}"), retry_in = ?backoff, "Redis connect failed");
                            tokio::select! {
                                _ = shutdown.cancelled() => return,
                                _ = tokio::time::sleep(backoff) => {}
                            }
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                            continue;
                        }
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = link.failed.notified() => {}
                    _ = tokio::time::sleep(PING_EVERY) => link.ping(&metrics).await,
                }
            }
        });
    }
}

/// `url` with its password replaced, for logs and metrics.
fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((credentials, host)) => {
            let user = credentials.split_once(':').map_or(credentials, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}
