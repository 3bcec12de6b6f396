//! The fault suite: a whole farm on loopback — three nodes behind HAProxy, two workers, Redis,
//! the broker and the MongoDB server — under like traffic while a scheduler kills and freezes
//! its parts, one at a time and then several at once. Afterwards every acked like is looked up
//! in MongoDB and every track's count is compared across MongoDB, Redis and a fresh subscribe.
//!
//! `fanfare-chaos` (src/bin/fanfare-chaos.rs, `scripts/chaos`) runs it long; `tests/faults.rs` runs a
//! short round as part of the test command.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::net::TcpStream;

use crate::pipeline::Pipeline;
use crate::services::{Haproxy, WorkerProcess};
use crate::stored::{EventAudit, audit_events, stored_totals, wait_stored};
use crate::traffic::{Acks, Traffic, TrafficPlan};
use crate::{NodeProcess, WsClient};

const NODES: usize = 3;
const WORKERS: usize = 2;

/// What to run.
#[derive(Debug, Clone)]
pub struct ChaosPlan {
    pub seed: u64,
    pub users: usize,
    pub tracks: usize,
    /// Pause between one user's likes.
    pub pause: Duration,
    /// Rounds of every single fault in turn (shuffled), then rounds of combined faults.
    pub single_rounds: usize,
    pub combined_rounds: usize,
    /// Longest a faulty part stays down or frozen (the pause is random up to this).
    pub max_outage: Duration,
    /// Subscribers that never read, and zombies that go silent without closing.
    pub slow_clients: usize,
    pub zombies: usize,
    /// The kinds of fault to inject alone (all by default).
    pub faults: Vec<Fault>,
    /// The kinds the combined rounds draw from.
    pub combined_faults: Vec<Fault>,
    /// Kinds every combined round includes (the rest are drawn): the short run's one round
    /// always loses Redis' data while a node is frozen, the hardest case for the counts.
    pub combined_always: Vec<Fault>,
    /// Kafka brokers (from 3: replication factor 3, `min.insync.replicas=2`; a broker kill
    /// takes one down at a time, in turn).
    pub kafka_brokers: usize,
}

impl ChaosPlan {
    /// The short round the test command runs.
    pub fn short(seed: u64) -> ChaosPlan {
        ChaosPlan {
            seed,
            users: 20,
            tracks: 12,
            pause: Duration::from_millis(50),
            single_rounds: 1,
            combined_rounds: 1,
            max_outage: Duration::from_secs(4),
            slow_clients: 4,
            zombies: 20,
            faults: ALL_FAULTS.to_vec(),
            combined_faults: combinable_by_default(&ALL_FAULTS),
            combined_always: vec![Fault::KillRedis, Fault::FreezeNode],
            kafka_brokers: 1,
        }
    }
}

/// The parts a fault can hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    KillNode,
    FreezeNode,
    KillWorker,
    KillRedis,
    KillBroker,
    KillMongo,
}

/// The kinds combined rounds draw from unless told otherwise: all of them (the Redis kill
/// with node faults too, since counts are merged registers: docs/reliability.md).
pub fn combinable_by_default(kinds: &[Fault]) -> Vec<Fault> {
    kinds.to_vec()
}

pub const ALL_FAULTS: [Fault; 6] = [
    Fault::KillNode,
    Fault::FreezeNode,
    Fault::KillWorker,
    Fault::KillRedis,
    Fault::KillBroker,
    Fault::KillMongo,
];

/// What the run measured.
#[derive(Debug, Default)]
pub struct Report {
    pub seed: u64,
    /// Each injection: what, which, for how long.
    pub injected: Vec<String>,
    pub acked: u64,
    pub in_doubt: u64,
    pub reconnects: u64,
    pub audit: EventAudit,
    /// Tracks whose counts disagree at the end (MongoDB / Redis / subscribe / acked).
    pub mismatched: Vec<String>,
    /// From the end of traffic until Redis, a fresh subscribe and the acks agree everywhere.
    pub live_converged: Option<Duration>,
    /// From the end of traffic until MongoDB held every acked like.
    pub stored_after: Option<Duration>,
    pub run_time: Duration,
    /// Slow and zombie clients the nodes cut off (metrics of the nodes alive at the end).
    pub cut_off: f64,
    /// Likes still held in the nodes' Kafka spills when the audit ended (acked, safe on the
    /// node, not yet in Kafka).
    pub still_spilled: f64,
    /// ERROR/FATAL lines the broker logged (for the report; a kill -9 makes a few).
    pub broker_errors: Vec<String>,
}

impl Report {
    /// Nothing lost, nothing doubled, every count agreeing.
    pub fn passed(&self) -> bool {
        self.audit.missing == 0
            && self.audit.doubled == 0
            && self.audit.unexplained == 0
            && self.mismatched.is_empty()
            && self.live_converged.is_some()
            && self.stored_after.is_some()
    }

    pub fn table(&self) -> String {
        let secs = |d: Option<Duration>| {
            d.map_or("never".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()))
        };
        let mut out = String::new();
        let _ = writeln!(out, "| measure | value |\n|---|---|");
        let rows = [
            ("seed", self.seed.to_string()),
            ("faults injected", self.injected.len().to_string()),
            ("run time", format!("{:.0} s", self.run_time.as_secs_f64())),
            ("likes acked", self.acked.to_string()),
            ("likes in doubt at stop", self.in_doubt.to_string()),
            ("client reconnects", self.reconnects.to_string()),
            ("events stored", self.audit.stored.to_string()),
            ("lost (acked, not stored)", self.audit.missing.to_string()),
            ("doubled", self.audit.doubled.to_string()),
            ("stored but never acked", self.audit.unexplained.to_string()),
            (
                "tracks with disagreeing counts",
                self.mismatched.len().to_string(),
            ),
            ("live counts converged after", secs(self.live_converged)),
            ("MongoDB complete after", secs(self.stored_after)),
            ("slow/zombie clients cut off", self.cut_off.to_string()),
            (
                "acked likes still in node spills",
                self.still_spilled.to_string(),
            ),
            (
                "broker ERROR log lines",
                self.broker_errors.len().to_string(),
            ),
        ];
        for (k, v) in rows {
            let _ = writeln!(out, "| {k} | {v} |");
        }
        let _ = writeln!(out, "\nfaults: {}", self.injected.join("; "));
        for error in self.broker_errors.iter().take(5) {
            let _ = writeln!(out, "broker error: {error}");
        }
        for m in &self.mismatched {
            let _ = writeln!(out, "mismatch: {m}");
        }
        out
    }
}

struct Node {
    process: Option<NodeProcess>,
    addr: String,
    dir: tempfile::TempDir,
}

/// Every process of the farm, each restartable in place.
struct Farm {
    services: Pipeline,
    nodes: Vec<Node>,
    workers: Vec<Option<WorkerProcess>>,
    balancer: Haproxy,
}

impl Farm {
    async fn start(kafka_brokers: usize) -> anyhow::Result<Farm> {
        let services = Pipeline::start_with(kafka_brokers).await?;
        let mut nodes = Vec::new();
        for _ in 0..NODES {
            let dir = tempfile::tempdir()?;
            let process = start_node(&services, "127.0.0.1:0", dir.path()).await?;
            let addr = process.addr.clone();
            nodes.push(Node {
                process: Some(process),
                addr,
                dir,
            });
        }
        let mut workers = Vec::new();
        for _ in 0..WORKERS {
            workers.push(Some(services.worker(&[]).await?));
        }
        let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
        let balancer = Haproxy::start(&addrs).await?;
        Ok(Farm {
            services,
            nodes,
            workers,
            balancer,
        })
    }

    /// Takes a part down (or freezes it); returns a label for the report.
    async fn inject(&mut self, fault: Fault, target: usize) -> anyhow::Result<String> {
        match fault {
            Fault::KillNode => {
                if let Some(mut node) = self.nodes[target].process.take() {
                    node.kill().await?;
                }
            }
            Fault::FreezeNode => self.node(target)?.signal("STOP")?,
            Fault::KillWorker => {
                if let Some(mut worker) = self.workers[target].take() {
                    worker.kill().await?;
                }
            }
            Fault::KillRedis => self.services.redis.kill().await?,
            Fault::KillBroker => self.services.kafka.kill().await?,
            Fault::KillMongo => self.services.mongo.kill().await?,
        }
        Ok(match fault {
            Fault::KillNode | Fault::FreezeNode | Fault::KillWorker => {
                format!("{fault:?}({target})")
            }
            _ => format!("{fault:?}"),
        })
    }

    async fn restore(&mut self, fault: Fault, target: usize) -> anyhow::Result<()> {
        match fault {
            Fault::KillNode => {
                let node = &mut self.nodes[target];
                node.process = Some(start_node(&self.services, &node.addr, node.dir.path()).await?);
            }
            Fault::FreezeNode => self.node(target)?.signal("CONT")?,
            Fault::KillWorker => self.workers[target] = Some(self.services.worker(&[]).await?),
            Fault::KillRedis => self.services.redis.restart().await?,
            Fault::KillBroker => self.services.kafka.restart().await?,
            Fault::KillMongo => self.services.mongo.restart().await?,
        }
        Ok(())
    }

    fn node(&self, i: usize) -> anyhow::Result<&NodeProcess> {
        self.nodes[i].process.as_ref().context("node is down")
    }

    /// Which faults this farm may inject (outside services given by URL are left alone).
    fn can(&self, fault: Fault) -> bool {
        match fault {
            Fault::KillBroker => self.services.kafka.is_own(),
            Fault::KillMongo => self.services.mongo.is_own(),
            _ => true,
        }
    }
}

/// The pipeline's flags plus quick heartbeats, so zombies and stuck readers go within seconds.
fn node_args(services: &Pipeline) -> Vec<String> {
    let mut args = services.node_args();
    args.extend(
        [
            "--heartbeat-interval",
            "1000",
            "--heartbeat-timeout",
            "4000",
            "--slow-consumer-timeout",
            "2000",
            "--max-messages-per-second",
            "100000",
            // Behind HAProxy's send-proxy-v2, as examples/haproxy.cfg runs it.
            "--proxy-protocol",
            "--trusted-proxies",
            "127.0.0.1",
        ]
        .map(str::to_owned),
    );
    args
}

async fn start_node(
    services: &Pipeline,
    listen: &str,
    dir: &std::path::Path,
) -> anyhow::Result<NodeProcess> {
    let args = node_args(services);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    NodeProcess::start_on(listen, dir, &args).await
}

/// Runs the plan and audits the result.
pub async fn run(plan: &ChaosPlan) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let mut farm = Farm::start(plan.kafka_brokers).await?;
    let tracks: Vec<String> = (0..plan.tracks).map(|t| format!("chaos-{t}")).collect();
    let track_refs: Vec<&str> = tracks.iter().map(String::as_str).collect();
    let mut traffic_plan =
        TrafficPlan::new(&[&farm.balancer.addr], plan.users, plan.pause, &track_refs);
    traffic_plan.user_prefix = format!("cu{}-", plan.seed);
    traffic_plan.reply_timeout = Duration::from_secs(3);
    let traffic = Traffic::start(traffic_plan);
    let misbehaving = Misbehaving::start(&farm.balancer.addr, &tracks, plan).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut report = Report {
        seed: plan.seed,
        ..Report::default()
    };
    // Outside services given by URL are never killed.
    let injectable = |kinds: &[Fault]| -> Vec<Fault> {
        kinds.iter().copied().filter(|f| farm.can(*f)).collect()
    };
    let (alone, combinable) = (injectable(&plan.faults), injectable(&plan.combined_faults));
    // One at a time.
    for _ in 0..plan.single_rounds {
        let mut faults = alone.clone();
        faults.shuffle(&mut rng);
        for fault in faults {
            let target = rng.random_range(0..target_count(fault));
            inject_for_a_while(&mut farm, &mut rng, plan, &[(fault, target)], &mut report).await?;
        }
    }
    // Several at once: distinct kinds, never both node faults on the same node.
    for _ in 0..plan.combined_rounds {
        let mut kinds = combinable.clone();
        kinds.shuffle(&mut rng);
        // The kinds every round includes go first, so they are always among those taken.
        kinds.sort_by_key(|kind| !plan.combined_always.contains(kind));
        let mut chosen = Vec::new();
        let mut node_targets: Vec<usize> = (0..NODES).collect();
        node_targets.shuffle(&mut rng);
        let at_once = rng
            .random_range(2..=4)
            .max(plan.combined_always.len())
            .min(kinds.len());
        for fault in kinds.into_iter().take(at_once) {
            let target = match fault {
                Fault::KillNode | Fault::FreezeNode => node_targets.pop().unwrap_or(0),
                other => rng.random_range(0..target_count(other)),
            };
            chosen.push((fault, target));
        }
        inject_for_a_while(&mut farm, &mut rng, plan, &chosen, &mut report).await?;
    }
    misbehaving.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    report.reconnects = traffic.reconnects();
    let acks = traffic.finish().await?;
    let quiet = Instant::now();
    eprintln!(
        "chaos: traffic stopped after {} acks; auditing",
        acks.total()
    );
    report.acked = acks.total();
    report.in_doubt = acks.in_doubt.len() as u64;
    for node in farm.nodes.iter().filter_map(|n| n.process.as_ref()) {
        report.cut_off += node
            .metric("fanfare_slow_consumer_disconnects_total")
            .await
            .unwrap_or(0.0)
            + node
                .metric("fanfare_heartbeat_reaps_total")
                .await
                .unwrap_or(0.0);
    }
    audit(&farm, &acks, &track_refs, quiet, &mut report).await?;
    for node in farm.nodes.iter().filter_map(|n| n.process.as_ref()) {
        report.still_spilled += node
            .metric("fanfare_kafka_spill_events")
            .await
            .unwrap_or(0.0);
    }
    report.broker_errors = farm.services.kafka.errors();
    if let Some(death) = farm.services.kafka.died() {
        report.mismatched.push(death);
    } else if !report.passed() {
        eprintln!("chaos: broker log: {}", farm.services.kafka.log_tail(10));
    }
    report.run_time = started.elapsed();
    Ok(report)
}

fn target_count(fault: Fault) -> usize {
    match fault {
        Fault::KillNode | Fault::FreezeNode => NODES,
        Fault::KillWorker => WORKERS,
        _ => 1,
    }
}

/// Injects the faults together, keeps them for a random while, restores them, lets the farm
/// settle for a moment.
async fn inject_for_a_while(
    farm: &mut Farm,
    rng: &mut StdRng,
    plan: &ChaosPlan,
    faults: &[(Fault, usize)],
    report: &mut Report,
) -> anyhow::Result<()> {
    let outage = Duration::from_millis(rng.random_range(500..=plan.max_outage.as_millis() as u64));
    let mut labels = Vec::new();
    for &(fault, target) in faults {
        labels.push(farm.inject(fault, target).await?);
    }
    report.injected.push(format!(
        "{} for {:.1} s",
        labels.join(" + "),
        outage.as_secs_f64()
    ));
    tokio::time::sleep(outage).await;
    for &(fault, target) in faults.iter().rev() {
        farm.restore(fault, target)
            .await
            .with_context(|| format!("restoring {fault:?}({target})"))?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    Ok(())
}

/// Holds the acks against Redis, a fresh subscribe (live, within seconds) and MongoDB (once
/// the workers caught up).
async fn audit(
    farm: &Farm,
    acks: &Acks,
    tracks: &[&str],
    quiet: Instant,
    report: &mut Report,
) -> anyhow::Result<()> {
    let expected = |track: &str| acks.per_track.get(track).map_or(0, |e| e.count);
    let mut doubt_per_track = std::collections::HashMap::<&str, i64>::new();
    for like in &acks.in_doubt {
        *doubt_per_track.entry(like.track.as_str()).or_default() += 1;
    }
    let within_doubt = |track: &str, value: i64| {
        (value - expected(track)).abs() <= doubt_per_track.get(track).copied().unwrap_or(0)
    };

    // Live: Redis and a fresh subscribe through the balancer agree with the acks.
    let deadline = quiet + Duration::from_secs(30);
    let live = loop {
        let live = live_counts(farm, tracks).await.unwrap_or_default();
        let agree = live.len() == tracks.len()
            && live
                .iter()
                .zip(tracks)
                .all(|((redis, subscribed), t)| redis == subscribed && within_doubt(t, *redis));
        if agree {
            report.live_converged = Some(quiet.elapsed());
        }
        if agree || Instant::now() > deadline {
            break live;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Stored: every acked like, once; per-track totals consistent and equal to the live ones.
    let db = farm.services.db().await?;
    // Long runs get time in proportion to what they acked (replays recount totals).
    let patience = Duration::from_secs(120).max(Duration::from_millis(acks.total() * 2));
    match wait_stored(&db, acks.total(), patience).await {
        Ok(_) => report.stored_after = Some(quiet.elapsed()),
        Err(err) => eprintln!("chaos: {err:#}"),
    }
    eprintln!(
        "chaos: live {:?}, stored {:?}",
        report.live_converged, report.stored_after
    );
    report.audit = audit_events(&db, acks).await?;
    let totals = match stored_totals(&db, tracks).await {
        Ok(totals) => totals,
        Err(err) => {
            report.mismatched.push(format!("{err:#}"));
            Default::default()
        }
    };
    for (i, track) in tracks.iter().enumerate() {
        let stored = totals.get(*track).map_or(0, |e| e.count);
        let (redis, subscribed) = live.get(i).copied().unwrap_or((i64::MIN, i64::MIN));
        if !(stored == redis && redis == subscribed && within_doubt(track, stored)) {
            report.mismatched.push(format!(
                "{track}: acked {} mongo {stored} redis {redis} subscribe {subscribed}",
                expected(track)
            ));
        }
    }
    // Early in the output (CI shows its head): what disagreed, before the long broker log.
    for m in &report.mismatched {
        eprintln!("chaos: mismatch: {m}");
    }
    Ok(())
}

/// Each track's (Redis count, count a fresh subscriber is told).
async fn live_counts(farm: &Farm, tracks: &[&str]) -> anyhow::Result<Vec<(i64, i64)>> {
    let url = format!("ws://{}/v1/ws?user=auditor", farm.balancer.addr);
    let mut client = WsClient::connect(&url).await?;
    let mut counts = Vec::new();
    for track in tracks {
        let redis = farm
            .services
            .redis
            .get(&format!("ff:{{{track}}}:count"))
            .await?
            .map_or(Ok(0), |v| v.parse::<i64>())?;
        let subscribed = client.subscribe(track).await? as i64;
        counts.push((redis, subscribed));
    }
    Ok(counts)
}

/// Clients that misbehave for the whole run: subscribers that never read (with a tiny receive
/// buffer) and zombies that finish the handshake, subscribe and then never send or read again.
struct Misbehaving {
    stop: tokio::sync::watch::Sender<bool>,
}

impl Misbehaving {
    async fn start(addr: &str, tracks: &[String], plan: &ChaosPlan) -> anyhow::Result<Misbehaving> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let subscribe_all: Vec<String> = tracks
            .iter()
            .map(|t| format!(r#"{{"type":"subscribe","track":"{t}"}}"#))
            .collect();
        for i in 0..plan.slow_clients + plan.zombies {
            let socket = tokio::net::TcpSocket::new_v4()?;
            if i < plan.slow_clients {
                socket.set_recv_buffer_size(4096)?;
            }
            let stream = socket.connect(addr.parse()?).await?;
            let frames = subscribe_all.clone();
            let mut stopped = stopped.clone();
            let url = format!("ws://{addr}/v1/ws?user=misbehaving{i}");
            tokio::spawn(async move {
                let held = silent_subscriber(stream, &url, &frames).await;
                let _ = stopped.wait_for(|s| *s).await;
                drop(held);
            });
        }
        Ok(Misbehaving { stop })
    }

    fn stop(self) {
        let _ = self.stop.send(true);
    }
}

/// Handshakes, subscribes, then holds the socket without touching it.
async fn silent_subscriber(
    stream: TcpStream,
    url: &str,
    frames: &[String],
) -> Option<tokio_tungstenite::WebSocketStream<TcpStream>> {
    use futures_util::SinkExt;
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.ok()?;
    for frame in frames {
        ws.send(tokio_tungstenite::tungstenite::Message::text(frame.clone()))
            .await
            .ok()?;
    }
    Some(ws)
}
