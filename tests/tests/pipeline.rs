//! The durable pipeline against real processes: nodes → Apache Kafka → `fanfare worker` →
//! FerretDB (MongoDB protocol, on PostgreSQL), with Redis between the nodes. Every test checks
//! MongoDB against the acks the clients saw: nothing lost, nothing counted twice.

use std::time::Duration;

use anyhow::Context;
use fanfare_tests::pipeline::Pipeline;
use fanfare_tests::stored::{audit_events, stored_totals, wait_stored};
use fanfare_tests::traffic::{Acks, Expected, Traffic, TrafficPlan};
use fanfare_tests::{NodeProcess, wait_metric_at};
use mongodb::bson::{Document, doc};
use std::collections::BTreeMap;

const TRACKS: [&str; 3] = ["p-alpha", "p-beta", "p-gamma"];

/// Users on the given nodes cycling through the test tracks.
fn traffic(addrs: &[&str], users: usize, pause: Duration) -> Traffic {
    Traffic::start(TrafficPlan::new(addrs, users, pause, &TRACKS))
}

/// Stops the traffic; returns the per-track acks and how many likes stayed in doubt.
async fn finish(traffic: Traffic) -> anyhow::Result<(BTreeMap<String, Expected>, u64)> {
    let Acks {
        per_track,
        in_doubt,
        ..
    } = traffic.finish().await?;
    Ok((per_track, in_doubt.len() as u64))
}

/// Sums a node's history for a track over the last hour, in minute and in day buckets.
async fn history_sums(node: &NodeProcess, track: &str) -> anyhow::Result<(u64, u64)> {
    let minutes = node.history_last_hour(track, "minute").await?;
    let days = node.history_last_hour(track, "day").await?;
    anyhow::ensure!(
        minutes == days,
        "minute and day buckets disagree: {minutes:?} {days:?}"
    );
    Ok(minutes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn likes_on_two_nodes_reach_mongodb_exactly_once() -> anyhow::Result<()> {
    let p = Pipeline::start().await?;
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let a = p.node(dir_a.path()).await?;
    let b = p.node(dir_b.path()).await?;
    let mut worker = p.worker(&[]).await?;
    // A SIGHUP (a config roll-out signalling every fanfare process) leaves the worker
    // running: the traffic after it must be stored too.
    worker.signal("HUP")?;
    let traffic = traffic(&[&a.addr, &b.addr], 16, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (acked, in_doubt) = finish(traffic).await?;
    assert!(worker.is_running(), "the worker survived SIGHUP");
    assert_eq!(in_doubt, 0, "every like was answered");
    let total: u64 = acked.values().map(|e| e.actions).sum();
    assert!(total > 200, "only {total} likes acked");

    let db = p.db().await?;
    let stored = wait_stored(&db, total, Duration::from_secs(60)).await?;
    assert_eq!(stored, total, "MongoDB holds exactly the acked events");
    assert_eq!(
        stored_totals(&db, &TRACKS).await?,
        acked,
        "per-track totals are exact"
    );
    for track in TRACKS {
        let e = &acked[track];
        assert_eq!(
            history_sums(&a, track).await?,
            (e.likes, e.unlikes),
            "{track} history on A"
        );
        assert_eq!(
            history_sums(&b, track).await?,
            (e.likes, e.unlikes),
            "{track} history on B"
        );
        assert_eq!(
            a.track_count(track).await? as i64,
            e.count,
            "{track} live count"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_batch_loses_and_doubles_nothing() -> anyhow::Result<()> {
    let p = Pipeline::start().await?;
    let dir = tempfile::tempdir()?;
    let node = p.node(dir.path()).await?;
    let traffic = traffic(&[&node.addr], 12, Duration::from_millis(2));
    // Small batches, so the kill lands between (or inside) many of them.
    let mut worker = p
        .worker(&["--batch-max", "40", "--batch-wait", "20"])
        .await?;
    let db = p.db().await?;
    let likes = db.collection::<Document>("likes");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while likes.count_documents(doc! {}).await.unwrap_or(0) < 300 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the worker stored nothing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.kill().await?;
    let at_kill = likes.count_documents(doc! {}).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (acked, in_doubt) = finish(traffic).await?;
    assert_eq!(in_doubt, 0);
    let total: u64 = acked.values().map(|e| e.actions).sum();
    assert!(
        total > at_kill,
        "traffic went on after the kill ({at_kill} of {total} stored)"
    );

    let _worker = p
        .worker(&["--batch-max", "40", "--batch-wait", "20"])
        .await?;
    let stored = wait_stored(&db, total, Duration::from_secs(90)).await?;
    assert_eq!(stored, total);
    assert_eq!(stored_totals(&db, &TRACKS).await?, acked);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_frozen_and_killed_acks_from_the_spill_and_replays_once() -> anyhow::Result<()> {
    let mut p = Pipeline::start().await?;
    if !p.kafka.is_own() {
        eprintln!("skipped: FANFARE_TEST_KAFKA names an outside broker this test cannot freeze");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let mut node = p.node(dir.path()).await?;
    let _worker = p.worker(&[]).await?;
    let traffic = traffic(&[&node.addr], 8, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Frozen for 30 s: acks go on from the spill.
    p.kafka.signal("STOP")?;
    let before = traffic.acked_total();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let during_freeze = traffic.acked_total() - before;
    assert!(
        during_freeze > 100,
        "only {during_freeze} acks while Kafka was frozen"
    );
    let spilled = node.metric("fanfare_kafka_spill_events").await?;
    assert!(spilled > 0.0, "the spill holds the frozen period's likes");
    // The oldest unconfirmed like is from the freeze's start (measured every 250 ms).
    let oldest = node.metric("fanfare_kafka_spill_oldest_seconds").await?;
    assert!(
        (25.0..40.0).contains(&oldest),
        "the spill's oldest like is {oldest} s old after a 30 s freeze"
    );
    p.kafka.signal("CONT")?;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Killed: acks go on; the node is killed too while its spill is non-empty, and restarted.
    p.kafka.kill().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let addr = node.addr.clone();
    node.kill().await?;
    let node = NodeProcess::start_on(
        &addr,
        dir.path(),
        &p.node_args().iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    p.kafka.restart().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let acks = traffic.finish().await?;
    let acked = acks.per_track.clone();
    let total = acks.total();

    assert_eq!(acks.in_doubt.len(), 0, "every like was answered in the end");
    let db = p.db().await?;
    if let Err(err) = wait_stored(&db, total, Duration::from_secs(90)).await {
        let audit = audit_events(&db, &acks).await?;
        let spill = node.metric("fanfare_kafka_spill_events").await?;
        panic!("{err:#}: {audit:?}; the node's spill holds {spill} events");
    }
    // A like cut off by the kill was re-sent by its client: stored once, whichever node
    // attempt got through.
    let audit = audit_events(&db, &acks).await?;
    assert_eq!(
        (audit.missing, audit.doubled, audit.unexplained),
        (0, 0, 0),
        "MongoDB holds exactly the acked events: {audit:?}"
    );
    let totals = stored_totals(&db, &TRACKS).await?;
    assert_eq!(totals, acked, "per-track totals are exact");
    for track in TRACKS {
        let live = node.track_count(track).await? as i64;
        assert_eq!(
            totals[track].count, live,
            "{track}: MongoDB count equals the live count"
        );
    }
    let spill_left = node.metric("fanfare_kafka_spill_events").await?;
    assert_eq!(spill_left, 0.0, "the spill drained");
    node.wait_metric("fanfare_kafka_spill_oldest_seconds", |age| age == 0.0)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mongodb_outage_grows_lag_then_drains_without_loss() -> anyhow::Result<()> {
    let mut p = Pipeline::start().await?;
    if !p.mongo.is_own() {
        eprintln!("skipped: FANFARE_TEST_MONGO names an outside server this test cannot stop");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let node = p.node(dir.path()).await?;
    let metrics_port = fanfare_tests::free_port()?;
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let _worker = p.worker(&["--metrics-listen", &metrics_addr]).await?;
    let traffic = traffic(&[&node.addr], 8, Duration::from_millis(10));
    let inserted = "fanfare_worker_events_inserted_total";
    wait_metric_at(&metrics_addr, inserted, Duration::from_secs(30), |n| {
        n > 0.0
    })
    .await
    .context("nothing stored before the outage")?;

    p.mongo.kill().await?;
    // The worker fails its batches, and the lag it reports grows while likes keep coming.
    let patience = Duration::from_secs(30);
    wait_metric_at(
        &metrics_addr,
        "fanfare_worker_mongo_failures_total",
        patience,
        |f| f > 0.0,
    )
    .await
    .context("the worker never saw the outage")?;
    let first = wait_metric_at(
        &metrics_addr,
        "fanfare_worker_consumer_lag",
        patience,
        |l| l > 0.0,
    )
    .await
    .context("consumer lag did not grow while MongoDB was down")?;
    wait_metric_at(
        &metrics_addr,
        "fanfare_worker_consumer_lag",
        patience,
        |l| l > first,
    )
    .await
    .context("consumer lag stopped growing while MongoDB was down")?;
    let before = worker_metric(&metrics_addr, inserted).await?;
    p.mongo.restart().await?;
    // Traffic goes on until the worker stores again.
    wait_metric_at(&metrics_addr, inserted, Duration::from_secs(60), |n| {
        n > before
    })
    .await
    .context("the worker did not store after MongoDB came back")?;
    let (acked, in_doubt) = finish(traffic).await?;
    assert_eq!(in_doubt, 0, "acks never waited for MongoDB");
    let total: u64 = acked.values().map(|e| e.actions).sum();

    let db = p.db().await?;
    let stored = wait_stored(&db, total, Duration::from_secs(90)).await?;
    assert_eq!(stored, total);
    assert_eq!(stored_totals(&db, &TRACKS).await?, acked);
    wait_metric_at(
        &metrics_addr,
        "fanfare_worker_consumer_lag",
        Duration::from_secs(15),
        |lag| lag == 0.0,
    )
    .await
    .context("lag did not drain")?;
    Ok(())
}

#[tokio::test]
async fn embedded_history_buckets_count_likes_and_unlikes() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&[]).await?;
    for u in 0..5 {
        let mut ws = node.connect(&format!("h{u}")).await?;
        ws.like("like", TRACKS[0], &format!("h{u}-1")).await?;
        if u < 2 {
            ws.like("unlike", TRACKS[0], &format!("h{u}-2")).await?;
        }
    }
    assert_eq!(history_sums(&node, TRACKS[0]).await?, (5, 2));
    let (status, body) = node
        .get(&format!("/v1/tracks/{}/history?bucket=week", TRACKS[0]))
        .await?;
    assert_eq!(status, 400, "{body}");
    let (status, _) = node
        .get(&format!("/v1/tracks/{}/history?from=9&to=3", TRACKS[0]))
        .await?;
    assert_eq!(status, 400);
    Ok(())
}

async fn worker_metric(addr: &str, series: &str) -> anyhow::Result<f64> {
    fanfare_tests::metric_at(addr, series).await
}

/// Waits until the worker has fully handled (stored and merged into Redis) `events` events.
async fn wait_handled(metrics_addr: &str, events: f64) -> anyhow::Result<()> {
    let series = "fanfare_worker_events_inserted_total";
    wait_metric_at(metrics_addr, series, Duration::from_secs(30), |n| {
        n >= events
    })
    .await
    .with_context(|| format!("the worker did not handle {events} events"))?;
    Ok(())
}

/// Redis lost its data and the node that accepted the likes never comes back, so no node
/// replays them: the worker, merging each stored batch into Redis' registers, brings the live
/// count back anyway — and its merge of events a node already merged changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn likes_of_a_node_gone_for_good_return_to_a_wiped_redis_through_the_worker()
-> anyhow::Result<()> {
    let mut p = Pipeline::start().await?;
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let track = TRACKS[1];
    let mut a = p.node(dir_a.path()).await?;
    let metrics_addr = format!("127.0.0.1:{}", fanfare_tests::free_port()?);
    {
        // Merged live by A first: the worker's merges change no register.
        let _worker = p.worker(&["--metrics-listen", &metrics_addr]).await?;
        let mut ws = a.connect("d0").await?;
        ws.like("like", track, "d0-1").await?;
        wait_handled(&metrics_addr, 1.0).await?;
        let corrections = "fanfare_worker_redis_corrections_total";
        assert_eq!(worker_metric(&metrics_addr, corrections).await?, 0.0);
    }
    // No worker now: three more likes wait in Kafka. A dies for good and Redis loses its data.
    for u in 1..4 {
        let mut ws = a.connect(&format!("d{u}")).await?;
        ws.like("like", track, &format!("d{u}-1")).await?;
    }
    let mut ws = a.connect("d1").await?;
    assert_eq!(ws.like("unlike", track, "d1-2").await?["count"], 3);
    a.kill().await?;
    p.redis.kill().await?;
    p.redis.restart().await?;
    let b = p.node(dir_b.path()).await?;
    assert_eq!(b.track_count(track).await?, 0, "nothing replays A's likes");

    let _worker = p.worker(&["--metrics-listen", &metrics_addr]).await?;
    wait_stored(&p.db().await?, 5, Duration::from_secs(30)).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while b.track_count(track).await? != 3 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the live count stayed at {} (expected 3: d0, d2, d3)",
            b.track_count(track).await?
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut expected = BTreeMap::new();
    expected.insert(
        track.to_owned(),
        Expected {
            likes: 4,
            unlikes: 1,
            actions: 5,
            count: 3,
        },
    );
    assert_eq!(stored_totals(&p.db().await?, &[track]).await?, expected);
    Ok(())
}

/// One client key, two events: node A applied and stored the like, then froze; Redis lost its
/// data, so when the client re-sent the key to node B nothing remembered it and B made a second
/// event. MongoDB's unique (track, user, key) index keeps one, and every count says 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_resent_while_redis_forgot_it_is_stored_once() -> anyhow::Result<()> {
    let mut p = Pipeline::start().await?;
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let a = p.node(dir_a.path()).await?;
    let b = p.node(dir_b.path()).await?;
    let metrics_addr = format!("127.0.0.1:{}", fanfare_tests::free_port()?);
    let _worker = p.worker(&["--metrics-listen", &metrics_addr]).await?;
    let track = TRACKS[2];
    let mut on_a = a.connect("r1").await?;
    assert_eq!(on_a.like("like", track, "r1-k").await?["count"], 1);
    wait_handled(&metrics_addr, 1.0).await?;

    a.signal("STOP")?;
    p.redis.kill().await?;
    p.redis.restart().await?;
    // B is back on the new (empty) Redis once its link is up again. (An epoch is no sign: the
    // worker stamps an empty Redis too, to refill it.) A read through B makes it notice the
    // restart if its pings have not yet.
    let _ = b.track_count(track).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while b.get("/readyz").await?.1.contains("degraded") {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "B never reconnected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut on_b = b.connect("r1").await?;
    let reply = on_b.like("like", track, "r1-k").await?;
    assert_eq!(reply["count"], 1, "B counts the re-sent like once: {reply}");
    a.signal("CONT")?;

    // Wait until the worker has handled B's event too (stored or refused).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let inserted = worker_metric(&metrics_addr, "fanfare_worker_events_inserted_total").await?;
        let refused = worker_metric(&metrics_addr, "fanfare_worker_events_duplicate_total").await?;
        if inserted + refused >= 2.0 {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "B's event never reached the worker"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let db = p.db().await?;
    let events = db
        .collection::<Document>("likes")
        .count_documents(doc! { "track": track, "user": "r1", "key": "r1-k" })
        .await?;
    assert_eq!(events, 1, "one event per client key");
    let mut expected = BTreeMap::new();
    expected.insert(
        track.to_owned(),
        Expected {
            likes: 1,
            unlikes: 0,
            actions: 1,
            count: 1,
        },
    );
    assert_eq!(stored_totals(&db, &[track]).await?, expected);
    a.wait_metric("fanfare_redis_up", |up| up == 1.0).await?;
    for node in [&a, &b] {
        assert_eq!(node.track_count(track).await?, 1, "live count");
    }
    Ok(())
}
