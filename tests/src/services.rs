//! The pipeline's outside services for tests: a Kafka-protocol broker, a MongoDB-protocol
//! server and `fanfare worker` processes, each on a free loopback port and killed on drop.
//!
//! By default the broker is tansu (durable SQLite storage) and MongoDB is `nx-27017`, both
//! installed by `scripts/setup`. `FANFARE_TEST_KAFKA=host:port` and
//! `FANFARE_TEST_MONGO=mongodb://…` run the same tests against real Apache Kafka and MongoDB
//! instead; tests that must kill or freeze a service are then skipped (they say so).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::{PATIENCE, fanfare_bin, free_port};

/// A name no other test run uses (topics, groups, databases).
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

async fn wait_port(port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + PATIENCE * 3;
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if tokio::time::Instant::now() > deadline {
            bail!("{what} on port {port} did not come up");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn signal_pid(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()?;
    if !status.success() {
        bail!("kill -{name} {pid} failed");
    }
    Ok(())
}

/// Appends a service's stderr to a file in its data directory (kept while the test runs).
fn log_file(dir: &std::path::Path, name: &str) -> anyhow::Result<std::fs::File> {
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))?)
}

/// A Kafka-protocol broker: our own tansu, or the one `FANFARE_TEST_KAFKA` names.
pub struct KafkaBroker {
    child: Option<Child>,
    pub brokers: String,
    port: u16,
    dir: Option<tempfile::TempDir>,
}

impl KafkaBroker {
    pub async fn start() -> anyhow::Result<KafkaBroker> {
        if let Ok(brokers) = std::env::var("FANFARE_TEST_KAFKA") {
            return Ok(KafkaBroker {
                child: None,
                brokers,
                port: 0,
                dir: None,
            });
        }
        let port = free_port()?;
        let mut broker = KafkaBroker {
            child: None,
            brokers: format!("127.0.0.1:{port}"),
            port,
            dir: Some(tempfile::tempdir()?),
        };
        broker.restart().await?;
        Ok(broker)
    }

    /// Where our own broker keeps its data.
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.dir.as_ref().map(|d| d.path())
    }

    /// False for an outside broker, which tests must not kill or freeze.
    pub fn is_own(&self) -> bool {
        self.dir.is_some()
    }

    /// (Re)starts tansu on the same port and storage; what it stored survives.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let dir = self
            .dir
            .as_ref()
            .context("an outside broker cannot be restarted")?;
        let bin = tansu_bin();
        let child = Command::new(&bin)
            .current_dir(dir.path())
            .arg("broker")
            .arg("--listener-url")
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .arg("--storage-engine")
            .arg("sqlite://tansu.db")
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(log_file(dir.path(), "tansu.log")?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {} (run ./scripts/setup)", bin.display()))?;
        self.child = Some(child);
        wait_port(self.port, "tansu").await
    }

    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// If our broker died on its own: its exit status and the end of its log.
    pub fn died(&mut self) -> Option<String> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        Some(format!("tansu exited ({status}): {}", self.log_tail(5)))
    }

    /// Where our broker panicked, as it logged it (`panicked at <file:line>: <message>`).
    pub fn panics(&self) -> Vec<String> {
        let log = self
            .dir()
            .and_then(|d| std::fs::read_to_string(d.join("tansu.log")).ok())
            .unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines
            .iter()
            .enumerate()
            .filter_map(|(i, line)| {
                let at = line.split("panicked at ").nth(1)?;
                let message = lines.get(i + 1).copied().unwrap_or_default();
                let file = at.find("tansu-").map_or(at, |i| &at[i..]);
                Some(format!("{file} {message}"))
            })
            .collect()
    }

    /// The last lines our broker wrote to stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self
            .dir()
            .and_then(|d| std::fs::read_to_string(d.join("tansu.log")).ok())
            .unwrap_or_default();
        // Backtrace frames (indented) say less than the messages above them.
        let mut tail: Vec<&str> = log
            .lines()
            .rev()
            .filter(|l| !l.starts_with(' '))
            .take(lines)
            .collect();
        tail.reverse();
        tail.join(" | ")
    }

    /// SIGSTOP / SIGCONT.
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .context("broker not running")?;
        signal_pid(pid, name)
    }
}

/// `FANFARE_TANSU`, else the binary `scripts/setup` caches, else `tansu` on PATH.
pub fn tansu_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("FANFARE_TANSU") {
        return PathBuf::from(path);
    }
    let cache = std::env::var_os("FANFARE_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/fanfare"));
    let cached = cache.join("tansu/bin/tansu");
    if cached.exists() {
        cached
    } else {
        PathBuf::from("tansu")
    }
}

/// A MongoDB-protocol server: our own nx-27017, or the one `FANFARE_TEST_MONGO` names.
pub struct MongoServer {
    child: Option<Child>,
    pub url: String,
    port: u16,
    dir: Option<tempfile::TempDir>,
}

impl MongoServer {
    pub async fn start() -> anyhow::Result<MongoServer> {
        if let Ok(url) = std::env::var("FANFARE_TEST_MONGO") {
            return Ok(MongoServer {
                child: None,
                url,
                port: 0,
                dir: None,
            });
        }
        let port = free_port()?;
        let mut server = MongoServer {
            child: None,
            url: format!("mongodb://127.0.0.1:{port}/?serverSelectionTimeoutMS=2000"),
            port,
            dir: Some(tempfile::tempdir()?),
        };
        server.restart().await?;
        Ok(server)
    }

    pub fn is_own(&self) -> bool {
        self.dir.is_some()
    }

    /// Where our own server keeps its data.
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.dir.as_ref().map(|d| d.path())
    }

    /// (Re)starts the server on the same port and data directory.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let dir = self
            .dir
            .as_ref()
            .context("an outside MongoDB cannot be restarted")?;
        let child = Command::new("nx-27017")
            .arg("--host")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.port.to_string())
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--pid-file")
            .arg(dir.path().join("nx.pid"))
            .arg("--log-file")
            .arg(dir.path().join("nx.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start nx-27017 (run ./scripts/setup)")?;
        self.child = Some(child);
        wait_port(self.port, "nx-27017").await
    }

    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    pub async fn database(&self, name: &str) -> anyhow::Result<mongodb::Database> {
        let client = mongodb::Client::with_uri_str(&self.url).await?;
        Ok(client.database(name))
    }
}

/// A `fanfare worker` process.
pub struct WorkerProcess {
    child: Child,
}

impl WorkerProcess {
    pub async fn start(args: &[&str]) -> anyhow::Result<WorkerProcess> {
        let mut child = Command::new(fanfare_bin())
            .arg("worker")
            .args(args)
            .env("FANFARE_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start fanfare worker")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await? {
                if line.starts_with("fanfare worker consuming") {
                    return Ok(());
                }
            }
            Err(anyhow!("fanfare worker exited before consuming"))
        })
        .await
        .context("fanfare worker did not start in time")??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(WorkerProcess { child })
    }

    /// kill -9.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

/// HAProxy in TCP mode in front of the nodes, as in `examples/haproxy.cfg`: least connections,
/// `/readyz` health checks every 500 ms, sessions of a node marked down are cut so its clients
/// reconnect to the others, failed connects are redispatched.
pub struct Haproxy {
    child: Child,
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    pub async fn start(nodes: &[String]) -> anyhow::Result<Haproxy> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let servers: String = nodes
            .iter()
            .enumerate()
            .map(|(i, addr)| format!("    server node{i} {addr}\n"))
            .collect();
        let config = format!(
            "global\n    maxconn 8000\n\
             defaults\n    mode tcp\n    timeout connect 1s\n    timeout check 1s\n\
             \x20   timeout client 120s\n    timeout server 120s\n    timeout tunnel 1h\n\
             \x20   retries 3\n    option redispatch\n\
             frontend fanfare\n    bind 127.0.0.1:{port}\n    default_backend nodes\n\
             backend nodes\n    balance leastconn\n    option httpchk\n\
             \x20   http-check send meth GET uri /readyz\n    http-check expect status 200\n\
             \x20   default-server check inter 500ms fall 2 rise 2 on-marked-down shutdown-sessions\n\
             {servers}"
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config)?;
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-q")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start haproxy (run ./scripts/setup)")?;
        wait_port(port, "haproxy").await?;
        Ok(Haproxy {
            child,
            addr: format!("127.0.0.1:{port}"),
            _dir: dir,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}
