//! Embedded-path throughput: durable likes per second through one node (SQLite group commit),
//! with ack latency, from `connections` clients pipelining up to `window` likes each.
//!
//!     cargo build --release --workspace --bins
//!     FANFARE_BIN=target/release/fanfare target/release/like_bench [seconds] [connections] [window]
//!
//! Client and node share this machine's cores; the numbers are for both together.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fanfare_tests::NodeProcess;
use futures_util::future::try_join_all;
use serde_json::json;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[(((sorted.len() as f64) - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let seconds: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let connections: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(32);
    let window: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(64);
    let dir = tempfile::tempdir()?;
    let node = NodeProcess::start(dir.path(), &["--max-messages-per-second", "1000000"]).await?;
    let deadline = Instant::now() + Duration::from_secs(seconds);

    let clients = (0..connections).map(|c| {
        let node = &node;
        async move {
            let mut client = node.connect(&format!("bench{c}")).await?;
            let mut sent_at: HashMap<String, Instant> = HashMap::new();
            let mut latencies = Vec::new();
            let mut next = 0u64;
            loop {
                // Keep `window` likes in flight; each (user, track) is new, so each is applied.
                while sent_at.len() < window && Instant::now() < deadline {
                    let key = format!("k{next}");
                    client
                        .send(json!({"type":"like","track":format!("t{next}"),"id":key}))
                        .await?;
                    sent_at.insert(key, Instant::now());
                    next += 1;
                }
                if sent_at.is_empty() {
                    return anyhow::Ok(latencies);
                }
                let frame = client.recv().await?;
                anyhow::ensure!(
                    frame["type"] == "ack" && frame["duplicate"] == false,
                    "{frame}"
                );
                if let Some(at) = frame["id"].as_str().and_then(|k| sent_at.remove(k)) {
                    latencies.push(at.elapsed());
                }
            }
        }
    });
    let started = Instant::now();
    let mut latencies: Vec<Duration> = try_join_all(clients).await?.into_iter().flatten().collect();
    let elapsed = started.elapsed();
    latencies.sort();
    let rate = latencies.len() as f64 / elapsed.as_secs_f64();
    println!("| connections | in flight each | acked likes | likes/s | ack p50 | ack p99 | max |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {connections} | {window} | {} | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms |",
        latencies.len(),
        rate,
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
    );
    // Every acked like is stored: spot-check the store through the node.
    let count = node.track_count("t0").await?;
    anyhow::ensure!(
        count == connections as u64,
        "t0 has one like per connection, got {count}"
    );
    Ok(())
}
