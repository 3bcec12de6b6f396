//! The life of a like (`like::handle`) in-process, against the embedded seams and, where a
//! case needs a state that is hard to reach from outside (a full spill, a re-sent key this node
//! never stored), against small in-memory seams of the test's own. The real binary, real Redis,
//! Kafka and MongoDB are exercised by the `fanfare-tests` crate.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use fanfare::compose::{self, Context};
use fanfare::config::Config;
use fanfare::like::{self, Ack, Refusal};
use fanfare::metrics::Metrics;
use fanfare::node::Node;
use fanfare::seams::Part;
use fanfare::seams::Parts;
use fanfare::seams::bus::{Bus, BusHandler, Published};
use fanfare::seams::event_log::{EventLog, EventLogError, LikeEvent, Shipped};
use fanfare::seams::ledger::{Decision, Ledger, LedgerError, Outcome};
use fanfare::tasks::Tasks;
use fanfare_protocol::{Action, ErrorCode, LikeRequest};

/// A node alone in a temp dir; `change` swaps parts before the node is assembled.
async fn node_with(
    dir: &Path,
    extra: &[&str],
    change: impl FnOnce(&mut Parts),
) -> anyhow::Result<Arc<Node>> {
    let data = dir.to_string_lossy().to_string();
    let mut args = vec!["fanfare", "--data-dir", &data, "--node-id", "test-node"];
    args.extend_from_slice(extra);
    let config = Config::load_from(args.iter().map(Into::into))?;
    let tasks = Tasks::new();
    let metrics = Arc::new(Metrics::new());
    let cx = Context {
        config: &config,
        id: Arc::from("test-node"),
        metrics: metrics.clone(),
        tasks: &tasks,
    };
    let mut parts = compose::embedded(&cx).await?;
    change(&mut parts);
    compose::assemble(config, Arc::from("test-node"), parts, metrics, tasks).await
}

async fn send(node: &Arc<Node>, user: &str, action: Action, key: &str) -> Result<Ack, Refusal> {
    let request = LikeRequest {
        action,
        track: "demo:t1".to_owned(),
        key: key.to_owned(),
    };
    like::handle(node.clone(), Arc::from(user), 1, request)
        .await
        .result
}

fn ack(result: Result<Ack, Refusal>) -> anyhow::Result<Ack> {
    result.map_err(|r| anyhow::anyhow!("refused: {:?} {}", r.code, r.message))
}

fn refusal(result: Result<Ack, Refusal>) -> anyhow::Result<Refusal> {
    match result {
        Ok(ack) => anyhow::bail!("acked (count {}), expected a refusal", ack.count),
        Err(refusal) => Ok(refusal),
    }
}

#[tokio::test]
async fn likes_count_once_per_user_and_unlikes_take_them_back() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = node_with(dir.path(), &[], |_| {}).await?;
    let first = ack(send(&node, "ana", Action::Like, "k1").await)?;
    assert_eq!((first.count, first.duplicate), (1, false));
    let again = ack(send(&node, "ana", Action::Like, "k2").await)?;
    assert_eq!((again.count, again.duplicate), (1, true), "already liked");
    let other = ack(send(&node, "ben", Action::Like, "k1").await)?;
    assert_eq!(other.count, 2, "keys are per user");
    let unlike = ack(send(&node, "ana", Action::Unlike, "k3").await)?;
    assert_eq!((unlike.count, unlike.duplicate), (1, false));
    assert_eq!(node.ledger.count("demo:t1").await?, 1);
    Ok(())
}

#[tokio::test]
async fn a_resent_key_is_acked_again_and_counted_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = node_with(dir.path(), &[], |_| {}).await?;
    ack(send(&node, "ana", Action::Like, "k1").await)?;
    let resent = ack(send(&node, "ana", Action::Like, "k1").await)?;
    assert_eq!((resent.count, resent.duplicate), (1, false));
    Ok(())
}

#[tokio::test]
async fn accepted_likes_are_durable_across_a_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let node = node_with(dir.path(), &[], |_| {}).await?;
        ack(send(&node, "ana", Action::Like, "k1").await)?;
        ack(send(&node, "ben", Action::Like, "k1").await)?;
        node.close_parts().await?;
    }
    let node = node_with(dir.path(), &[], |_| {}).await?;
    assert_eq!(node.ledger.count("demo:t1").await?, 2);
    let resent = ack(send(&node, "ana", Action::Like, "k1").await)?;
    assert_eq!(
        (resent.count, resent.duplicate),
        (2, false),
        "the key survived"
    );
    Ok(())
}

#[tokio::test]
async fn a_closed_event_log_refuses_as_shutting_down() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = node_with(dir.path(), &[], |_| {}).await?;
    node.event_log.close().await?;
    let refused = refusal(send(&node, "ana", Action::Like, "k1").await)?;
    assert_eq!(refused.code, ErrorCode::Overloaded);
    assert!(
        refused.message.contains("shutting down"),
        "{}",
        refused.message
    );
    Ok(())
}

/// An event log whose spill is full: it refuses before anything is counted.
struct FullLog;

impl Part for FullLog {
    fn name(&self) -> &'static str {
        "event log (full)"
    }
}

#[async_trait]
impl EventLog for FullLog {
    async fn commit(&self, _event: LikeEvent) -> Result<Shipped, EventLogError> {
        Err(EventLogError::Overloaded(1))
    }
    async fn barrier(&self) -> Result<(), EventLogError> {
        Ok(())
    }
    fn admit(&self) -> Result<(), EventLogError> {
        Err(EventLogError::Overloaded(2_000_000))
    }
}

#[tokio::test]
async fn a_full_event_log_refuses_before_counting() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = node_with(dir.path(), &[], |parts| parts.event_log = Arc::new(FullLog)).await?;
    let refused = refusal(send(&node, "ana", Action::Like, "k1").await)?;
    assert_eq!(refused.code, ErrorCode::Overloaded);
    assert_eq!(refused.retry_after_ms, Some(5_000));
    assert_eq!(
        node.ledger.count("demo:t1").await?,
        0,
        "nothing was counted"
    );
    Ok(())
}

/// A ledger that answers `Restored` (a re-sent key applied by a node that died before storing
/// it), and an event log that records what it is given.
struct RestoringLedger;

impl Part for RestoringLedger {
    fn name(&self) -> &'static str {
        "ledger (restoring)"
    }
}

#[async_trait]
impl Ledger for RestoringLedger {
    async fn decide(
        &self,
        user: &Arc<str>,
        request: &LikeRequest,
    ) -> Result<Decision, LedgerError> {
        Ok(Decision {
            count: 7,
            to_merge: false,
            outcome: Outcome::Restored(LikeEvent {
                event_id: "original-event".to_owned(),
                seq: 1,
                version: 3,
                user: user.clone(),
                track: Arc::from(request.track.as_str()),
                action: request.action,
                key: request.key.clone(),
                accepted_at_ms: 1_000,
                node: Arc::from("dead-node"),
                changed: true,
            }),
        })
    }
    async fn count(&self, _track: &str) -> Result<u64, LedgerError> {
        Ok(7)
    }
}

#[derive(Default)]
struct RecordingLog(Mutex<Vec<LikeEvent>>);

impl Part for RecordingLog {
    fn name(&self) -> &'static str {
        "event log (recording)"
    }
}

#[async_trait]
impl EventLog for RecordingLog {
    async fn commit(&self, event: LikeEvent) -> Result<Shipped, EventLogError> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(event);
        Ok(Box::pin(std::future::ready(Ok(()))))
    }
    async fn barrier(&self) -> Result<(), EventLogError> {
        Ok(())
    }
}

#[tokio::test]
async fn a_restored_like_is_stored_again_under_its_original_id() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let log = Arc::new(RecordingLog::default());
    let recorded = log.clone();
    let node = node_with(dir.path(), &[], move |parts| {
        parts.ledger = Arc::new(RestoringLedger);
        parts.event_log = recorded;
    })
    .await?;
    let restored = ack(send(&node, "ana", Action::Like, "k1").await)?;
    assert_eq!((restored.count, restored.duplicate), (7, false));
    let stored = log.0.lock().unwrap_or_else(|p| p.into_inner());
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].event_id, "original-event");
    Ok(())
}

/// An event log whose appends wait at a gate before they take the event (as a send into a
/// full queue waits), recording what they take.
struct GatedLog {
    gate: tokio::sync::Semaphore,
    taken: Mutex<Vec<LikeEvent>>,
}

impl Part for GatedLog {
    fn name(&self) -> &'static str {
        "event log (gated)"
    }
}

#[async_trait]
impl EventLog for GatedLog {
    async fn commit(&self, event: LikeEvent) -> Result<Shipped, EventLogError> {
        let _pass = self
            .gate
            .acquire()
            .await
            .map_err(|_| EventLogError::Closed)?;
        self.taken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
        Ok(Box::pin(std::future::ready(Ok(()))))
    }
    async fn barrier(&self) -> Result<(), EventLogError> {
        Ok(())
    }
}

/// Finding 4 of issue 16: a like whose future is dropped after the ledger decided (a session
/// reaching `--shutdown-timeout`) lost its event while the ledger remembered its key, so the
/// client's re-send was acked as re-sent and never stored.
#[tokio::test]
async fn a_like_dropped_after_the_decision_is_still_stored() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let log = Arc::new(GatedLog {
        gate: tokio::sync::Semaphore::new(0),
        taken: Mutex::new(Vec::new()),
    });
    let gated = log.clone();
    let node = node_with(dir.path(), &[], move |parts| parts.event_log = gated).await?;
    let first = tokio::time::timeout(
        std::time::Duration::from_millis(100),
        send(&node, "ana", Action::Like, "k1"),
    )
    .await;
    assert!(first.is_err(), "the append waits at the gate");
    log.gate.add_permits(10);
    let resent = ack(send(&node, "ana", Action::Like, "k1").await)?;
    assert_eq!(
        (resent.count, resent.duplicate),
        (1, false),
        "acked as re-sent"
    );
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while log
        .taken
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_empty()
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the like the re-send confirms was never stored"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    Ok(())
}

/// A bus that records what it is asked to publish.
#[derive(Default)]
struct RecordingBus(Mutex<Vec<Published>>);

impl Part for RecordingBus {
    fn name(&self) -> &'static str {
        "bus (recording)"
    }
}

impl Bus for RecordingBus {
    fn start(&self, _handler: Arc<dyn BusHandler>, _tasks: &Tasks) {}
    fn publish(&self, like: Published) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(like);
    }
    fn interest_changed(&self, _track: &Arc<str>) {}
}

/// Durable first: nothing is broadcast before the event log has committed the event.
#[tokio::test]
async fn a_like_is_broadcast_only_once_committed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let log = Arc::new(GatedLog {
        gate: tokio::sync::Semaphore::new(0),
        taken: Mutex::new(Vec::new()),
    });
    let bus = Arc::new(RecordingBus::default());
    let (gated, recording) = (log.clone(), bus.clone());
    let node = node_with(dir.path(), &[], move |parts| {
        parts.event_log = gated;
        parts.bus = recording;
    })
    .await?;
    let like = tokio::spawn({
        let node = node.clone();
        async move { send(&node, "ana", Action::Like, "k1").await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        bus.0.lock().unwrap_or_else(|p| p.into_inner()).is_empty(),
        "published before the commit"
    );
    log.gate.add_permits(1);
    let acked = ack(like.await?)?;
    assert_eq!((acked.count, acked.duplicate), (1, false));
    let published = bus.0.lock().unwrap_or_else(|p| p.into_inner());
    assert_eq!(published.len(), 1);
    assert_eq!((published[0].count, published[0].delta), (1, 1));
    Ok(())
}

/// A manifest in `dir` naming the repository's built components (`./scripts/build-plugins`).
fn manifest(dir: &Path, text: &str) -> anyhow::Result<String> {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
    for name in ["rate_limit_token_bucket.wasm", "validate_basic.wasm"] {
        let path = built.join(name);
        anyhow::ensure!(
            path.exists(),
            "{} is missing: run ./scripts/build-plugins first",
            path.display()
        );
        std::fs::copy(&path, dir.join(name))?;
    }
    let file = dir.join("fanfare.toml");
    std::fs::write(&file, text)?;
    Ok(file.to_string_lossy().to_string())
}

#[tokio::test]
async fn plugins_refuse_by_rate_limit_and_by_validation() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let plugins = tempfile::tempdir()?;
    let manifest = manifest(
        plugins.path(),
        r#"
        [rate_limit]
        component = "rate_limit_token_bucket.wasm"
        config = { likes = 2, window_ms = 60000 }
        [validate]
        component = "validate_basic.wasm"
        config = { banned_users = ["spammer"], blocked_tracks = ["leak:*"] }
        "#,
    )?;
    let node = node_with(dir.path(), &["--plugins", &manifest], |_| {}).await?;

    let banned = refusal(send(&node, "spammer", Action::Like, "k1").await)?;
    assert_eq!(banned.code, ErrorCode::Rejected);

    ack(send(&node, "ana", Action::Like, "k1").await)?;
    ack(send(&node, "ana", Action::Unlike, "k2").await)?;
    let limited = refusal(send(&node, "ana", Action::Like, "k3").await)?;
    assert_eq!(limited.code, ErrorCode::RateLimited);
    assert!(limited.retry_after_ms.is_some_and(|ms| ms > 0));
    assert_eq!(
        node.ledger.count("demo:t1").await?,
        0,
        "refused likes never count"
    );
    Ok(())
}
