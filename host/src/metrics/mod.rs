//! Prometheus metrics of one node, exposed at `GET /metrics` in the text format.
//!
//! Handles are cheap clones around atomics, so hot paths update them without locks. `http`
//! serves any process's metrics (a node's or a worker's) on an address of their own.

pub mod http;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

type Label = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];
type HistogramFamily = Family<Label, Histogram, fn() -> Histogram>;

fn plugin_latency_histogram() -> Histogram {
    // 1 µs .. ~65 ms
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1e-6, 4.0, 9,
    ))
}

pub struct Metrics {
    registry: Registry,
    pub connections_active: Gauge,
    pub connections_opened: Counter,
    pub subscriptions_active: Gauge,
    pub tracks_with_listeners: Gauge,
    likes: Family<Label, Counter>,
    protocol_errors: Family<Label, Counter>,
    pub broadcast_lag: Histogram,
    /// Like received → its ack ready (durable), acks only.
    pub ack_latency: Histogram,
    redis_scripts: HistogramFamily,
    pub broadcast_updates: Counter,
    /// `listeners` frames built (one per track whose listener count changed, per period).
    pub listener_updates: Counter,
    pub frames_delivered: Counter,
    /// Of those, written by fan-out straight to an idle socket (no session wake-up).
    pub frames_written_directly: Counter,
    pub outbound_conflated: Counter,
    pub slow_consumer_disconnects: Counter,
    pub heartbeat_reaps: Counter,
    pub garbage_disconnects: Counter,
    plugin_calls: HistogramFamily,
    plugin_events: Family<Labels2, Counter>,
    plugin_reloads: Family<Labels2, Counter>,
    bus_events: Family<Label, Counter>,
    pub redis_up: Gauge,
    pub clock_skew_ms: Gauge,
    pub bus_channels: Gauge,
    upgrades_refused: Family<Label, Counter>,
    proxy_refused: Family<Label, Counter>,
    reloads: Family<Labels2, Counter>,
    pub messages_rate_limited: Counter,
    pub tokens_expired: Counter,
    pub http_reads_limited: Counter,
    pub kafka_up: Gauge,
    pub kafka_spill_events: Gauge,
    /// Age of the oldest like in the spill (0 when empty).
    pub kafka_spill_oldest_seconds: Gauge<f64, AtomicU64>,
    /// Requests not committed to SQLite yet (queued or in the batch being written).
    pub event_log_queue_depth: Gauge,
    /// Events the reconciler replayed into Redis (after a reconnect, failover or data loss).
    pub replay_events: Counter,
    /// Events the running replay has still to send (0 when none runs).
    pub replay_remaining: Gauge,
    durable_acks: Family<Label, Counter>,
}

/// How a like/unlike request ended, as the `outcome` label of `fanfare_likes_total`.
#[derive(Debug, Clone, Copy)]
pub enum LikeOutcome {
    Accepted,
    Duplicate,
    Resent,
    Rejected,
    RateLimited,
    Overloaded,
    Failed,
}

impl LikeOutcome {
    fn label(self) -> &'static str {
        match self {
            LikeOutcome::Accepted => "accepted",
            LikeOutcome::Duplicate => "duplicate",
            LikeOutcome::Resent => "resent",
            LikeOutcome::Rejected => "rejected",
            LikeOutcome::RateLimited => "rate_limited",
            LikeOutcome::Overloaded => "overloaded",
            LikeOutcome::Failed => "failed",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            connections_active: Gauge::default(),
            connections_opened: Counter::default(),
            subscriptions_active: Gauge::default(),
            tracks_with_listeners: Gauge::default(),
            likes: Family::default(),
            protocol_errors: Family::default(),
            // 0.5 ms .. ~1 s
            broadcast_lag: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0,
            ]),
            // 0.5 ms .. ~1 s
            ack_latency: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0,
            ]),
            redis_scripts: Family::new_with_constructor(plugin_latency_histogram),
            broadcast_updates: Counter::default(),
            listener_updates: Counter::default(),
            frames_delivered: Counter::default(),
            frames_written_directly: Counter::default(),
            outbound_conflated: Counter::default(),
            slow_consumer_disconnects: Counter::default(),
            heartbeat_reaps: Counter::default(),
            garbage_disconnects: Counter::default(),
            plugin_calls: Family::new_with_constructor(plugin_latency_histogram),
            plugin_events: Family::default(),
            plugin_reloads: Family::default(),
            bus_events: Family::default(),
            redis_up: Gauge::default(),
            clock_skew_ms: Gauge::default(),
            bus_channels: Gauge::default(),
            upgrades_refused: Family::default(),
            proxy_refused: Family::default(),
            reloads: Family::default(),
            messages_rate_limited: Counter::default(),
            tokens_expired: Counter::default(),
            http_reads_limited: Counter::default(),
            kafka_up: Gauge::default(),
            kafka_spill_events: Gauge::default(),
            kafka_spill_oldest_seconds: Gauge::default(),
            event_log_queue_depth: Gauge::default(),
            replay_events: Counter::default(),
            replay_remaining: Gauge::default(),
            durable_acks: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "fanfare_connections_active",
            "Open WebSocket connections",
            m.connections_active.clone(),
        );
        registry.register(
            "fanfare_connections_opened",
            "WebSocket connections accepted",
            m.connections_opened.clone(),
        );
        registry.register(
            "fanfare_subscriptions_active",
            "Active (connection, track) subscriptions",
            m.subscriptions_active.clone(),
        );
        registry.register(
            "fanfare_tracks_with_listeners",
            "Tracks with at least one local listener",
            m.tracks_with_listeners.clone(),
        );
        registry.register(
            "fanfare_likes",
            "Like and unlike requests by outcome",
            m.likes.clone(),
        );
        registry.register(
            "fanfare_protocol_errors",
            "Error frames sent, by code",
            m.protocol_errors.clone(),
        );
        registry.register(
            "fanfare_broadcast_lag_seconds",
            "Time from the first like of an update being accepted to the update queued on every local socket",
            m.broadcast_lag.clone(),
        );
        registry.register(
            "fanfare_ack_seconds",
            "Time from a like read off its socket to its ack (the event durable), for acks",
            m.ack_latency.clone(),
        );
        registry.register(
            "fanfare_redis_script_seconds",
            "Time of the farm ledger's Redis scripts, by script (read, merge), failures included",
            m.redis_scripts.clone(),
        );
        registry.register(
            "fanfare_broadcast_updates",
            "Per-track updates built (each serialized once)",
            m.broadcast_updates.clone(),
        );
        registry.register(
            "fanfare_listener_updates",
            "Listener-count updates built (a track whose listeners changed, at most one per track every 2 s, each serialized once)",
            m.listener_updates.clone(),
        );
        registry.register(
            "fanfare_frames_delivered",
            "Update frames queued to sockets (or written to them directly)",
            m.frames_delivered.clone(),
        );
        registry.register(
            "fanfare_frames_written_directly",
            "Update frames fan-out wrote itself to an idle plain-TCP socket, without waking its session",
            m.frames_written_directly.clone(),
        );
        registry.register(
            "fanfare_outbound_conflated",
            "Updates that replaced an unsent older update of the same track",
            m.outbound_conflated.clone(),
        );
        registry.register(
            "fanfare_slow_consumer_disconnects",
            "Connections dropped for not reading",
            m.slow_consumer_disconnects.clone(),
        );
        registry.register(
            "fanfare_heartbeat_reaps",
            "Connections closed for silence past the heartbeat timeout",
            m.heartbeat_reaps.clone(),
        );
        registry.register(
            "fanfare_garbage_disconnects",
            "Connections closed (1008) for sending repeated bad frames",
            m.garbage_disconnects.clone(),
        );
        registry.register(
            "fanfare_plugin_call_seconds",
            "Plugin call latency by slot (count = calls)",
            m.plugin_calls.clone(),
        );
        registry.register(
            "fanfare_plugin_events",
            "Plugin rejections, traps and timeouts by slot",
            m.plugin_events.clone(),
        );
        registry.register(
            "fanfare_plugin_reloads",
            "Plugin load attempts by slot and outcome (loaded, refused, unloaded)",
            m.plugin_reloads.clone(),
        );
        registry.register(
            "fanfare_bus_messages",
            "Cross-node bus messages by event (published, received, dropped, invalid)",
            m.bus_events.clone(),
        );
        registry.register(
            "fanfare_redis_up",
            "1 while the farm's Redis is reachable, 0 while degraded (farm mode only)",
            m.redis_up.clone(),
        );
        registry.register(
            "fanfare_clock_skew_ms",
            "This node's wall clock minus Redis TIME, in ms (farm mode; measured every 500 ms)",
            m.clock_skew_ms.clone(),
        );
        registry.register(
            "fanfare_bus_channels",
            "Track channels this node is subscribed to on the bus (farm mode)",
            m.bus_channels.clone(),
        );
        registry.register(
            "fanfare_upgrades_refused",
            "WebSocket upgrades refused, by reason (unauthorized, origin, node_full, ip_full, user_full, draining)",
            m.upgrades_refused.clone(),
        );
        registry.register(
            "fanfare_reloads",
            "Reloads of files on SIGHUP or change, by what (tls, jwt_keys) and result (ok, refused: the previous ones stay)",
            m.reloads.clone(),
        );
        registry.register(
            "fanfare_proxy_refused",
            "Connections closed before HTTP under --proxy-protocol, by reason (untrusted, bad_header, timeout, io)",
            m.proxy_refused.clone(),
        );
        registry.register(
            "fanfare_http_reads_limited",
            "HTTP reads refused with 429 for exceeding --max-http-reads-per-ip",
            m.http_reads_limited.clone(),
        );
        registry.register(
            "fanfare_tokens_expired",
            "Sessions closed with 4001 because their token expired without a refresh",
            m.tokens_expired.clone(),
        );
        registry.register(
            "fanfare_messages_rate_limited",
            "Inbound frames refused for exceeding --max-messages-per-second",
            m.messages_rate_limited.clone(),
        );
        registry.register(
            "fanfare_kafka_up",
            "1 while Kafka confirms likes in time, 0 while acks come from the local spill",
            m.kafka_up.clone(),
        );
        registry.register(
            "fanfare_kafka_spill_events",
            "Accepted likes stored locally and not yet confirmed by Kafka",
            m.kafka_spill_events.clone(),
        );
        registry.register(
            "fanfare_kafka_spill_oldest_seconds",
            "Age of the oldest like in the local spill not yet confirmed by Kafka (0 when it is empty)",
            m.kafka_spill_oldest_seconds.clone(),
        );
        registry.register(
            "fanfare_event_log_queue_depth",
            "Requests not committed to the local store yet: waiting for the group commit or in the batch being written (updated on every append and around every commit)",
            m.event_log_queue_depth.clone(),
        );
        registry.register(
            "fanfare_replay_events",
            "Events replayed into Redis by the farm ledger's reconciler (reconnect, failover, data loss)",
            m.replay_events.clone(),
        );
        registry.register(
            "fanfare_replay_remaining_events",
            "Events the replay into Redis has still to send (0 when none is owed; a failed one keeps its remainder until a retry succeeds)",
            m.replay_remaining.clone(),
        );
        registry.register(
            "fanfare_durable_acks",
            "Likes acked with Kafka configured, by where they were durable first (kafka: the broker confirmed in time; spill: the local spill)",
            m.durable_acks.clone(),
        );
        // Known label values start at 0, so every series exists before its first event
        // (rates and alerts work from the start; the shipped monitoring can be checked
        // against a fresh node).
        for reason in [
            "unauthorized",
            "origin",
            "node_full",
            "ip_full",
            "user_full",
            "draining",
        ] {
            let _ = m.upgrades_refused.get_or_create(&[("reason", reason)]);
        }
        for reason in ["untrusted", "bad_header", "timeout", "io"] {
            let _ = m.proxy_refused.get_or_create(&[("reason", reason)]);
        }
        for slot in ["rate_limit", "validate", "shape"] {
            let _ = m.plugin_calls.get_or_create(&[("slot", slot)]);
            for event in ["timeout", "trap"] {
                let _ = m
                    .plugin_events
                    .get_or_create(&[("slot", slot), ("event", event)]);
            }
        }
        for source in ["kafka", "spill"] {
            let _ = m.durable_acks.get_or_create(&[("source", source)]);
        }
        for script in ["read", "merge"] {
            let _ = m.redis_scripts.get_or_create(&[("script", script)]);
        }
        Metrics { registry, ..m }
    }

    pub fn like(&self, outcome: LikeOutcome) {
        self.likes
            .get_or_create(&[("outcome", outcome.label())])
            .inc();
    }

    pub fn redis_script(&self, script: &'static str, seconds: f64) {
        self.redis_scripts
            .get_or_create(&[("script", script)])
            .observe(seconds);
    }

    pub fn protocol_error(&self, code: &'static str) {
        self.protocol_errors.get_or_create(&[("code", code)]).inc();
    }

    pub fn plugin_call(&self, slot: &'static str, seconds: f64) {
        self.plugin_calls
            .get_or_create(&[("slot", slot)])
            .observe(seconds);
    }

    pub fn plugin_event(&self, slot: &'static str, event: &'static str) {
        self.plugin_events
            .get_or_create(&[("slot", slot), ("event", event)])
            .inc();
    }

    pub fn plugin_reload(&self, slot: &'static str, outcome: &'static str) {
        self.plugin_reloads
            .get_or_create(&[("slot", slot), ("outcome", outcome)])
            .inc();
    }

    pub fn durable_ack(&self, source: &'static str) {
        self.durable_acks.get_or_create(&[("source", source)]).inc();
    }

    pub fn bus_event(&self, event: &'static str) {
        self.bus_events.get_or_create(&[("event", event)]).inc();
    }

    pub fn upgrade_refused(&self, reason: &'static str) {
        self.upgrades_refused
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    pub fn reloaded(&self, what: &'static str, ok: bool) {
        let result = if ok { "ok" } else { "refused" };
        self.reloads
            .get_or_create(&[("what", what), ("result", result)])
            .inc();
    }

    pub fn proxy_refused(&self, reason: &'static str) {
        self.proxy_refused
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    pub fn render(&self) -> String {
        let mut text = String::with_capacity(4096);
        if let Err(err) = encode(&mut text, &self.registry) {
            tracing::error!(error = %err, "cannot encode metrics");
        }
        text
    }
}
