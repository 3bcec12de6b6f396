//! Likes end to end on one node: broadcast, exact counts, idempotency, durability.

use anyhow::Context;
use fanfare_tests::{NodeProcess, PATIENCE};
use futures_util::future::try_join_all;
use serde_json::json;

#[tokio::test]
async fn a_like_reaches_every_other_listener_with_the_total() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&[]).await?;
    let mut listeners = Vec::new();
    for i in 0..40 {
        let mut client = node.connect(&format!("listener{i}")).await?;
        assert_eq!(client.subscribe("hit:1").await?, 0);
        listeners.push(client);
    }
    let mut liker = node.connect("ana").await?;
    liker.subscribe("hit:1").await?;
    let ack = liker.like("like", "hit:1", "k1").await?;
    assert_eq!(
        ack,
        json!({"type":"ack","id":"k1","track":"hit:1","count":1,"duplicate":false})
    );

    for client in &mut listeners {
        let update = client.recv_until(|f| f["type"] == "likes").await?;
        assert_eq!(update["track"], "hit:1");
        assert_eq!(update["count"], 1);
        assert_eq!(update["delta"], 1);
        assert_eq!(
            update["recent"],
            json!([{"user":"ana","id":"k1","action":"like"}])
        );
    }
    // Idle plain-TCP listeners: fan-out wrote the frame to each socket itself.
    // (Counted after the fan-out loop, so a listener may read the frame first: wait for it.)
    node.wait_metric("fanfare_frames_written_directly_total", |v| v >= 1.0)
        .await
        .context("no update was written directly")?;
    // The liker gets no update that holds only its own like: the next frame it sees is the pong.
    liker.send(json!({"type":"ping"})).await?;
    assert_eq!(liker.recv().await?, json!({"type":"pong"}));
    // An unsubscribed listener hears nothing more.
    listeners[0]
        .send(json!({"type":"unsubscribe","track":"hit:1"}))
        .await?;
    assert_eq!(
        listeners[0].recv().await?,
        json!({"type":"unsubscribed","track":"hit:1"})
    );
    let mut other = node.connect("bob").await?;
    other.like("like", "hit:1", "b1").await?;
    let update = listeners[1].recv_until(|f| f["type"] == "likes").await?;
    assert_eq!(update["count"], 2);
    listeners[0].send(json!({"type":"ping"})).await?;
    assert_eq!(listeners[0].recv().await?, json!({"type":"pong"}));
    Ok(())
}

#[tokio::test]
async fn likes_are_idempotent_per_user_and_key() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&[]).await?;
    let mut ana = node.connect("ana").await?;
    let ack = |id: &str, count: u64, duplicate: bool| json!({"type":"ack","id":id,"track":"t","count":count,"duplicate":duplicate});
    assert_eq!(ana.like("like", "t", "k1").await?, ack("k1", 1, false));
    assert_eq!(
        ana.like("like", "t", "k2").await?,
        ack("k2", 1, true),
        "second like is a duplicate"
    );
    assert_eq!(
        ana.like("like", "t", "k1").await?,
        ack("k1", 1, false),
        "re-sent key acked again"
    );
    // The same user on a second connection is still the same user.
    let mut ana2 = node.connect("ana").await?;
    assert_eq!(ana2.like("like", "t", "k3").await?, ack("k3", 1, true));
    assert_eq!(ana.like("unlike", "t", "u1").await?, ack("u1", 0, false));
    assert_eq!(ana.like("unlike", "t", "u2").await?, ack("u2", 0, true));
    assert_eq!(
        ana.like("like", "t", "k4").await?,
        ack("k4", 1, false),
        "like again after unlike"
    );
    assert_eq!(node.track_count("t").await?, 1);
    Ok(())
}

#[tokio::test]
async fn concurrent_likes_from_many_users_give_exact_counts() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&[]).await?;
    let tracks = ["album:a", "album:b", "album:c", "album:d"];
    let mut watcher = node.connect("watcher").await?;
    for track in tracks {
        watcher.subscribe(track).await?;
    }
    // 120 users on their own connections; each likes every track and sends each like twice,
    // and the first 30 also unlike "album:d" afterwards.
    let users = (0..120).map(|i| {
        let node = &node;
        async move {
            let mut client = node.connect(&format!("user{i}")).await?;
            for track in tracks {
                client
                    .send(json!({"type":"like","track":track,"id":format!("{i}-{track}")}))
                    .await?;
                client
                    .send(json!({"type":"like","track":track,"id":format!("{i}-{track}")}))
                    .await?;
            }
            let mut acks = 0;
            while acks < tracks.len() * 2 {
                let frame = client
                    .recv()
                    .await
                    .with_context(|| format!("user{i} after {acks} acks"))?;
                if frame["type"] == "ack" {
                    acks += 1;
                }
                anyhow::ensure!(frame["type"] != "error", "unexpected error {frame}");
            }
            if i < 30 {
                let ack = client.like("unlike", "album:d", &format!("{i}-un")).await?;
                anyhow::ensure!(ack["duplicate"] == false, "unlike should apply: {ack}");
            }
            anyhow::Ok(())
        }
    });
    try_join_all(users).await?;
    for track in tracks {
        let expected = if track == "album:d" { 90 } else { 120 };
        assert_eq!(node.track_count(track).await?, expected, "{track}");
    }
    // The listener converges on the same totals through broadcasts alone.
    let mut seen = std::collections::HashMap::new();
    while seen.get("album:a") != Some(&120)
        || seen.get("album:d") != Some(&90)
        || seen.get("album:b") != Some(&120)
        || seen.get("album:c") != Some(&120)
    {
        let update = watcher
            .recv_until(|f| f["type"] == "likes")
            .await
            .with_context(|| format!("the watcher saw {seen:?}"))?;
        seen.insert(
            update["track"].as_str().unwrap_or_default().to_owned(),
            update["count"].as_u64().unwrap_or(0),
        );
    }
    Ok(())
}

#[tokio::test]
async fn acked_likes_survive_kill_and_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut node = NodeProcess::start(dir.path(), &[]).await?;
    for i in 0..25 {
        let mut client = node.connect(&format!("fan{i}")).await?;
        let ack = client.like("like", "keeper", &format!("k{i}")).await?;
        assert_eq!(ack["type"], "ack");
    }
    let mut ana = node.connect("ana").await?;
    ana.like("like", "keeper", "a1").await?;
    ana.like("unlike", "keeper", "a2").await?;
    // kill -9: no chance to flush anything that was not already durable at the ack.
    node.signal("KILL")?;
    node.wait_exit(PATIENCE).await?;

    let node = NodeProcess::start(dir.path(), &[]).await?;
    assert_eq!(node.track_count("keeper").await?, 25);
    let mut listener = node.connect("late").await?;
    assert_eq!(listener.subscribe("keeper").await?, 25);
    // The once-only state and the keys survived too.
    let mut fan0 = node.connect("fan0").await?;
    let again = fan0.like("like", "keeper", "k0").await?;
    assert_eq!(
        again["duplicate"], false,
        "re-sent key after restart: {again}"
    );
    assert_eq!(again["count"], 25);
    let dup = fan0.like("like", "keeper", "other").await?;
    assert_eq!(dup["duplicate"], true);
    let mut ana = node.connect("ana").await?;
    assert_eq!(ana.like("like", "keeper", "a3").await?["count"], 26);
    Ok(())
}

#[tokio::test]
async fn graceful_shutdown_stores_every_accepted_like() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut node = NodeProcess::start(dir.path(), &["--drain-period", "500"]).await?;
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(node.connect(&format!("fan{i}")).await?);
    }
    // Every client fires 30 likes on distinct tracks without waiting, then the node is told to stop.
    for (i, client) in clients.iter_mut().enumerate() {
        for t in 0..30 {
            client
                .send(json!({"type":"like","track":format!("t{t}"),"id":format!("{i}-{t}")}))
                .await?;
        }
    }
    node.signal("TERM")?;
    let mut acked = 0;
    for client in &mut clients {
        loop {
            match client.recv_message(PATIENCE).await? {
                tokio_tungstenite::tungstenite::Message::Close(frame) => {
                    let code = frame.map(|f| u16::from(f.code));
                    assert_eq!(code, Some(1001), "going-away close on shutdown");
                    break;
                }
                tokio_tungstenite::tungstenite::Message::Text(text) if text.contains("\"ack\"") => {
                    acked += 1
                }
                _ => {}
            }
        }
    }
    assert_eq!(node.wait_exit(PATIENCE).await?, Some(0), "clean exit");
    let node = NodeProcess::start(dir.path(), &[]).await?;
    let mut stored = 0;
    for t in 0..30 {
        stored += node.track_count(&format!("t{t}")).await?;
    }
    assert!(acked > 0, "some likes were acked before shutdown");
    assert!(
        stored >= acked,
        "every acked like is stored ({stored} stored, {acked} acked)"
    );
    assert_eq!(
        stored, acked,
        "accepted likes finished and were acked before closing"
    );
    Ok(())
}

#[tokio::test]
async fn counts_and_health_over_http() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&[]).await?;
    assert_eq!(node.get("/healthz").await?.0, 200);
    assert_eq!(node.get("/readyz").await?.0, 200);
    let (status, body) = node.get("/v1/tracks/fresh:1").await?;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body)?,
        serde_json::json!({"count": 0, "track": "fresh:1", "listeners": 0})
    );
    assert_eq!(node.get("/v1/tracks/bad%20id").await?.0, 400);
    assert_eq!(node.get("/nope").await?.0, 404);
    let (status, page) = node.get("/").await?;
    assert!(status == 200 && page.contains("<html"), "index page");
    let mut client = node.connect("ana").await?;
    client.subscribe("fresh:1").await?;
    client.like("like", "fresh:1", "x").await?;
    node.wait_metric("fanfare_connections_active", |v| v == 1.0)
        .await?;
    node.wait_metric("fanfare_subscriptions_active", |v| v == 1.0)
        .await?;
    node.wait_metric("fanfare_likes_total{outcome=\"accepted\"}", |v| v == 1.0)
        .await?;
    assert!(
        node.get("/metrics")
            .await?
            .1
            .contains("fanfare_broadcast_lag_seconds_bucket")
    );
    drop(client);
    node.wait_metric("fanfare_connections_active", |v| v == 0.0)
        .await?;
    node.wait_metric("fanfare_subscriptions_active", |v| v == 0.0)
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_slow_store_shows_in_the_queue_depth_and_the_ack_latency() -> anyhow::Result<()> {
    // Every group commit held 1.5 s: all 20 likes are uncommitted (queued, or in the batch
    // being written) until the commits that take them finish.
    let node = NodeProcess::fresh(&["--test-commit-delay-ms=1500"]).await?;
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(node.connect(&format!("user{i}")).await?);
    }
    assert_eq!(node.metric("fanfare_event_log_queue_depth").await?, 0.0);
    for (i, client) in clients.iter_mut().enumerate() {
        client
            .send(json!({"type":"like","track":"slow","id":format!("k{i}")}))
            .await?;
    }
    let depth = node
        .wait_metric("fanfare_event_log_queue_depth", |v| v >= 10.0)
        .await?;
    assert!(depth <= 20.0, "at most the 20 likes: {depth}");
    for client in &mut clients {
        let ack = client.recv_until(|f| f["type"] == "ack").await?;
        assert_eq!(ack["duplicate"], false, "{ack}");
    }
    assert_eq!(node.metric("fanfare_ack_seconds_count").await?, 20.0);
    let waited = node.metric("fanfare_ack_seconds_sum").await?;
    // Each ack waited at least one 1.5-s commit.
    assert!(
        waited >= 29.9,
        "20 acks behind 1.5 s commits waited {waited} s in all"
    );
    node.wait_metric("fanfare_event_log_queue_depth", |v| v == 0.0)
        .await?;
    Ok(())
}
