//! The ledger's merge script, against a real `redis-server`: random histories of (user,
//! track) actions — likes and unlikes in any pattern, no-ops included, stamps that tie —
//! delivered as replays in random order, each event one to three times, with a wipe of Redis
//! at a random point after which every event is replayed again (what the nodes do after a
//! data loss). Whatever the order, every pair ends in the state of its newest action by
//! (stamp, event id) and each track's count is the number of its pairs in the liked state.
//!
//! A deterministic simulation (seeded; a failure prints its seed), not a timing test.

use std::collections::HashMap;
use std::process::Stdio;

use fanfare::farm::ledger_script::{MERGE, script_keys};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// One accepted action as a node stored it.
#[derive(Clone, Debug)]
struct Action {
    user: String,
    track: String,
    like: bool,
    stamp: i64,
    event_id: String,
    key: String,
}

struct Redis {
    child: tokio::process::Child,
    port: u16,
}

impl Redis {
    async fn start() -> anyhow::Result<Redis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        Ok(Redis { child, port })
    }

    async fn connect(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port))?;
        for _ in 0..100 {
            if let Ok(conn) = client.get_multiplexed_async_connection().await {
                return Ok(conn);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        anyhow::bail!("redis-server on {} never answered", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A history: per user and track, a run of actions with rising stamps (sometimes equal: two
/// nodes deciding in the same millisecond), each a like or unlike at random.
fn history(rng: &mut StdRng) -> Vec<Action> {
    let mut actions = Vec::new();
    let users = rng.random_range(1..6);
    let tracks = rng.random_range(1..3);
    for u in 0..users {
        for t in 0..tracks {
            let mut stamp = 1_000 + rng.random_range(0..50);
            for i in 0..rng.random_range(1..7) {
                stamp += rng.random_range(0..3); // 0: a tie
                actions.push(Action {
                    user: format!("u{u}"),
                    track: format!("t{t}"),
                    like: rng.random_bool(0.5),
                    stamp,
                    // Event ids order ties; random, so a tie's winner is not the later one.
                    event_id: format!("{:08x}-{u}-{t}-{i}", rng.random::<u32>()),
                    key: format!("k{u}-{t}-{i}"),
                });
            }
        }
    }
    actions
}

/// The newest action per pair by (stamp, event id): the state the registers must reach.
fn expected(actions: &[Action]) -> (HashMap<(String, String), bool>, HashMap<String, u64>) {
    let mut newest: HashMap<(String, String), &Action> = HashMap::new();
    for a in actions {
        let slot = newest.entry((a.user.clone(), a.track.clone())).or_insert(a);
        if (a.stamp, &a.event_id) > (slot.stamp, &slot.event_id) {
            *slot = a;
        }
    }
    let mut counts: HashMap<String, u64> = HashMap::new();
    let states = newest
        .into_iter()
        .map(|(pair, a)| {
            *counts.entry(pair.1.clone()).or_default() += u64::from(a.like);
            (pair, a.like)
        })
        .collect();
    (states, counts)
}

async fn replay(
    conn: &mut redis::aio::MultiplexedConnection,
    script: &redis::Script,
    a: &Action,
) -> anyhow::Result<()> {
    let [pairs, count, keys, version] = script_keys(&a.track, &a.user);
    let _: (i64, u8, u64, String) = script
        .key(pairs)
        .key(count)
        .key(keys)
        .key(version)
        .arg(&a.user)
        .arg(&a.key)
        .arg(if a.like { "1" } else { "0" })
        .arg(a.stamp)
        .arg(&a.event_id)
        .invoke_async(conn)
        .await?;
    Ok(())
}

#[tokio::test]
async fn replays_in_any_order_with_duplicates_and_a_wipe_end_in_the_newest_actions()
-> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let mut conn = redis.connect().await?;
    let script = redis::Script::new(MERGE);
    for seed in 0..300u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        redis::cmd("FLUSHALL").query_async::<()>(&mut conn).await?;
        let actions = history(&mut rng);
        let (states, counts) = expected(&actions);

        // Each event delivered one to three times, all shuffled.
        let mut deliveries: Vec<&Action> = actions
            .iter()
            .flat_map(|a| std::iter::repeat_n(a, rng.random_range(1..4)))
            .collect();
        deliveries.shuffle(&mut rng);
        // A wipe somewhere, then every node replays its whole history again, in its own order.
        let wipe_at = rng.random_range(0..=deliveries.len());
        for (i, a) in deliveries.iter().enumerate() {
            if i == wipe_at {
                redis::cmd("FLUSHALL").query_async::<()>(&mut conn).await?;
            }
            replay(&mut conn, &script, a).await?;
        }
        let mut again: Vec<&Action> = actions.iter().collect();
        again.shuffle(&mut rng);
        for a in again {
            replay(&mut conn, &script, a).await?;
        }

        for ((user, track), liked) in &states {
            let register: Option<String> = redis::cmd("HGET")
                .arg(&script_keys(track, user)[0])
                .arg(user)
                .query_async(&mut conn)
                .await?;
            let got = register.as_deref().is_some_and(|r| r.starts_with('1'));
            assert_eq!(
                got, *liked,
                "seed {seed}: {user}/{track} register {register:?}; history {actions:?}"
            );
        }
        for (track, count) in &counts {
            let got: Option<i64> = redis::cmd("GET")
                .arg(&script_keys(track, "")[1])
                .query_async(&mut conn)
                .await?;
            assert_eq!(
                got.unwrap_or(0),
                *count as i64,
                "seed {seed}: count of {track}; history {actions:?}"
            );
        }
    }
    Ok(())
}

/// A node's live merge can come after its own replay (or a worker) merged the same event: the
/// script must say which event the remembered key holds, or the live like is acked as a
/// duplicate (CI saw `duplicate: true` for a fresh user's first like across a failover).
#[tokio::test]
async fn a_key_merged_before_names_the_event_that_merged_it() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let mut conn = redis.connect().await?;
    let script = redis::Script::new(MERGE);
    let merge = |event_id: &'static str| {
        let [pairs, count, keys, version] = script_keys("t", "u");
        let mut invocation = script.key(pairs);
        invocation
            .key(count)
            .key(keys)
            .key(version)
            .arg("u")
            .arg("k1")
            .arg("1")
            .arg(1_000)
            .arg(event_id);
        invocation
    };
    let first: (u64, u8, u64, String) = merge("e1").invoke_async(&mut conn).await?;
    assert_eq!((first.0, first.1), (1, 0), "{first:?}");
    assert!(first.2 > 0, "a change has a version: {first:?}");
    // The same event again: remembered, with the version it made and its id.
    let again: (u64, u8, u64, String) = merge("e1").invoke_async(&mut conn).await?;
    assert_eq!(again, (1, 2, first.2, "e1".to_owned()));
    // Another event under the same key (a re-send decided anew): the original is named.
    let other: (u64, u8, u64, String) = merge("e2").invoke_async(&mut conn).await?;
    assert_eq!(other, (1, 2, first.2, "e1".to_owned()));
    // Entries written before the key carried its event: no id, version 0.
    let [_, _, keys, _] = script_keys("t", "v");
    redis::cmd("LPUSH")
        .arg(&keys)
        .arg("k1")
        .query_async::<()>(&mut conn)
        .await?;
    let [pairs, count, _, version] = script_keys("t", "v");
    let old: (u64, u8, u64, String) = script
        .key(pairs)
        .key(count)
        .key(keys)
        .key(version)
        .arg("v")
        .arg("k1")
        .arg("1")
        .arg(1_000)
        .arg("e3")
        .invoke_async(&mut conn)
        .await?;
    assert_eq!(old, (1, 2, 0, String::new()));
    Ok(())
}
