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

/// A server-sent-events reader over a plain TCP connection (what an `EventSource` does).
struct EventStream {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::TcpStream>>,
}

impl EventStream {
    async fn open(addr: &str, path: &str) -> anyhow::Result<(u16, EventStream)> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut lines = tokio::io::BufReader::new(stream).lines();
        let status_line = lines.next_line().await?.unwrap_or_default();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut content_type = String::new();
        while let Some(line) = lines.next_line().await? {
            if line.is_empty() {
                break;
            }
            if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-type:") {
                content_type = value.trim().to_owned();
            }
        }
        anyhow::ensure!(
            status != 200 || content_type == "text/event-stream",
            "content type {content_type}"
        );
        Ok((status, EventStream { lines }))
    }

    /// The next event's name and JSON data (chunked-encoding size lines and comments skipped).
    async fn next(&mut self) -> anyhow::Result<(String, Value)> {
        let mut kind = None;
        loop {
            let line = tokio::time::timeout(PATIENCE, self.lines.next_line())
                .await??
                .ok_or_else(|| anyhow::anyhow!("the stream ended"))?;
            if let Some(name) = line.strip_prefix("event: ") {
                kind = Some(name.to_owned());
            } else if let Some(data) = line.strip_prefix("data: ") {
                let kind = kind.take().unwrap_or_default();
                return Ok((kind, serde_json::from_str(data)?));
            }
        }
    }
}

#[tokio::test]
async fn an_event_stream_counts_as_a_listener_and_carries_updates() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&[]).await?;
    let (status, mut stream) = EventStream::open(
        &node.addr,
        "/v1/tracks/embed/events?user=widget&listeners=true",
    )
    .await?;
    assert_eq!(status, 200);
    let (kind, first) = stream.next().await?;
    assert_eq!(kind, "subscribed");
    assert_eq!(
        first,
        json!({"type":"subscribed","track":"embed","count":0,"listeners":1})
    );
    assert_eq!(
        http_listeners(&node, "embed").await?,
        1,
        "the stream is a listener"
    );

    // A like on a WebSocket reaches the stream as the same JSON a socket gets.
    let mut fan = node.connect("fan").await?;
    subscribe(&mut fan, "embed", false).await?;
    fan.like("like", "embed", "k1").await?;
    let (kind, update) = loop {
        let (kind, data) = stream.next().await?;
        if kind == "likes" {
            break (kind, data);
        }
        assert_eq!(kind, "listeners", "{data}"); // the WebSocket joining, within 2 s
    };
    assert_eq!(kind, "likes");
    assert_eq!(
        (update["count"].as_u64(), update["listeners"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(update["recent"][0]["user"], "fan");

    // Gone: no longer counted.
    drop(stream);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while http_listeners(&node, "embed").await? != 1 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the stream still counts"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Same auth as a WebSocket: with tokens, no token is 401; a bad track is 400.
    let jwt = NodeProcess::fresh(&[
        "--auth",
        "jwt",
        "--jwt-secret",
        "a-test-secret-that-is-at-least-32-bytes-long",
    ])
    .await?;
    let (status, _) = EventStream::open(&jwt.addr, "/v1/tracks/embed/events").await?;
    assert_eq!(status, 401);
    let (status, _) = EventStream::open(&node.addr, "/v1/tracks/bad%20id/events").await?;
    assert_eq!(status, 400);
    Ok(())
}
