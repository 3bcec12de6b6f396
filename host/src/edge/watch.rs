//! Reload on SIGHUP and when a file changes: certificates (`tls`) and JWT keys (`auth`) are
//! replaced while the node runs, for new connections; open ones keep what they were given.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use notify::{EventKind, RecursiveMode, Watcher};

use crate::metrics::Metrics;
use crate::tasks::Tasks;

/// Calls `reload` on SIGHUP and after any change in the directories of `files` (so a swap of
/// a mounted secret's symlink counts too), 200 ms after the last one — a certificate and its
/// key are usually written one after the other — until shutdown. A reload that fails keeps
/// what it had, so a spurious one is harmless. `reload` says whether it took the new files;
/// `fanfare_reloads_total{what, result}` counts both outcomes.
pub fn spawn_reload(
    files: &[&Path],
    what: &'static str,
    tasks: &Tasks,
    metrics: Arc<Metrics>,
    reload: impl Fn() -> bool + Send + 'static,
) -> anyhow::Result<()> {
    let (changed, mut changes) = tokio::sync::mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && matches!(event.kind, EventKind::Create(_) | EventKind::Modify(_))
        {
            let _ = changed.try_send(());
        }
    })
    .with_context(|| format!("cannot watch the {what} files"))?;
    for file in files {
        let dir = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("cannot watch {}", dir.display()))?;
    }
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let shutdown = tasks.shutdown().clone();
    tasks.spawn(async move {
        let _watcher = watcher;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = hangup.recv() => {}
                Some(()) = changes.recv() => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    while changes.try_recv().is_ok() {}
                }
            }
            metrics.reloaded(what, reload());
        }
    });
    Ok(())
}

/// Takes what a reload read, or keeps the current one when it did not load: logs either way
/// and says which (for `fanfare_reloads_total`).
pub fn take_or_keep<T>(what: &str, loaded: anyhow::Result<T>, take: impl FnOnce(T)) -> bool {
    match loaded {
        Ok(value) => {
            take(value);
            tracing::info!("{what} reloaded");
            true
        }
        Err(err) => {
            tracing::error!(
                error = format!("{err:#}"),
                "{what} reload refused; keeping the current one"
            );
            false
        }
    }
}
