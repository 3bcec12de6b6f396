//! Memory per idle subscribed socket: node RSS before and after opening N WebSockets that
//! each subscribe to one of 100 tracks and then stay silent.
//!
//!     FANFARE_BIN=target/release/fanfare target/release/idle_bench [sockets]
//!
//! Keep sockets under ~9000 per run: this process and the node each hold one fd per socket
//! and the machine's hard limit is 20000 per process.

use std::time::Duration;

use fanfare_tests::NodeProcess;

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    match fanfare_bench::proc_stats(pid) {
        (0, _) => anyhow::bail!("no VmRSS for pid {pid}"),
        (rss, _) => Ok(rss),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sockets: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5000);
    let dir = tempfile::tempdir()?;
    let node = NodeProcess::start(
        dir.path(),
        &[
            "--heartbeat-timeout",
            "600000",
            "--heartbeat-interval",
            "300000",
        ],
    )
    .await?;
    // Warm up allocator and runtime with a few connections first.
    let mut clients = Vec::with_capacity(sockets);
    for i in 0..10 {
        let mut c = node.connect(&format!("warm{i}")).await?;
        c.subscribe(&format!("track{}", i % 100)).await?;
        clients.push(c);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(node.pid())?;
    for i in 10..sockets {
        let mut c = node.connect(&format!("idle{i}")).await?;
        c.subscribe(&format!("track{}", i % 100)).await?;
        clients.push(c);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(node.pid())?;
    let per = (after - before) as f64 * 1024.0 / (sockets - 10) as f64;
    println!("| idle subscribed sockets | node RSS before | after | per socket |");
    println!("|---|---|---|---|");
    println!(
        "| {} | {} KiB | {} KiB | {:.0} B ({:.2} KiB) |",
        sockets,
        before,
        after,
        per,
        per / 1024.0
    );
    Ok(())
}
