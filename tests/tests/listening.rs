//! Listening now: `subscribed`, `likes` updates and `GET /v1/tracks/{t}` carry the number of
//! sockets on the track (exact on one node, summed over a farm within the presence refresh);
//! subscriptions that ask get `listeners` frames, at most one per track every 2 s.

use std::time::Duration;

use fanfare_tests::{NodeProcess, PATIENCE, RedisProcess, WsClient};
use serde_json::{Value, json};

async fn http_listeners(node: &NodeProcess, track: &str) -> anyhow::Result<u64> {
    let (status, body) = node.get(&format!("/v1/tracks/{track}")).await?;
    anyhow::ensure!(status == 200, "{status} {body}");
    let reply: Value = serde_json::from_str(&body)?;
    reply["listeners"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no listeners in {reply}"))
}

/// Subscribes and returns the `subscribed` frame.
async fn subscribe(client: &mut WsClient, track: &str, listeners: bool) -> anyhow::Result<Value> {
    client
        .send(json!({"type":"subscribe","track":track,"listeners":listeners}))
        .await?;
    client.recv_until(|f| f["type"] == "subscribed").await
}

/// Every frame `client` receives within `period`.
async fn frames_within(client: &mut WsClient, period: Duration) -> Vec<Value> {
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + period;
    while let Ok(Ok(frame)) = tokio::time::timeout_at(deadline, client.recv()).await {
        frames.push(frame);
    }
    frames
}

#[tokio::test]
async fn one_node_counts_its_listeners_exactly() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&[]).await?;
    let mut watcher = node.connect("watcher").await?;
    let mut plain = node.connect("plain").await?;
    assert_eq!(subscribe(&mut watcher, "live", true).await?["listeners"], 1);
    assert_eq!(subscribe(&mut plain, "live", false).await?["listeners"], 2);
    assert_eq!(http_listeners(&node, "live").await?, 2);
    assert_eq!(http_listeners(&node, "nobody").await?, 0);

    // A like's update carries it too.
    let mut liker = node.connect("liker").await?;
    liker.like("like", "other", "k0").await?; // not subscribed to `live`: not counted there
    liker.like("like", "live", "k1").await?;
    let update = plain.recv_until(|f| f["type"] == "likes").await?;
    assert_eq!(
        (update["count"].as_u64(), update["listeners"].as_u64()),
        (Some(1), Some(2))
    );

    // 40 sockets join and 10 leave within a moment: the watcher gets the new figure in
    // `listeners` frames — at most one per 2-s period — and the plain subscriber none.
    let mut crowd = Vec::new();
    for i in 0..40 {
        let mut client = node.connect(&format!("fan{i}")).await?;
        subscribe(&mut client, "live", false).await?;
        crowd.push(client);
    }
    crowd.truncate(30);
    let frames = frames_within(&mut watcher, Duration::from_millis(4_500)).await;
    let updates: Vec<&Value> = frames.iter().filter(|f| f["type"] == "listeners").collect();
    assert!(
        (1..=3).contains(&updates.len()),
        "one frame per period at most: {frames:?}"
    );
    let last = updates.last().map(|f| f["listeners"].as_u64());
    assert_eq!(last, Some(Some(32)), "{frames:?}");
    assert_eq!(updates[0]["track"], "live");
    assert_eq!(http_listeners(&node, "live").await?, 32);
    plain.send(json!({"type":"ping"})).await?;
    assert_eq!(
        plain.recv_until(|f| f["type"] != "likes").await?,
        json!({"type":"pong"}),
        "no listeners frames to a subscription that did not ask"
    );

    // Quiet: nothing more when nothing changes.
    let frames = frames_within(&mut watcher, Duration::from_millis(2_500)).await;
    assert!(frames.is_empty(), "{frames:?}");
    assert!(node.metric("fanfare_listener_updates_total").await? >= 1.0);
    Ok(())
}

#[tokio::test]
async fn a_farm_sums_listeners_over_its_nodes() -> anyhow::Result<()> {
    let redis = RedisProcess::start().await?;
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let node = NodeProcess::fresh(&["--redis", &redis.url(), "--insecure-dev-auth"]).await?;
        node.wait_metric("fanfare_redis_up", |v| v == 1.0).await?;
        nodes.push(node);
    }
    // Two listeners on node 0, one on each of the others.
    let mut clients = Vec::new();
    for (i, node) in [0, 0, 1, 2].into_iter().enumerate() {
        let mut client = nodes[node].connect(&format!("u{i}")).await?;
        subscribe(&mut client, "farm:live", i == 3).await?;
        clients.push(client);
    }
    // Within a presence refresh or two every node shows the farm's 4.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    for node in &nodes {
        loop {
            let seen = http_listeners(node, "farm:live").await?;
            if seen == 4 {
                break;
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{} shows {seen} listeners, not 4",
                node.addr
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // A like on node 1 reaches node 2's listener with the farm-wide figure.
    let mut liker = nodes[1].connect("liker").await?;
    liker.like("like", "farm:live", "k1").await?;
    let update = clients[3].recv_until(|f| f["type"] == "likes").await?;
    assert_eq!(update["listeners"], 4, "{update}");

    // Node 0 stops: its two listeners leave every node's figure (it removes its share on the
    // way out), and node 2's watcher is told.
    clients.drain(0..2);
    nodes[0].signal("TERM")?;
    nodes[0].wait_exit(PATIENCE).await?;
    let told = tokio::time::timeout(
        Duration::from_secs(10),
        clients[1].recv_until(|f| f["type"] == "listeners" && f["listeners"] == 2),
    )
    .await??;
    assert_eq!(told["track"], "farm:live");
    assert_eq!(http_listeners(&nodes[1], "farm:live").await?, 2);
    Ok(())
}
