//! Protocol abuse against the real binary: frames around the size limit, invalid UTF-8,
//! fragmented messages, ping and subscription floods, thousands of connections from one IP,
//! handshakes that never upgrade, and clients that vanish. After each, the node must still
//! serve a well-behaved client.

use std::time::Duration;

use anyhow::Context;
use fanfare_tests::{NodeProcess, PATIENCE};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A WebSocket client written by hand, to send what a library would refuse to.
struct RawSocket {
    stream: TcpStream,
}

impl RawSocket {
    async fn open(node: &NodeProcess, user: &str) -> anyhow::Result<RawSocket> {
        let mut stream = TcpStream::connect(&node.addr).await?;
        let request = format!(
            "GET /v1/ws?user={user} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            node.addr
        );
        stream.write_all(request.as_bytes()).await?;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await?;
            head.push(byte[0]);
        }
        anyhow::ensure!(
            head.starts_with(b"HTTP/1.1 101"),
            "no upgrade: {}",
            String::from_utf8_lossy(&head)
        );
        let mut socket = RawSocket { stream };
        socket.read_text().await?; // welcome
        Ok(socket)
    }

    /// One masked frame (clients must mask).
    async fn frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) -> anyhow::Result<()> {
        let mut frame = vec![(u8::from(fin) << 7) | opcode];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n < 65536 => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = [0x12, 0x34, 0x56, 0x78];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await?;
        Ok(())
    }

    /// The next server frame: (opcode, payload); `None` when the connection ended.
    async fn read_frame(&mut self) -> anyhow::Result<Option<(u8, Vec<u8>)>> {
        let mut head = [0u8; 2];
        match tokio::time::timeout(PATIENCE, self.stream.read_exact(&mut head)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Ok(None),
            Err(_) => anyhow::bail!("no frame in time"),
        }
        let len = match head[1] & 0x7f {
            126 => u64::from(self.stream.read_u16().await?),
            127 => self.stream.read_u64().await?,
            n => u64::from(n),
        };
        let mut payload = vec![0u8; len as usize];
        self.stream.read_exact(&mut payload).await?;
        Ok(Some((head[0] & 0x0f, payload)))
    }

    async fn read_text(&mut self) -> anyhow::Result<serde_json::Value> {
        loop {
            match self.read_frame().await?.context("connection closed")? {
                (1, payload) => return Ok(serde_json::from_slice(&payload)?),
                (8, payload) => anyhow::bail!("closed: {payload:?}"),
                _ => continue,
            }
        }
    }

    /// Reads until the close frame; returns its code (or None if the TCP stream just ended).
    async fn close_code(&mut self) -> anyhow::Result<Option<u16>> {
        while let Some((opcode, payload)) = self.read_frame().await? {
            if opcode == 8 {
                return Ok(payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]])));
            }
        }
        Ok(None)
    }
}

/// A fresh, well-behaved client gets a pong: the node is fine.
async fn still_serves(node: &NodeProcess) -> anyhow::Result<()> {
    let mut client = node.connect("bystander").await?;
    client.send(json!({"type":"ping"})).await?;
    anyhow::ensure!(client.recv().await? == json!({"type":"pong"}), "no pong");
    Ok(())
}

fn ping_of_len(len: usize) -> Vec<u8> {
    let shell = r#"{"type":"ping","pad":""}"#.len();
    format!(r#"{{"type":"ping","pad":"{}"}}"#, "p".repeat(len - shell)).into_bytes()
}

#[tokio::test]
async fn frames_of_every_size_around_the_limit() -> anyhow::Result<()> {
    let limit = 300;
    let node = NodeProcess::fresh(&["--max-frame-bytes", &limit.to_string()]).await?;
    for len in limit - 3..=limit + 3 {
        let mut socket = RawSocket::open(&node, &format!("size{len}")).await?;
        socket.frame(true, 1, &ping_of_len(len)).await?;
        if len <= limit {
            assert_eq!(
                socket.read_text().await?,
                json!({"type":"pong"}),
                "{len} bytes"
            );
        } else {
            assert_eq!(socket.close_code().await?, Some(1009), "{len} bytes");
        }
    }
    // The same limit holds for a message split over fragments.
    let mut socket = RawSocket::open(&node, "fragments").await?;
    let big = ping_of_len(limit + 50);
    socket.frame(false, 1, &big[..200]).await?;
    socket.frame(true, 0, &big[200..]).await?;
    assert_eq!(socket.close_code().await?, Some(1009));
    still_serves(&node).await
}

#[tokio::test]
async fn fragmented_messages_are_reassembled() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&[]).await?;
    let mut socket = RawSocket::open(&node, "frag").await?;
    let message = br#"{"type":"subscribe","track":"frag:1"}"#;
    socket.frame(false, 1, &message[..5]).await?;
    // A ping may arrive between fragments; it is answered and the message still completes.
    socket.frame(true, 9, b"hi").await?;
    socket.frame(false, 0, &message[5..20]).await?;
    socket.frame(true, 0, &message[20..]).await?;
    let mut pong = false;
    loop {
        match socket.read_frame().await?.context("closed")? {
            (10, payload) => pong = payload == b"hi",
            (1, payload) => {
                let frame: serde_json::Value = serde_json::from_slice(&payload)?;
                assert_eq!(frame["type"], "subscribed", "{frame}");
                break;
            }
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    assert!(pong, "the interleaved ping was answered first");
    still_serves(&node).await
}

#[tokio::test]
async fn invalid_utf8_closes_only_that_connection() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&[]).await?;
    let mut socket = RawSocket::open(&node, "utf8").await?;
    socket
        .frame(true, 1, b"{\"type\":\"ping\",\"x\":\"\xff\xfe\"}")
        .await?;
    let code = socket.close_code().await?;
    assert!(
        matches!(code, None | Some(1007) | Some(1002)),
        "closed with {code:?}"
    );
    // Also inside a fragmented message: a multi-byte character split across fragments is fine,
    // a broken one is not.
    let mut socket = RawSocket::open(&node, "utf8b").await?;
    let text = r#"{"type":"subscribe","track":"ok","note":"héllo"}"#.as_bytes();
    let split = text.iter().position(|b| *b == 0xc3).context("é")? + 1;
    socket.frame(false, 1, &text[..split]).await?;
    socket.frame(true, 0, &text[split..]).await?;
    let reply = socket.read_text().await?;
    assert!(
        reply["type"] == "subscribed" || reply["type"] == "error",
        "{reply}"
    );
    still_serves(&node).await
}

#[tokio::test]
async fn ping_and_subscription_floods_are_bounded() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&[
        "--max-subscriptions",
        "100",
        "--max-messages-per-second",
        "100000",
    ])
    .await?;
    // 20 000 control pings as fast as the socket takes them.
    let mut pinger = RawSocket::open(&node, "pinger").await?;
    let flood = async {
        for _ in 0..20_000 {
            pinger.frame(true, 9, b"x").await?;
        }
        anyhow::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(20), flood).await;
    still_serves(&node).await?;

    // Subscriptions beyond the limit are refused one by one; the connection stays usable.
    let mut client = node.connect("subscriber").await?;
    let mut refused = 0;
    for i in 0..150 {
        client
            .send(json!({"type":"subscribe","track":format!("flood:{i}")}))
            .await?;
        let reply = client
            .recv_until(|f| f["type"] == "subscribed" || f["type"] == "error")
            .await?;
        if reply["type"] == "error" {
            refused += 1;
        }
    }
    assert_eq!(
        refused, 50,
        "exactly the subscriptions over the limit are refused"
    );
    client.send(json!({"type":"ping"})).await?;
    client.recv_until(|f| f["type"] == "pong").await?;
    assert_eq!(node.metric("fanfare_subscriptions_active").await?, 100.0);
    Ok(())
}

#[tokio::test]
async fn ten_thousand_connections_from_one_ip() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&["--max-connections-per-ip", "500"]).await?;
    let mut held = Vec::new();
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..10_000 {
        match tokio_tungstenite::connect_async(node.ws_url(&format!("many{i}"))).await {
            Ok((ws, _)) => {
                accepted += 1;
                held.push(ws);
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 429);
                refused += 1;
            }
            Err(err) => return Err(err.into()),
        }
    }
    assert_eq!((accepted, refused), (500, 9_500));
    drop(held);
    // Once the node has seen them go, the address may connect again.
    node.wait_metric("fanfare_connections_active", |v| v == 0.0)
        .await?;
    still_serves(&node).await
}

#[tokio::test]
async fn handshakes_that_never_upgrade_and_clients_that_vanish() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&[
        "--handshake-timeout",
        "500",
        "--heartbeat-timeout",
        "1000",
        "--heartbeat-interval",
        "500",
    ])
    .await?;
    // Slowloris: a connection that never finishes its request is cut off.
    let mut idle = TcpStream::connect(&node.addr).await?;
    idle.write_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n")
        .await?;
    let mut buf = [0u8; 256];
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match idle.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "an unfinished handshake is closed");

    // Zombies: subscribed clients that stop reading and writing without closing (half-open
    // from the node's point of view) are reaped by the heartbeat while likes flow.
    let mut zombies = Vec::new();
    for i in 0..20 {
        let mut socket = RawSocket::open(&node, &format!("zombie{i}")).await?;
        socket
            .frame(true, 1, br#"{"type":"subscribe","track":"zombie:1"}"#)
            .await?;
        zombies.push(socket);
    }
    let mut liker = node.connect("liker").await?;
    for i in 0..20 {
        liker
            .like("like", &format!("zombie:{}", i % 2), &format!("z{i}"))
            .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.wait_metric("fanfare_heartbeat_reaps_total", |v| v >= 20.0)
        .await?;
    drop(zombies);
    still_serves(&node).await
}

/// A client that closes gets the close frame back and then the end of the stream at once, even
/// after watching a track's listener count (that task once still held the socket, so the FIN
/// never came and Python's websockets waited 10 s for it).
#[tokio::test]
async fn a_closing_client_gets_the_close_frame_then_the_fin() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&[]).await?;
    let mut socket = RawSocket::open(&node, "leaver").await?;
    socket
        .frame(
            true,
            1,
            br#"{"type":"subscribe","track":"t1","listeners":true}"#,
        )
        .await?;
    let subscribed = socket.read_text().await?;
    anyhow::ensure!(subscribed["type"] == "subscribed", "{subscribed}");
    socket.frame(true, 8, &1000u16.to_be_bytes()).await?;
    let code = socket.close_code().await?;
    anyhow::ensure!(
        code == Some(1000),
        "the node answered the close with {code:?}"
    );
    let mut rest = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(2), socket.stream.read(&mut rest))
        .await
        .context("no FIN within 2 s of the close handshake")??;
    anyhow::ensure!(read == 0, "{read} more bytes after the close frame");
    still_serves(&node).await
}
