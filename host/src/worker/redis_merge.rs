//! The workers' half of "Redis is a rebuildable cache of registers".
//!
//! Each stored batch is merged into Redis with the ledger's own script as a replay: only an
//! action newer than a pair's register changes it, so merging what a node already merged is
//! a no-op. And when Redis has lost its data (a new epoch), the registers kept in MongoDB are
//! merged back, once per epoch, so pairs whose last action was stored long ago return too.
//! Nodes replay their own unshipped and recent history beside this; every merge commutes.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use redis::Script;

use crate::event::LikeEvent;
use crate::farm::keys;
use crate::farm::ledger_script::{EventMerge, MERGE};
use crate::farm::link::RedisLink;
use crate::tasks::Tasks;
use crate::worker::archive::MongoArchive;

/// Script calls per pipelined round trip.
const PIPELINE: usize = 500;
/// How often the epoch is checked besides reconnects (a Redis restarted between two checks
/// of the link is noticed here).
const EPOCH_CHECK: Duration = Duration::from_secs(5);

/// Merges the events into Redis; returns how many changed a register's state (events no node
/// had merged).
pub async fn merge(link: &RedisLink, events: &[LikeEvent]) -> anyhow::Result<u64> {
    let merges: Vec<EventMerge<'_>> = events
        .iter()
        .map(|e| EventMerge {
            track: &e.track,
            user: &e.user,
            key: &e.key,
            like: e.liked(),
            stamp: e.accepted_at_ms,
            event_id: &e.event_id,
            announce_as: None,
        })
        .collect();
    merge_all(link, &merges).await
}

async fn merge_all(link: &RedisLink, merges: &[EventMerge<'_>]) -> anyhow::Result<u64> {
    let mut conn = link.connection().context("redis is down")?;
    let script = Script::new(MERGE);
    script.prepare_invoke().load_async(&mut conn).await?;
    let mut changed = 0;
    for chunk in merges.chunks(PIPELINE) {
        let mut pipe = redis::pipe();
        for merge in chunk {
            merge.push(&mut pipe, script.get_hash());
        }
        let results: Vec<(i64, u8, u64, String)> = pipe.query_async(&mut conn).await?;
        changed += results.iter().filter(|r| r.1 == 0).count() as u64;
    }
    Ok(changed)
}

/// Watches Redis' epoch; when it is not the one the stored registers were last merged into,
/// merges them all (then records the epoch in MongoDB, so a crash mid-way merges again).
pub fn spawn_refill(link: Arc<RedisLink>, archive: MongoArchive, tasks: &Tasks) {
    let shutdown = tasks.shutdown().clone();
    let mut generations = link.generations();
    tasks.spawn(async move {
        loop {
            if link.is_up() {
                match refill_if_lost(&link, &archive).await {
                    Ok(0) => {}
                    Ok(merged) => tracing::info!(merged, "refilled Redis from stored registers"),
                    Err(err) => {
                        tracing::warn!(error = %format!("{err:#}"), "refill of Redis failed; retrying")
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = generations.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(EPOCH_CHECK) => {}
            }
        }
    });
}

async fn refill_if_lost(link: &RedisLink, archive: &MongoArchive) -> anyhow::Result<u64> {
    let mut conn = link.connection().context("redis is down")?;
    // Like the nodes: an empty Redis gets an epoch from whoever sees it first.
    let fresh = uuid::Uuid::now_v7().to_string();
    let _: Option<String> = redis::cmd("SET")
        .arg(keys::EPOCH)
        .arg(&fresh)
        .arg("NX")
        .query_async(&mut conn)
        .await?;
    let epoch: String = redis::cmd("GET")
        .arg(keys::EPOCH)
        .query_async(&mut conn)
        .await?;
    if archive.refilled_epoch().await?.as_deref() == Some(epoch.as_str()) {
        return Ok(0);
    }
    let mut registers = archive.all_registers().await?;
    let mut merged = 0u64;
    let mut page = Vec::with_capacity(PIPELINE);
    let mut done = false;
    while !done {
        page.clear();
        while page.len() < PIPELINE {
            match registers.next().await {
                Some(entry) => page.push(entry?),
                None => {
                    done = true;
                    break;
                }
            }
        }
        let merges: Vec<EventMerge<'_>> = page
            .iter()
            .map(|(track, user, r)| EventMerge {
                track,
                user,
                key: &r.key,
                like: r.liked,
                stamp: r.stamp,
                event_id: &r.event_id,
                announce_as: None,
            })
            .collect();
        if !merges.is_empty() {
            merge_all(link, &merges).await?;
        }
        merged += page.len() as u64;
    }
    archive.set_refilled_epoch(&epoch).await?;
    Ok(merged)
}
