//! Embedded durable ingest at the node's limit: how many likes per second one node accepts,
//! commits (SQLite group commit) and acks, measured so that the figure is the node's and not
//! this generator's.
//!
//!     cargo build --release --workspace --bins
//!     FANFARE_BIN=target/release/fanfare taskset -c 1 target/release/ingest_bench \
//!         --node-core 0 [--seconds 10] [--connections 32] [--window 256] [--tracks N]
//!
//! The node is started under `taskset -c NODE_CORE` (so its runtime sizes itself to that one
//! core); run this generator pinned to another. Likes are pre-framed client frames written raw
//! (one write per batch), acks are found in the raw server frames with a byte scan (no JSON, no
//! UTF-8 check), so one generator core offers several times what the node can take. Every like
//! is a new (user, track) pair, so every one is applied, stored and acked after the commit:
//! without `--tracks`, connection `c` likes `t0, t1, …` as `like_bench` does (a new track per
//! like); with `--tracks N` each connection cycles a catalog of N tracks, liking then unliking
//! (every action changes its pair, memory stays bounded).
//!
//! Reports acked likes/s, ack p50/p99, the node's CPU seconds and µs per like, and this
//! generator's own CPU share (above 85 % of its core the run is flagged instrument-bound).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use fanfare_tests::process::{Ready, Service, Spec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser, Clone)]
struct Args {
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Likes in flight per connection.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// The core the node runs on (`taskset -c`); unpinned when absent.
    #[arg(long)]
    node_core: Option<usize>,
    /// A catalog of N tracks per connection, liked then unliked in turn.
    #[arg(long)]
    tracks: Option<u64>,
    /// More node flags (after `--`).
    #[arg(last = true)]
    node_args: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // One generator thread: its CPU share is then a share of one core.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = start_node(&args, dir.path()).await?;
    let pid = node.pid().context("node pid")?;
    let addr = node.announced.clone();
    let mut streams = Vec::new();
    for c in 0..args.connections {
        streams.push(handshake(&addr, &format!("u{c}")).await?);
    }
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let (_, node_cpu_before) = fanfare_bench::proc_stats(pid);
    let (_, own_cpu_before) = fanfare_bench::proc_stats(std::process::id());
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for (c, stream) in streams.into_iter().enumerate() {
        clients.spawn(drive(stream, c, args.clone(), deadline));
    }
    let mut latencies: Vec<u32> = Vec::new();
    while let Some(done) = clients.join_next().await {
        latencies.extend(done.context("client task")??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (_, node_cpu_after) = fanfare_bench::proc_stats(pid);
    let (_, own_cpu_after) = fanfare_bench::proc_stats(std::process::id());
    latencies.sort_unstable();
    let acked = latencies.len() as f64;
    let pct = |p: f64| {
        latencies
            .get(((acked - 1.0) * p).round() as usize)
            .map_or(0.0, |us| *us as f64 / 1e3)
    };
    let node_cpu = node_cpu_after - node_cpu_before;
    let own_share = (own_cpu_after - own_cpu_before) / elapsed;
    println!(
        "| connections | in flight each | acked likes | likes/s | ack p50 | ack p99 | node CPU-s | node µs/like | generator core |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {:.0} | {:.2} ms | {:.2} ms | {:.2} | {:.2} | {:.0} %{} |",
        args.connections,
        args.window,
        latencies.len(),
        acked / elapsed,
        pct(0.5),
        pct(0.99),
        node_cpu,
        node_cpu / acked * 1e6,
        own_share * 100.0,
        if own_share > 0.85 {
            " (instrument-bound)"
        } else {
            ""
        },
    );
    Ok(())
}

async fn start_node(args: &Args, dir: &std::path::Path) -> anyhow::Result<Service> {
    let bin = fanfare_tests::fanfare_bin();
    let (program, mut argv): (std::path::PathBuf, Vec<String>) = match args.node_core {
        Some(core) => (
            "taskset".into(),
            vec![
                "-c".into(),
                core.to_string(),
                bin.to_string_lossy().into_owned(),
            ],
        ),
        None => (bin, Vec::new()),
    };
    argv.extend(["--listen", "127.0.0.1:0", "--data-dir"].map(String::from));
    argv.push(dir.to_string_lossy().into_owned());
    argv.extend(
        fanfare_bench::UNLIMITED_NODE_ARGS
            .iter()
            .map(|a| a.to_string()),
    );
    argv.extend(args.node_args.iter().cloned());
    let spec = Spec::new(
        "fanfare",
        program,
        Ready::Line(vec!["fanfare listening on http://"]),
    )
    .args(argv)
    .env("FANFARE_LOG", "warn");
    Service::start(spec).await
}

/// The WebSocket upgrade by hand, so that no byte the node sends is left in a client library's
/// buffer: what follows the response is ours to read raw.
async fn handshake(addr: &str, user: &str) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET /v1/ws?user={user} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("the node closed the upgrade");
        }
        response.extend_from_slice(&chunk[..n]);
        if let Some(end) = memchr::memmem::find(&response, b"\r\n\r\n") {
            if !response.starts_with(b"HTTP/1.1 101") {
                bail!(
                    "upgrade refused: {}",
                    String::from_utf8_lossy(&response[..end])
                );
            }
            return Ok((stream, response[end + 4..].to_vec()));
        }
    }
}

/// Appends one masked client text frame (payloads here are < 126 bytes).
fn push_frame(out: &mut Vec<u8>, payload: &[u8], mask: [u8; 4]) {
    debug_assert!(payload.len() < 126);
    out.extend_from_slice(&[0x81, 0x80 | payload.len() as u8]);
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

/// One connection: keeps `window` likes in flight until the deadline, then waits for the rest of
/// its acks. Returns each ack's latency in µs.
async fn drive(
    (mut stream, mut buffer): (TcpStream, Vec<u8>),
    connection: usize,
    args: Args,
    deadline: Instant,
) -> anyhow::Result<Vec<u32>> {
    let ack_id = memchr::memmem::Finder::new(br#""type":"ack","id":"k"#);
    let mut in_flight: HashMap<u64, Instant> = HashMap::with_capacity(args.window * 2);
    let mut latencies = Vec::new();
    let mut next = 0u64;
    let mut out = Vec::with_capacity(args.window * 64);
    let mut payload = Vec::with_capacity(64);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let now = Instant::now();
        if now < deadline {
            out.clear();
            while in_flight.len() < args.window {
                payload.clear();
                let (track, action) = match args.tracks {
                    Some(n) => (next % n, ["like", "unlike"][(next / n % 2) as usize]),
                    None => (next, "like"),
                };
                use std::io::Write;
                write!(
                    payload,
                    r#"{{"type":"{action}","track":"t{track}","id":"k{next}"}}"#
                )?;
                let mask = ((next as u32) ^ (connection as u32).rotate_left(16)).to_be_bytes();
                push_frame(&mut out, &payload, mask);
                in_flight.insert(next, now);
                next += 1;
            }
            if !out.is_empty() {
                stream.write_all(&out).await?;
            }
        } else if in_flight.is_empty() {
            return Ok(latencies);
        }
        let read = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut chunk))
            .await
            .context("no ack for 30 s")??;
        if read == 0 {
            bail!("the node closed connection {connection}");
        }
        buffer.extend_from_slice(&chunk[..read]);
        let now = Instant::now();
        let mut at = 0;
        while let Some(((start, end), next)) = fanfare_bench::server_frame(&buffer[at..]) {
            let frame = &buffer[at + start..at + end];
            at += next;
            let Some(found) = ack_id.find(frame) else {
                if memchr::memmem::find(frame, br#""type":"welcome""#).is_some() {
                    continue;
                }
                bail!("not an ack: {}", String::from_utf8_lossy(frame));
            };
            let digits = &frame[found + ack_id.needle().len()..];
            let id = digits
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            if memchr::memmem::find(frame, br#""duplicate":false"#).is_none() {
                bail!("a duplicate ack: {}", String::from_utf8_lossy(frame));
            }
            if let Some(sent) = in_flight.remove(&id) {
                latencies.push(now.duration_since(sent).as_micros() as u32);
            }
        }
        buffer.drain(..at);
    }
}
