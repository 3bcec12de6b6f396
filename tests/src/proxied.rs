//! Nodes started with `--proxy-protocol` refuse connections that do not open with a PROXY
//! header. The harness's own requests to such a node (metrics, counts, listeners) act as a
//! trusted balancer on 127.0.0.1 would: every connection to a registered address starts with a
//! v1 header naming the harness's end of it as the client.

use std::collections::HashSet;
use std::sync::{LazyLock, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

static PROXIED: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(Default::default);

/// From now on, connections to `addr` start with a PROXY header.
pub fn register(addr: &str) {
    PROXIED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(addr.to_owned());
}

pub fn is_proxied(addr: &str) -> bool {
    PROXIED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(addr)
}

/// A v1 header for a connection from `from` to `to`.
pub fn v1_header(from: std::net::SocketAddr, to: std::net::SocketAddr) -> String {
    let family = if from.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        from.ip(),
        to.ip(),
        from.port(),
        to.port()
    )
}

/// A TCP connection to `addr`, opened with a PROXY header if the node there expects one.
pub async fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr).await?;
    if is_proxied(addr) {
        let header = v1_header(stream.local_addr()?, stream.peer_addr()?);
        stream.write_all(header.as_bytes()).await?;
    }
    Ok(stream)
}
