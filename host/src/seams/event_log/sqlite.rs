//! Group commit into the embedded SQLite store on a dedicated thread.
//!
//! Appends queue on a bounded channel; the writer takes everything waiting (up to a batch
//! limit), writes it in one transaction, commits once (one fsync) and then answers every
//! waiter. Under load batches grow by themselves, so throughput rises without raising latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, oneshot};

use super::{EventLog, EventLogError, LikeEvent, Shipped, Uncommitted};
use crate::seams::{Health, Part};
use crate::store::Store;

const MAX_BATCH: usize = 4096;

/// Set only by the hidden `--test-commit-delay-ms` flag (tests of a node killed mid-like).
static TEST_COMMIT_DELAY_MS: AtomicU64 = AtomicU64::new(0);

/// Holds every commit of this process for `ms` (testing only).
pub fn set_test_commit_delay_ms(ms: u64) {
    TEST_COMMIT_DELAY_MS.store(ms, Ordering::Relaxed);
}
const QUEUE_CAPACITY: usize = 16_384;

enum Request {
    Append(LikeEvent, oneshot::Sender<Result<(), EventLogError>>),
    Barrier(oneshot::Sender<Result<(), EventLogError>>),
    Close(oneshot::Sender<Result<(), EventLogError>>),
}

/// Where the writer hands committed events when Kafka is configured: each event also gets a
/// row in the `kafka_outbox` table (the spill) in the same transaction, and after the commit
/// goes to the shipper in commit order. The hand-off queue is bounded: while the shipper
/// cannot keep up (Kafka away), a full queue drops the hand-off — the event is in the spill,
/// and the shipper reads the gap back from there — so RAM never holds a second copy of the
/// spill.
pub struct Forward {
    pub committed: mpsc::Sender<Committed>,
    /// Highest outbox position committed so far.
    pub committed_pos: Arc<AtomicU64>,
}

/// An event the writer committed, with its outbox position.
pub struct Committed {
    pub pos: u64,
    pub event: LikeEvent,
}

pub struct SqliteEventLog {
    requests: mpsc::Sender<Request>,
    /// Requests not committed yet (waiting for the writer, or in the batch it is writing): set
    /// on every append and around every commit.
    queue_depth: Gauge,
    /// How many requests the batch being written holds (0 between commits).
    committing: Arc<AtomicUsize>,
    uncommitted: Arc<Uncommitted>,
    healthy: Arc<AtomicBool>,
}

impl SqliteEventLog {
    /// Starts the writer thread on its own connection to the store; `queue_depth` follows the
    /// number of requests not committed yet.
    pub fn start(
        store: &Store,
        forward: Option<Forward>,
        queue_depth: Gauge,
    ) -> anyhow::Result<SqliteEventLog> {
        let conn = store.writer()?;
        let uncommitted = Arc::new(Uncommitted::default());
        let (requests, inbox) = mpsc::channel(QUEUE_CAPACITY);
        let healthy = Arc::new(AtomicBool::new(true));
        let committing = Arc::new(AtomicUsize::new(0));
        let writer = Writer {
            conn,
            uncommitted: uncommitted.clone(),
            healthy: healthy.clone(),
            forward,
            queue_depth: queue_depth.clone(),
            committing: committing.clone(),
        };
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer.run(inbox))
            .context("cannot start the SQLite writer thread")?;
        Ok(SqliteEventLog {
            requests,
            queue_depth,
            committing,
            uncommitted,
            healthy,
        })
    }

    /// What is not committed yet; the ledger uses it to evict safely.
    pub fn uncommitted(&self) -> Arc<Uncommitted> {
        self.uncommitted.clone()
    }

    async fn request(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), EventLogError>>) -> Request,
    ) -> Result<(), EventLogError> {
        let (done, wait) = oneshot::channel();
        // A full queue pushes back on the connections (their in-flight limit) instead of failing.
        if self.requests.send(make(done)).await.is_err() {
            return Err(EventLogError::Closed);
        }
        let queued = self.requests.max_capacity() - self.requests.capacity();
        self.queue_depth
            .set((queued + self.committing.load(Ordering::Relaxed)) as i64);
        wait.await.map_err(|_| EventLogError::Closed)?
    }
}

#[async_trait]
impl EventLog for SqliteEventLog {
    async fn commit(&self, event: LikeEvent) -> Result<Shipped, EventLogError> {
        self.request(|done| Request::Append(event, done)).await?;
        Ok(Box::pin(std::future::ready(Ok(()))))
    }

    async fn barrier(&self) -> Result<(), EventLogError> {
        self.request(Request::Barrier).await
    }
}

#[async_trait]
impl Part for SqliteEventLog {
    fn name(&self) -> &'static str {
        "event log (sqlite)"
    }

    fn health(&self) -> Health {
        if self.healthy.load(Ordering::Relaxed) {
            Health::Healthy
        } else {
            Health::Unavailable("the store cannot write (retrying)".to_owned())
        }
    }

    async fn close(&self) -> anyhow::Result<()> {
        match self.request(Request::Close).await {
            Err(EventLogError::Closed) => Ok(()), // already closed
            other => Ok(other?),
        }
    }
}

struct Writer {
    conn: crate::store::Writer,
    uncommitted: Arc<Uncommitted>,
    healthy: Arc<AtomicBool>,
    forward: Option<Forward>,
    queue_depth: Gauge,
    committing: Arc<AtomicUsize>,
}

impl Writer {
    fn run(mut self, mut inbox: mpsc::Receiver<Request>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = inbox.blocking_recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match inbox.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            self.committing.store(batch.len(), Ordering::Relaxed);
            self.queue_depth.set((inbox.len() + batch.len()) as i64);
            self.commit_until_done(&batch);
            self.committing.store(0, Ordering::Relaxed);
            self.queue_depth.set(inbox.len() as i64);
            let closing = batch.iter().any(|r| matches!(r, Request::Close(_)));
            for request in batch.drain(..) {
                let _ = request.into_reply().send(Ok(()));
            }
            if closing {
                inbox.close();
                // Anything that raced in after Close is refused, never silently dropped.
                while let Ok(late) = inbox.try_recv() {
                    let _ = late.into_reply().send(Err(EventLogError::Closed));
                }
                tracing::info!("event log flushed and closed");
                return;
            }
        }
    }

    /// Retries a failing commit (disk full, I/O error) instead of failing acks: nothing is
    /// acked that is not stored, and nothing accepted is dropped. The node reports not ready
    /// meanwhile.
    fn commit_until_done(&mut self, batch: &[Request]) {
        let mut backoff = Duration::from_millis(10);
        let spill = self.forward.is_some();
        let delay = TEST_COMMIT_DELAY_MS.load(Ordering::Relaxed);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        let outboxed = loop {
            match commit(&mut self.conn, batch, spill) {
                Ok(outboxed) => break outboxed,
                Err(err) => {
                    self.healthy.store(false, Ordering::Relaxed);
                    tracing::error!(error = %err, retry_in = ?backoff, "SQLite commit failed");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        self.healthy.store(true, Ordering::Relaxed);
        if let Some(forward) = &self.forward {
            for (pos, index) in outboxed {
                if let Request::Append(event, _) = &batch[index] {
                    forward.committed_pos.fetch_max(pos, Ordering::Release);
                    let _ = forward.committed.try_send(Committed {
                        pos,
                        event: event.clone(),
                    });
                }
            }
        }
        self.uncommitted
            .committed(batch.iter().filter_map(appended_seq));
    }
}

impl Request {
    fn into_reply(self) -> oneshot::Sender<Result<(), EventLogError>> {
        match self {
            Request::Append(_, done) | Request::Barrier(done) | Request::Close(done) => done,
        }
    }
}

fn appended_seq(request: &Request) -> Option<u64> {
    match request {
        Request::Append(event, _) => Some(event.seq),
        _ => None,
    }
}

/// Commits the batch's events; with `spill`, also queues each new one in the outbox and
/// returns (outbox position, batch index) pairs in commit order.
fn commit(
    conn: &mut crate::store::Writer,
    batch: &[Request],
    spill: bool,
) -> Result<Vec<(u64, usize)>, String> {
    let (indexes, events): (Vec<usize>, Vec<&LikeEvent>) = batch
        .iter()
        .enumerate()
        .filter_map(|(index, request)| match request {
            Request::Append(event, _) => Some((index, event)),
            _ => None,
        })
        .unzip();
    let spilled = conn.commit(&events, spill).map_err(|e| e.to_string())?;
    Ok(spilled
        .into_iter()
        .map(|(pos, i)| (pos, indexes[i]))
        .collect())
}
