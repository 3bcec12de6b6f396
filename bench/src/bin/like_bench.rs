//! Embedded-path throughput: durable likes per second through one node (SQLite group commit),
//! with ack latency, from `connections` clients pipelining up to `window` likes each.
//!
//!     cargo build --release --workspace --bins
//!     FANFARE_BIN=target/release/fanfare target/release/like_bench [seconds] [connections] [window]
//!
//! With `FANFARE_BENCH_PIPELINE=1` the node runs with `--kafka` against an Apache Kafka broker
//! and one `fanfare worker` writes FerretDB on PostgreSQL; the bench then also
//! waits until MongoDB holds every acked like and reports the end-to-end rate and the bytes
//! per event in both stores' files. `FANFARE_BENCH_TRACKS=N` draws tracks from a catalog of
//! N, as real traffic does: each connection likes them in turn, then reconnects as a new
//! listener, so every like is a first like of its (user, track) pair — the common case. With
//! `FANFARE_BENCH_TOGGLE=1` each connection keeps its user and unlikes what it liked, then
//! likes it again, …: every action changes an existing pair (the store's worst case). Without
//! a catalog every like is on a new track.
//! `FANFARE_BENCH_WORKERS=N` runs N workers (default 1). `FANFARE_BENCH_RATE=N` offers at
//! most N likes/s in total (paced per connection) instead of as many as the node acks: the
//! way to ask "does the pipeline sustain N/s with the store keeping up?".
//! `FANFARE_BENCH_WARMUP=S` (pipeline mode) first offers the same load for S seconds with other
//! users and keys, waits until the store holds all of it, and measures only what follows: the
//! steady state of a running deployment (JVM warmed up, consumer group settled, collections
//! and indexes created) rather than its first seconds.
//!
//! Progress into the store is read from the workers' own counters (`/metrics`), not by
//! counting documents: FerretDB answers `count` by decoding every stored document, so a
//! bench that polls it spends the store's CPU on itself. One exact count at the end checks
//! the counters.
//!
//! Client and node share this machine's cores; the numbers are for both together.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fanfare_tests::NodeProcess;
use fanfare_tests::services::{KafkaBroker, MongoServer, WorkerProcess, unique};
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
    let catalog: Option<u64> = std::env::var("FANFARE_BENCH_TRACKS")
        .ok()
        .and_then(|t| t.parse().ok())
        .filter(|t| *t > 0);
    let toggle = std::env::var("FANFARE_BENCH_TOGGLE").as_deref() == Ok("1");
    // Seconds between two likes of one connection, when the offered rate is capped.
    let pace: Option<f64> = std::env::var("FANFARE_BENCH_RATE")
        .ok()
        .and_then(|r| r.parse::<f64>().ok())
        .filter(|r| *r > 0.0)
        .map(|rate| connections as f64 / rate);
    let dir = tempfile::tempdir()?;
    let pipeline = match std::env::var("FANFARE_BENCH_PIPELINE").as_deref() {
        Ok("1") => Some(Pipeline::start().await?),
        _ => None,
    };
    let mut node_args: Vec<String> = fanfare_bench::UNLIMITED_NODE_ARGS
        .iter()
        .map(|a| a.to_string())
        .collect();
    if let Some(p) = &pipeline {
        node_args.extend(["--kafka".to_owned(), p.kafka.brokers.clone()]);
    }
    let node_args: Vec<&str> = node_args.iter().map(String::as_str).collect();
    let node = NodeProcess::start(dir.path(), &node_args).await?;
    let traffic = Traffic {
        connections,
        window,
        catalog,
        toggle,
        pace,
    };
    let warmup: u64 = std::env::var("FANFARE_BENCH_WARMUP")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(0);
    // What the store held before the measured minute (the warm-up's events).
    let mut before = Baseline::default();
    if let (Some(p), true) = (&pipeline, warmup > 0) {
        let warm = traffic.offer(&node, "warm", warmup).await?.len() as u64;
        p.wait_until_handled(warm).await?;
        before = p.baseline(warm).await?;
        println!("warm-up: {warm} likes over {warmup} s, all stored; measuring from here");
    }
    let started = Instant::now();
    let progress = pipeline
        .as_ref()
        .map(|p| p.spawn_progress(started, before.handled));
    let mut latencies = traffic.offer(&node, "bench", seconds).await?;
    let elapsed = started.elapsed();
    let last_ack = Instant::now();
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
    if let Some(p) = &pipeline {
        p.report(latencies.len() as u64, started, last_ack, &before)
            .await?;
    }
    if let Some(progress) = progress {
        progress.abort();
    }
    // Every acked like is stored: spot-check the store through the node.
    let count = node.track_count("t0").await?;
    if catalog.is_none() {
        anyhow::ensure!(
            count == connections as u64,
            "t0 has one like per connection, got {count}"
        );
    }
    Ok(())
}

/// The offered load: `connections` clients keeping up to `window` likes in flight each.
#[derive(Clone, Copy)]
struct Traffic {
    connections: usize,
    window: usize,
    catalog: Option<u64>,
    toggle: bool,
    /// Seconds between two likes of one connection, when the offered rate is capped.
    pace: Option<f64>,
}

impl Traffic {
    /// Offers the load for `seconds`; users and keys start with `tag`, so a second phase
    /// still likes new pairs. Returns the ack latencies.
    async fn offer(
        &self,
        node: &NodeProcess,
        tag: &str,
        seconds: u64,
    ) -> anyhow::Result<Vec<Duration>> {
        let connections = self.connections;
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let started = Instant::now();
        let clients = (0..connections).map(|c| {
            let node = &node;
            let Traffic {
                window,
                catalog,
                toggle,
                pace,
                ..
            } = *self;
            async move {
                let mut client = node.connect(&format!("{tag}{c}")).await?;
                let mut sent_at: HashMap<String, Instant> = HashMap::new();
                let mut latencies = Vec::new();
                let mut next = 0u64;
                let mut listener = 0u64;
                let mut changing_listener = false;
                loop {
                    // Keep `window` likes in flight; every action changes its pair, so each is an
                    // event.
                    while sent_at.len() < window && Instant::now() < deadline {
                        if let Some(n) = catalog.filter(|_| !toggle)
                            && next / n != listener
                        {
                            if !sent_at.is_empty() {
                                changing_listener = true;
                                break; // the acks first, then a new listener
                            }
                            changing_listener = false;
                            listener = next / n;
                            client = node.connect(&format!("{tag}{c}-{listener}")).await?;
                        }
                        if let Some(pace) = pace {
                            let due = started + Duration::from_secs_f64(pace * next as f64);
                            if due > Instant::now() {
                                if sent_at.is_empty() {
                                    tokio::time::sleep_until(due.into()).await;
                                } else {
                                    break; // read acks meanwhile
                                }
                            }
                        }
                        let key = format!("{tag}{next}");
                        let (track, action) = match catalog {
                            Some(n) if toggle => {
                                (next % n, ["like", "unlike"][(next / n % 2) as usize])
                            }
                            Some(n) => (next % n, "like"),
                            None => (next, "like"),
                        };
                        client
                            .send(json!({"type":action,"track":format!("t{track}"),"id":key}))
                            .await?;
                        sent_at.insert(key, Instant::now());
                        next += 1;
                    }
                    if sent_at.is_empty() {
                        return anyhow::Ok(latencies);
                    }
                    let frame = match pace {
                        Some(pace)
                            if !changing_listener
                                && sent_at.len() < window
                                && Instant::now() < deadline =>
                        {
                            let due = started + Duration::from_secs_f64(pace * next as f64);
                            match tokio::time::timeout_at(due.into(), client.recv()).await {
                                Ok(frame) => frame?,
                                Err(_) => continue, // time to send the next one
                            }
                        }
                        _ => client.recv().await?,
                    };
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
        Ok(try_join_all(clients).await?.into_iter().flatten().collect())
    }
}

/// The workers' counters when the measured phase began.
#[derive(Default)]
struct Baseline {
    handled: u64,
    /// Likes acked in the warm-up.
    acked: u64,
    /// Store seconds per step.
    steps: Vec<f64>,
    batches: f64,
}

/// Broker, MongoDB and one worker for the pipeline mode.
struct Pipeline {
    kafka: KafkaBroker,
    mongo: MongoServer,
    _workers: Vec<WorkerProcess>,
    /// The workers' `/metrics` addresses.
    metrics: Vec<String>,
}

impl Pipeline {
    async fn start() -> anyhow::Result<Pipeline> {
        let kafka = KafkaBroker::start().await?;
        let mongo = MongoServer::start().await?;
        let workers: usize = std::env::var("FANFARE_BENCH_WORKERS")
            .ok()
            .and_then(|w| w.parse().ok())
            .unwrap_or(1);
        let group = unique("bench");
        let mut started = Vec::new();
        let mut metrics = Vec::new();
        for _ in 0..workers {
            let addr = format!("127.0.0.1:{}", fanfare_tests::free_port()?);
            let args = [
                "--metrics-listen",
                &addr,
                "--kafka",
                &kafka.brokers,
                "--mongo",
                &mongo.url,
                "--group",
                &group,
            ];
            started.push(WorkerProcess::start(&args).await?);
            metrics.push(addr);
        }
        Ok(Pipeline {
            kafka,
            mongo,
            _workers: started,
            metrics,
        })
    }

    /// Events the workers have handled (stored, or found already stored).
    async fn handled(&self) -> anyhow::Result<u64> {
        let inserted = sum_of(&self.metrics, "fanfare_worker_events_inserted_total").await?;
        let duplicate = sum_of(&self.metrics, "fanfare_worker_events_duplicate_total").await?;
        Ok((inserted + duplicate) as u64)
    }

    /// Prints the store's rate every 5 s while the bench runs.
    fn spawn_progress(&self, started: Instant, from: u64) -> tokio::task::JoinHandle<()> {
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let mut before = from as f64;
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let Ok(now) = sum_of(&metrics, "fanfare_worker_events_inserted_total").await else {
                    continue;
                };
                eprintln!(
                    "{:5.0} s: stored {:.0} events/s",
                    started.elapsed().as_secs_f64(),
                    (now - before) / 5.0
                );
                before = now;
            }
        })
    }

    /// Waits (up to 10 minutes) until the workers have handled `total` events.
    async fn wait_until_handled(&self, total: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let handled = self.handled().await?;
            if handled >= total {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the workers handled {handled} of {total}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The counters the measured phase is compared with.
    async fn baseline(&self, acked: u64) -> anyhow::Result<Baseline> {
        let mut steps = Vec::new();
        for step in STEPS {
            steps.push(sum_of(&self.metrics, &step_series(step)).await?);
        }
        Ok(Baseline {
            acked,
            handled: self.handled().await?,
            steps,
            batches: sum_of(&self.metrics, "fanfare_worker_batches_total").await?,
        })
    }

    /// Waits until MongoDB holds every acked like; prints the end-to-end rate and sizes.
    async fn report(
        &self,
        acked: u64,
        started: Instant,
        last_ack: Instant,
        before: &Baseline,
    ) -> anyhow::Result<()> {
        let likes = self
            .mongo
            .database("fanfare")
            .await?
            .collection::<mongodb::bson::Document>("likes");
        let acked_in_all = before.acked + acked;
        self.wait_until_handled(before.handled + acked).await?;
        let all_stored = started.elapsed();
        let lag = last_ack.elapsed();
        // The counters say it; the store must agree.
        let stored = likes.estimated_document_count().await?;
        anyhow::ensure!(
            stored >= acked_in_all,
            "MongoDB holds {stored} of {acked_in_all} acked likes"
        );
        println!();
        println!(
            "end to end: {acked} likes in MongoDB {:.1} s after the first was sent → {:.0} likes/s; \
             store lag at the end (last ack → all stored): {:.2} s",
            all_stored.as_secs_f64(),
            acked as f64 / all_stored.as_secs_f64(),
            lag.as_secs_f64()
        );
        // Where the workers' MongoDB time went (summed over workers).
        let mut steps = Vec::new();
        for (i, step) in STEPS.iter().enumerate() {
            let now = sum_of(&self.metrics, &step_series(step))
                .await
                .unwrap_or(0.0);
            steps.push((step, now - before.steps.get(i).copied().unwrap_or(0.0)));
        }
        let total: f64 = steps.iter().map(|(_, s)| s).sum();
        let shares: Vec<String> = steps
            .iter()
            .map(|(step, s)| format!("{step} {s:.1} s ({:.0}%)", 100.0 * s / total.max(1e-9)))
            .collect();
        println!("worker store time: {}", shares.join(", "));
        let batches = sum_of(&self.metrics, "fanfare_worker_batches_total").await? - before.batches;
        println!(
            "worker batches: {batches:.0}, {:.0} events each on average",
            acked as f64 / batches.max(1.0)
        );
        for (name, dir) in [
            ("Apache Kafka", self.kafka.dir()),
            ("FerretDB + PostgreSQL", self.mongo.dir()),
        ] {
            if let Some(dir) = dir {
                let bytes = dir_bytes(dir);
                println!(
                    "{name}: {bytes} bytes on disk → {:.0} bytes per event",
                    bytes as f64 / acked_in_all as f64
                );
            }
        }
        Ok(())
    }
}

/// The workers' store steps, as `fanfare_worker_store_seconds_total` labels them.
const STEPS: [&str; 3] = ["insert_events", "merge_registers", "set_totals"];

fn step_series(step: &str) -> String {
    format!("fanfare_worker_store_seconds_total{{step=\"{step}\"}}")
}

/// One series summed over the workers' `/metrics`.
async fn sum_of(metrics: &[String], series: &str) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for addr in metrics {
        total += fanfare_tests::metric_at(addr, series).await?;
    }
    Ok(total)
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
