//! One configuration struct, filled from flags, `FANFARE_*` environment variables and an
//! optional TOML file, in that order of precedence (flag wins, then env, then file, then default).
//!
//! The TOML file is merged by turning each of its keys into a flag and letting clap parse
//! again, so a value from the file is validated exactly like the same value given as a flag.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};

use fanfare_protocol::toml_text::toml_text;

/// Fanfare: realtime likes for music tracks over WebSocket.
///
/// With no services configured the node runs everything itself: likes are stored in an
/// embedded SQLite database under --data-dir and broadcast to the track's listeners.
#[derive(Debug, Clone, Parser)]
#[command(name = "fanfare", version, about, long_about = None)]
pub struct Config {
    /// Optional TOML file with any of the options below (keys as the long flag names).
    #[arg(long, env = "FANFARE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to serve HTTP and WebSocket on.
    #[arg(
        long,
        env = "FANFARE_LISTEN",
        default_value = "127.0.0.1:8080",
        value_name = "ADDR:PORT"
    )]
    pub listen: SocketAddr,

    /// Directory holding the embedded SQLite store; created if missing.
    #[arg(
        long,
        env = "FANFARE_DATA_DIR",
        default_value = "./data",
        value_name = "DIR"
    )]
    pub data_dir: PathBuf,

    /// Plugin manifest (TOML) naming the WebAssembly component for each slot; changes to files
    /// next to it, SIGHUP and `POST /admin/plugins/reload` reload it. Without it every slot
    /// uses built-in behaviour.
    #[arg(long, env = "FANFARE_PLUGINS", value_name = "FILE")]
    pub plugins: Option<PathBuf>,

    /// Kafka, Redis, MongoDB, metrics address and log filter: defined once, shared with the worker.
    #[command(flatten)]
    pub shared: SharedArgs,

    /// How long an ack waits for Kafka before it is given from the local spill.
    #[arg(
        long,
        env = "FANFARE_KAFKA_ACK_TIMEOUT",
        default_value_t = 250,
        value_name = "MS"
    )]
    pub kafka_ack_timeout: u64,

    /// Idempotent Kafka producer (the default). `false` trades Kafka-side dedupe of retries for
    /// one request in flight (order kept); duplicates from retries are then dropped by event id
    /// downstream. For brokers whose idempotence breaks on recovery (tansu 0.6, docs/events.md).
    #[arg(
        long,
        env = "FANFARE_KAFKA_IDEMPOTENCE",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    pub kafka_idempotence: bool,

    /// Likes the local spill holds while Kafka is away; beyond it likes get `overloaded`.
    #[arg(
        long,
        env = "FANFARE_SPILL_MAX_EVENTS",
        default_value_t = 2_000_000,
        value_name = "N"
    )]
    pub spill_max_events: u64,

    /// Farm mode: the most this node's wall clock may differ from Redis' (`TIME`, checked every
    /// 500 ms, exported as `fanfare_clock_skew_ms`) before `/readyz` says not ready. A pair's
    /// actions are ordered by Redis whatever the skew; the clock still places events in
    /// history minutes and orders what a node decided while Redis was away.
    #[arg(
        long,
        env = "FANFARE_MAX_CLOCK_SKEW",
        default_value_t = 1_000,
        value_name = "MS"
    )]
    pub max_clock_skew: u64,

    /// Testing only: shifts this node's wall clock (clock-skew tests).
    #[arg(long, hide = true, allow_hyphen_values = true, default_value_t = 0)]
    pub test_clock_offset_ms: i64,

    /// Testing only: holds every SQLite commit this long (a node killed between deciding a
    /// like and storing it, on purpose).
    #[arg(long, hide = true, default_value_t = 0)]
    pub test_commit_delay_ms: u64,

    /// Name of this node in events and logs (default: a random id per start).
    #[arg(long, env = "FANFARE_NODE_ID", value_name = "NAME")]
    pub node_id: Option<String>,

    /// Close a connection that sent nothing (no frame, no ping) for this long.
    #[arg(
        long,
        env = "FANFARE_HEARTBEAT_TIMEOUT",
        default_value_t = 75_000,
        value_name = "MS"
    )]
    pub heartbeat_timeout: u64,

    /// Ping interval announced to clients in `welcome`; must be below the heartbeat timeout.
    #[arg(
        long,
        env = "FANFARE_HEARTBEAT_INTERVAL",
        default_value_t = 30_000,
        value_name = "MS"
    )]
    pub heartbeat_interval: u64,

    /// Longest time likes on a track are summed before one update goes out (for the largest
    /// audiences; small audiences get a few ms). At most 150 so delivery stays under 200 ms.
    #[arg(
        long,
        env = "FANFARE_BROADCAST_WINDOW",
        default_value_t = 50,
        value_name = "MS"
    )]
    pub broadcast_window: u64,

    /// Largest inbound WebSocket message; bigger ones close the connection with code 1009.
    #[arg(
        long,
        env = "FANFARE_MAX_FRAME_BYTES",
        default_value_t = 4096,
        value_name = "BYTES"
    )]
    pub max_frame_bytes: usize,

    /// Unsent updates a connection may hold beyond one per subscribed track and its listener
    /// count (a newer update of a track always replaces its unsent one); past it, 1013.
    #[arg(
        long,
        env = "FANFARE_OUTBOUND_QUEUE",
        default_value_t = 64,
        value_name = "FRAMES"
    )]
    pub outbound_queue: usize,

    /// A connection whose socket accepts no bytes for this long is dropped as a slow consumer.
    #[arg(
        long,
        env = "FANFARE_SLOW_CONSUMER_TIMEOUT",
        default_value_t = 10_000,
        value_name = "MS"
    )]
    pub slow_consumer_timeout: u64,

    /// Tracks one connection may subscribe to at once.
    #[arg(
        long,
        env = "FANFARE_MAX_SUBSCRIPTIONS",
        default_value_t = 1000,
        value_name = "N"
    )]
    pub max_subscriptions: usize,

    /// Likes one connection may have waiting for their ack; reading pauses beyond this.
    #[arg(
        long,
        env = "FANFARE_MAX_INFLIGHT",
        default_value_t = 64,
        value_name = "N"
    )]
    pub max_inflight: usize,

    /// How long shutdown waits for connections to finish their in-flight likes.
    #[arg(
        long,
        env = "FANFARE_SHUTDOWN_TIMEOUT",
        default_value_t = 10_000,
        value_name = "MS"
    )]
    pub shutdown_timeout: u64,

    /// TLS certificate chain (PEM): the port then serves wss:// and https://.
    #[arg(
        long,
        env = "FANFARE_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM) for --tls-cert.
    #[arg(
        long,
        env = "FANFARE_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// How clients prove who they are: `dev` trusts `?user=` (the default, allowed only on a
    /// loopback listener outside farm mode), `jwt` requires a signed token whose `sub` is the
    /// user.
    #[arg(long, env = "FANFARE_AUTH", value_enum, default_value_t = AuthMode::Dev)]
    pub auth: AuthMode,

    /// Allow `--auth dev` where anyone who reaches the node can act as any user (a farm, or a
    /// listener other than loopback): for demos and tests only.
    #[arg(long, env = "FANFARE_INSECURE_DEV_AUTH")]
    pub insecure_dev_auth: bool,

    /// HS256 secret for `--auth jwt` (at least 32 bytes).
    #[arg(
        long,
        env = "FANFARE_JWT_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,

    /// RS256/ES256 public key (PEM) or JWKS file for `--auth jwt`.
    #[arg(long, env = "FANFARE_JWT_KEY", value_name = "FILE")]
    pub jwt_key: Option<PathBuf>,

    /// Audiences a token's `aud` must name (comma-separated); empty: tokens carrying an `aud`
    /// are refused, as RFC 7519 says for a service that names none.
    #[arg(
        long,
        env = "FANFARE_JWT_AUDIENCE",
        value_delimiter = ',',
        value_name = "AUD,…"
    )]
    pub jwt_audience: Vec<String>,

    /// Issuers a token's `iss` must be one of (comma-separated); empty: any issuer.
    #[arg(
        long,
        env = "FANFARE_JWT_ISSUER",
        value_delimiter = ',',
        value_name = "ISS,…"
    )]
    pub jwt_issuer: Vec<String>,

    /// Clock skew tolerated on a token's `exp` and `nbf`, in seconds; a session ends this long
    /// after its token's `exp` unless the client sent a newer token (`refresh`).
    #[arg(
        long,
        env = "FANFARE_JWT_LEEWAY",
        default_value_t = 30,
        value_name = "SECONDS"
    )]
    pub jwt_leeway: u64,

    /// Bearer token for `/admin/*`; without it admin endpoints answer this machine's own tools
    /// only (loopback, no `Origin`, not behind --proxy-protocol).
    #[arg(
        long,
        env = "FANFARE_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,

    /// Serve `/admin/*` on this address only (the public port then answers 404 there); without
    /// `--admin-token` it must be a loopback address.
    #[arg(long, env = "FANFARE_ADMIN_LISTEN", value_name = "ADDR:PORT")]
    pub admin_listen: Option<SocketAddr>,

    /// Browser origins allowed to upgrade (comma-separated); empty allows any. Requests
    /// without an Origin header (non-browser clients) are not affected.
    #[arg(
        long,
        env = "FANFARE_ALLOWED_ORIGINS",
        value_delimiter = ',',
        value_name = "ORIGINS"
    )]
    pub allowed_origins: Vec<String>,

    #[command(flatten)]
    pub limits: limits::Limits,

    /// Every connection starts with a PROXY protocol (v1 or v2) header naming the client, as
    /// HAProxy's `send-proxy-v2` writes it: per-IP limits and logs then see the client, not the
    /// balancer. Needs --trusted-proxies; connections from anywhere else are refused.
    #[arg(long, env = "FANFARE_PROXY_PROTOCOL", requires = "trusted_proxies")]
    pub proxy_protocol: bool,

    /// Addresses allowed to send PROXY headers, as networks (comma-separated CIDR, e.g.
    /// `10.0.0.0/24,127.0.0.1/32`).
    #[arg(
        long,
        env = "FANFARE_TRUSTED_PROXIES",
        value_delimiter = ',',
        value_name = "CIDR,…",
        value_parser = parse::network,
        requires = "proxy_protocol"
    )]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// Time for a client to send its HTTP request headers (slowloris guard).
    #[arg(
        long,
        env = "FANFARE_HANDSHAKE_TIMEOUT",
        default_value_t = 10_000,
        value_name = "MS"
    )]
    pub handshake_timeout: u64,

    /// On SIGTERM, connections are closed spread over this period, each told when to reconnect.
    #[arg(
        long,
        env = "FANFARE_DRAIN_PERIOD",
        default_value_t = 10_000,
        value_name = "MS"
    )]
    pub drain_period: u64,

    /// Log output format.
    #[arg(long, env = "FANFARE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Options the node (`fanfare`) and the worker (`fanfare worker`) share: one definition,
/// flattened into both.
#[derive(Debug, Clone, clap::Args)]
pub struct SharedArgs {
    /// Kafka brokers (`host:port[,host:port…]`). A node with it sends every accepted like to the
    /// topic before its ack (the durable pipeline); a worker consumes the topic (required by
    /// `fanfare worker`).
    #[arg(long, env = "FANFARE_KAFKA", value_name = "BROKERS")]
    pub kafka: Option<String>,

    /// A librdkafka setting for every Kafka client, `key=value`, repeatable: security
    /// (`security.protocol=SASL_SSL`, `sasl.mechanism=SCRAM-SHA-512`, `sasl.username=…`,
    /// `sasl.password=…`, `ssl.ca.location=…`) or tuning. Settings Fanfare's guarantees rest
    /// on (acks, idempotence, offset commits, brokers, group) are refused.
    #[arg(long = "kafka-option", value_name = "KEY=VALUE", value_parser = parse::kafka_option)]
    pub kafka_options: Vec<(String, String)>,

    /// Kafka topic of like events.
    #[arg(
        long,
        env = "FANFARE_KAFKA_TOPIC",
        default_value = "fanfare.likes",
        value_name = "NAME"
    )]
    pub kafka_topic: String,

    /// Redis shared by the farm, `redis://[user:password@]host:port`, `rediss://…` (TLS) or
    /// `redis+sentinel://[user:password@]host:port[,host:port…]/master-name` (ACL users work). A node with it is in farm mode
    /// (without it, alone); a worker with it writes stored counts back where live counts drifted.
    #[arg(
        long,
        env = "FANFARE_REDIS",
        value_name = "URL",
        hide_env_values = true
    )]
    pub redis: Option<String>,

    /// Certificate authorities (PEM) a `rediss://` Redis must present a certificate from;
    /// without it the system's roots are used.
    #[arg(long, env = "FANFARE_REDIS_CA", value_name = "FILE")]
    pub redis_ca: Option<PathBuf>,

    /// MongoDB (`mongodb://…`): workers store every like there (required by `fanfare worker`),
    /// nodes serve track history from it.
    #[arg(long, env = "FANFARE_MONGO", value_name = "URL")]
    pub mongo: Option<String>,

    /// MongoDB database name.
    #[arg(
        long,
        env = "FANFARE_MONGO_DATABASE",
        default_value = "fanfare",
        value_name = "NAME"
    )]
    pub mongo_database: String,

    /// Serve `/metrics` on this separate address (a node otherwise serves it on its public port).
    #[arg(long, env = "FANFARE_METRICS_LISTEN", value_name = "ADDR:PORT")]
    pub metrics_listen: Option<SocketAddr>,

    /// Log filter in tracing-subscriber's EnvFilter syntax (RUST_LOG also works).
    #[arg(
        long,
        env = "FANFARE_LOG",
        default_value = "info",
        value_name = "FILTER"
    )]
    pub log: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    Dev,
    Jwt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// Parses the process arguments, merging in the TOML file if one is named.
    pub fn load() -> anyhow::Result<Config> {
        Self::load_from(std::env::args_os())
    }

    pub fn load_from(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<Config> {
        let args: Vec<OsString> = args.into_iter().collect();
        let matches = Config::command().try_get_matches_from(args.clone())?;
        let config = Config::from_arg_matches(&matches)?;
        let Some(path) = config.config.clone() else {
            return config.validated();
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let table: toml::Table =
            toml::from_str(&text).with_context(|| format!("invalid TOML in {}", path.display()))?;

        let mut merged = vec![args.first().cloned().unwrap_or_else(|| "fanfare".into())];
        for (key, value) in &table {
            let id = key.replace('-', "_");
            if id == "config"
                || !Config::command()
                    .get_arguments()
                    .any(|a| a.get_id() == id.as_str())
            {
                bail!("unknown option `{key}` in {}", path.display());
            }
            let explicit = matches!(
                matches.value_source(&id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            );
            if !explicit {
                let Some(value) = toml_text(value) else {
                    bail!(
                        "option `{key}` in {} must be a string, number or list",
                        path.display()
                    );
                };
                merged.push(format!("--{}={value}", id.replace('_', "-")).into());
            }
        }
        merged.extend(args.into_iter().skip(1));
        let matches = Config::command()
            .try_get_matches_from(merged)
            .with_context(|| format!("in config file {}", path.display()))?;
        Config::from_arg_matches(&matches)?.validated()
    }

    fn validated(self) -> anyhow::Result<Config> {
        if self.heartbeat_timeout == 0 || self.heartbeat_interval == 0 {
            bail!("--heartbeat-timeout and --heartbeat-interval must be positive");
        }
        if self.heartbeat_interval >= self.heartbeat_timeout {
            bail!(
                "--heartbeat-interval ({} ms) must be below --heartbeat-timeout ({} ms)",
                self.heartbeat_interval,
                self.heartbeat_timeout
            );
        }
        if self.broadcast_window > 150 {
            bail!("--broadcast-window must be at most 150 ms (delivery promise is 200 ms)");
        }
        if !(64..=1 << 20).contains(&self.max_frame_bytes) {
            bail!("--max-frame-bytes must be between 64 and 1048576");
        }
        if self.outbound_queue < 4 || self.max_inflight == 0 || self.max_subscriptions == 0 {
            bail!(
                "--outbound-queue must be at least 4, --max-inflight and --max-subscriptions at least 1"
            );
        }
        if self.shared.kafka_topic.is_empty()
            || self.kafka_ack_timeout == 0
            || self.spill_max_events == 0
        {
            bail!(
                "--kafka-topic must not be empty; --kafka-ack-timeout and --spill-max-events must be positive"
            );
        }
        if let Some(node) = &self.node_id
            && !fanfare_protocol::is_valid_user(node)
        {
            bail!("--node-id must match [A-Za-z0-9_.-]{{1,64}}");
        }
        if let Some(admin) = self.admin_listen
            && !admin.ip().is_loopback()
            && self.admin_token.is_none()
        {
            bail!("--admin-listen {admin} is not a loopback address: it needs --admin-token");
        }
        self.check_dev_auth()?;
        Ok(self)
    }

    /// `--auth dev` lets a client pick its user with `?user=`: harmless on a node only its own
    /// machine reaches, not in a farm (a load balancer in front) or on another address.
    fn check_dev_auth(&self) -> anyhow::Result<()> {
        if self.auth != AuthMode::Dev || self.insecure_dev_auth {
            return Ok(());
        }
        let exposed = if self.shared.redis.is_some() {
            Some("in farm mode (--redis)")
        } else if !self.listen.ip().is_loopback() {
            Some("on a listener other than loopback")
        } else if self.proxy_protocol {
            Some("behind a balancer (--proxy-protocol)")
        } else {
            None
        };
        if let Some(where_) = exposed {
            bail!(
                "--auth dev (the default) lets every client choose its user with ?user= and is \
                 refused {where_} ({}): use --auth jwt with --jwt-secret or --jwt-key, or \
                 --insecure-dev-auth for a demo",
                self.listen
            );
        }
        Ok(())
    }

    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat_timeout)
    }

    pub fn broadcast_window(&self) -> Duration {
        Duration::from_millis(self.broadcast_window)
    }

    pub fn slow_consumer_timeout(&self) -> Duration {
        Duration::from_millis(self.slow_consumer_timeout)
    }

    pub fn drain_period(&self) -> Duration {
        Duration::from_millis(self.drain_period)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout.max(100))
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout)
    }

    pub fn kafka_settings(&self) -> Option<crate::seams::event_log::KafkaSettings> {
        self.shared
            .kafka
            .as_ref()
            .map(|brokers| crate::seams::event_log::KafkaSettings {
                brokers: brokers.clone(),
                topic: self.shared.kafka_topic.clone(),
                ack_timeout: Duration::from_millis(self.kafka_ack_timeout),
                spill_max_events: self.spill_max_events,
                idempotence: self.kafka_idempotence,
                options: self.shared.kafka_options.clone(),
            })
    }
}

pub mod limits;
mod parse;

#[cfg(test)]
mod tests;
