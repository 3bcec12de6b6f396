//! One abstraction for every process a test starts (node, worker, Redis, Sentinel, broker,
//! document store, HAProxy): spawn, wait until ready, stop / kill / freeze / continue,
//! restart with the same arguments, and its log shown when a test panics while it runs.
//!
//! The typed wrappers (`NodeProcess`, `RedisProcess`, `KafkaBroker`, …) only say how to
//! start their program and how to tell it is ready; everything else is here. Each process is
//! killed by pid when its value is dropped, so a failing test leaves nothing behind.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::PATIENCE;

/// How a process says it is ready.
#[derive(Clone)]
pub enum Ready {
    /// It prints a line starting with this on stdout; the rest of the line is kept
    /// (`Service::announced`, e.g. the address a node bound).
    Line(Vec<&'static str>),
    /// It accepts TCP connections on this loopback port.
    Port(u16),
    /// It answers `PING` with `+PONG` on this loopback port (Redis, Sentinel).
    RedisPing(u16),
}

/// Where a process's stderr goes.
#[derive(Clone)]
pub enum Log {
    /// The test's own stderr (nodes and workers: their warnings appear beside the test's).
    Inherit,
    /// A file (kept in the service's temp dir), printed when a test panics.
    File(PathBuf),
    /// Nothing (the program writes its own log file, named here for failure reports).
    Discard(Option<PathBuf>),
}

/// What to run and how to know it is up.
#[derive(Clone)]
pub struct Spec {
    pub name: &'static str,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(&'static str, String)>,
    pub current_dir: Option<PathBuf>,
    pub ready: Ready,
    pub log: Log,
    /// How long it may take to become ready.
    pub patience: Duration,
}

impl Spec {
    pub fn new(name: &'static str, program: impl Into<PathBuf>, ready: Ready) -> Spec {
        Spec {
            name,
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            current_dir: None,
            ready,
            log: Log::Inherit,
            patience: PATIENCE,
        }
    }

    pub fn args<I, S>(mut self, args: I) -> Spec
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: &'static str, value: impl Into<String>) -> Spec {
        self.env.push((key, value.into()));
        self
    }

    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Spec {
        self.current_dir = Some(dir.into());
        self
    }

    pub fn log(mut self, log: Log) -> Spec {
        self.log = log;
        self
    }

    pub fn patience(mut self, patience: Duration) -> Spec {
        self.patience = patience;
        self
    }
}

/// A running (or stopped, awaiting restart) process.
pub struct Service {
    spec: Spec,
    child: Option<Child>,
    /// What the ready line carried after its prefix.
    pub announced: String,
}

impl Service {
    /// Spawns the process and waits until it is ready.
    pub async fn start(spec: Spec) -> anyhow::Result<Service> {
        let mut service = Service {
            spec,
            child: None,
            announced: String::new(),
        };
        service.restart().await?;
        Ok(service)
    }

    /// (Re)starts it with the same program, arguments and environment.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await?;
        let spec = &self.spec;
        let mut command = Command::new(&spec.program);
        command.args(&spec.args).kill_on_drop(true);
        for (key, value) in &spec.env {
            command.env(key, value);
        }
        if let Some(dir) = &spec.current_dir {
            command.current_dir(dir);
        }
        command.stdout(match spec.ready {
            Ready::Line(_) => Stdio::piped(),
            _ => Stdio::null(),
        });
        command.stderr(match &spec.log {
            Log::Inherit => Stdio::inherit(),
            Log::Discard(_) => Stdio::null(),
            Log::File(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("cannot open {}", path.display()))?,
            ),
        });
        let mut child = command.spawn().with_context(|| {
            format!(
                "cannot start {} ({}; ./scripts/setup installs the services)",
                spec.name,
                spec.program.display()
            )
        })?;
        let ready = self.wait_ready(&mut child).await;
        self.child = Some(child);
        match ready {
            Ok(announced) => {
                self.announced = announced;
                Ok(())
            }
            Err(err) => Err(err.context(format!(
                "{} did not become ready{}",
                self.spec.name,
                self.log_excerpt()
            ))),
        }
    }

    async fn wait_ready(&self, child: &mut Child) -> anyhow::Result<String> {
        let patience = self.spec.patience;
        match &self.spec.ready {
            Ready::Line(prefixes) => {
                let stdout = child.stdout.take().context("no stdout")?;
                let mut lines = BufReader::new(stdout).lines();
                let announced = tokio::time::timeout(patience, async {
                    while let Some(line) = lines.next_line().await? {
                        if let Some(rest) = prefixes.iter().find_map(|p| line.strip_prefix(p)) {
                            return Ok(rest.to_owned());
                        }
                    }
                    Err(anyhow!("it exited first"))
                })
                .await
                .context("timed out")??;
                // Keep draining stdout so the process never blocks on a full pipe.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                Ok(announced)
            }
            Ready::Port(port) => {
                let deadline = tokio::time::Instant::now() + patience;
                while TcpStream::connect(("127.0.0.1", *port)).await.is_err() {
                    if let Ok(Some(status)) = child.try_wait() {
                        bail!("it exited ({status})");
                    }
                    if tokio::time::Instant::now() > deadline {
                        bail!("nothing listens on port {port}");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(String::new())
            }
            Ready::RedisPing(port) => {
                let deadline = tokio::time::Instant::now() + patience;
                loop {
                    if crate::redis_ping(*port).await {
                        return Ok(String::new());
                    }
                    if let Ok(Some(status)) = child.try_wait() {
                        bail!("it exited ({status})");
                    }
                    if tokio::time::Instant::now() > deadline {
                        bail!("no PONG on port {port}");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Sends a signal by name ("TERM", "STOP", "CONT", …).
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        let pid = self
            .pid()
            .with_context(|| format!("{} is not running", self.spec.name))?;
        signal_pid(pid, name)
    }

    /// SIGSTOP: the process holds its sockets but answers nothing.
    pub fn freeze(&self) -> anyhow::Result<()> {
        self.signal("STOP")
    }

    /// SIGCONT.
    pub fn thaw(&self) -> anyhow::Result<()> {
        self.signal("CONT")
    }

    /// kill -9 (nothing flushed); a later `restart` starts it again.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// SIGTERM, then waits for the exit; returns the exit code.
    pub async fn stop(&mut self, patience: Duration) -> anyhow::Result<Option<i32>> {
        self.signal("TERM")?;
        self.wait_exit(patience).await
    }

    /// Waits for the process to exit on its own; returns its exit code.
    pub async fn wait_exit(&mut self, patience: Duration) -> anyhow::Result<Option<i32>> {
        let child = self
            .child
            .as_mut()
            .with_context(|| format!("{} is not running", self.spec.name))?;
        let status = tokio::time::timeout(patience, child.wait())
            .await
            .with_context(|| format!("{} did not exit in time", self.spec.name))??;
        Ok(status.code())
    }

    /// If it exited on its own: how, and the end of its log.
    pub fn died(&mut self) -> Option<String> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        Some(format!(
            "{} exited ({status}){}",
            self.spec.name,
            self.log_excerpt()
        ))
    }

    /// The log file, if the process writes one.
    pub fn log_path(&self) -> Option<&PathBuf> {
        match &self.spec.log {
            Log::File(path) | Log::Discard(Some(path)) => Some(path),
            _ => None,
        }
    }

    /// The last `lines` lines of its log (empty when it logs to the test's stderr).
    pub fn log_tail(&self, lines: usize) -> Vec<String> {
        let text = self
            .log_path()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..]
            .iter()
            .map(|l| l.to_string())
            .collect()
    }

    fn log_excerpt(&self) -> String {
        let tail = self.log_tail(10);
        if tail.is_empty() {
            String::new()
        } else {
            format!("; its log ends:\n  {}", tail.join("\n  "))
        }
    }
}

impl Drop for Service {
    /// A test that panics shows what each of its services logged last.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let excerpt = self.log_excerpt();
            if !excerpt.is_empty() {
                eprintln!("[{}]{excerpt}", self.spec.name);
            }
        }
    }
}

pub fn signal_pid(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()?;
    if !status.success() {
        bail!("kill -{name} {pid} failed");
    }
    Ok(())
}
