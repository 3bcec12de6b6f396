//! The pipeline's outside services for tests: a Kafka-protocol broker, a MongoDB-protocol
//! server and `fanfare worker` processes, each on a free loopback port and killed on drop.
//!
//! By default the broker is tansu (durable SQLite storage) and MongoDB is `nx-27017`, both
//! installed by `scripts/setup`. `FANFARE_TEST_KAFKA=host:port` and
//! `FANFARE_TEST_MONGO=mongodb://…` run the same tests against real Apache Kafka and MongoDB
//! instead; tests that must kill or freeze a service are then skipped (they say so).

use std::ffi::OsStr;
use std::path::PathBuf;

use anyhow::Context;

use crate::process::{Log, Ready, Service, Spec};
use crate::{PATIENCE, fanfare_bin, free_port};

/// A name no other test run uses (topics, groups, databases).
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// A Kafka-protocol broker: our own tansu, or the one `FANFARE_TEST_KAFKA` names.
pub struct KafkaBroker {
    /// `None` for an outside broker.
    service: Option<Service>,
    pub brokers: String,
    dir: Option<tempfile::TempDir>,
}

impl KafkaBroker {
    pub async fn start() -> anyhow::Result<KafkaBroker> {
        if let Ok(brokers) = std::env::var("FANFARE_TEST_KAFKA") {
            return Ok(KafkaBroker {
                service: None,
                brokers,
                dir: None,
            });
        }
        let port = free_port()?;
        let dir = tempfile::tempdir()?;
        let url = format!("tcp://127.0.0.1:{port}");
        let spec = Spec::new("tansu", tansu_bin(), Ready::Port(port))
            .current_dir(dir.path())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .env("RUST_LOG", "error")
            .log(Log::File(dir.path().join("tansu.log")))
            .patience(PATIENCE * 3);
        Ok(KafkaBroker {
            service: Some(Service::start(spec).await?),
            brokers: format!("127.0.0.1:{port}"),
            dir: Some(dir),
        })
    }

    /// Where our own broker keeps its data.
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.dir.as_ref().map(|d| d.path())
    }

    /// False for an outside broker, which tests must not kill or freeze.
    pub fn is_own(&self) -> bool {
        self.service.is_some()
    }

    fn own(&mut self) -> anyhow::Result<&mut Service> {
        self.service
            .as_mut()
            .context("an outside broker cannot be stopped or restarted")
    }

    /// (Re)starts tansu on the same port and storage; what it stored survives.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.own()?.restart().await
    }

    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.own()?.kill().await
    }

    /// If our broker died on its own: its exit status and the end of its log.
    pub fn died(&mut self) -> Option<String> {
        self.service.as_mut()?.died()
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

    /// The last lines our broker wrote to stderr (backtrace frames, indented, left out).
    pub fn log_tail(&self, lines: usize) -> String {
        let Some(service) = &self.service else {
            return String::new();
        };
        let all = service.log_tail(lines * 20);
        let mut tail: Vec<&String> = all
            .iter()
            .rev()
            .filter(|l| !l.starts_with(' '))
            .take(lines)
            .collect();
        tail.reverse();
        tail.iter()
            .map(|l| l.as_str())
            .collect::<Vec<_>>()
            .join(" | ")
    }

    /// SIGSTOP / SIGCONT.
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        self.service
            .as_ref()
            .context("an outside broker cannot be signalled")?
            .signal(name)
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
    service: Option<Service>,
    pub url: String,
    dir: Option<tempfile::TempDir>,
}

impl MongoServer {
    pub async fn start() -> anyhow::Result<MongoServer> {
        if let Ok(url) = std::env::var("FANFARE_TEST_MONGO") {
            return Ok(MongoServer {
                service: None,
                url,
                dir: None,
            });
        }
        let port = free_port()?;
        let dir = tempfile::tempdir()?;
        let spec = Spec::new("nx-27017", "nx-27017", Ready::Port(port))
            .args(["--host", "127.0.0.1", "-p", &port.to_string()])
            .args([
                OsStr::new("--data-dir"),
                dir.path().join("data").as_os_str(),
            ])
            .args([
                OsStr::new("--pid-file"),
                dir.path().join("nx.pid").as_os_str(),
            ])
            .args([
                OsStr::new("--log-file"),
                dir.path().join("nx.log").as_os_str(),
            ])
            .log(Log::Discard(Some(dir.path().join("nx.log"))))
            .patience(PATIENCE * 3);
        Ok(MongoServer {
            service: Some(Service::start(spec).await?),
            url: format!("mongodb://127.0.0.1:{port}/?serverSelectionTimeoutMS=2000"),
            dir: Some(dir),
        })
    }

    pub fn is_own(&self) -> bool {
        self.service.is_some()
    }

    /// Where our own server keeps its data.
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.dir.as_ref().map(|d| d.path())
    }

    fn own(&mut self) -> anyhow::Result<&mut Service> {
        self.service
            .as_mut()
            .context("an outside MongoDB cannot be stopped or restarted")
    }

    /// (Re)starts the server on the same port and data directory.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.own()?.restart().await
    }

    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.own()?.kill().await
    }

    pub async fn database(&self, name: &str) -> anyhow::Result<mongodb::Database> {
        let client = mongodb::Client::with_uri_str(&self.url).await?;
        Ok(client.database(name))
    }
}

/// A `fanfare worker` process.
pub struct WorkerProcess {
    service: Service,
}

impl WorkerProcess {
    pub async fn start(args: &[&str]) -> anyhow::Result<WorkerProcess> {
        let spec = Spec::new(
            "fanfare worker",
            fanfare_bin(),
            Ready::Line(vec!["fanfare worker consuming"]),
        )
        .args(["worker"])
        .args(args.iter().copied())
        .env("FANFARE_LOG", "warn");
        Ok(WorkerProcess {
            service: Service::start(spec).await?,
        })
    }

    /// kill -9.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.service.kill().await
    }

    /// Starts it again with the same arguments.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.service.restart().await
    }
}

/// HAProxy in TCP mode in front of the nodes, as in `examples/haproxy.cfg`: least connections,
/// `/readyz` health checks every 500 ms, sessions of a node marked down are cut so its clients
/// reconnect to the others, failed connects are redispatched.
pub struct Haproxy {
    service: Service,
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
        let spec = Spec::new("haproxy", "haproxy", Ready::Port(port))
            .args([
                OsStr::new("-db"),
                OsStr::new("-q"),
                OsStr::new("-f"),
                path.as_os_str(),
            ])
            .patience(PATIENCE * 3);
        Ok(Haproxy {
            service: Service::start(spec).await?,
            addr: format!("127.0.0.1:{port}"),
            _dir: dir,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.service.pid()
    }
}
