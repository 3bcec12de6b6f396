//! Cross-node delivery benchmark: a like sent on node A → the update received by listeners
//! on node B, through a real redis-server; Redis commands per like; then the liker's own ack
//! latency on A (one like at a time, nobody listening on that track).
//!
//!     cargo build --release --workspace --bins
//!     FANFARE_BIN=target/release/fanfare target/release/farm_bench [likes] [listeners]
//!
//! Prints a markdown table (see docs/benchmarks.md).

use std::time::{Duration, Instant};

use anyhow::Context;
use fanfare_tests::{NodeProcess, RedisProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn command_stats(port: u16) -> anyhow::Result<Vec<(String, u64)>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(b"INFO commandstats\r\n").await?;
    let mut buf = vec![0u8; 65536];
    tokio::time::sleep(Duration::from_millis(50)).await;
    let n = stream.read(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf[..n]);
    Ok(text
        .lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let likes: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let listener_count: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(100);
    let redis = RedisProcess::start().await?;
    let dir_a = tempfile::tempdir()?;
    let dir_b = tempfile::tempdir()?;
    let redis_url = redis.url();
    let mut a_args = vec!["--redis", redis_url.as_str(), "--node-id", "a"];
    a_args.extend(fanfare_bench::UNLIMITED_NODE_ARGS);
    let a = NodeProcess::start(dir_a.path(), &a_args).await?;
    let b = NodeProcess::start(dir_b.path(), &["--redis", &redis.url(), "--node-id", "b"]).await?;

    let mut listeners = Vec::new();
    for i in 0..listener_count {
        let mut client = b.connect(&format!("l{i}")).await?;
        client.subscribe("bench").await?;
        listeners.push(client);
    }
    b.wait_metric("fanfare_bus_channels", |v| v >= 1.0).await?;
    let mut liker = a.connect("liker").await?;
    let before = command_stats(redis.port).await?;

    // One like at a time (like, then unlike, alternating keys), so each update holds exactly
    // one like and its latency is measured alone. Every listener's receive time counts.
    let mut samples = Vec::with_capacity(likes * listener_count);
    let started = Instant::now();
    for i in 0..likes {
        let action = if i % 2 == 0 { "like" } else { "unlike" };
        let sent = Instant::now();
        let key = format!("k{i}");
        liker
            .send(serde_json::json!({"type": action, "track": "bench", "id": key}))
            .await?;
        for listener in &mut listeners {
            listener
                .recv_until(|f| f["type"] == "likes" && f["recent"][0]["id"] == key.as_str())
                .await?;
            samples.push(sent.elapsed());
        }
        liker.recv_until(|f| f["type"] == "ack").await?;
    }
    let elapsed = started.elapsed();
    let after = command_stats(redis.port).await?;
    samples.sort();
    let calls = |name: &str, stats: &[(String, u64)]| {
        stats.iter().find(|(n, _)| n == name).map_or(0, |(_, c)| *c)
    };
    let per_like = |name: &str| (calls(name, &after) - calls(name, &before)) as f64 / likes as f64;
    let total_after: u64 = after.iter().map(|(_, c)| c).sum();
    let total_before: u64 = before.iter().map(|(_, c)| c).sum();

    println!(
        "| likes | listeners on B | p50 | p90 | p99 | max | Redis cmds/like (all) | EVALSHA/like | PUBLISH/like |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {likes} | {listener_count} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} | {:.2} | {:.2} |",
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.9).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.last().context("no samples")?.as_secs_f64() * 1e3,
        (total_after - total_before) as f64 / likes as f64,
        per_like("evalsha") + per_like("eval"),
        per_like("publish"),
    );
    println!(
        "({} deliveries in {:.1} s)",
        samples.len(),
        elapsed.as_secs_f64()
    );

    // The liker's ack: decided, stored (SQLite group commit), merged into Redis.
    let mut acks = Vec::with_capacity(likes);
    for i in 0..likes {
        let action = if i % 2 == 0 { "like" } else { "unlike" };
        let sent = Instant::now();
        let ack = liker.like(action, "bench-ack", &format!("a{i}")).await?;
        anyhow::ensure!(ack["type"] == "ack", "not acked: {ack}");
        acks.push(sent.elapsed());
    }
    acks.sort();
    println!(
        "ack on A ({likes} likes one at a time): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&acks, 0.5).as_secs_f64() * 1e3,
        percentile(&acks, 0.99).as_secs_f64() * 1e3,
        acks.last().context("no acks")?.as_secs_f64() * 1e3,
    );
    Ok(())
}
