//! A node behind an L4 balancer (`--proxy-protocol`): only the balancers in `--trusted-proxies`
//! may say who the client is, per-IP limits count clients rather than the balancer, and admin
//! needs a token there. Against the real binary and a real HAProxy with `send-proxy-v2`.

use std::time::Duration;

use fanfare_tests::services::Haproxy;
use fanfare_tests::{NodeProcess, WsClient, free_port, metric_at, proxied, wait_metric_at};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::MaybeTlsStream;

/// A TCP connection to `addr` from the local address `from` (127.0.0.x: distinct clients).
async fn connect_from(from: &str, addr: &str) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{from}:0").parse()?)?;
    Ok(socket.connect(addr.parse()?).await?)
}

/// A protocol client for `user` from the local address `from`, through `addr`: the upgrade's
/// HTTP status, and the client if it was 101.
async fn client_from(from: &str, addr: &str, user: &str) -> anyhow::Result<Result<WsClient, u16>> {
    let stream = connect_from(from, addr).await?;
    let url = format!("ws://{addr}/v1/ws?user={user}");
    match tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)).await {
        Ok((ws, _)) => Ok(Ok(WsClient::from_stream(ws).await?)),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Ok(Err(response.status().as_u16()))
        }
        Err(err) => Err(err.into()),
    }
}

/// Sends `prefix` then a GET of `path` and returns everything the node answered (empty: it
/// closed the connection without a word).
async fn answer(mut stream: TcpStream, prefix: &[u8], path: &str) -> anyhow::Result<String> {
    stream.write_all(prefix).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    // The node may close before reading the request: a refused write is part of the answer.
    let _ = stream.write_all(request.as_bytes()).await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await?;
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

/// A PROXY v2 header: `LOCAL` (no addresses) or a TCP4 `PROXY` for `client`.
fn v2_header(client: Option<([u8; 4], u16)>) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    match client {
        None => header.extend([0x20, 0x00, 0, 0]),
        Some((ip, port)) => {
            header.extend([0x21, 0x11, 0, 12]);
            header.extend(ip);
            header.extend([127, 0, 0, 1]);
            header.extend(port.to_be_bytes());
            header.extend(8080u16.to_be_bytes());
        }
    }
    header
}

#[tokio::test]
async fn behind_haproxy_limits_count_clients_not_the_balancer() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&[
        "--proxy-protocol",
        "--trusted-proxies",
        "127.0.0.1",
        "--max-connections-per-ip",
        "1",
        "--insecure-dev-auth",
    ])
    .await?;
    let balancer = Haproxy::start(std::slice::from_ref(&node.addr)).await?;

    // Two clients on two addresses, each at its limit of one connection: without the header
    // both would be the balancer's 127.0.0.1 and the second refused.
    let mut listener = client_from("127.0.0.3", &balancer.addr, "listener")
        .await?
        .map_err(|status| anyhow::anyhow!("listener refused: {status}"))?;
    listener.subscribe("behind").await?;
    let mut liker = client_from("127.0.0.4", &balancer.addr, "liker")
        .await?
        .map_err(|status| anyhow::anyhow!("liker refused: {status}"))?;
    let ack = liker.like("like", "behind", "k1").await?;
    assert_eq!(ack["type"], "ack", "{ack}");
    let update = tokio::time::timeout(
        Duration::from_secs(5),
        listener.recv_until(|f| f["type"] == "likes"),
    )
    .await??;
    assert_eq!(update["count"], 1, "{update}");

    // A second connection from the listener's address is over its limit.
    let again = client_from("127.0.0.3", &balancer.addr, "listener2").await?;
    assert!(matches!(again, Err(429)), "{:?}", again.err());
    assert_eq!(
        node.metric("fanfare_upgrades_refused_total{reason=\"ip_full\"}")
            .await?,
        1.0
    );
    // Only the listener's own address is at its limit.
    let other = client_from("127.0.0.5", &balancer.addr, "third").await?;
    assert!(other.is_ok(), "{:?}", other.err());
    Ok(())
}

#[tokio::test]
async fn only_trusted_proxies_may_name_the_client() -> anyhow::Result<()> {
    let metrics = format!("127.0.0.1:{}", free_port()?);
    let node = NodeProcess::fresh(&[
        "--proxy-protocol",
        "--trusted-proxies",
        "127.0.0.2",
        "--metrics-listen",
        &metrics,
        "--insecure-dev-auth",
    ])
    .await?;
    let refused = |reason: &str| format!("fanfare_proxy_refused_total{{reason=\"{reason}\"}}");

    // From an address not in --trusted-proxies: closed without an answer, header or not.
    let header = proxied::v1_header("203.0.113.9:4000".parse()?, "127.0.0.1:8080".parse()?);
    let stranger = connect_from("127.0.0.1", &node.addr).await?;
    let said = answer(stranger, header.as_bytes(), "/healthz").await?;
    assert_eq!(said, "", "an untrusted peer named a client");
    wait_metric_at(
        &metrics,
        &refused("untrusted"),
        Duration::from_secs(5),
        |n| n == 1.0,
    )
    .await?;

    // From the trusted proxy without a header, or with a broken one: closed too.
    let bare = connect_from("127.0.0.2", &node.addr).await?;
    assert_eq!(answer(bare, b"", "/healthz").await?, "");
    let broken = connect_from("127.0.0.2", &node.addr).await?;
    let said = answer(
        broken,
        b"PROXY TCP4 300.1.1.1 127.0.0.1 1 2\r\n",
        "/healthz",
    )
    .await?;
    assert_eq!(said, "");
    wait_metric_at(
        &metrics,
        &refused("bad_header"),
        Duration::from_secs(5),
        |n| n == 2.0,
    )
    .await?;

    // From the trusted proxy with a v1 or a v2 header: served.
    let v1 = connect_from("127.0.0.2", &node.addr).await?;
    let said = answer(v1, header.as_bytes(), "/healthz").await?;
    assert!(said.starts_with("HTTP/1.1 200"), "{said}");
    let v2 = connect_from("127.0.0.2", &node.addr).await?;
    let said = answer(v2, &v2_header(Some(([198, 51, 100, 1], 4000))), "/healthz").await?;
    assert!(said.starts_with("HTTP/1.1 200"), "{said}");

    // Admin behind a balancer needs a token, even for the balancer's own (LOCAL) requests.
    let local = connect_from("127.0.0.2", &node.addr).await?;
    let said = answer(local, &v2_header(None), "/admin/plugins").await?;
    assert!(
        said.starts_with("HTTP/1.1 403") && said.contains("--admin-token"),
        "{said}"
    );
    assert_eq!(metric_at(&metrics, &refused("timeout")).await?, 0.0);
    Ok(())
}

/// Behind a balancer admin needs a token on the public port; on a loopback `--admin-listen`
/// (never a PROXY header there) this machine's tools reach it without one.
#[tokio::test]
async fn admin_can_live_on_its_own_loopback_address() -> anyhow::Result<()> {
    let admin = format!("127.0.0.1:{}", free_port()?);
    let node = NodeProcess::fresh(&[
        "--proxy-protocol",
        "--trusted-proxies",
        "127.0.0.1",
        "--admin-listen",
        &admin,
        "--insecure-dev-auth",
    ])
    .await?;
    let (status, body) = fanfare_tests::http_get(&admin, "/admin/plugins").await?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("rate_limit"), "{body}");
    let (status, body) = fanfare_tests::http_get(&admin, "/v1/tracks/t").await?;
    assert_eq!(status, 404, "only admin on the admin address: {body}");
    // The public port (through the harness's PROXY header) no longer serves admin at all.
    let (status, body) = node.get("/admin/plugins").await?;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("--admin-listen"), "{body}");
    assert_eq!(node.get("/v1/tracks/t").await?.0, 200);
    Ok(())
}
