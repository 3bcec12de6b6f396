//! `fanfare`: parse the configuration, open the store, serve until a signal, shut down in order.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use fanfare::config::{Config, LogFormat};
use fanfare::edge::server::{self, Edge};
use fanfare::node::Node;
use fanfare::tasks::Tasks;
use fanfare::{compose, plugins, worker};

/// How long shutdown waits for background tasks after the parts closed.
const TASKS_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

fn main() -> ExitCode {
    // `fanfare worker …` is the persistence worker; everything else configures a node.
    if std::env::args_os().nth(1).is_some_and(|a| a == "worker") {
        return worker_main();
    }
    if std::env::args_os().nth(1).is_some_and(|a| a == "plugin") {
        return plugin_main();
    }
    let config = match Config::load() {
        Ok(config) => config,
        Err(err) => {
            if let Some(clap_err) = err.downcast_ref::<clap::Error>() {
                clap_err.exit();
            }
            eprintln!("fanfare: {err:#}");
            return ExitCode::from(2);
        }
    };
    let log = init_tracing(&config.shared.log, config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("fanfare: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, log)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("fanfare: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `fanfare plugin sign|public-key …`: signing components for the manifest.
fn plugin_main() -> ExitCode {
    use clap::Parser;
    let args = std::iter::once("fanfare plugin".into()).chain(std::env::args_os().skip(2));
    let command = match plugins::signing::PluginCommand::try_parse_from(args) {
        Ok(command) => command,
        Err(err) => err.exit(),
    };
    match plugins::signing::run(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("fanfare plugin: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn worker_main() -> ExitCode {
    use clap::Parser;
    // `fanfare worker …` → parse `…` under the name `fanfare worker` (usage lines say so).
    let args = std::iter::once("fanfare worker".into()).chain(std::env::args_os().skip(2));
    let config = match worker::WorkerConfig::try_parse_from(args)
        .map_err(anyhow::Error::from)
        .and_then(worker::WorkerConfig::validated)
    {
        Ok(config) => config,
        Err(err) => {
            if let Some(clap_err) = err.downcast_ref::<clap::Error>() {
                clap_err.exit();
            }
            eprintln!("fanfare worker: {err:#}");
            return ExitCode::from(2);
        }
    };
    let _log = init_tracing(&config.shared.log, LogFormat::Text);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("fanfare worker: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let tasks = Tasks::new();
    let result = runtime.block_on(async {
        tasks.spawn(cancel_on_signal(tasks.clone()));
        // Registered before anything is served, so no SIGHUP finds the default action.
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(hangup) => tasks.spawn(ignore_hangups(hangup, tasks.clone())),
            Err(err) => tracing::error!(error = %err, "cannot watch SIGHUP"),
        }
        let result = worker::run(config, &tasks).await;
        tasks.cancel();
        if !tasks.wait(TASKS_PATIENCE).await {
            tracing::warn!(
                running = tasks.running(),
                "some worker tasks did not finish in time"
            );
        }
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("fanfare worker: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The log filter can be replaced while the node runs (SIGHUP re-reads `--log`).
type LogFilter = tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// `RUST_LOG` if set, else `log`.
fn log_filter(log: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(log))
        .map_err(|err| format!("invalid log filter `{log}`: {err}"))
}

fn init_tracing(log: &str, format: LogFormat) -> LogFilter {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = log_filter(log).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => registry.with(layer).init(),
        LogFormat::Json => registry.with(layer.json()).init(),
    }
    handle
}

/// On SIGHUP: reads the configuration again (the `--config` file's values; flags and
/// environment stay those of the start) and applies what can change while the node runs —
/// limits, rates, allowed origins, the log filter. A file that does not load, or a filter
/// that does not parse, changes nothing (`fanfare_reloads_total{what="config"}`).
fn spawn_config_reload(edge: Arc<Edge>, log: LogFilter, node: &Node) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    let shutdown = node.tasks.shutdown().clone();
    let metrics = node.metrics.clone();
    node.tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = hangup.recv() => {}
            }
            let applied = Config::load()
                .map_err(|err| format!("{err:#}"))
                .and_then(|config| Ok((log_filter(&config.shared.log)?, config)))
                .and_then(|(filter, config)| {
                    log.reload(filter).map_err(|err| err.to_string())?;
                    edge.apply(&config);
                    Ok(())
                });
            match &applied {
                Ok(()) => {
                    tracing::info!("configuration reloaded: limits, allowed origins, log filter")
                }
                Err(err) => {
                    tracing::error!(error = %err, "configuration reload refused; nothing changed")
                }
            }
            metrics.reloaded("config", applied.is_ok());
        }
    });
    Ok(())
}

async fn run(config: Config, log: LogFilter) -> anyhow::Result<()> {
    let listen = config.listen;
    let edge = Edge::new(&config)?;
    let node = compose::node(config).await?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let local = listener.local_addr().unwrap_or(listen);
    tracing::info!(node = %node.id, listen = %local, data_dir = %node.config.data_dir.display(), "fanfare node serving");
    let scheme = if edge.tls.is_some() { "https" } else { "http" };
    if let Some(addr) = node.config.shared.metrics_listen {
        let metrics_listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for metrics on {addr}"))?;
        tracing::info!(listen = %addr, "metrics served on their own address");
        let metrics = node.metrics.clone();
        fanfare::metrics::http::spawn(
            Arc::new(move || metrics.render()),
            metrics_listener,
            &node.tasks,
        );
    }
    let mut admin_local = None;
    if let Some(addr) = node.config.admin_listen {
        let admin_listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for admin on {addr}"))?;
        let local = admin_listener.local_addr().unwrap_or(addr);
        tracing::info!(listen = %local, "admin served on its own address");
        admin_local = Some(local);
        node.tasks.spawn(server::serve(
            node.clone(),
            edge.admin_only(),
            admin_listener,
        ));
    }
    node.tasks.spawn(cancel_on_signal(node.tasks.clone()));
    plugins::reload::spawn_triggers(node.plugins.clone(), &node.tasks)?;
    if let Some(tls) = &edge.tls {
        tls.spawn_watch(&node.tasks, node.metrics.clone())?;
    }
    edge.auth.spawn_watch(&node.tasks, node.metrics.clone())?;
    spawn_config_reload(edge.clone(), log, &node)?;
    // One machine-readable line on stdout, so scripts and tests can use `--listen 127.0.0.1:0`;
    // written once every listener is bound and every signal is handled, so whoever waits for
    // it may use any of them (and send SIGHUP) at once.
    if let Some(admin) = admin_local {
        println!("fanfare admin on {scheme}://{admin}");
    }
    println!("fanfare listening on {scheme}://{local}");
    server::serve(node.clone(), edge, listener).await;
    shutdown(node).await
}

/// Cancels the shutdown signal on SIGTERM or SIGINT (or returns with it).
async fn cancel_on_signal(tasks: Tasks) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::error!(error = %err, "cannot watch SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = tasks.shutdown().cancelled() => return,
    }
    tasks.cancel();
}

/// The worker's settings are all flags and environment, fixed at start: SIGHUP (sent to
/// every fanfare process by a config roll-out, say) is logged and changes nothing, instead of
/// ending the process as its default action would.
async fn ignore_hangups(mut hangup: tokio::signal::unix::Signal, tasks: Tasks) {
    loop {
        tokio::select! {
            _ = hangup.recv() => tracing::info!("SIGHUP: the worker has nothing to reload (its settings are flags); going on"),
            _ = tasks.shutdown().cancelled() => return,
        }
    }
}

/// Sessions first (each closes at its moment within the drain period with 1001, after
/// finishing its in-flight likes), then every part (the event log flushes first), then the
/// background tasks.
async fn shutdown(node: Arc<Node>) -> anyhow::Result<()> {
    node.sessions.close();
    let grace = node.config.drain_period()
        + node.config.shutdown_timeout()
        + std::time::Duration::from_secs(3);
    if tokio::time::timeout(grace, node.sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!("some sessions did not finish in time");
    }
    let closed = node.close_parts().await;
    if !node.tasks.wait(TASKS_PATIENCE).await {
        tracing::warn!(
            running = node.tasks.running(),
            "some background tasks did not finish in time"
        );
    }
    closed?;
    tracing::info!("shutdown complete");
    Ok(())
}
