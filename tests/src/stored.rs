//! Reads back what the persistence workers wrote to MongoDB and holds it against the acks the
//! clients saw: the audit behind the pipeline tests and the fault suite.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::bail;
use futures_util::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};

use crate::traffic::{AckedLike, Acks, Expected};

/// A numeric field whatever integer width the server chose.
pub fn number(d: &Document, key: &str) -> i64 {
    match d.get(key) {
        Some(Bson::Int32(v)) => i64::from(*v),
        Some(Bson::Int64(v)) => *v,
        Some(Bson::Double(v)) => *v as i64,
        _ => 0,
    }
}

/// Waits until MongoDB holds `at_least` events and the count stops changing.
pub async fn wait_stored(
    db: &mongodb::Database,
    at_least: u64,
    patience: Duration,
) -> anyhow::Result<u64> {
    let likes = db.collection::<Document>("likes");
    let deadline = tokio::time::Instant::now() + patience;
    let mut last = u64::MAX;
    loop {
        let stored = likes.count_documents(doc! {}).await.unwrap_or(0);
        if stored >= at_least && stored == last {
            return Ok(stored);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("MongoDB holds {stored} like events, expected at least {at_least}");
        }
        last = stored;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// MongoDB's per-track totals, each checked against the events stored for the track: the
/// count against the pairs' newest events by (stamp, event id) and against the `pairs`
/// registers. A worker writes the totals just after the
/// events, so they may trail for a moment, and a track a late batch could not be sure of is
/// rebuilt 20 s after that batch (plus up to 5 s until its partition's holder looks): this waits
/// up to 60 s for them to agree before it calls a difference a fault. (With 30 s, a fault run
/// once failed on one track whose registers were right and whose count was not yet rebuilt.)
pub async fn stored_totals(
    db: &mongodb::Database,
    tracks: &[&str],
) -> anyhow::Result<BTreeMap<String, Expected>> {
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs(60);
    loop {
        match totals_once(db, tracks).await {
            Ok(totals) => {
                if started.elapsed() > Duration::from_secs(10) {
                    eprintln!(
                        "stored totals agreed after {:.1} s",
                        started.elapsed().as_secs_f64()
                    );
                }
                return Ok(totals);
            }
            Err(err) if tokio::time::Instant::now() > deadline => return Err(err),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

async fn totals_once(
    db: &mongodb::Database,
    tracks: &[&str],
) -> anyhow::Result<BTreeMap<String, Expected>> {
    let likes = db.collection::<Document>("likes");
    let pairs = db.collection::<Document>("pairs");
    let counts = db.collection::<Document>("track_counts");
    let mut totals = BTreeMap::new();
    for &track in tracks {
        let Some(d) = counts.find_one(doc! {"_id": track}).await? else {
            continue;
        };
        let mut from_events = Expected::default();
        // user → (stamp, event id, liked) of the newest event
        let mut newest: HashMap<String, (i64, String, bool)> = HashMap::new();
        let mut events = likes.find(doc! {"track": track}).await?;
        while let Some(e) = events.try_next().await? {
            let like = e.get_str("action")? == "like";
            from_events.actions += 1;
            if e.get_bool("changed").unwrap_or(true) {
                if like {
                    from_events.likes += 1;
                } else {
                    from_events.unlikes += 1;
                }
            }
            let register = (
                number(&e, "accepted_at_ms"),
                e.get_str("_id")?.to_owned(),
                like,
            );
            let user = e.get_str("user")?.to_owned();
            match newest.get(&user) {
                Some(old) if (old.0, &old.1) >= (register.0, &register.1) => {}
                _ => {
                    newest.insert(user, register);
                }
            }
        }
        from_events.count = newest.values().filter(|r| r.2).count() as i64;
        let registers = pairs
            .count_documents(doc! {"track": track, "liked": true})
            .await? as i64;
        let stored = number(&d, "count");
        if !(stored == from_events.count && registers == stored) {
            // Say which pairs' registers differ from their newest stored events, and why.
            let mut differing = Vec::new();
            let mut cursor = pairs.find(doc! {"track": track}).await?;
            while let Some(p) = cursor.try_next().await? {
                let user = p.get_str("user").unwrap_or_default().to_owned();
                let liked = p.get_bool("liked").unwrap_or(false);
                let newest_liked = newest.get(&user).is_some_and(|r| r.2);
                if liked != newest_liked {
                    let events: Vec<String> = likes
                        .find(doc! {"track": track, "user": &user})
                        .await?
                        .try_collect::<Vec<Document>>()
                        .await?
                        .iter()
                        .map(|e| {
                            format!(
                                "{}@{}/{}/{}",
                                e.get_str("action").unwrap_or_default(),
                                number(e, "accepted_at_ms"),
                                e.get_str("_id").unwrap_or_default(),
                                e.get_str("node").unwrap_or_default()
                            )
                        })
                        .collect();
                    differing.push(format!("{user}: register {p} events {events:?}"));
                }
            }
            anyhow::bail!(
                "{track}: count {stored} and {registers} liked registers disagree with the stored \
                 events {from_events:?}; differing pairs: {differing:?}"
            );
        }
        totals.insert(track.to_owned(), from_events);
    }
    Ok(totals)
}

/// Acked actions held against the stored events, one by one.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EventAudit {
    /// Acked, not stored.
    pub missing: u64,
    /// The first few of those, to look up in logs and spills.
    pub missing_examples: Vec<AckedLike>,
    /// One client key stored as more than one event.
    pub doubled: u64,
    /// Stored, neither acked nor in doubt.
    pub unexplained: u64,
    /// Stored events in all.
    pub stored: u64,
}

/// Compares every acked action with the `likes` collection by (user, key).
pub async fn audit_events(db: &mongodb::Database, acks: &Acks) -> anyhow::Result<EventAudit> {
    let mut stored: HashMap<(String, String), u64> = HashMap::new();
    let mut cursor = db
        .collection::<Document>("likes")
        .find(doc! {})
        .projection(doc! {"user": 1, "key": 1})
        .await?;
    let mut audit = EventAudit::default();
    while let Some(d) = cursor.try_next().await? {
        let user = d.get_str("user").unwrap_or_default().to_owned();
        let key = d.get_str("key").unwrap_or_default().to_owned();
        *stored.entry((user, key)).or_default() += 1;
        audit.stored += 1;
    }
    audit.doubled = stored.values().filter(|n| **n > 1).map(|n| n - 1).sum();
    for like in &acks.likes {
        if stored
            .remove(&(like.user.clone(), like.key.clone()))
            .is_none()
        {
            audit.missing += 1;
            if audit.missing_examples.len() < 10 {
                audit.missing_examples.push(like.clone());
            }
        }
    }
    for like in &acks.in_doubt {
        stored.remove(&(like.user.clone(), like.key.clone()));
    }
    audit.unexplained = stored.len() as u64;
    Ok(audit)
}
