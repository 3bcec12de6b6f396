//! Like traffic whose every ack is written down, so a test (or the fault suite) can later hold
//! what the system stored against what it promised.
//!
//! Each simulated user likes and unlikes tracks in turn, each like with a fresh key. Every
//! acked action is an event; a track's count is how many users' last acked action on it is a
//! like. A user
//! whose connection breaks or whose like goes unanswered reconnects (through the same address,
//! which may be a balancer) and re-sends the same key, as a real client must: the node applies a
//! key once however often it arrives. A like still unanswered when traffic stops is in doubt.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::bail;

use crate::WsClient;

/// What the clients saw acked for one track.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Expected {
    /// Acked as changes (`duplicate: false`), by action.
    pub likes: u64,
    pub unlikes: u64,
    /// Every acked action, changes and no-ops (`duplicate: true`) alike: each is an event.
    pub actions: u64,
    /// Users whose last acked action on the track is a like: what the count must be.
    pub count: i64,
}

/// One action the node acked.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct AckedLike {
    pub user: String,
    pub key: String,
    pub track: String,
    pub action: &'static str,
}

/// Everything the clients were told.
#[derive(Debug, Default, Clone)]
pub struct Acks {
    pub per_track: BTreeMap<String, Expected>,
    /// Every acked action, in the order each user sent them.
    pub likes: Vec<AckedLike>,
    /// Each (user, track)'s last acked action.
    pub last: BTreeMap<(String, String), &'static str>,
    /// Sent but never answered (traffic stopped while the user could not reconnect).
    pub in_doubt: Vec<AckedLike>,
}

impl Acks {
    pub fn total(&self) -> u64 {
        self.likes.len() as u64
    }
}

/// Who sends what, where, how fast.
#[derive(Debug, Clone)]
pub struct TrafficPlan {
    /// Addresses the users connect to, round-robin (one may be a balancer).
    pub addrs: Vec<String>,
    pub users: usize,
    /// Prefix of user names, so runs sharing a database do not collide.
    pub user_prefix: String,
    pub tracks: Vec<String>,
    /// Pause between one user's likes.
    pub pause: Duration,
    /// How long a like may go unanswered before the user reconnects and re-sends it.
    pub reply_timeout: Duration,
}

impl TrafficPlan {
    pub fn new(addrs: &[&str], users: usize, pause: Duration, tracks: &[&str]) -> TrafficPlan {
        TrafficPlan {
            addrs: addrs.iter().map(|a| (*a).to_owned()).collect(),
            users,
            user_prefix: "pu".into(),
            tracks: tracks.iter().map(|t| (*t).to_owned()).collect(),
            pause,
            reply_timeout: Duration::from_secs(30),
        }
    }
}

/// Traffic in progress.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Acks>>,
    reconnects: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Traffic {
    pub fn start(plan: TrafficPlan) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(Mutex::new(Acks::default()));
        let reconnects = Arc::new(AtomicU64::new(0));
        let plan = Arc::new(plan);
        let tasks = (0..plan.users)
            .map(|u| {
                let user = User {
                    name: format!("{}{u}", plan.user_prefix),
                    addr: plan.addrs[u % plan.addrs.len()].clone(),
                    plan: plan.clone(),
                    stop: stop.clone(),
                    acks: acks.clone(),
                    reconnects: reconnects.clone(),
                };
                tokio::spawn(async move { user.run(u).await })
            })
            .collect();
        Traffic {
            stop,
            acks,
            reconnects,
            tasks,
        }
    }

    /// Likes acked so far.
    pub fn acked_total(&self) -> u64 {
        lock(&self.acks).total()
    }

    /// Times a user had to reconnect (its node died, froze or refused).
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Stops the users (each finishes the like it is on) and returns what they were told.
    pub async fn finish(self) -> anyhow::Result<Acks> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await??;
        }
        let acks = lock(&self.acks).clone();
        Ok(acks)
    }
}

struct User {
    name: String,
    addr: String,
    plan: Arc<TrafficPlan>,
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Acks>>,
    reconnects: Arc<AtomicU64>,
}

impl User {
    async fn run(self, index: usize) -> anyhow::Result<()> {
        let url = format!("ws://{}/v1/ws?user={}", self.addr, self.name);
        let tracks = &self.plan.tracks;
        let mut liked = vec![false; tracks.len()];
        let mut client: Option<WsClient> = None;
        let mut sent = 0usize;
        while !self.stop.load(Ordering::Relaxed) {
            let slot = (sent + index) % tracks.len();
            let like = AckedLike {
                user: self.name.clone(),
                key: format!("{}-{sent}", self.name),
                track: tracks[slot].clone(),
                action: if liked[slot] { "unlike" } else { "like" },
            };
            sent += 1;
            // Until this like is answered: on a lost connection, reconnect and send the same
            // key again — the node applies it once whether or not the first attempt got through.
            loop {
                let ws = match &mut client {
                    Some(ws) => ws,
                    None => match WsClient::connect(&url).await {
                        Ok(ws) => client.insert(ws),
                        Err(_) if self.stop.load(Ordering::Relaxed) => {
                            lock(&self.acks).in_doubt.push(like);
                            return Ok(());
                        }
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let reply = tokio::time::timeout(
                    self.plan.reply_timeout,
                    ws.like(like.action, &like.track, &like.key),
                )
                .await;
                match reply {
                    Ok(Ok(reply)) if reply["type"] == "ack" => {
                        liked[slot] = like.action == "like";
                        self.record(like, reply["duplicate"] == false);
                        break;
                    }
                    Ok(Ok(reply))
                        if reply["code"] == "overloaded" || reply["code"] == "rate_limited" =>
                    {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Ok(Ok(reply)) => bail!("{}: unexpected reply {reply}", self.name),
                    _ => {
                        client = None;
                        self.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            tokio::time::sleep(self.plan.pause).await;
        }
        Ok(())
    }

    fn record(&self, like: AckedLike, changed: bool) {
        let mut acks = lock(&self.acks);
        let pair = (like.user.clone(), like.track.clone());
        let was_liked = acks.last.insert(pair, like.action) == Some("like");
        let e = acks.per_track.entry(like.track.clone()).or_default();
        e.actions += 1;
        match (changed, like.action == "like") {
            (true, true) => e.likes += 1,
            (true, false) => e.unlikes += 1,
            (false, _) => {}
        }
        e.count += i64::from(like.action == "like") - i64::from(was_liked);
        acks.likes.push(like);
    }
}

/// A poisoned lock still holds valid data here (a panicking user only stops itself).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
