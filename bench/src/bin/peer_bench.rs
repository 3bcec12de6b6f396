//! Side-by-side "hot track" benchmark: L listeners on one track, likers sending R likes/s for
//! T seconds, against Fanfare, the seed's Python MVP and a Node.js `ws` server, one after the
//! other on this machine. Latency is like-sent → update-received at every listener (the send
//! time rides in the like's id, so one clock measures both ends).
//!
//!     FANFARE_BIN=target/release/fanfare target/release/peer_bench [listeners] [likes/s] [seconds]
//!
//! Prints a markdown table. Servers: bench/baselines/python_mvp.py, bench/baselines/node_ws.js.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fanfare_bench::proc_stats;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

struct Server {
    name: &'static str,
    child: Child,
    addr: String,
}

async fn start(name: &'static str, program: &str, args: &[String]) -> anyhow::Result<Server> {
    let mut child = Command::new(program)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {program}"))?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let addr = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(line) = lines.next_line().await? {
            if let Some((_, addr)) = line.split_once("listening on http://") {
                return Ok(addr.to_owned());
            }
        }
        bail!("{name} exited")
    })
    .await??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Server { name, child, addr })
}

struct Outcome {
    sent: u64,
    frames: u64,
    likes_seen: u64,
    latencies: Vec<Duration>,
    rss_kib: u64,
    cpu_s: f64,
    elapsed: Duration,
}

async fn run(
    server: &Server,
    listeners: usize,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<Outcome> {
    let url = |user: &str| format!("ws://{}/v1/ws?user={user}", server.addr);
    let origin = Instant::now();
    let frames = Arc::new(AtomicU64::new(0));
    let likes_seen = Arc::new(AtomicU64::new(0));
    let mut samples: Vec<Arc<std::sync::Mutex<Vec<Duration>>>> = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..listeners {
        let (mut ws, _) = tokio_tungstenite::connect_async(url(&format!("l{i}"))).await?;
        ws.send(Message::text(
            json!({"type":"subscribe","track":"hot"}).to_string(),
        ))
        .await?;
        let (frames, likes_seen) = (frames.clone(), likes_seen.clone());
        let mine = Arc::new(std::sync::Mutex::new(Vec::new()));
        samples.push(mine.clone());
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(Message::Text(text))) = ws.next().await {
                let Ok(frame) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                if frame["type"] != "likes" {
                    continue;
                }
                frames.fetch_add(1, Ordering::Relaxed);
                let now = origin.elapsed();
                for like in frame["recent"].as_array().into_iter().flatten() {
                    likes_seen.fetch_add(1, Ordering::Relaxed);
                    let sent_us = like["id"]
                        .as_str()
                        .and_then(|id| id.split('-').nth(1))
                        .and_then(|us| us.parse::<u64>().ok());
                    if let Some(us) = sent_us
                        && let Ok(mut mine) = mine.lock()
                    {
                        mine.push(now.saturating_sub(Duration::from_micros(us)));
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, cpu_before) = proc_stats(server.child.id().unwrap_or(0));
    // 8 likers share the rate; each alternates like/unlike so every like is effective.
    let likers = 8u64;
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut senders = Vec::new();
    for l in 0..likers {
        let (mut ws, _) = tokio_tungstenite::connect_async(url(&format!("liker{l}"))).await?;
        let sent = sent.clone();
        senders.push(tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_secs_f64(likers as f64 / rate as f64));
            let mut n = 0u64;
            while started.elapsed() < Duration::from_secs(seconds) {
                tick.tick().await;
                let action = if n.is_multiple_of(2) {
                    "like"
                } else {
                    "unlike"
                };
                let id = format!("{l}x{n}-{}", origin.elapsed().as_micros());
                if ws
                    .send(Message::text(
                        json!({"type":action,"track":"hot","id":id}).to_string(),
                    ))
                    .await
                    .is_err()
                {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
                n += 1;
                // Read acks as they come so the liker's socket never backs up.
                while let Some(Some(Ok(_))) = ws.next().now_or_never() {}
            }
            let _ = ws.close(None).await;
        }));
    }
    for sender in senders {
        let _ = sender.await;
    }
    // Let deliveries finish (bounded), then measure the server.
    let settle = Instant::now();
    let expected = sent.load(Ordering::Relaxed) * listeners as u64;
    while likes_seen.load(Ordering::Relaxed) < expected && settle.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    let (rss_kib, cpu_after) = proc_stats(server.child.id().unwrap_or(0));
    for task in &tasks {
        task.abort();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut latencies: Vec<Duration> = samples
        .iter()
        .flat_map(|mine| mine.lock().map(|v| v.clone()).unwrap_or_default())
        .collect();
    latencies.sort();
    Ok(Outcome {
        sent: sent.load(Ordering::Relaxed),
        frames: frames.load(Ordering::Relaxed),
        likes_seen: likes_seen.load(Ordering::Relaxed),
        latencies,
        rss_kib,
        cpu_s: cpu_after - cpu_before,
        elapsed,
    })
}

trait NowOrNever: futures_util::Future + Sized {
    fn now_or_never(self) -> Option<Self::Output> {
        futures_util::FutureExt::now_or_never(self)
    }
}
impl<F: futures_util::Future> NowOrNever for F {}

fn pct(sorted: &[Duration], p: f64) -> String {
    if sorted.is_empty() {
        return "-".into();
    }
    let d = sorted[((sorted.len() as f64 - 1.0) * p).round() as usize];
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let listeners: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let rate: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(500);
    let seconds: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(10);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let data = tempfile::tempdir()?;
    let fanfare = fanfare_tests::fanfare_bin();
    let mut fanfare_args: Vec<String> = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        data.path().display().to_string(),
    ];
    fanfare_args.extend(
        fanfare_bench::UNLIMITED_NODE_ARGS
            .iter()
            .map(|a| a.to_string()),
    );
    let port = |_: ()| fanfare_tests::free_port().map(|p| p.to_string());
    let python = vec![
        root.join("bench/baselines/python_mvp.py")
            .display()
            .to_string(),
        port(())?,
    ];
    let node = vec![
        root.join("bench/baselines/node_ws.js")
            .display()
            .to_string(),
        port(())?,
    ];

    println!(
        "| server | listeners | likes/s offered | likes sent | update frames received | likes delivered/s | p50 | p99 | max | server RSS | server CPU s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (name, program, args) in [
        ("fanfare", fanfare.display().to_string(), fanfare_args),
        ("python-mvp", "python3".to_owned(), python),
        ("node-ws", "node".to_owned(), node),
    ] {
        let server = start(name, &program, &args).await?;
        let outcome = run(&server, listeners, rate, seconds).await?;
        println!(
            "| {} | {listeners} | {rate} | {} | {} | {:.0} | {} | {} | {} | {} MiB | {:.1} |",
            server.name,
            outcome.sent,
            outcome.frames,
            outcome.likes_seen as f64 / outcome.elapsed.as_secs_f64(),
            pct(&outcome.latencies, 0.5),
            pct(&outcome.latencies, 0.99),
            pct(&outcome.latencies, 1.0),
            outcome.rss_kib / 1024,
            outcome.cpu_s,
        );
    }
    Ok(())
}
