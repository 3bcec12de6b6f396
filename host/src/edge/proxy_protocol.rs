//! PROXY protocol v1 and v2 on the listener (`--proxy-protocol`): behind an L4 balancer every
//! connection comes from the balancer, so the client's address — for per-IP limits and logs —
//! is the one the balancer writes in front of the stream. Only balancers listed in
//! `--trusted-proxies` may say who the client is; anyone else is refused before a byte of HTTP.
//!
//! The header is read exactly (no byte of the HTTP request after it is consumed), so the
//! stream then goes to TLS or hyper unchanged; `ppp` parses and validates it.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use ppp::{HeaderResult, v1, v2};
use tokio::io::AsyncReadExt;

/// A v1 header is at most 107 bytes, CRLF included (the specification's limit).
const V1_MAX: usize = 107;
/// Both headers are at least this long ("PROXY UNKNOWN\r\n"): read before telling them apart.
const SHORTEST: usize = 15;
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Generous for HAProxy's TLVs, small enough that a header cannot hold a node's memory.
const V2_MAX_PAYLOAD: usize = 2048;

/// Who may speak the PROXY protocol to this node.
#[derive(Debug, Clone)]
pub struct ProxyProtocol {
    trusted: Vec<IpNet>,
}

/// Why a connection was closed before its HTTP request.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("connection from {0}, which is not in --trusted-proxies")]
    Untrusted(IpAddr),
    #[error("no valid PROXY protocol header: {0}")]
    BadHeader(String),
    #[error("PROXY protocol header not sent in time")]
    Timeout,
    #[error("connection closed while reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

impl ProxyError {
    /// The label of `fanfare_proxy_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::Untrusted(_) => "untrusted",
            ProxyError::BadHeader(_) => "bad_header",
            ProxyError::Timeout => "timeout",
            ProxyError::Io(_) => "io",
        }
    }
}

impl ProxyProtocol {
    pub fn new(trusted: Vec<IpNet>) -> ProxyProtocol {
        ProxyProtocol { trusted }
    }

    pub fn trusts(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.trusted.iter().any(|net| net.contains(&peer))
    }

    /// Reads the header a trusted proxy sent first and returns the client's address: the
    /// proxy's own for a `LOCAL` (v2) or `UNKNOWN` (v1) header, e.g. its health checks.
    pub async fn accept<S>(
        &self,
        stream: &mut S,
        peer: SocketAddr,
        deadline: Duration,
    ) -> Result<SocketAddr, ProxyError>
    where
        S: tokio::io::AsyncRead + Unpin,
    {
        if !self.trusts(peer.ip()) {
            return Err(ProxyError::Untrusted(peer.ip()));
        }
        let header = tokio::time::timeout(deadline, read_header(stream))
            .await
            .map_err(|_| ProxyError::Timeout)??;
        Ok(client_address(&header)?.unwrap_or(peer))
    }
}

/// Exactly the header's bytes, however the proxy split them into segments.
async fn read_header<S>(stream: &mut S) -> Result<Vec<u8>, ProxyError>
where
    S: tokio::io::AsyncRead + Unpin,
{
    let mut header = vec![0u8; SHORTEST];
    stream.read_exact(&mut header).await?;
    if header.starts_with(V2_SIGNATURE) {
        // 12 signature, version/command, family, 2 bytes of payload length: then the payload.
        header.resize(16, 0);
        stream.read_exact(&mut header[SHORTEST..]).await?;
        let payload = usize::from(u16::from_be_bytes([header[14], header[15]]));
        if payload > V2_MAX_PAYLOAD {
            return Err(ProxyError::BadHeader(format!(
                "v2 payload of {payload} bytes (at most {V2_MAX_PAYLOAD})"
            )));
        }
        header.resize(16 + payload, 0);
        stream.read_exact(&mut header[16..]).await?;
        return Ok(header);
    }
    if !header.starts_with(b"PROXY ") {
        return Err(ProxyError::BadHeader(
            "the stream starts with neither a v1 nor a v2 header".to_owned(),
        ));
    }
    // v1: a line; read a byte at a time so nothing after its CRLF is taken (once per
    // connection, ≤ 92 reads).
    while !header.ends_with(b"\r\n") {
        if header.len() >= V1_MAX {
            return Err(ProxyError::BadHeader(format!(
                "v1 header longer than {V1_MAX} bytes"
            )));
        }
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await?;
        header.push(byte[0]);
    }
    Ok(header)
}

/// The source address a complete header carries (`None`: the proxy speaks for itself).
fn client_address(header: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    let bad = |err: &dyn std::fmt::Display| ProxyError::BadHeader(err.to_string());
    match HeaderResult::parse(header) {
        HeaderResult::V1(Ok(header)) => Ok(match header.addresses {
            v1::Addresses::Tcp4(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
            v1::Addresses::Tcp6(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
            v1::Addresses::Unknown => None,
        }),
        HeaderResult::V2(Ok(header)) => {
            if header.command == v2::Command::Local {
                return Ok(None);
            }
            Ok(match header.addresses {
                v2::Addresses::IPv4(a) => {
                    Some(SocketAddr::new(a.source_address.into(), a.source_port))
                }
                v2::Addresses::IPv6(a) => {
                    Some(SocketAddr::new(a.source_address.into(), a.source_port))
                }
                v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
            })
        }
        HeaderResult::V1(Err(err)) => Err(bad(&err)),
        HeaderResult::V2(Err(err)) => Err(bad(&err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted() -> ProxyProtocol {
        ProxyProtocol::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ])
    }

    fn proxy() -> SocketAddr {
        "127.0.0.1:5000".parse().unwrap()
    }

    async fn accept(bytes: &[u8]) -> (Result<SocketAddr, ProxyError>, Vec<u8>) {
        let mut stream = bytes;
        let result = trusted()
            .accept(&mut stream, proxy(), Duration::from_secs(1))
            .await;
        (result, stream.to_vec())
    }

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut header = V2_SIGNATURE.to_vec();
        header.push(0x20 | command);
        header.push(family);
        header.extend((addresses.len() as u16).to_be_bytes());
        header.extend(addresses);
        header
    }

    #[tokio::test]
    async fn a_v1_header_names_the_client_and_leaves_the_request() {
        let (client, rest) =
            accept(b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 8080\r\nGET / HTTP/1.1\r\n").await;
        assert_eq!(client.unwrap(), "203.0.113.7:40000".parse().unwrap());
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
        let (client, _) = accept(b"PROXY TCP6 2001:db8::1 ::1 40000 8080\r\n").await;
        assert_eq!(client.unwrap(), "[2001:db8::1]:40000".parse().unwrap());
        let (client, rest) = accept(b"PROXY UNKNOWN\r\nGET").await;
        assert_eq!(client.unwrap(), proxy(), "the proxy speaks for itself");
        assert_eq!(rest, b"GET");
    }

    #[tokio::test]
    async fn a_v2_header_names_the_client_and_leaves_the_request() {
        let mut bytes = v2(
            1,
            0x11,
            &[198, 51, 100, 9, 127, 0, 0, 1, 0x9c, 0x40, 0x1f, 0x90],
        );
        bytes.extend(b"GET /");
        let (client, rest) = accept(&bytes).await;
        assert_eq!(client.unwrap(), "198.51.100.9:40000".parse().unwrap());
        assert_eq!(rest, b"GET /");
        // LOCAL: a health check from the proxy itself.
        let (client, _) = accept(&v2(0, 0x00, &[])).await;
        assert_eq!(client.unwrap(), proxy());
    }

    #[tokio::test]
    async fn untrusted_peers_and_bad_headers_are_refused() {
        let mut stream: &[u8] = b"PROXY TCP4 1.2.3.4 127.0.0.1 1 2\r\n";
        let stranger: SocketAddr = "10.9.9.9:1234".parse().unwrap();
        let refused = trusted()
            .accept(&mut stream, stranger, Duration::from_secs(1))
            .await;
        assert!(
            matches!(refused, Err(ProxyError::Untrusted(_))),
            "{refused:?}"
        );
        for bad in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"PROXY TCP4 999.1.1.1 127.0.0.1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 127.0.0.1 1 2 and much more text that never ends with a line \
              break at all, longer than any v1 header may be",
        ] {
            let (result, _) = accept(bad).await;
            assert!(
                matches!(result, Err(ProxyError::BadHeader(_))),
                "{:?}: {result:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let (result, _) = accept(&v2(1, 0x11, &[0; 4000])).await;
        assert!(
            matches!(result, Err(ProxyError::BadHeader(_))),
            "{result:?}"
        );
        let (result, _) = accept(b"PROXY TCP4 1.2.3.4").await;
        assert!(
            matches!(result, Err(ProxyError::Io(_))),
            "cut short: {result:?}"
        );
    }

    #[test]
    fn ipv4_mapped_peers_match_ipv4_networks() {
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(trusted().trusts(mapped));
        assert!(!trusted().trusts("192.0.2.1".parse().unwrap()));
    }
}
