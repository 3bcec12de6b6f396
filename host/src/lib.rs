//! Fanfare node as a library: the binary in `main.rs` wires it to a process, and benches and
//! tools reuse the same parts.

pub mod archive;
pub mod auth;
pub mod config;
pub mod consumer_watch;
pub mod event_log;
pub mod fanout;
pub mod farm;
pub mod history;
pub mod ledger;
pub mod like;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod outbox;
pub mod plugins;
pub mod protocol;
pub mod registry;
pub mod server;
pub mod session;
pub mod sharded;
pub mod store;
pub mod tls;
pub mod toml_text;
pub mod worker;
