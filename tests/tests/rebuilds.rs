//! Rebuilds against real processes (Apache Kafka, `fanfare worker`, FerretDB): a track a
//! batch could not be sure of is rebuilt from its stored events by whoever holds its
//! partition, however the worker that asked for it went away (docs/events.md, "A second look
//! around faults").

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use fanfare_tests::pipeline::Pipeline;
use fanfare_tests::stored::{number, stored_totals, wait_stored};
use fanfare_tests::traffic::Expected;
use fanfare_tests::wait_metric_at;
use mongodb::bson::{Document, doc};

const TRACKS: [&str; 1] = ["p-alpha"];

/// A worker that lost a track's partition before it could rebuild the track writes a request
/// to `rebuilds`; whoever holds the partition rebuilds the track from its events. Here the
/// stored register of one user is made wrong after the worker's own idle rebuild, and only
/// the request can set it right.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_handed_over_is_done_by_the_partitions_holder() -> anyhow::Result<()> {
    let p = Pipeline::start().await?;
    let dir = tempfile::tempdir()?;
    let a = p.node(dir.path()).await?;
    let metrics_addr = format!("127.0.0.1:{}", fanfare_tests::free_port()?);
    let _worker = p.worker(&["--metrics-listen", &metrics_addr]).await?;
    let track = TRACKS[0];
    for user in ["h0", "h1"] {
        let mut ws = a.connect(user).await?;
        ws.like("like", track, &format!("{user}-1")).await?;
    }
    let db = p.db().await?;
    if let Err(err) = wait_stored(&db, 2, Duration::from_secs(30)).await {
        let spill = a.metric("fanfare_kafka_spill_events").await?;
        anyhow::bail!("{err:#}; the node's spill holds {spill} events");
    }
    // The worker's first batch followed its assignment, so it rebuilds the track once it is
    // idle; break the register only after that.
    wait_idle_rebuild(&metrics_addr).await?;
    // Every metric the shipped alerts and dashboard use is one this farm node or worker serves.
    let (_, node_metrics) = a.get("/metrics").await?;
    let (_, worker_metrics) = fanfare_tests::http_get(&metrics_addr, "/metrics").await?;
    let mut served = fanfare_tests::monitoring::served(&node_metrics);
    served.extend(fanfare_tests::monitoring::served(&worker_metrics));
    let unknown: Vec<String> = fanfare_tests::monitoring::used_by_monitoring()?
        .difference(&served)
        .cloned()
        .collect();
    assert!(
        unknown.is_empty(),
        "monitoring names unserved metrics: {unknown:?}"
    );
    let counts = db.collection::<Document>("track_counts");
    let stored = counts
        .find_one(doc! { "_id": track })
        .await?
        .context("no count stored")?;
    let partition: i32 = stored
        .keys()
        .find_map(|k| k.strip_prefix("log.")?.parse().ok())
        .or_else(|| {
            let log = stored.get_document("log").ok()?;
            log.keys().find_map(|k| k.parse().ok())
        })
        .context("the count records no partition")?;
    db.collection::<Document>("pairs")
        .update_one(
            doc! { "_id": format!("{track}\nh1") },
            doc! { "$set": { "liked": false } },
        )
        .await?;
    counts
        .update_one(doc! { "_id": track }, doc! { "$set": { "count": 1 } })
        .await?;
    // A request of an older worker (no window): the whole history is read.
    rebuild(
        &db,
        doc! { "_id": track, "partition": partition, "asked_at_ms": 1_i64 },
    )
    .await?;
    let mut expected = BTreeMap::new();
    expected.insert(
        track.to_owned(),
        Expected {
            likes: 2,
            unlikes: 0,
            actions: 2,
            count: 2,
        },
    );
    assert_eq!(stored_totals(&db, &[track]).await?, expected);
    let pairs = db.collection::<Document>("pairs");
    let h1 = doc! { "_id": format!("{track}\nh1") };
    let register = pairs
        .find_one(h1.clone())
        .await?
        .context("the rebuild lost the register")?;
    assert_eq!(
        register.get_bool("liked").ok(),
        Some(true),
        "the rebuild set the register back to what the events say: {register}"
    );

    // A windowed request reads only events stamped from its start: a register behind an
    // event of the window is brought up to it, and the count is the registers' liked ones.
    let stamp = register.get_i64("stamp")?;
    pairs
        .update_one(
            h1.clone(),
            doc! { "$set": { "liked": false, "stamp": 1_i64, "event": "0-older" } },
        )
        .await?;
    counts
        .update_one(doc! { "_id": track }, doc! { "$set": { "count": 7 } })
        .await?;
    let window =
        doc! { "_id": track, "partition": partition, "asked_at_ms": 2_i64, "since_ms": stamp };
    rebuild(&db, window).await?;
    assert_eq!(stored_totals(&db, &[track]).await?, expected);
    let register = pairs.find_one(h1).await?.context("no register")?;
    assert_eq!(
        (
            register.get_bool("liked").ok(),
            register.get_i64("stamp").ok()
        ),
        (Some(true), Some(stamp)),
        "the window's event set the register: {register}"
    );
    Ok(())
}

/// A batch that could not be sure of a track asks for its rebuild, due 20 s later, before
/// its offsets are committed: a worker killed -9 right after the commit leaves the request
/// behind, and the partition's next holder does it (found 18 in docs/reliability.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_asked_for_outlives_the_worker_that_asked() -> anyhow::Result<()> {
    let p = Pipeline::start().await?;
    let dir = tempfile::tempdir()?;
    let a = p.node(dir.path()).await?;
    let metrics_addr = format!("127.0.0.1:{}", fanfare_tests::free_port()?);
    let mut first = p.worker(&["--metrics-listen", &metrics_addr]).await?;
    let track = TRACKS[0];
    for user in ["h0", "h1"] {
        let mut ws = a.connect(user).await?;
        ws.like("like", track, &format!("{user}-1")).await?;
    }
    let db = p.db().await?;
    wait_stored(&db, 2, Duration::from_secs(30)).await?;
    // The first batch followed the worker's assignment: let its idle rebuild pass first.
    wait_idle_rebuild(&metrics_addr).await?;
    // h1's register is newer than anything the node will stamp, so the worker's merge of
    // h1's unlike is refused: the batch cannot be sure of the track.
    let pairs = db.collection::<Document>("pairs");
    pairs
        .update_one(
            doc! { "_id": format!("{track}\nh1") },
            doc! { "$set": { "liked": true, "stamp": 4_000_000_000_000_i64, "event": "z-future" } },
        )
        .await?;
    let mut ws = a.connect("h1").await?;
    ws.like("unlike", track, "h1-2").await?;
    let requests = db.collection::<Document>("rebuilds");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let request = loop {
        if let Some(found) = requests.find_one(doc! { "_id": track }).await? {
            break found;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the worker never asked for the track's rebuild"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let due_ms = number(&request, "due_ms");
    anyhow::ensure!(
        due_ms > now_ms + 5_000,
        "the rebuild is due at {due_ms}, now is {now_ms}: {request}"
    );
    wait_stored(&db, 3, Duration::from_secs(15)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await; // the commit follows the ask
    first.kill().await?;
    // What the rebuild must repair: a count that agrees with nothing.
    db.collection::<Document>("track_counts")
        .update_one(doc! { "_id": track }, doc! { "$set": { "count": 7 } })
        .await?;
    let _second = p.worker(&[]).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let count = db
            .collection::<Document>("track_counts")
            .find_one(doc! { "_id": track })
            .await?
            .map(|d| number(&d, "count"));
        // h0's like and h1's register, newer than its unlike, both count.
        if count == Some(2) {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the next worker never did the rebuild: count {count:?}, requests {:?}",
            futures_util::TryStreamExt::try_collect::<Vec<_>>(requests.find(doc! {}).await?)
                .await?
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let liked = pairs
        .count_documents(doc! { "track": track, "liked": true })
        .await?;
    assert_eq!(liked, 2, "the rebuild moved a register");
    Ok(())
}

/// Writes a rebuild request (in place of one the worker may have left: a rebuild done within
/// 20 s of an assignment change is asked for again) and waits until the partition's holder
/// has done it.
async fn rebuild(db: &mongodb::Database, request: Document) -> anyhow::Result<()> {
    let requests = db.collection::<Document>("rebuilds");
    let id = request.get_str("_id")?.to_owned();
    let asked_at_ms = request.get_i64("asked_at_ms")?;
    requests
        .replace_one(doc! { "_id": &id }, request)
        .upsert(true)
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let this = doc! { "_id": &id, "asked_at_ms": asked_at_ms };
    while requests.count_documents(this.clone()).await? > 0 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the request was never taken up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Waits for the worker's first idle rebuild (its first batch followed its assignment).
async fn wait_idle_rebuild(metrics_addr: &str) -> anyhow::Result<()> {
    let series = "fanfare_worker_tracks_rebuilt_total";
    wait_metric_at(metrics_addr, series, Duration::from_secs(30), |n| n >= 1.0)
        .await
        .context("the worker never rebuilt the track when idle")?;
    Ok(())
}
