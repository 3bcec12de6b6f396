//! Helpers for integration tests that drive the real `fanfare` binary over real sockets.
//!
//! A [`NodeProcess`] starts the binary on a kernel-chosen port (`--listen 127.0.0.1:0`, the
//! node prints the bound address), and kills it when dropped, so a failing test leaves nothing
//! behind. A [`WsClient`] speaks protocol v1 with plain tokio-tungstenite.

pub mod chaos;
pub mod monitoring;
pub mod pipeline;
pub mod process;
pub mod proxied;
pub mod services;
pub mod stored;
pub mod traffic;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::process::{Log, Ready, Service, Spec};

/// Default time to wait for something that should happen.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Path of the `fanfare` binary: `FANFARE_BIN`, else next to the test executable's target dir.
pub fn fanfare_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("FANFARE_BIN") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<test-binary> → target/<profile>/fanfare
    let exe = std::env::current_exe().unwrap_or_default();
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    profile_dir.join("fanfare")
}

/// A running node process with its data directory.
pub struct NodeProcess {
    service: Service,
    pub addr: String,
    pub data_dir: PathBuf,
    /// Set when the node owns a temp data directory (removed with it).
    _own_dir: Option<tempfile::TempDir>,
}

/// `--insecure-dev-auth` for a farm node (`--redis`) that chose no `--auth`.
fn insecure_dev_auth(extra: &[&str]) -> Option<&'static str> {
    let farm = extra.contains(&"--redis");
    let auth = extra
        .iter()
        .any(|a| a.starts_with("--auth") || *a == "--insecure-dev-auth");
    (farm && !auth).then_some("--insecure-dev-auth")
}

impl NodeProcess {
    /// A node on a free port with a fresh data directory of its own.
    pub async fn fresh(extra: &[&str]) -> anyhow::Result<NodeProcess> {
        let dir = tempfile::tempdir()?;
        let mut node = Self::start(dir.path(), extra).await?;
        node._own_dir = Some(dir);
        Ok(node)
    }

    /// Starts a node on a free port with the given data directory and extra flags.
    pub async fn start(data_dir: &Path, extra: &[&str]) -> anyhow::Result<NodeProcess> {
        Self::start_on("127.0.0.1:0", data_dir, extra).await
    }

    /// Starts a node on a given address (e.g. to restart one where its clients expect it).
    pub async fn start_on(
        listen: &str,
        data_dir: &Path,
        extra: &[&str],
    ) -> anyhow::Result<NodeProcess> {
        let bin = fanfare_bin();
        if !bin.exists() {
            bail!(
                "{} not found: run `cargo build --workspace --bins` first",
                bin.display()
            );
        }
        let spec = Spec::new(
            "fanfare",
            bin,
            Ready::Line(vec![
                "fanfare listening on http://",
                "fanfare listening on https://",
            ]),
        )
        .args(["--listen", listen])
        .args([OsStr::new("--data-dir"), data_dir.as_os_str()])
        .args(extra.iter().copied())
        // A farm node refuses dev auth unless told it is a demo; the suites use `?user=`.
        .args(insecure_dev_auth(extra))
        .env("FANFARE_LOG", "warn");
        let service = Service::start(spec).await?;
        if extra.contains(&"--proxy-protocol") {
            proxied::register(&service.announced);
        }
        Ok(NodeProcess {
            addr: service.announced.clone(),
            service,
            data_dir: data_dir.to_owned(),
            _own_dir: None,
        })
    }

    /// Starts it again with the same flags and data directory (on a new port unless it was
    /// started with `start_on` a fixed address).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let proxied = proxied::is_proxied(&self.addr);
        self.service.restart().await?;
        self.addr = self.service.announced.clone();
        if proxied {
            proxied::register(&self.addr);
        }
        Ok(())
    }

    pub fn ws_url(&self, user: &str) -> String {
        format!("ws://{}/v1/ws?user={user}", self.addr)
    }

    pub async fn connect(&self, user: &str) -> anyhow::Result<WsClient> {
        WsClient::connect(&self.ws_url(user)).await
    }

    pub fn pid(&self) -> u32 {
        self.service.pid().unwrap_or(0)
    }

    /// Sends a signal (e.g. "TERM", "KILL", "STOP", "CONT") to the node.
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        self.service.signal(name)
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, patience: Duration) -> anyhow::Result<Option<i32>> {
        self.service.wait_exit(patience).await
    }

    /// kill -9.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.service.kill().await
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(&self.addr, path).await
    }

    /// POST without a body: (status, body).
    pub async fn post(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http_request(&self.addr, "POST", path).await
    }

    pub async fn track_count(&self, track: &str) -> anyhow::Result<u64> {
        let (status, body) = self.get(&format!("/v1/tracks/{track}")).await?;
        if status != 200 {
            bail!("GET count: {status} {body}");
        }
        let value: Value = serde_json::from_str(&body)?;
        value["count"].as_u64().context("count missing")
    }

    /// A track's history over the last hour in `bucket`s (minute, hour, day): the summed
    /// (likes, unlikes).
    pub async fn history_last_hour(&self, track: &str, bucket: &str) -> anyhow::Result<(u64, u64)> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis();
        let path = format!(
            "/v1/tracks/{track}/history?bucket={bucket}&from={}&to={}",
            now - 3_600_000,
            now + 1
        );
        let (status, body) = self.get(&path).await?;
        if status != 200 {
            bail!("history: {status} {body}");
        }
        let reply: Value = serde_json::from_str(&body)?;
        let buckets = reply["buckets"].as_array().context("no buckets")?;
        let sum = |field: &str| buckets.iter().filter_map(|b| b[field].as_u64()).sum();
        Ok((sum("likes"), sum("unlikes")))
    }

    /// Reads one sample from `/metrics` (the exact series name with labels, if any).
    pub async fn metric(&self, series: &str) -> anyhow::Result<f64> {
        metric_at(&self.addr, series).await
    }

    /// Polls a metric until it satisfies `check`.
    pub async fn wait_metric(
        &self,
        series: &str,
        check: impl Fn(f64) -> bool,
    ) -> anyhow::Result<f64> {
        self.wait_metric_for(series, PATIENCE, check).await
    }

    pub async fn wait_metric_for(
        &self,
        series: &str,
        patience: Duration,
        check: impl Fn(f64) -> bool,
    ) -> anyhow::Result<f64> {
        wait_metric_at(&self.addr, series, patience, check).await
    }
}

/// Polls a metric of any process serving `/metrics` (a node, a worker) until it satisfies
/// `check`.
pub async fn wait_metric_at(
    addr: &str,
    series: &str,
    patience: Duration,
    check: impl Fn(f64) -> bool,
) -> anyhow::Result<f64> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let value = metric_at(addr, series).await.unwrap_or(f64::NAN);
        if check(value) {
            return Ok(value);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("metric {series} stuck at {value}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Minimal HTTP/1.1 GET over a fresh TCP connection.
pub async fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    http_request(addr, "GET", path).await
}

/// Sends a raw HTTP request and returns the whole response text.
pub async fn raw_http(addr: &str, request: &str) -> anyhow::Result<String> {
    let mut stream = proxied::connect(addr).await?;
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut raw)).await??;
    Ok(String::from_utf8_lossy(&raw).to_string())
}

/// Minimal HTTP/1.1 request without a body: (status, body).
pub async fn http_request(addr: &str, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = proxied::connect(addr).await?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status code")?;
    Ok((status, body.to_owned()))
}

/// A protocol v1 client over any stream (plain TCP, or TLS in the TLS tests).
pub struct WsClient<S = MaybeTlsStream<TcpStream>> {
    pub ws: WebSocketStream<S>,
    pub user: String,
}

impl WsClient {
    /// Connects and consumes the `welcome` frame.
    pub async fn connect(url: &str) -> anyhow::Result<WsClient> {
        let host = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .filter(|host| proxied::is_proxied(host));
        let (ws, _) = match host {
            // A node behind a balancer: the harness opens the stream as the balancer would.
            Some(host) => {
                let stream = proxied::connect(host).await?;
                tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)).await
            }
            None => tokio_tungstenite::connect_async(url).await,
        }
        .with_context(|| format!("connect {url}"))?;
        WsClient::from_stream(ws).await
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> WsClient<S> {
    /// Wraps an upgraded stream and consumes the `welcome` frame.
    pub async fn from_stream(ws: WebSocketStream<S>) -> anyhow::Result<WsClient<S>> {
        let mut client = WsClient {
            ws,
            user: String::new(),
        };
        let welcome = client.recv().await?;
        if welcome["type"] != "welcome" {
            bail!("expected welcome, got {welcome}");
        }
        client.user = welcome["user"].as_str().unwrap_or_default().to_owned();
        Ok(client)
    }

    pub async fn send(&mut self, frame: Value) -> anyhow::Result<()> {
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await?;
        Ok(())
    }

    pub async fn send_raw(&mut self, message: Message) -> anyhow::Result<()> {
        self.ws.send(message).await?;
        Ok(())
    }

    /// Next text frame as JSON (pings and pongs skipped).
    pub async fn recv(&mut self) -> anyhow::Result<Value> {
        match self.recv_message(PATIENCE).await? {
            Message::Text(text) => Ok(serde_json::from_str(&text)?),
            other => bail!("expected a text frame, got {other:?}"),
        }
    }

    /// Next data or close message, skipping pings and pongs.
    pub async fn recv_message(&mut self, patience: Duration) -> anyhow::Result<Message> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .context("timed out waiting for a frame")?;
            match next {
                None => bail!("connection ended"),
                Some(Err(err)) => bail!("websocket error: {err}"),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(message)) => return Ok(message),
            }
        }
    }

    /// Reads frames until one satisfies `want`; returns it.
    pub async fn recv_until(&mut self, want: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        loop {
            let frame = self.recv().await?;
            if want(&frame) {
                return Ok(frame);
            }
        }
    }

    /// Waits for the server's close frame and returns it.
    pub async fn expect_close(&mut self, patience: Duration) -> anyhow::Result<Option<CloseFrame>> {
        loop {
            match self.recv_message(patience).await {
                Ok(Message::Close(frame)) => return Ok(frame),
                Ok(_) => continue,
                Err(err) => bail!("no close frame: {err}"),
            }
        }
    }

    pub async fn subscribe(&mut self, track: &str) -> anyhow::Result<u64> {
        self.send(json!({"type": "subscribe", "track": track}))
            .await?;
        let reply = self
            .recv_until(|f| f["type"] == "subscribed" && f["track"] == track)
            .await?;
        reply["count"].as_u64().context("subscribed without count")
    }

    /// Sends a like/unlike and waits for its ack (or error) frame.
    pub async fn like(&mut self, action: &str, track: &str, key: &str) -> anyhow::Result<Value> {
        self.send(json!({"type": action, "track": track, "id": key}))
            .await?;
        self.recv_until(|f| (f["type"] == "ack" || f["type"] == "error") && f["id"] == key)
            .await
    }
}

/// A throwaway plugin directory holding copies of the built components and a manifest.
pub struct PluginDir {
    pub dir: tempfile::TempDir,
}

impl PluginDir {
    /// Copies every built component from the repository's `plugins/` directory.
    pub fn new() -> anyhow::Result<PluginDir> {
        let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
        let dir = tempfile::tempdir()?;
        let mut copied = 0;
        for entry in std::fs::read_dir(&built)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "wasm") {
                std::fs::copy(
                    &path,
                    dir.path().join(path.file_name().context("file name")?),
                )?;
                copied += 1;
            }
        }
        if copied == 0 {
            bail!(
                "no components in {}: run ./scripts/build-plugins first",
                built.display()
            );
        }
        Ok(PluginDir { dir })
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.dir.path().join("fanfare.toml")
    }

    /// Replaces the manifest atomically (write + rename), as an operator should.
    pub fn write_manifest(&self, text: &str) -> anyhow::Result<()> {
        self.replace_file("fanfare.toml", text.as_bytes())
    }

    pub fn replace_file(&self, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let partial = self.dir.path().join(format!(".{name}.partial"));
        std::fs::write(&partial, bytes)?;
        std::fs::rename(&partial, self.dir.path().join(name))?;
        Ok(())
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Reads one sample from `/metrics` at `addr` (the exact series name with labels, if any).
pub async fn metric_at(addr: &str, series: &str) -> anyhow::Result<f64> {
    let (_, body) = http_get(addr, "/metrics").await?;
    body.lines()
        .find_map(|line| {
            line.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .with_context(|| format!("metric {series} not found"))
}

/// A port the kernel just handed out (for servers that cannot bind port 0 themselves).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A real `redis-server` (or `redis-sentinel`) process on loopback, killed when dropped.
pub struct RedisProcess {
    service: Service,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl RedisProcess {
    /// A master with no persistence: a restart starts empty, the hardest case for convergence.
    pub async fn start() -> anyhow::Result<RedisProcess> {
        Self::launch(vec![]).await
    }

    pub async fn replica_of(master: &RedisProcess) -> anyhow::Result<RedisProcess> {
        Self::launch(vec![
            "--replicaof".into(),
            "127.0.0.1".into(),
            master.port.to_string(),
        ])
        .await
    }

    async fn launch(extra: Vec<String>) -> anyhow::Result<RedisProcess> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let spec = Spec::new("redis-server", "redis-server", Ready::RedisPing(port))
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args([OsStr::new("--dir"), dir.path().as_os_str()])
            .args(extra)
            .log(Log::Discard(None));
        Ok(RedisProcess {
            service: Service::start(spec).await?,
            port,
            dir,
        })
    }

    /// Runs `redis-cli` against this server; its output.
    pub async fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = tokio::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .await
            .context("cannot run redis-cli")?;
        anyhow::ensure!(output.status.success(), "redis-cli {args:?} failed");
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// A Sentinel watching `master` as `mymaster`, quick to declare it down.
    pub async fn sentinel(master: &RedisProcess) -> anyhow::Result<RedisProcess> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 3000\n\
                 sentinel parallel-syncs mymaster 1\n",
                dir.path().display(),
                master.port
            ),
        )?;
        let spec = Spec::new("redis-sentinel", "redis-server", Ready::RedisPing(port))
            .args([conf.as_os_str(), OsStr::new("--sentinel")])
            .log(Log::Discard(None));
        Ok(RedisProcess {
            service: Service::start(spec).await?,
            port,
            dir,
        })
    }

    /// (Re)starts the server on the same port and waits until it answers.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.service.restart().await
    }

    /// kill -9.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.service.kill().await
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `GET key` over a bare connection (RESP inline command); `None` when unset.
    pub async fn get(&self, key: &str) -> anyhow::Result<Option<String>> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await?;
        stream
            .write_all(format!("GET {key}\r\n").as_bytes())
            .await?;
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        reader.read_line(&mut head).await?;
        if head.starts_with("$-1") {
            return Ok(None);
        }
        anyhow::ensure!(head.starts_with('$'), "redis: {}", head.trim_end());
        let mut value = String::new();
        reader.read_line(&mut value).await?;
        Ok(Some(value.trim_end().to_owned()))
    }
}

/// Whether a Redis (or Sentinel) on this loopback port answers `PING`.
pub async fn redis_ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if stream.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut reply = [0u8; 16];
    let n = stream.read(&mut reply).await.unwrap_or(0);
    reply[..n].starts_with(b"+PONG")
}
