//! Farm nodes whose clocks disagree (one 2 s ahead, one 2 s behind, via the node's
//! test-only clock offset) against a real redis-server: a user's actions alternate between
//! them faster than the skew and the last action wins — no false duplicates, the same count
//! on every node and for a fresh subscriber. And the skew guard: a node whose clock is off
//! Redis' by more than `--max-clock-skew` says so and is not ready.

use std::time::Duration;

use fanfare_tests::{NodeProcess, PATIENCE, RedisProcess, http_get};
use futures_util::future::try_join_all;

const SKEW_MS: i64 = 2_000;

async fn skewed_node(
    redis_url: &str,
    name: &str,
    offset_ms: i64,
    extra: &[&str],
) -> anyhow::Result<(tempfile::TempDir, NodeProcess)> {
    let dir = tempfile::tempdir()?;
    let offset = format!("--test-clock-offset-ms={offset_ms}");
    let mut args = vec!["--redis", redis_url, "--node-id", name, &offset];
    args.extend_from_slice(extra);
    let node = NodeProcess::start(dir.path(), &args).await?;
    Ok((dir, node))
}

#[tokio::test]
async fn actions_alternating_between_skewed_nodes_end_in_the_last_action() -> anyhow::Result<()> {
    let redis = RedisProcess::start().await?;
    let url = redis.url();
    let tolerant = ["--max-clock-skew", "60000"];
    let (_a_dir, ahead) = skewed_node(&url, "ahead", SKEW_MS, &tolerant).await?;
    let (_b_dir, behind) = skewed_node(&url, "behind", -SKEW_MS, &tolerant).await?;
    let nodes = [&ahead, &behind];

    // 24 users, 7 actions each (like, unlike, like, …), each on the other node than the one
    // before, both ways round; each waits for its ack, so they are 4 s apart in node time
    // and milliseconds apart in real time. Users ending on a like: the odd action counts.
    let track = "skew:track";
    let users = (0..24).map(|u| {
        let nodes = &nodes;
        async move {
            let mut clients = [
                nodes[0].connect(&format!("u{u}")).await?,
                nodes[1].connect(&format!("u{u}")).await?,
            ];
            let actions = if u % 3 == 0 { 6 } else { 7 };
            for i in 0..actions {
                let action = if i % 2 == 0 { "like" } else { "unlike" };
                let client = &mut clients[(u + i) % 2];
                let ack = client.like(action, track, &format!("u{u}k{i}")).await?;
                anyhow::ensure!(ack["type"] == "ack", "user {u} action {i}: {ack}");
                anyhow::ensure!(
                    ack["duplicate"] == false,
                    "user {u} action {i} ({action}) was taken for a duplicate: {ack}"
                );
            }
            anyhow::Ok(actions % 2 == 1)
        }
    });
    let ends_liked = try_join_all(users).await?;
    let expected = ends_liked.iter().filter(|liked| **liked).count() as u64;
    assert_eq!(expected, 16);
    for node in nodes {
        assert_eq!(node.track_count(track).await?, expected);
        let mut fresh = node.connect("fresh-listener").await?;
        assert_eq!(fresh.subscribe(track).await?, expected);
    }
    Ok(())
}

#[tokio::test]
async fn a_node_whose_clock_is_off_is_not_ready_and_says_why() -> anyhow::Result<()> {
    let redis = RedisProcess::start().await?;
    let url = redis.url();
    let (_dir, node) = skewed_node(&url, "late", -5_000, &[]).await?;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (status, body) = http_get(&node.addr, "/readyz").await?;
        if status == 503 {
            assert!(
                body.contains("clock") && body.contains("--max-clock-skew"),
                "{body}"
            );
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "a node 5 s behind Redis stayed ready: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let skew = node.metric("fanfare_clock_skew_ms").await?;
    assert!(
        (-5_500.0..=-4_500.0).contains(&skew),
        "skew gauge {skew}, expected about -5000"
    );
    // The same node with a matching clock is ready.
    let (_dir2, fine) = skewed_node(&url, "fine", 0, &[]).await?;
    let (status, body) = http_get(&fine.addr, "/readyz").await?;
    assert_eq!(status, 200, "{body}");
    Ok(())
}
