//! Farm mode against a real redis-server (and Sentinel): likes and global counts cross
//! nodes, and Redis failures lose no acked like.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use fanfare_tests::{NodeProcess, PATIENCE, RedisProcess, WsClient};
use futures_util::future::try_join_all;
use serde_json::json;

async fn farm(
    redis_url: &str,
    nodes: usize,
) -> anyhow::Result<(Vec<tempfile::TempDir>, Vec<NodeProcess>)> {
    let mut dirs = Vec::new();
    let mut started = Vec::new();
    for i in 0..nodes {
        let dir = tempfile::tempdir()?;
        let node_id = format!("node{i}");
        started.push(
            NodeProcess::start(dir.path(), &["--redis", redis_url, "--node-id", &node_id]).await?,
        );
        dirs.push(dir);
    }
    Ok((dirs, started))
}

/// Subscribes `count` listeners per node and waits until every node listens on the bus.
async fn listeners(
    nodes: &[NodeProcess],
    track: &str,
    count: usize,
) -> anyhow::Result<Vec<WsClient>> {
    let mut all = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for i in 0..count {
            let mut client = node.connect(&format!("listener{n}x{i}")).await?;
            client.subscribe(track).await?;
            all.push(client);
        }
        node.wait_metric("fanfare_bus_channels", |v| v >= 1.0)
            .await?;
    }
    Ok(all)
}

#[tokio::test]
async fn likes_on_any_node_reach_every_listener_with_the_global_count() -> anyhow::Result<()> {
    let redis = RedisProcess::start().await?;
    let (_dirs, nodes) = farm(&redis.url(), 3).await?;
    let mut all = listeners(&nodes, "farm:hit", 4).await?;

    // One like on node 0 reaches listeners on nodes 1 and 2, with the user and the total.
    let mut ana = nodes[0].connect("ana").await?;
    assert_eq!(ana.like("like", "farm:hit", "a1").await?["count"], 1);
    for listener in all.iter_mut().skip(4) {
        let update = listener.recv_until(|f| f["type"] == "likes").await?;
        assert_eq!(update["count"], 1);
        assert_eq!(update["recent"][0]["user"], "ana");
    }
    // The once-only rule is global: ana on another node is a duplicate.
    let mut ana_elsewhere = nodes[2].connect("ana").await?;
    assert_eq!(
        ana_elsewhere.like("like", "farm:hit", "a2").await?["duplicate"],
        true
    );

    // 3 nodes × 40 users like at once (each sends its like twice): the total is exact.
    let users = (0..120).map(|i| {
        let node = &nodes[i % 3];
        async move {
            let mut client = node.connect(&format!("fan{i}")).await?;
            let key = format!("k{i}");
            client
                .send(json!({"type":"like","track":"farm:hit","id":key}))
                .await?;
            client
                .send(json!({"type":"like","track":"farm:hit","id":key}))
                .await?;
            for _ in 0..2 {
                let reply = client
                    .recv_until(|f| f["type"] == "ack" || f["type"] == "error")
                    .await?;
                anyhow::ensure!(reply["type"] == "ack", "{reply}");
            }
            anyhow::Ok(())
        }
    });
    try_join_all(users).await?;
    for node in &nodes {
        assert_eq!(node.track_count("farm:hit").await?, 121);
    }
    for listener in &mut all {
        listener
            .recv_until(|f| f["type"] == "likes" && f["count"] == 121)
            .await?;
    }
    // One Redis publish per like, received by the other nodes.
    let published: f64 = {
        let mut sum = 0.0;
        for node in &nodes {
            sum += node
                .metric("fanfare_bus_messages_total{event=\"published\"}")
                .await
                .unwrap_or(0.0);
        }
        sum
    };
    assert_eq!(published, 121.0);
    Ok(())
}

/// Likes from fresh users on `node` until `stop`, counting acks; any error fails.
async fn keep_liking(
    node: &NodeProcess,
    prefix: &str,
    stop: &AtomicBool,
    acked: &AtomicU64,
) -> anyhow::Result<()> {
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let mut client = node.connect(&format!("{prefix}{i}")).await?;
        let reply = client.like("like", "farm:live", &format!("k{i}")).await?;
        anyhow::ensure!(
            reply["type"] == "ack" && reply["duplicate"] == false,
            "{reply}"
        );
        acked.fetch_add(1, Ordering::Relaxed);
        i += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

async fn converge(nodes: &[NodeProcess], track: &str, expected: u64) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let mut counts = Vec::new();
        for node in nodes {
            counts.push(node.track_count(track).await?);
        }
        if counts.iter().all(|&c| c == expected) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            let mut outcomes = Vec::new();
            for node in nodes {
                let (_, metrics) = node.get("/metrics").await?;
                outcomes.extend(
                    metrics
                        .lines()
                        .filter(|l| l.starts_with("fanfare_likes_total"))
                        .map(str::to_owned),
                );
            }
            anyhow::bail!("counts {counts:?} never reached {expected}; {outcomes:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A fresh like on `from` reaches a listener on `to` within 5 s.
async fn crosses(from: &NodeProcess, listener: &mut WsClient, user: &str) -> anyhow::Result<()> {
    let mut client = from.connect(user).await?;
    let ack = client.like("like", "farm:live", "probe").await?;
    anyhow::ensure!(ack["type"] == "ack", "{ack}");
    tokio::time::timeout(
        Duration::from_secs(5),
        listener.recv_until(|f| f["type"] == "likes" && f["recent"].to_string().contains(user)),
    )
    .await
    .map_err(|_| anyhow::anyhow!("like from {user} did not cross nodes within 5 s"))??;
    Ok(())
}

/// Runs likes from fresh users on both nodes while `chaos` runs, then stops the traffic and
/// returns how many likes were acked (any refused like fails the run).
async fn under_traffic(
    nodes: &[NodeProcess],
    chaos: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<u64> {
    let stop = AtomicBool::new(false);
    let acked = AtomicU64::new(0);
    let traffic = async {
        tokio::try_join!(
            keep_liking(&nodes[0], "a", &stop, &acked),
            keep_liking(&nodes[1], "b", &stop, &acked),
        )
    };
    let chaos = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let result = chaos.await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        result
    };
    let (traffic, chaos) = tokio::join!(traffic, chaos);
    chaos?;
    traffic?;
    let acked = acked.load(Ordering::Relaxed);
    anyhow::ensure!(acked > 20, "traffic flowed ({acked} acked)");
    Ok(acked)
}

/// After an outage: counts converge on exactly the acked likes, and a new like crosses nodes
/// within 5 s and is counted once.
async fn recovered(
    nodes: &[NodeProcess],
    watcher: &mut WsClient,
    acked: u64,
    probe: &str,
) -> anyhow::Result<()> {
    converge(nodes, "farm:live", acked).await?;
    nodes[1]
        .wait_metric("fanfare_bus_channels", |v| v >= 1.0)
        .await?;
    crosses(&nodes[0], watcher, probe).await?;
    converge(nodes, "farm:live", acked + 1).await
}

#[tokio::test]
async fn redis_killed_and_restarted_under_traffic_loses_nothing() -> anyhow::Result<()> {
    let mut redis = RedisProcess::start().await?;
    let (_dirs, nodes) = farm(&redis.url(), 2).await?;
    let mut watchers = listeners(&nodes[1..], "farm:live", 1).await?;
    let acked = under_traffic(&nodes, async {
        redis.kill().await?;
        nodes[0]
            .wait_metric("fanfare_redis_up", |v| v == 0.0)
            .await?;
        let (_, readyz) = nodes[0].get("/readyz").await?;
        anyhow::ensure!(readyz.contains("degraded"), "{readyz}");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        redis.restart().await?; // empty: no persistence
        for node in &nodes {
            node.wait_metric("fanfare_redis_up", |v| v == 1.0).await?;
        }
        Ok(())
    })
    .await?;
    recovered(&nodes, &mut watchers[0], acked, "after-restart").await?;
    // The emptied Redis got each node's history back through the reconciler's replay, and
    // no replay is left owed.
    for node in &nodes {
        let replayed = node.metric("fanfare_replay_events_total").await?;
        assert!(replayed >= 1.0, "{}: replayed {replayed}", node.addr);
        node.wait_metric("fanfare_replay_remaining_events", |v| v == 0.0)
            .await?;
    }
    Ok(())
}

#[tokio::test]
async fn sentinel_failover_is_followed_without_restart() -> anyhow::Result<()> {
    let mut master = RedisProcess::start().await?;
    let _replica = RedisProcess::replica_of(&master).await?;
    let sentinel = RedisProcess::sentinel(&master).await?;
    let url = format!("redis+sentinel://127.0.0.1:{}/mymaster", sentinel.port);
    let (_dirs, nodes) = farm(&url, 2).await?;
    let mut watchers = listeners(&nodes[1..], "farm:live", 1).await?;
    let acked = under_traffic(&nodes, async {
        master.kill().await?;
        nodes[0]
            .wait_metric("fanfare_redis_up", |v| v == 0.0)
            .await?;
        // Sentinel promotes the replica; the nodes find it through Sentinel by themselves.
        for node in &nodes {
            node.wait_metric_for("fanfare_redis_up", Duration::from_secs(20), |v| v == 1.0)
                .await?;
        }
        Ok(())
    })
    .await?;
    recovered(&nodes, &mut watchers[0], acked, "after-failover").await
}

#[tokio::test]
async fn plugin_rate_limits_hold_across_nodes() -> anyhow::Result<()> {
    let redis = RedisProcess::start().await?;
    let plugins = fanfare_tests::PluginDir::new()?;
    plugins.write_manifest(
        "[rate_limit]\ncomponent = \"rate_limit_token_bucket.wasm\"\nconfig = { likes = 3, window_ms = 60000 }\n",
    )?;
    let manifest = plugins.manifest_path();
    let mut nodes = Vec::new();
    let mut dirs = Vec::new();
    for i in 0..2 {
        let dir = tempfile::tempdir()?;
        let args = [
            "--redis",
            &redis.url(),
            "--plugins",
            manifest.to_str().unwrap_or_default(),
            "--node-id",
        ];
        let node_id = format!("node{i}");
        let mut all: Vec<&str> = args.to_vec();
        all.push(&node_id);
        nodes.push(NodeProcess::start(dir.path(), &all).await?);
        dirs.push(dir);
    }
    // The same user alternates nodes: the limit of 3 per window counts both.
    let mut replies = Vec::new();
    for i in 0..4 {
        let mut client = nodes[i % 2].connect("eager").await?;
        replies.push(
            client
                .like("like", &format!("t{i}"), &format!("k{i}"))
                .await?,
        );
    }
    for reply in &replies[..3] {
        assert_eq!(reply["type"], "ack", "{reply}");
    }
    assert_eq!(replies[3]["code"], "rate_limited", "{}", replies[3]);
    Ok(())
}

/// A node that was down while Redis lost its data must replay its history when it comes back,
/// even though the other nodes have already stamped the new Redis with an epoch (it remembers
/// which epoch its history was last replayed into).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_down_during_redis_data_loss_replays_when_it_returns() -> anyhow::Result<()> {
    let mut redis = RedisProcess::start().await?;
    let url = redis.url();
    let (dirs, mut nodes) = farm(&url, 2).await?;
    let track = "returning";
    for u in 0..5 {
        let mut client = nodes[0].connect(&format!("r{u}")).await?;
        client.like("like", track, &format!("r{u}-1")).await?;
    }
    converge(&nodes, track, 5).await?;

    nodes[0].kill().await?;
    redis.kill().await?;
    redis.restart().await?;
    // The surviving node stamps the empty Redis with a new epoch (and has nothing to replay).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while redis.get("ff:epoch").await?.is_none() {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no epoch set");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        redis.get(&format!("ff:{{{track}}}:count")).await?,
        None,
        "Redis came back empty"
    );

    nodes[0] = NodeProcess::start(dirs[0].path(), &["--redis", &url, "--node-id", "node0"]).await?;
    converge(&nodes, track, 5).await
}

#[tokio::test]
async fn redis_out_of_memory_is_reported_degraded_and_converges() -> anyhow::Result<()> {
    let redis = RedisProcess::start().await?;
    let (_dirs, nodes) = farm(&redis.url(), 2).await?;
    let mut first = nodes[0].connect("oom-a").await?;
    assert_eq!(first.like("like", "farm:oom", "a1").await?["count"], 1);

    // Redis at maxmemory with noeviction refuses every script that writes.
    redis
        .cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        .await?;
    redis.cli(&["CONFIG", "SET", "maxmemory", "1"]).await?;
    let mut second = nodes[1].connect("oom-b").await?;
    let ack = second.like("like", "farm:oom", "b1").await?;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["duplicate"], false, "{ack}");
    // The node says so instead of reporting ready and healthy.
    let (status, body) = fanfare_tests::http_get(&nodes[1].addr, "/readyz").await?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("refuses writes"), "{body}");

    // Memory back: the like decided locally reaches Redis (its replay is the write that tells
    // the node Redis accepts writes again), every node counts both, and the node is ready.
    redis.cli(&["CONFIG", "SET", "maxmemory", "0"]).await?;
    converge(&nodes, "farm:oom", 2).await?;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, body) = fanfare_tests::http_get(&nodes[1].addr, "/readyz").await?;
        if body == "ready\n" {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "still degraded after Redis accepted writes again: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Durable first (issue 16, finding 4): a like is merged into Redis and broadcast only once its
/// event is committed. The deciding node holds its commits for 3 s and is killed -9 in that
/// window: no other node ever saw the like, Redis never counted it, and after the restart it is
/// still nowhere (it was never acked: the client re-sends). Before, Redis counted it at once
/// and kept it, a state no store had.
#[tokio::test]
async fn a_like_counts_nowhere_until_its_node_has_stored_it() -> anyhow::Result<()> {
    let redis = RedisProcess::start().await?;
    let url = redis.url();
    let slow_dir = tempfile::tempdir()?;
    let mut slow = NodeProcess::start(
        slow_dir.path(),
        &[
            "--redis",
            &url,
            "--node-id",
            "slow",
            "--test-commit-delay-ms=3000",
        ],
    )
    .await?;
    let (_dirs, others) = farm(&url, 1).await?;
    let mut listener = listeners(&others, "durable:first", 1).await?.remove(0);

    let mut ana = slow.connect("ana").await?;
    ana.send(json!({"type": "like", "track": "durable:first", "id": "a1"}))
        .await?;
    // Well inside the held commit: nothing may have left the deciding node.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let count_key = "ff:{durable:first}:count";
    assert_eq!(
        redis.get(count_key).await?,
        None,
        "Redis counted a like no store holds"
    );
    if let Ok(frame) = listener.recv_message(Duration::from_millis(100)).await {
        anyhow::bail!("another node saw a like that was not stored: {frame:?}");
    }
    slow.kill().await?;

    slow.restart().await?;
    let mut fresh = others[0].connect("fresh").await?;
    assert_eq!(fresh.subscribe("durable:first").await?, 0);
    assert_eq!(slow.track_count("durable:first").await?, 0);
    assert_eq!(redis.get(count_key).await?, None);

    // The same path, not killed: acked after the commit, seen on the other node.
    let mut ben = slow.connect("ben").await?;
    let ack = ben.like("like", "durable:first", "b1").await?;
    assert_eq!(
        (ack["type"].as_str(), ack["count"].as_u64()),
        (Some("ack"), Some(1))
    );
    let update = listener.recv_until(|f| f["type"] == "likes").await?;
    assert_eq!(update["count"], 1);
    assert_eq!(update["recent"][0]["user"], "ben");
    assert_eq!(redis.get(count_key).await?.as_deref(), Some("1"));
    Ok(())
}
