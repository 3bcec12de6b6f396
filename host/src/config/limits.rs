//! The connection and rate limits (`Config::limits`): what one client, user or address may
//! hold or send. See docs/operations.md, "Limits".

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct Limits {
    /// WebSocket connections this node accepts at once (beyond: HTTP 503).
    #[arg(
        long,
        env = "FANFARE_MAX_CONNECTIONS",
        default_value_t = 50_000,
        value_name = "N"
    )]
    pub max_connections: usize,

    /// WebSocket connections from one source IP at once (beyond: HTTP 429).
    #[arg(
        long,
        env = "FANFARE_MAX_CONNECTIONS_PER_IP",
        default_value_t = 1_000,
        value_name = "N"
    )]
    pub max_connections_per_ip: usize,

    /// Inbound messages per second per connection, bursts of twice that (beyond: `rate_limited`).
    #[arg(
        long,
        env = "FANFARE_MAX_MESSAGES_PER_SECOND",
        default_value_t = 50,
        value_name = "N"
    )]
    pub max_messages_per_second: u32,

    /// WebSocket connections of one user at once, across addresses (beyond: HTTP 429).
    #[arg(
        long,
        env = "FANFARE_MAX_CONNECTIONS_PER_USER",
        default_value_t = 20,
        value_name = "N"
    )]
    pub max_connections_per_user: usize,

    /// Likes and unlikes per second of one user on this node, over all their connections,
    /// bursts of twice that (beyond: `rate_limited` with `retry_after_ms`); 0: no limit.
    #[arg(
        long,
        env = "FANFARE_MAX_LIKES_PER_USER",
        default_value_t = 20,
        value_name = "PER_SECOND"
    )]
    pub max_likes_per_user: u32,

    /// HTTP reads (`/v1/tracks/…`: counts and history) per second from one client address,
    /// bursts of twice that (beyond: HTTP 429 with `Retry-After`); 0: no limit.
    #[arg(
        long,
        env = "FANFARE_MAX_HTTP_READS_PER_IP",
        default_value_t = 50,
        value_name = "PER_SECOND"
    )]
    pub max_http_reads_per_ip: u32,
}
