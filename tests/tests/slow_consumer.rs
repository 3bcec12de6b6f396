//! A listener that stops reading is conflated and then dropped; it never delays anyone else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fanfare_tests::NodeProcess;
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const TRACKS: usize = 8;

#[tokio::test]
async fn a_stuck_reader_is_dropped_while_others_keep_up() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&[
        "--outbound-queue",
        "4",
        "--slow-consumer-timeout",
        "500",
        "--max-messages-per-second",
        "100000",
        // Each toggler is one user sending batches of 50: no per-user like rate here.
        "--max-likes-per-user",
        "0",
    ])
    .await?;
    let tracks: Vec<String> = (0..TRACKS).map(|t| format!("hot:{t}")).collect();

    // The stuck reader: a tiny receive buffer and it never reads after subscribing.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let stream = socket.connect(node.addr.parse()?).await?;
    let (mut stuck, _) = tokio_tungstenite::client_async(node.ws_url("stuck"), stream).await?;
    for track in &tracks {
        let frame = json!({"type":"subscribe","track":track}).to_string();
        stuck.send(Message::text(frame)).await?;
    }

    let mut reader = node.connect("reader").await?;
    for track in &tracks {
        reader.subscribe(track).await?;
    }

    // Togglers: long user names and keys make big updates; they alternate like/unlike in
    // batches until the stuck reader has been dropped (or 30 s pass), then end liked.
    let stuck_dropped = AtomicBool::new(false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let togglers = tracks.iter().enumerate().map(|(t, track)| {
        let node = &node;
        let stuck_dropped = &stuck_dropped;
        async move {
            let user = format!("{t}{}", "u".repeat(62));
            let mut client = node.connect(&user).await?;
            let mut op = 0usize;
            loop {
                let done =
                    stuck_dropped.load(Ordering::Relaxed) || tokio::time::Instant::now() > deadline;
                // Ops alternate like/unlike starting with like: an odd count ends liked.
                if done && op % 2 == 1 {
                    return anyhow::Ok(());
                }
                let batch = if done { 1 } else { 50 };
                for i in op..op + batch {
                    let action = if i % 2 == 0 { "like" } else { "unlike" };
                    let key = format!("{i:06}{}", "k".repeat(58));
                    client
                        .send(json!({"type":action,"track":track,"id":key}))
                        .await?;
                }
                let mut acks = 0;
                while acks < batch {
                    let frame = client.recv().await?;
                    anyhow::ensure!(frame["type"] != "error", "{frame}");
                    if frame["type"] == "ack" {
                        anyhow::ensure!(frame["duplicate"] == false, "{frame}");
                        acks += 1;
                    }
                }
                op += batch;
            }
        }
    });
    let watch = async {
        node.wait_metric_for(
            "fanfare_slow_consumer_disconnects_total",
            Duration::from_secs(30),
            |v| v >= 1.0,
        )
        .await?;
        stuck_dropped.store(true, Ordering::Relaxed);
        anyhow::Ok(())
    };
    let reading = async {
        // The reader keeps draining while the togglers run, like any healthy client.
        let mut last = HashMap::new();
        loop {
            let frame = reader.recv_until(|f| f["type"] == "likes").await?;
            let count = frame["count"].as_u64().unwrap_or(0);
            last.insert(
                frame["track"].as_str().unwrap_or_default().to_owned(),
                count,
            );
            if last.len() == TRACKS && last.values().all(|&c| c == 2) {
                return anyhow::Ok(());
            }
        }
    };
    let produce = async {
        futures_util::future::try_join_all(togglers).await?;
        // Every toggler ends liked (301 ops); one more user makes each total 2.
        let mut finisher = node.connect("finisher").await?;
        for track in &tracks {
            let ack = finisher.like("like", track, "f").await?;
            anyhow::ensure!(ack["count"] == 2, "{ack}");
        }
        anyhow::Ok(())
    };
    let (produced, read, watched) = tokio::join!(produce, reading, watch);
    watched?;
    produced?;
    read?;

    // Only the healthy reader is left: togglers and finisher are gone, the stuck one was dropped.
    node.wait_metric("fanfare_connections_active", |v| v == 1.0)
        .await?;
    drop(stuck);
    Ok(())
}
