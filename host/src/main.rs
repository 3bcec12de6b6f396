//! `fanfare`: parse the configuration, open the store, serve until a signal, shut down in order.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use fanfare::config::{Config, LogFormat};
use fanfare::node::Node;
use fanfare::{plugins, server, worker};

fn main() -> ExitCode {
    // `fanfare worker …` is the persistence worker; everything else configures a node.
    if std::env::args_os().nth(1).is_some_and(|a| a == "worker") {
        return worker_main();
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
    init_tracing(&config.log, config.log_format);
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
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("fanfare: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn worker_main() -> ExitCode {
    use clap::Parser;
    let args = std::env::args_os().skip(1);
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
    init_tracing(&config.log, LogFormat::Text);
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
    let shutdown = tokio_util::sync::CancellationToken::new();
    let result = runtime.block_on(async {
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        worker::run(config, shutdown).await
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

fn init_tracing(log: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(log))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let listen = config.listen;
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(fanfare::tls::Tls::load(cert, key)?),
        _ => None,
    };
    let node = Node::start(config).await?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let local = listener.local_addr().unwrap_or(listen);
    tracing::info!(node = %node.id, listen = %local, data_dir = %node.config.data_dir.display(), "fanfare node serving");
    // One machine-readable line on stdout, so scripts and tests can use `--listen 127.0.0.1:0`.
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("fanfare listening on {scheme}://{local}");
    if let Some(addr) = node.config.metrics_listen {
        let metrics_listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for metrics on {addr}"))?;
        tracing::info!(listen = %addr, "metrics served on their own address");
        let metrics = node.metrics.clone();
        tokio::spawn(server::serve_metrics(
            Arc::new(move || metrics.render()),
            metrics_listener,
            node.shutdown.clone(),
        ));
    }
    tokio::spawn(watch_signals(node.clone()));
    plugins::reload::spawn_triggers(node.plugins.clone(), node.shutdown.clone())?;
    if let Some(tls) = &tls {
        tls.spawn_watch(node.shutdown.clone())?;
    }
    server::serve(node.clone(), listener, tls).await;
    shutdown(node).await
}

async fn watch_signals(node: Arc<Node>) {
    cancel_on_signal(node.shutdown.clone()).await;
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn cancel_on_signal(shutdown: tokio_util::sync::CancellationToken) {
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
    }
    shutdown.cancel();
}

/// Sessions first (each closes at its moment within the drain period with 1001, after
/// finishing its in-flight likes), then the event log.
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
    node.event_log
        .close()
        .await
        .context("cannot flush the event log")?;
    tracing::info!("shutdown complete");
    Ok(())
}
