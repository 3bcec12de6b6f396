//! `fanfare-chaos`: the fault suite, as long as you like. Starts a whole farm on loopback
//! (3 nodes behind HAProxy, 2 workers, Redis, Apache Kafka, FerretDB), injects faults under traffic,
//! audits every acked like and exits non-zero on any loss, double count or disagreeing count.
//! `scripts/chaos` builds and runs it; `docs/reliability.md` explains the report.

use std::time::Duration;

use clap::Parser;
use fanfare_tests::chaos::{ALL_FAULTS, ChaosPlan, Fault, combinable_by_default, run};

#[derive(Parser, Debug)]
#[command(name = "fanfare-chaos", about)]
struct Args {
    /// Random seed (faults, targets, outages); printed so a run can be repeated.
    #[arg(long)]
    seed: Option<u64>,
    /// Simulated users, each liking and unliking in a loop.
    #[arg(long, default_value_t = 60)]
    users: usize,
    #[arg(long, default_value_t = 24)]
    tracks: usize,
    /// Pause between one user's likes, in ms.
    #[arg(long, default_value_t = 20)]
    pause_ms: u64,
    /// Rounds of every fault alone.
    #[arg(long, default_value_t = 3)]
    single_rounds: usize,
    /// Rounds of 2–4 faults at once.
    #[arg(long, default_value_t = 6)]
    combined_rounds: usize,
    /// Longest outage of a faulty part, in ms.
    #[arg(long, default_value_t = 6000)]
    max_outage_ms: u64,
    #[arg(long, default_value_t = 8)]
    slow_clients: usize,
    #[arg(long, default_value_t = 200)]
    zombies: usize,
    /// Fault kinds to inject, comma-separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    faults: Vec<Fault>,
    /// Fault kinds the combined rounds draw from (default: those of --faults).
    #[arg(long, value_enum, value_delimiter = ',')]
    combined_faults: Vec<Fault>,
    /// Kafka brokers in the cluster (3: replication factor 3, min.insync.replicas=2, the
    /// deployment users run; a broker fault kills one at a time).
    #[arg(long, default_value_t = 3)]
    kafka_brokers: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    });
    let plan = ChaosPlan {
        seed,
        users: args.users,
        tracks: args.tracks,
        pause: Duration::from_millis(args.pause_ms),
        single_rounds: args.single_rounds,
        combined_rounds: args.combined_rounds,
        max_outage: Duration::from_millis(args.max_outage_ms),
        slow_clients: args.slow_clients,
        zombies: args.zombies,
        combined_faults: if !args.combined_faults.is_empty() {
            args.combined_faults
        } else if args.faults.is_empty() {
            combinable_by_default(&ALL_FAULTS)
        } else {
            combinable_by_default(&args.faults)
        },
        combined_always: Vec::new(),
        kafka_brokers: args.kafka_brokers,
        faults: if args.faults.is_empty() {
            ALL_FAULTS.to_vec()
        } else {
            args.faults
        },
    };
    eprintln!("fanfare-chaos: {plan:?}");
    let report = run(&plan).await?;
    println!("{}", report.table());
    if !report.passed() {
        eprintln!("fanfare-chaos: FAILED (seed {seed})");
        std::process::exit(1);
    }
    Ok(())
}
