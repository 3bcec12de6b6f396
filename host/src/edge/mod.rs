//! The node's edge: the listener and HTTP routes (`server`), one WebSocket connection
//! (`session`, and why it ended: `session_end`), a read-only event stream (`sse`), who a connection is (`auth`), wss/https (`tls`) and connection and message
//! limits (`limits`), the client's address from a balancer's PROXY header (`proxy_protocol`). The edge reaches the rest only through [`crate::node::Node`] and the
//! seams' traits; it never names farm, pipeline or worker code.

pub mod admin;
pub mod auth;
pub mod direct;
pub mod limits;
pub mod proxy_protocol;
pub mod respond;
pub mod server;
pub mod session;
mod session_end;
pub mod sse;
pub mod tls;
pub mod watch;
