//! Fanfare node as a library: the binary in `main.rs` wires it to a process, and benches and
//! tools reuse the same parts.
//!
//! From the top: `compose` (the one composition root) builds a [`node::Node`] from the
//! configuration; `edge` serves sockets and HTTP and hands every like to `like` (the life of a
//! like, top to bottom); `broadcast` sums likes into updates and queues them on sockets; the
//! `seams` are the traits every outside system sits behind, each with an embedded twin;
//! `farm` implements them over Redis; `worker` is the persistence worker (Kafka → MongoDB).

pub mod broadcast;
pub mod clock;
pub mod compose;
pub mod config;
pub mod edge;
pub mod event;
pub mod farm;
pub mod like;
pub mod logs;
pub mod metrics;
pub mod node;
pub mod plugins;
pub mod seams;
pub mod store;
pub mod tasks;
pub mod worker;
