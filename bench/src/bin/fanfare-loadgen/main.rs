//! `fanfare-loadgen`: drives a Fanfare node (or farm, or a protocol-compatible peer) with many
//! WebSocket clients and measures what listeners see.
//!
//! Scenarios: `idle` (hold subscribed sockets: memory per connection), `steady` (Zipf-popular
//! tracks and a like rate), `album-release` (one hot track, every listener on it),
//! `reconnect-storm` (all listeners drop at once and come back). Latency is like-sent →
//! update-received: the send time (wall clock, µs) rides in the like id, and every process of
//! the run is on this machine, so one clock measures both ends.
//!
//! Sockets spread over source addresses 127.0.0.2… (`--source-ips`) so tens of thousands fit
//! in the local port range, and over `--processes` child processes so each stays under the
//! open-file limit. `fanfare-loadgen report` merges runs into a markdown table and PNG charts.

mod charts;
mod report;
mod stats;
mod sweep;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use fanfare_protocol::{Action, ClientFrame, LikeRequest};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

use stats::{Histogram, RunResult, now_us};

#[derive(Parser, Debug)]
#[command(name = "fanfare-loadgen", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one scenario against one server (or farm) and print its result as JSON.
    Run(RunArgs),
    /// Merge result files into a markdown table (ratios against the first label) and charts.
    Report {
        /// Result JSON files written by `run --out`.
        files: Vec<std::path::PathBuf>,
        /// `raw_writer` results: the machine's floor, shown beside every server's CPU per frame.
        #[arg(long)]
        raw: Vec<std::path::PathBuf>,
        /// A load sweep's directory (`<rate>/<label>-steady.json`): latency and CPU against
        /// offered load.
        #[arg(long)]
        sweep: Option<std::path::PathBuf>,
        /// Directory for `<scenario>-latency.png` and `<scenario>-throughput.png`.
        #[arg(long)]
        charts: std::path::PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Scenario {
    Idle,
    Steady,
    AlbumRelease,
    ReconnectStorm,
}

#[derive(Parser, Debug, Clone)]
struct RunArgs {
    /// WebSocket endpoint(s), e.g. ws://127.0.0.1:8080/v1/ws; connections spread over them.
    #[arg(long, required = true)]
    target: Vec<String>,
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Name of the server in reports (fanfare, python-mvp, node-ws…).
    #[arg(long, default_value = "fanfare")]
    label: String,
    /// Listening connections in all processes together.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Liking connections (in the parent process).
    #[arg(long, default_value_t = 8)]
    likers: usize,
    /// Likes per second offered by all likers together.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Tracks in the `steady` scenario (Zipf popularity).
    #[arg(long, default_value_t = 1000)]
    tracks: usize,
    /// Zipf exponent for track popularity.
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Seconds of measured load (after all connections are up).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Spread client sockets over this many source addresses (127.0.0.2 …).
    #[arg(long, default_value_t = 1)]
    source_ips: u8,
    /// Split the listeners over this many processes (each must stay under the fd limit).
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// Listeners (in all processes together) whose every update is parsed for latency; the
    /// others only count frames and likes on the raw bytes, so the generator stays cheaper
    /// than the server it measures.
    #[arg(long, default_value_t = 1000)]
    sample: usize,
    /// Server process ids to read RSS and CPU time from (/proc).
    #[arg(long)]
    server_pid: Vec<u32>,
    /// Write `<label>-<scenario>.json` here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Internal: this process is child N of a multi-process run.
    #[arg(long, hide = true)]
    child: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Run(args) => runtime.block_on(run(args)),
        Command::Report {
            files,
            raw,
            sweep,
            charts,
        } => report::write(&files, &raw, sweep.as_deref(), &charts),
    }
}

/// Counters every listener task shares within one process.
#[derive(Default)]
struct Shared {
    connected: AtomicU64,
    errors: AtomicU64,
    disconnects: AtomicU64,
    frames: AtomicU64,
    likes_seen: AtomicU64,
    latency: std::sync::Mutex<Histogram>,
    /// Update frames per second since the start of the measurement.
    per_second: std::sync::Mutex<Vec<u64>>,
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.child.is_some() {
        return run_child(args).await;
    }
    let shared = Arc::new(Shared::default());
    let (rss_base, _) = server_stats(&args.server_pid);
    let mut children = Vec::new();
    let own = if args.processes > 1 {
        let per = args.connections.div_ceil(args.processes);
        for index in 1..args.processes {
            children.push(spawn_child(&args, index, per)?);
        }
        per
    } else {
        args.connections
    };
    let sample = if args.processes > 1 {
        args.sample.div_ceil(args.processes)
    } else {
        args.sample
    };
    let listeners = start_listeners(&args, 0, own, sample, shared.clone()).await?;
    for child in &mut children {
        child.wait_ready().await?;
    }
    let cpu_before = server_cpu(&args.server_pid);
    let own_cpu_before = server_cpu(&[std::process::id()]);
    let started = Instant::now();
    for child in &mut children {
        child.go().await?;
    }
    let (sent, _reconnected) = drive(&args, &shared, started, &listeners).await?;
    let mut result = collect(&args, &shared, sent, started.elapsed());
    result.loadgen_cpu_s = server_cpu(&[std::process::id()]) - own_cpu_before;
    for child in &mut children {
        result.merge(child.result().await?);
    }
    let (rss_kib, _) = server_stats(&args.server_pid);
    result.server_rss_kib = rss_kib;
    result.server_rss_base_kib = rss_base;
    result.server_cpu_s = server_cpu(&args.server_pid) - cpu_before;
    result.finish();
    let text = serde_json::to_string_pretty(&result)?;
    println!("{text}");
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{}-{}.json", args.label, result.scenario_name()));
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// A child process: connects its listeners, says `ready`, waits for `go`, measures, prints
/// its result as one JSON line.
async fn run_child(args: RunArgs) -> anyhow::Result<()> {
    let index = args.child.unwrap_or(0);
    let shared = Arc::new(Shared::default());
    let _listeners =
        start_listeners(&args, index, args.connections, args.sample, shared.clone()).await?;
    println!("ready");
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    stdin.next_line().await?;
    let own_cpu_before = server_cpu(&[std::process::id()]);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration) + SETTLE).await;
    let mut result = collect(&args, &shared, 0, started.elapsed());
    result.loadgen_cpu_s = server_cpu(&[std::process::id()]) - own_cpu_before;
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

/// After the likers stop, listeners get this long to receive the last updates.
const SETTLE: Duration = Duration::from_secs(2);

struct Child {
    process: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

fn spawn_child(args: &RunArgs, index: usize, connections: usize) -> anyhow::Result<Child> {
    let exe = std::env::current_exe()?;
    let mut command = tokio::process::Command::new(exe);
    command
        .arg("run")
        .arg("--scenario")
        .arg(scenario_arg(args.scenario));
    for target in &args.target {
        command.arg("--target").arg(target);
    }
    command
        .args(["--connections", &connections.to_string()])
        .args(["--tracks", &args.tracks.to_string()])
        .args(["--zipf", &args.zipf.to_string()])
        .args(["--duration", &args.duration.to_string()])
        .args(["--source-ips", &args.source_ips.to_string()])
        .args([
            "--sample",
            &args.sample.div_ceil(args.processes.max(1)).to_string(),
        ])
        .args(["--child", &index.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut process = command.spawn().context("cannot start a loadgen child")?;
    let stdout = process.stdout.take().context("child stdout")?;
    Ok(Child {
        process,
        lines: BufReader::new(stdout).lines(),
    })
}

impl Child {
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        match self.lines.next_line().await? {
            Some(line) if line == "ready" => Ok(()),
            other => bail!("loadgen child failed to connect: {other:?}"),
        }
    }

    async fn go(&mut self) -> anyhow::Result<()> {
        let stdin = self.process.stdin.as_mut().context("child stdin")?;
        stdin.write_all(b"go\n").await?;
        Ok(stdin.flush().await?)
    }

    async fn result(&mut self) -> anyhow::Result<RunResult> {
        let line = self
            .lines
            .next_line()
            .await?
            .context("child gave no result")?;
        Ok(serde_json::from_str(&line)?)
    }
}

fn scenario_arg(scenario: Scenario) -> &'static str {
    match scenario {
        Scenario::Idle => "idle",
        Scenario::Steady => "steady",
        Scenario::AlbumRelease => "album-release",
        Scenario::ReconnectStorm => "reconnect-storm",
    }
}

/// Which track listener `i` follows.
fn listener_track(args: &RunArgs, i: usize, zipf: &stats::Zipf) -> String {
    match args.scenario {
        Scenario::AlbumRelease => "hot".to_owned(),
        Scenario::Idle | Scenario::ReconnectStorm => format!("t{}", i % args.tracks.max(1)),
        Scenario::Steady => format!("t{}", zipf.sample(&mut rand::rng())),
    }
}

/// Handles to the listener tasks, so the storm can drop and reconnect them.
struct Listeners {
    stop: Vec<tokio::sync::watch::Sender<bool>>,
    specs: Vec<(String, String, String, Option<IpAddr>)>,
}

async fn start_listeners(
    args: &RunArgs,
    process: usize,
    count: usize,
    sample: usize,
    shared: Arc<Shared>,
) -> anyhow::Result<Listeners> {
    let zipf = stats::Zipf::new(args.tracks.max(1), args.zipf);
    let mut listeners = Listeners {
        stop: Vec::new(),
        specs: Vec::new(),
    };
    // Connect in waves so the server's accept queue is not flooded.
    let wave = 200;
    for start in (0..count).step_by(wave) {
        let mut connecting = Vec::new();
        for i in start..(start + wave).min(count) {
            let global = process * 1_000_000 + i;
            let target = args.target[i % args.target.len()].clone();
            let user = format!("l{global}");
            let track = listener_track(args, i, &zipf);
            let source = source_ip(args.source_ips, i);
            listeners
                .specs
                .push((target.clone(), user.clone(), track.clone(), source));
            let shared = shared.clone();
            let sampled = i < sample;
            connecting
                .push(async move { listen(target, user, track, source, sampled, shared).await });
        }
        for stop in futures_util::future::join_all(connecting).await {
            match stop {
                Ok(stop) => listeners.stop.push(stop),
                Err(_) => {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    Ok(listeners)
}

fn source_ip(spread: u8, i: usize) -> Option<IpAddr> {
    (spread > 1).then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % spread as usize) as u8)))
}

/// Connects one listener, subscribes, and spawns its reader; returns its stop switch.
async fn listen(
    target: String,
    user: String,
    track: String,
    source: Option<IpAddr>,
    sampled: bool,
    shared: Arc<Shared>,
) -> anyhow::Result<tokio::sync::watch::Sender<bool>> {
    let mut ws = connect(&target, &user, source).await?;
    ws.send(Message::text(
        ClientFrame::Subscribe {
            track: track.clone(),
            listeners: false,
        }
        .to_json(),
    ))
    .await?;
    shared.connected.fetch_add(1, Ordering::Relaxed);
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    if !sampled {
        tokio::spawn(async move {
            drain_raw(&mut ws, &mut stopped, &shared).await;
            shared.connected.fetch_sub(1, Ordering::Relaxed);
        });
        return Ok(stop);
    }
    tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                _ = stopped.changed() => break,
                message = ws.next() => message,
            };
            match message {
                Some(Ok(Message::Text(text))) => observe(&text, &shared),
                Some(Ok(_)) => {}
                _ => {
                    shared.disconnects.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
        shared.connected.fetch_sub(1, Ordering::Relaxed);
    });
    Ok(stop)
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn connect(target: &str, user: &str, source: Option<IpAddr>) -> anyhow::Result<Ws> {
    let url = format!("{target}?user={user}");
    let authority = target
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .context("targets are ws://host:port/path")?;
    let addr: SocketAddr = tokio::net::lookup_host(authority)
        .await?
        .next()
        .context("target does not resolve")?;
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    let (ws, _) = tokio_tungstenite::client_async(url, stream).await?;
    Ok(ws)
}

/// Counts an update frame and the latency of every like it names. A plain scan instead of a
/// JSON parse: the load generator must stay cheaper than the servers it measures.
fn observe(text: &str, shared: &Shared) {
    // Peers may space their JSON (Python's json.dumps does); the scan below wants it compact.
    let compact;
    let text = if text.contains("\": ") {
        compact = text.replace("\": ", "\":");
        compact.as_str()
    } else {
        text
    };
    if !text.contains(r#""type":"likes""#) {
        return;
    }
    shared.frames.fetch_add(1, Ordering::Relaxed);
    let now = now_us();
    let mut sent_times = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(r#""id":""#) {
        rest = &rest[at + 6..];
        let Some(end) = rest.find('"') else { break };
        let id = &rest[..end];
        rest = &rest[end..];
        if let Some(sent) = id.rsplit('-').next().and_then(|us| us.parse::<u64>().ok()) {
            sent_times.push(sent);
        }
    }
    shared
        .likes_seen
        .fetch_add(sent_times.len() as u64, Ordering::Relaxed);
    let mut latency = match shared.latency.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    for sent in sent_times {
        latency.record(now.saturating_sub(sent));
    }
}

/// An unsampled listener: reads the socket under the WebSocket (the subscribe is flushed and
/// the server sent nothing before it, so nothing is left in tungstenite's buffer), walks the
/// frame headers and counts `likes` frames and the likes they name — no UTF-8 check, no
/// message allocation, no clock read.
async fn drain_raw(ws: &mut Ws, stopped: &mut tokio::sync::watch::Receiver<bool>, shared: &Shared) {
    use tokio::io::AsyncReadExt;
    let likes = memchr::memmem::Finder::new(br#""likes""#);
    let ids = memchr::memmem::Finder::new(br#""id":"#);
    let mut buffer: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let read = tokio::select! {
            _ = stopped.changed() => return,
            read = ws.get_mut().read(&mut chunk) => read,
        };
        match read {
            Ok(0) | Err(_) => {
                shared.disconnects.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
        let mut at = 0;
        while let Some((payload, next)) = fanfare_bench::server_frame(&buffer[at..]) {
            let payload = &buffer[at + payload.0..at + payload.1];
            if likes.find(payload).is_some() {
                shared.frames.fetch_add(1, Ordering::Relaxed);
                let named = ids.find_iter(payload).count() as u64;
                shared.likes_seen.fetch_add(named, Ordering::Relaxed);
            }
            at += next;
        }
        buffer.drain(..at);
    }
}

/// Runs the scenario's active part in the parent: likes at the offered rate (and the storm).
async fn drive(
    args: &RunArgs,
    shared: &Arc<Shared>,
    started: Instant,
    listeners: &Listeners,
) -> anyhow::Result<(u64, Vec<tokio::sync::watch::Sender<bool>>)> {
    let sent = Arc::new(AtomicU64::new(0));
    let ticker = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut last = 0;
            loop {
                tick.tick().await;
                let now = shared.frames.load(Ordering::Relaxed);
                if let Ok(mut per_second) = shared.per_second.lock() {
                    per_second.push(now - last);
                }
                last = now;
            }
        })
    };
    let duration = Duration::from_secs(args.duration);
    let mut likers = Vec::new();
    if args.scenario != Scenario::Idle && args.likers > 0 && args.rate > 0 {
        let zipf = Arc::new(stats::Zipf::new(args.tracks.max(1), args.zipf));
        for l in 0..args.likers {
            let mut ws = connect(
                &args.target[l % args.target.len()],
                &format!("liker{l}"),
                None,
            )
            .await?;
            let (sent, zipf, scenario) = (sent.clone(), zipf.clone(), args.scenario);
            let every = Duration::from_secs_f64(args.likers as f64 / args.rate as f64);
            likers.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                let mut liked = std::collections::HashSet::new();
                let mut n = 0u64;
                while started.elapsed() < duration {
                    tick.tick().await;
                    let track = match scenario {
                        Scenario::AlbumRelease => "hot".to_owned(),
                        _ => format!("t{}", zipf.sample(&mut rand::rng())),
                    };
                    // Alternate per track so every like changes something.
                    let action = if liked.insert(track.clone()) {
                        Action::Like
                    } else {
                        liked.remove(&track);
                        Action::Unlike
                    };
                    let key = format!("{l}x{n}-{}", now_us());
                    let frame = ClientFrame::Like(LikeRequest { action, track, key }).to_json();
                    if ws.send(Message::text(frame)).await.is_err() {
                        break;
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                    // Read acks as they come so the liker's socket never backs up.
                    while let Some(Some(Ok(_))) = futures_util::FutureExt::now_or_never(ws.next()) {
                    }
                }
                let _ = ws.close(None).await;
            }));
        }
    }
    let mut reconnected = Vec::new();
    if args.scenario == Scenario::ReconnectStorm {
        tokio::time::sleep(duration / 3).await;
        reconnected = storm(listeners, args.sample, shared).await;
    }
    // A server that stops reading blocks a liker's send; the run still ends on time.
    let deadline = tokio::time::Instant::from_std(started) + duration + SETTLE;
    for mut liker in likers {
        if tokio::time::timeout_at(deadline, &mut liker).await.is_err() {
            liker.abort();
        }
    }
    let remaining = duration.saturating_sub(started.elapsed());
    tokio::time::sleep(remaining + SETTLE).await;
    ticker.abort();
    Ok((sent.load(Ordering::Relaxed), reconnected))
}

/// Drops every listener at once, then reconnects them all as fast as the server lets them;
/// records how long until all are subscribed again. Returns the new listeners' stop switches.
async fn storm(
    listeners: &Listeners,
    sample: usize,
    shared: &Arc<Shared>,
) -> Vec<tokio::sync::watch::Sender<bool>> {
    for stop in &listeners.stop {
        let _ = stop.send(true);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let began = Instant::now();
    // The same listeners as before the storm parse every update (the sample); the others are
    // drained on raw bytes again, so the generator's own parsing does not slow the reconnects.
    let reconnects =
        listeners
            .specs
            .iter()
            .enumerate()
            .map(|(i, (target, user, track, source))| {
                let shared = shared.clone();
                let sampled = i < sample;
                let (target, user, track, source) =
                    (target.clone(), user.clone(), track.clone(), *source);
                async move {
                    for _ in 0..20 {
                        match listen(
                            target.clone(),
                            user.clone(),
                            track.clone(),
                            source,
                            sampled,
                            shared.clone(),
                        )
                        .await
                        {
                            Ok(stop) => return Some(stop),
                            Err(_) => {
                                shared.errors.fetch_add(1, Ordering::Relaxed);
                                let pause = 50 + rand::rng().random_range(0..200);
                                tokio::time::sleep(Duration::from_millis(pause)).await;
                            }
                        }
                    }
                    None
                }
            });
    let stops: Vec<_> = futures_util::stream::iter(reconnects)
        .buffer_unordered(500)
        .filter_map(|stop| async move { stop })
        .collect()
        .await;
    if let Ok(mut latency) = shared.latency.lock() {
        latency.reconnect_all_ms = Some(began.elapsed().as_secs_f64() * 1e3);
    }
    stops
}

fn collect(args: &RunArgs, shared: &Shared, sent: u64, elapsed: Duration) -> RunResult {
    let latency = shared.latency.lock().map(|h| h.clone()).unwrap_or_default();
    RunResult {
        label: args.label.clone(),
        scenario: scenario_arg(args.scenario).to_owned(),
        connections: args.connections as u64,
        connected: shared.connected.load(Ordering::Relaxed),
        errors: shared.errors.load(Ordering::Relaxed),
        disconnects: shared.disconnects.load(Ordering::Relaxed),
        rate_offered: if args.scenario == Scenario::Idle {
            0
        } else {
            args.rate
        },
        likes_sent: sent,
        frames: shared.frames.load(Ordering::Relaxed),
        likes_seen: shared.likes_seen.load(Ordering::Relaxed),
        seconds: elapsed.as_secs_f64(),
        per_second: shared
            .per_second
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default(),
        latency,
        ..RunResult::default()
    }
}

/// (RSS KiB summed over the server processes, CPU seconds).
fn server_stats(pids: &[u32]) -> (u64, f64) {
    pids.iter()
        .map(|pid| stats::proc_stats(*pid))
        .fold((0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
}

fn server_cpu(pids: &[u32]) -> f64 {
    server_stats(pids).1
}
