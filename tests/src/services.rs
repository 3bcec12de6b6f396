//! The pipeline's outside services for tests: Apache Kafka (KRaft, one broker), FerretDB on
//! PostgreSQL as the MongoDB-protocol store, and `fanfare worker` processes, each on free
//! loopback ports with data in a temp dir, killed by pid on drop.
//!
//! `scripts/setup` installs them into the cache (`scripts/services install`): the Kafka jars
//! from Maven Central, the FerretDB binary built from the Go module proxy, PostgreSQL from
//! Debian. `FANFARE_TEST_KAFKA=host:port` and `FANFARE_TEST_MONGO=mongodb://…` (what
//! `eval "$(scripts/services up)"` prints) run the same tests against long-running services
//! instead; tests that must kill or freeze a service are then skipped (they say so).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::process::{Log, Ready, Service, Spec};
use crate::{PATIENCE, fanfare_bin, free_port};

/// Partitions of an auto-created topic: enough for two workers to share the likes.
const TOPIC_PARTITIONS: u32 = 4;

/// A name no other test run uses (topics, groups, databases).
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// Where `scripts/services install` keeps what it installs.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("FANFARE_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/fanfare"))
}

/// The Kafka jars: `FANFARE_KAFKA_LIB`, else the cache.
pub fn kafka_lib() -> PathBuf {
    std::env::var_os("FANFARE_KAFKA_LIB")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("kafka-4.4.0/lib"))
}

/// Apache Kafka of our own — one KRaft node, or a cluster of nodes that are each broker and
/// controller (replication factor 3, `min.insync.replicas=2` from three up) — or the brokers
/// `FANFARE_TEST_KAFKA` names.
pub struct KafkaBroker {
    /// Empty for an outside broker.
    nodes: Vec<Service>,
    pub brokers: String,
    dir: Option<tempfile::TempDir>,
    /// The node the next `kill` takes down (one at a time, in turn).
    next_victim: usize,
}

impl KafkaBroker {
    /// One broker, or `FANFARE_TEST_KAFKA`.
    pub async fn start() -> anyhow::Result<KafkaBroker> {
        KafkaBroker::start_cluster(1).await
    }

    /// `size` brokers on loopback, started together (a quorum forms only once most are up).
    pub async fn start_cluster(size: usize) -> anyhow::Result<KafkaBroker> {
        if let Ok(brokers) = std::env::var("FANFARE_TEST_KAFKA") {
            return Ok(KafkaBroker {
                nodes: Vec::new(),
                brokers,
                dir: None,
                next_victim: 0,
            });
        }
        KafkaBroker::launch(size, &Listener::default()).await
    }

    /// One broker of our own (never an outside one) whose client listener speaks `listener`.
    pub async fn start_secured(listener: &Listener) -> anyhow::Result<KafkaBroker> {
        KafkaBroker::launch(1, listener).await
    }

    async fn launch(size: usize, listener: &Listener) -> anyhow::Result<KafkaBroker> {
        anyhow::ensure!(size >= 1, "a Kafka cluster needs at least one broker");
        let dir = tempfile::tempdir()?;
        let ports: Vec<(u16, u16)> = (0..size)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<anyhow::Result<_>>()?;
        let cluster_id = kafka_cluster_id();
        let lib = kafka_lib();
        let log4j =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka/log4j2.properties");
        let mut specs = Vec::new();
        for (i, (port, _)) in ports.iter().enumerate() {
            let node_dir = dir.path().join(format!("node{}", i + 1));
            std::fs::create_dir_all(&node_dir)?;
            let config = node_dir.join("server.properties");
            std::fs::write(&config, kafka_config(&node_dir, i + 1, &ports, listener))?;
            format_kafka_storage(&config, &cluster_id, size == 1).await?;
            specs.push(
                Spec::new("kafka", "java", Ready::Port(*port))
                    .args(["-Xms128m", "-Xmx512m", "-XX:+UseSerialGC"])
                    .args([format!("-Dlog4j2.configurationFile={}", log4j.display())])
                    .args([format!("-Dkafka.logs.dir={}", node_dir.display())])
                    .args([OsStr::new("-cp"), lib.join("*").as_os_str()])
                    .args([OsStr::new("kafka.Kafka"), config.as_os_str()])
                    .log(Log::File(node_dir.join("stderr.log")))
                    // A restart after kill -9 recovers every log first: slow on a busy machine.
                    .patience(PATIENCE * 6),
            );
        }
        let nodes =
            futures_util::future::try_join_all(specs.into_iter().map(Service::start)).await?;
        let brokers = ports
            .iter()
            .map(|(port, _)| format!("127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        Ok(KafkaBroker {
            nodes,
            brokers,
            dir: Some(dir),
            next_victim: 0,
        })
    }

    /// Where our own brokers keep their data and logs (`node<N>/broker.log`).
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.dir.as_ref().map(|d| d.path())
    }

    /// False for an outside broker, which tests must not kill or freeze.
    pub fn is_own(&self) -> bool {
        !self.nodes.is_empty()
    }

    fn own(&mut self) -> anyhow::Result<&mut Vec<Service>> {
        anyhow::ensure!(
            self.is_own(),
            "an outside broker cannot be stopped or restarted"
        );
        Ok(&mut self.nodes)
    }

    /// Restarts every broker that is down on the same ports and log dirs; what they stored
    /// survives.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        for node in self.own()? {
            if !node.is_running() {
                node.restart().await?;
            }
        }
        Ok(())
    }

    /// `kill -9` of one broker: each call takes the next one in turn.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        let victim = self.next_victim;
        let nodes = self.own()?;
        let count = nodes.len();
        nodes[victim % count].kill().await?;
        self.next_victim = (victim + 1) % count;
        Ok(())
    }

    /// If one of our brokers died on its own: its exit status and the end of its log.
    pub fn died(&mut self) -> Option<String> {
        self.nodes.iter_mut().find_map(Service::died)
    }

    fn logs(&self) -> Vec<String> {
        (1..=self.nodes.len())
            .filter_map(|i| {
                let path = self.dir()?.join(format!("node{i}/broker.log"));
                std::fs::read_to_string(path).ok()
            })
            .collect()
    }

    /// The brokers' ERROR and FATAL log lines (a kill -9 makes a few).
    pub fn errors(&self) -> Vec<String> {
        self.logs()
            .iter()
            .flat_map(|log| log.lines())
            .filter(|l| l.contains("] ERROR ") || l.contains("] FATAL "))
            .map(str::to_owned)
            .collect()
    }

    /// The last lines of each broker's log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.logs()
            .iter()
            .map(|log| {
                let all: Vec<&str> = log.lines().filter(|l| l.starts_with('[')).collect();
                all[all.len().saturating_sub(lines)..].join(" | ")
            })
            .collect::<Vec<_>>()
            .join(" || ")
    }

    /// SIGSTOP / SIGCONT to every broker.
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        anyhow::ensure!(self.is_own(), "an outside broker cannot be signalled");
        for node in &self.nodes {
            node.signal(name)?;
        }
        Ok(())
    }
}

/// A failing test (or any, with `FANFARE_TEST_KEEP_KAFKA=1`) keeps what its brokers stored
/// and logged (data, `broker.log`) for a look afterwards; a passing one leaves nothing behind.
impl Drop for KafkaBroker {
    fn drop(&mut self) {
        let keep =
            std::thread::panicking() || std::env::var_os("FANFARE_TEST_KEEP_KAFKA").is_some();
        if keep && let Some(dir) = self.dir.take() {
            eprintln!("Kafka's data and logs are kept in {}", dir.keep().display());
        }
    }
}

/// The client listener of a broker: its security protocol (`PLAINTEXT`, `SASL_SSL`, …) and
/// the broker properties that configure it (keys, SASL users), appended to the config.
pub struct Listener {
    pub protocol: String,
    pub properties: String,
}

impl Default for Listener {
    fn default() -> Self {
        Listener {
            protocol: "PLAINTEXT".to_owned(),
            properties: String::new(),
        }
    }
}

/// Node `id` (1-based) of a cluster whose nodes listen on `ports` (client, controller), each
/// broker and controller, sized for tests: no rebalance delay, auto-created topics with a few
/// partitions, replicated three ways with two in sync from three nodes up.
pub fn kafka_config(dir: &Path, id: usize, ports: &[(u16, u16)], listener: &Listener) -> String {
    let (port, controller) = ports[id - 1];
    let replicas = ports.len().min(3);
    let in_sync = if replicas >= 3 { 2 } else { 1 };
    let quorum = if ports.len() == 1 {
        format!("controller.quorum.bootstrap.servers=127.0.0.1:{controller}")
    } else {
        let voters: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, c))| format!("{}@127.0.0.1:{c}", i + 1))
            .collect();
        format!("controller.quorum.voters={}", voters.join(","))
    };
    format!(
        "process.roles=broker,controller\n\
         node.id={id}\n\
         listeners={protocol}://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}\n\
         advertised.listeners={protocol}://127.0.0.1:{port}\n\
         controller.listener.names=CONTROLLER\n\
         inter.broker.listener.name={protocol}\n\
         listener.security.protocol.map={protocol}:{protocol},CONTROLLER:PLAINTEXT\n\
         {quorum}\n\
         log.dirs={}\n\
         num.partitions={TOPIC_PARTITIONS}\n\
         auto.create.topics.enable=true\n\
         default.replication.factor={replicas}\n\
         min.insync.replicas={in_sync}\n\
         offsets.topic.replication.factor={replicas}\n\
         offsets.topic.num.partitions=4\n\
         transaction.state.log.replication.factor={replicas}\n\
         transaction.state.log.min.isr={in_sync}\n\
         share.coordinator.state.topic.replication.factor={replicas}\n\
         group.initial.rebalance.delay.ms=0\n\
         {}\n",
        dir.join("data").display(),
        listener.properties,
        protocol = listener.protocol,
    )
}

/// `kafka-storage format` (`--standalone` for a single node; a cluster names its voters in
/// the config).
async fn format_kafka_storage(
    config: &Path,
    cluster_id: &str,
    standalone: bool,
) -> anyhow::Result<()> {
    let mut command = tokio::process::Command::new("java");
    command
        .args(["-Xmx256m", "-cp"])
        .arg(kafka_lib().join("*"))
        .args(["kafka.tools.StorageTool", "format", "-t", cluster_id, "-c"])
        .arg(config);
    if standalone {
        command.arg("--standalone");
    }
    let output = command
        .output()
        .await
        .context("cannot run java (./scripts/setup installs OpenJDK and the Kafka jars)")?;
    anyhow::ensure!(
        output.status.success(),
        "kafka storage format failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// A Kafka cluster id: 16 random bytes, URL-safe base64 without padding, never starting with
/// `-` (the storage tool would take it for an option; Kafka's `Uuid.randomUuid` skips those
/// too — one test run in 64 failed before this).
fn kafka_cluster_id() -> String {
    loop {
        let id = base64_url(rand::random());
        if !id.starts_with('-') {
            return id;
        }
    }
}

fn base64_url(bytes: [u8; 16]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut id = String::with_capacity(22);
    for chunk in bytes.chunks(3) {
        let word = chunk
            .iter()
            .enumerate()
            .fold(0u32, |w, (i, b)| w | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            id.push(ALPHABET[(word >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    id
}

/// A MongoDB-protocol server of our own — FerretDB on its own PostgreSQL — or the one
/// `FANFARE_TEST_MONGO` names. `kill`/`restart` hit FerretDB (the server clients talk to);
/// PostgreSQL, its storage, keeps running.
/// PEM files for a TLS listener: its certificate and key, and the CA clients trust.
pub struct MongoTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

pub struct MongoServer {
    ferretdb: Option<Service>,
    _postgres: Option<Service>,
    pub url: String,
    dir: Option<tempfile::TempDir>,
}

impl MongoServer {
    pub async fn start() -> anyhow::Result<MongoServer> {
        if let Ok(url) = std::env::var("FANFARE_TEST_MONGO") {
            return Ok(MongoServer {
                ferretdb: None,
                _postgres: None,
                url,
                dir: None,
            });
        }
        MongoServer::launch(None).await
    }

    /// Our own FerretDB that clients reach over TLS only (its plain listener is on a port
    /// nobody is told): `url` carries `tls=true&tlsCAFile=…`.
    pub async fn start_tls(tls: &MongoTls) -> anyhow::Result<MongoServer> {
        MongoServer::launch(Some(tls)).await
    }

    async fn launch(tls: Option<&MongoTls>) -> anyhow::Result<MongoServer> {
        let dir = tempfile::tempdir()?;
        let (postgres, pg_port) = start_postgres(dir.path()).await?;
        let port = free_port()?;
        let tls_port = free_port()?;
        let state = dir.path().join("ferretdb");
        std::fs::create_dir_all(&state)?;
        let spec = Spec::new("ferretdb", ferretdb_bin(), Ready::Port(port))
            .args([
                "--handler=postgresql",
                "--telemetry=disable",
                "--debug-addr=-",
            ])
            .args(["--log-level=warn", "--mode=normal"])
            .args([format!(
                "--postgresql-url=postgres://postgres@127.0.0.1:{pg_port}/postgres?pool_max_conns=200"
            )])
            .args([format!("--listen-addr=127.0.0.1:{port}")])
            .args([format!("--state-dir={}", state.display())])
            .log(Log::File(dir.path().join("ferretdb.log")))
            .patience(PATIENCE * 3);
        let (spec, url) = match tls {
            None => (
                spec,
                format!("mongodb://127.0.0.1:{port}/?serverSelectionTimeoutMS=2000"),
            ),
            Some(tls) => (
                Spec {
                    ready: Ready::Port(tls_port),
                    ..spec.args([
                        format!("--listen-tls=127.0.0.1:{tls_port}"),
                        format!("--listen-tls-cert-file={}", tls.cert.display()),
                        format!("--listen-tls-key-file={}", tls.key.display()),
                    ])
                },
                format!(
                    "mongodb://127.0.0.1:{tls_port}/?serverSelectionTimeoutMS=2000&tls=true&tlsCAFile={}",
                    tls.ca.display()
                ),
            ),
        };
        Ok(MongoServer {
            ferretdb: Some(Service::start(spec).await?),
            _postgres: Some(postgres),
            url,
            dir: Some(dir),
        })
    }

    pub fn is_own(&self) -> bool {
        self.ferretdb.is_some()
    }

    /// Where our own server keeps its data.
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.dir.as_ref().map(|d| d.path())
    }

    fn own(&mut self) -> anyhow::Result<&mut Service> {
        self.ferretdb
            .as_mut()
            .context("an outside MongoDB cannot be stopped or restarted")
    }

    /// (Re)starts FerretDB on the same port and storage.
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

/// `FANFARE_FERRETDB`, else the binary `scripts/services install` builds into the cache.
pub fn ferretdb_bin() -> PathBuf {
    std::env::var_os("FANFARE_FERRETDB")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("ferretdb-1.24.2/bin/ferretdb"))
}

/// PostgreSQL's server programs: `FANFARE_PG_BIN`, else Debian's newest, else PATH.
pub fn postgres_bin(program: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("FANFARE_PG_BIN") {
        return Path::new(&dir).join(program);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path().join("bin").join(program)))
        .filter(|p| p.exists())
        .collect();
    versions.sort();
    versions.pop().unwrap_or_else(|| PathBuf::from(program))
}

/// PostgreSQL refuses to run as root: as root, its programs run as the `postgres` user.
fn as_postgres_user(program: &str) -> (PathBuf, Vec<std::ffi::OsString>) {
    let binary = postgres_bin(program);
    if !running_as_root() {
        return (binary, Vec::new());
    }
    let prefix = [
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        "--",
    ];
    let mut args: Vec<std::ffi::OsString> = prefix.iter().map(Into::into).collect();
    args.push(binary.into());
    (PathBuf::from("setpriv"), args)
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A fresh PostgreSQL cluster under `dir/pg`, listening on loopback only.
async fn start_postgres(dir: &Path) -> anyhow::Result<(Service, u16)> {
    let data = dir.join("pg");
    std::fs::create_dir_all(&data)?;
    if running_as_root() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        let status = std::process::Command::new("chown")
            .args(["postgres:", "--"])
            .arg(&data)
            .status()?;
        anyhow::ensure!(
            status.success(),
            "cannot chown {} to postgres",
            data.display()
        );
    }
    let (initdb, mut args) = as_postgres_user("initdb");
    args.extend(["-D".into(), data.clone().into_os_string()]);
    args.extend(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"].map(Into::into));
    let output = tokio::process::Command::new(&initdb)
        .args(&args)
        .output()
        .await
        .with_context(|| {
            format!(
                "cannot run {} (./scripts/setup installs PostgreSQL)",
                initdb.display()
            )
        })?;
    anyhow::ensure!(
        output.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let port = free_port()?;
    let (postgres, prefix) = as_postgres_user("postgres");
    let spec = Spec::new("postgres", postgres, Ready::Port(port))
        .args(prefix)
        .args([
            OsStr::new("-D"),
            data.as_os_str(),
            OsStr::new("-k"),
            data.as_os_str(),
        ])
        .args(["-p".to_owned(), port.to_string()])
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "max_connections=300",
        ])
        .log(Log::File(dir.join("postgres.log")))
        .patience(PATIENCE * 3);
    let postgres = Service::start(spec).await?;
    prepare_for_ferretdb(port).await?;
    Ok((postgres, port))
}

/// Applies scripts/ferretdb-postgres.sql (indexes FerretDB's lookups by `_id` can use),
/// retrying while PostgreSQL is still starting up.
async fn prepare_for_ferretdb(port: u16) -> anyhow::Result<()> {
    let sql = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ferretdb-postgres.sql");
    let mut last = String::new();
    for _ in 0..50 {
        let output = tokio::process::Command::new(postgres_bin("psql"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
            .args(["-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q", "-f"])
            .arg(&sql)
            .output()
            .await
            .context("cannot run psql")?;
        if output.status.success() {
            return Ok(());
        }
        last = String::from_utf8_lossy(&output.stderr).into_owned();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("cannot prepare PostgreSQL for FerretDB: {last}")
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
        // The worker's own info lines (rebuilds, redis refills) say what a failing run did.
        .env("FANFARE_LOG", "warn,fanfare::worker=info");
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

    /// Sends a signal by name ("HUP", "TERM", …).
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        self.service.signal(name)
    }

    pub fn is_running(&mut self) -> bool {
        self.service.is_running()
    }
}

/// HAProxy in TCP mode in front of the nodes, as in `examples/haproxy.cfg`: least connections,
/// a PROXY v2 header on every connection to a node (health checks too; the nodes run with
/// `--proxy-protocol`), `/readyz` health checks every 500 ms, sessions of a node marked down
/// are cut so its clients reconnect to the others, failed connects are redispatched.
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
             \x20   default-server check inter 500ms fall 2 rise 2 on-marked-down shutdown-sessions \
             send-proxy-v2 check-send-proxy\n\
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ids_are_kafka_uuids() {
        assert_eq!(base64_url([0; 16]), "AAAAAAAAAAAAAAAAAAAAAA");
        assert_eq!(base64_url([0xff; 16]), "_____________________w");
        for _ in 0..1000 {
            let id = kafka_cluster_id();
            assert_eq!(id.len(), 22);
            assert!(!id.starts_with('-'), "{id}");
        }
    }
}
