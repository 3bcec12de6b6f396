//! Background tasks of one process, and the one shutdown signal they all listen to.
//!
//! Every long-lived task (Redis link, bus, reconciler, watchers, metrics listener) and every
//! short one (a broadcast window's timer) is spawned here, so shutdown can cancel the signal
//! and then wait until each has really finished, as in mini-redis.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Runs `task` in the background; shutdown waits for it.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task);
    }

    /// The shutdown signal: loops select on `cancelled()` and return.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Signals shutdown to every task.
    pub fn cancel(&self) {
        self.shutdown.cancel();
    }

    /// Waits (at most `patience`) for every task to finish; false if some did not. New tasks
    /// cannot be spawned afterwards.
    pub async fn wait(&self, patience: Duration) -> bool {
        self.tracker.close();
        tokio::time::timeout(patience, self.tracker.wait())
            .await
            .is_ok()
    }

    /// Tasks still running (for logs at shutdown).
    pub fn running(&self) -> usize {
        self.tracker.len()
    }
}
