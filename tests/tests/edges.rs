//! Production edges against the real binary: JWT auth at the upgrade, admin token, origin
//! allow-list, connection and message limits, metrics on their own address, graceful drain.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fanfare_tests::{NodeProcess, PATIENCE, WsClient, free_port, http_get};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const SECRET: &str = "a-test-secret-that-is-at-least-32-bytes-long";

fn token(secret: &str, sub: &str, exp_offset: i64, nbf_offset: i64) -> anyhow::Result<String> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
    let claims = json!({"sub": sub, "exp": now + exp_offset, "nbf": now + nbf_offset});
    Ok(encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// Tries an upgrade with extra headers; returns the HTTP status (101 on success).
async fn upgrade_status(url: &str, headers: &[(&'static str, &str)]) -> anyhow::Result<u16> {
    let mut request = url.into_client_request()?;
    for (name, value) in headers {
        request
            .headers_mut()
            .insert(*name, HeaderValue::from_str(value)?);
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((_, response)) => Ok(response.status().as_u16()),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Ok(response.status().as_u16())
        }
        Err(err) => Err(err.into()),
    }
}

/// `?user=` lets anyone act as anyone: a farm node (a load balancer in front) refuses to
/// start with it and says what to use instead, binding nothing; told it is a demo, it runs.
#[tokio::test]
async fn a_farm_node_refuses_dev_auth_unless_told_it_is_a_demo() -> anyhow::Result<()> {
    let redis = fanfare_tests::RedisProcess::start().await?;
    let dir = tempfile::tempdir()?;
    let listen = format!("127.0.0.1:{}", free_port()?);
    let mut refused = tokio::process::Command::new(fanfare_tests::fanfare_bin());
    refused
        .args([
            "--listen",
            &listen,
            "--redis",
            &redis.url(),
            "--log",
            "warn",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("FANFARE_INSECURE_DEV_AUTH")
        .env_remove("FANFARE_AUTH")
        .kill_on_drop(true);
    let output = tokio::time::timeout(PATIENCE, refused.output())
        .await
        .map_err(|_| anyhow::anyhow!("the farm node started with dev auth"))??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "exit: {:?}", output.status);
    assert!(
        stderr.contains("--auth jwt") && stderr.contains("--insecure-dev-auth"),
        "the refusal does not say what to use: {stderr}"
    );
    assert!(
        tokio::net::TcpStream::connect(&listen).await.is_err(),
        "the refused node bound {listen}"
    );

    let demo = NodeProcess::start(
        dir.path(),
        &["--redis", &redis.url(), "--insecure-dev-auth"],
    )
    .await?;
    let mut ana = demo.connect("ana").await?;
    let ack = ana.like("like", "demo:t", "k1").await?;
    assert_eq!(ack["count"], 1, "{ack}");
    Ok(())
}

#[tokio::test]
async fn jwt_auth_refuses_bad_tokens_at_the_upgrade() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&["--auth", "jwt", "--jwt-secret", SECRET]).await?;
    let url = format!("ws://{}/v1/ws", node.addr);
    let good = token(SECRET, "ana", 300, -10)?;

    assert_eq!(upgrade_status(&url, &[]).await?, 401, "missing token");
    assert_eq!(
        upgrade_status(&format!("{url}?user=ana"), &[]).await?,
        401,
        "dev-style user is not enough"
    );
    let forged = token(
        "another-secret-that-is-also-32-bytes-long!!",
        "ana",
        300,
        -10,
    )?;
    assert_eq!(
        upgrade_status(&format!("{url}?token={forged}"), &[]).await?,
        401,
        "wrong signature"
    );
    let expired = token(SECRET, "ana", -120, -300)?;
    assert_eq!(
        upgrade_status(&format!("{url}?token={expired}"), &[]).await?,
        401,
        "expired"
    );
    let early = token(SECRET, "ana", 600, 120)?;
    assert_eq!(
        upgrade_status(&format!("{url}?token={early}"), &[]).await?,
        401,
        "not yet valid"
    );
    assert_eq!(
        upgrade_status(&format!("{url}?token=garbage"), &[]).await?,
        401,
        "malformed"
    );
    assert_eq!(
        upgrade_status(&format!("{url}?token={good}&user=bob"), &[]).await?,
        401,
        "user mismatch"
    );
    assert_eq!(
        node.metric("fanfare_upgrades_refused_total{reason=\"unauthorized\"}")
            .await?,
        7.0
    );

    // Valid tokens by each route; the user is the token's subject.
    let bearer = format!("Bearer {good}");
    let mut request = url.as_str().into_client_request()?;
    request
        .headers_mut()
        .insert("Authorization", HeaderValue::from_str(&bearer)?);
    let (ws, _) = tokio_tungstenite::connect_async(request).await?;
    let mut client = WsClient {
        ws,
        user: String::new(),
    };
    assert_eq!(client.recv().await?["user"], "ana");
    let mut by_query = WsClient::connect(&format!("{url}?token={good}")).await?;
    assert_eq!(by_query.user, "ana");
    let mut request = url.as_str().into_client_request()?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(&format!("bearer, {good}"))?,
    );
    let (ws, response) = tokio_tungstenite::connect_async(request).await?;
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.as_bytes()),
        Some(&b"bearer"[..])
    );
    let mut by_protocol = WsClient {
        ws,
        user: String::new(),
    };
    assert_eq!(by_protocol.recv().await?["user"], "ana");
    // A user can only like as themselves.
    let ack = by_query.like("like", "t", "k1").await?;
    assert_eq!(ack["count"], 1);
    assert_eq!(
        client.like("like", "t", "k2").await?["duplicate"],
        true,
        "same user ana"
    );
    Ok(())
}

#[tokio::test]
async fn admin_needs_the_token_and_origins_are_checked() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&[
        "--admin-token",
        "s3cret-admin",
        "--allowed-origins",
        "https://good.example",
    ])
    .await?;
    assert_eq!(node.get("/admin/plugins").await?.0, 401);
    let raw = "GET /admin/plugins HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret-admin\r\nConnection: close\r\n\r\n";
    let response = fanfare_tests::raw_http(&node.addr, raw).await?;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let url = node.ws_url("ana");
    assert_eq!(
        upgrade_status(&url, &[("Origin", "https://evil.example")]).await?,
        403
    );
    assert_eq!(
        upgrade_status(&url, &[("Origin", "https://good.example")]).await?,
        101
    );
    assert_eq!(
        upgrade_status(&url, &[]).await?,
        101,
        "non-browser clients send no Origin"
    );
    Ok(())
}

/// Without a token, admin answers this machine's own tools, never a web page: a site open in a
/// local browser could otherwise POST a plugin reload to 127.0.0.1 (no CSRF guard).
#[tokio::test]
async fn admin_without_a_token_refuses_requests_from_web_pages() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&[]).await?;
    assert_eq!(node.get("/admin/plugins").await?.0, 200, "a local tool");
    for request in [
        "POST /admin/plugins/reload HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.example\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        "GET /admin/plugins HTTP/1.1\r\nHost: x\r\nOrigin: null\r\nConnection: close\r\n\r\n",
    ] {
        let response = fanfare_tests::raw_http(&node.addr, request).await?;
        assert!(
            response.starts_with("HTTP/1.1 403") && response.contains("--admin-token"),
            "{response}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn connection_and_message_limits_trip_with_clear_answers() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = NodeProcess::start(
        dir.path(),
        &[
            "--max-connections-per-ip",
            "3",
            "--max-messages-per-second",
            "5",
        ],
    )
    .await?;
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(node.connect(&format!("u{i}")).await?);
    }
    assert_eq!(
        upgrade_status(&node.ws_url("u3"), &[]).await?,
        429,
        "fourth from one IP"
    );
    drop(held.pop());
    node.wait_metric("fanfare_connections_active", |v| v == 2.0)
        .await?;
    held.push(node.connect("u4").await?);

    // 30 pings at once: the burst (10) passes, the rest are refused with rate_limited.
    let client = &mut held[0];
    for _ in 0..30 {
        client.send_raw(Message::text(r#"{"type":"ping"}"#)).await?;
    }
    let (mut pongs, mut limited) = (0, 0);
    while pongs + limited < 30 {
        let frame = client.recv().await?;
        match frame["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") if frame["code"] == "rate_limited" => limited += 1,
            _ => anyhow::bail!("unexpected {frame}"),
        }
    }
    assert!(
        pongs >= 10 && limited >= 15,
        "{pongs} pongs, {limited} limited"
    );
    assert!(node.metric("fanfare_messages_rate_limited_total").await? >= 15.0);

    let dir = tempfile::tempdir()?;
    let small = NodeProcess::start(dir.path(), &["--max-connections", "2"]).await?;
    let _a = small.connect("a").await?;
    let _b = small.connect("b").await?;
    assert_eq!(
        upgrade_status(&small.ws_url("c"), &[]).await?,
        503,
        "node full"
    );
    Ok(())
}

#[tokio::test]
async fn metrics_can_live_on_their_own_address() -> anyhow::Result<()> {
    let metrics_addr = format!("127.0.0.1:{}", free_port()?);
    let node = NodeProcess::fresh(&["--metrics-listen", &metrics_addr]).await?;
    let _client = node.connect("ana").await?;
    assert_eq!(node.get("/metrics").await?.0, 404, "not on the public port");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (status, body) = http_get(&metrics_addr, "/metrics").await?;
        if status == 200 && body.contains("fanfare_connections_active 1") {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "metrics: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test]
async fn drain_spreads_closes_and_reconnects_and_loses_no_like() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut node = NodeProcess::start(dir.path(), &["--drain-period", "2000"]).await?;
    let mut clients = Vec::new();
    for i in 0..30 {
        clients.push(node.connect(&format!("fan{i}")).await?);
    }
    node.signal("TERM")?;
    // Readiness flips first, so the balancer stops sending new clients.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while node.get("/readyz").await.map(|r| r.0).unwrap_or(503) != 503 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "readyz never turned 503"
        );
    }
    let started = tokio::time::Instant::now();
    // Each still-open client keeps liking until its close arrives; every like must be acked.
    let drained = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| async move {
            let mut acked = 0u64;
            let mut n = 0;
            loop {
                client
                    .send(json!({"type":"like","track":format!("d{n}"),"id":format!("{i}-{n}")}))
                    .await
                    .ok();
                n += 1;
                loop {
                    match client.recv_message(PATIENCE).await? {
                        Message::Close(frame) => {
                            let frame =
                                frame.ok_or_else(|| anyhow::anyhow!("close without reason"))?;
                            anyhow::ensure!(u16::from(frame.code) == 1001);
                            return anyhow::Ok((
                                started.elapsed(),
                                frame.reason.to_string(),
                                acked,
                            ));
                        }
                        Message::Text(text) if text.contains("\"ack\"") => {
                            acked += 1;
                            break;
                        }
                        Message::Text(text) => anyhow::bail!("unexpected {text}"),
                        _ => {}
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    let results = futures_util::future::try_join_all(drained).await?;
    assert_eq!(node.wait_exit(PATIENCE).await?, Some(0));

    let times: Vec<Duration> = results.iter().map(|r| r.0).collect();
    let spread = *times.iter().max().unwrap_or(&Duration::ZERO)
        - *times.iter().min().unwrap_or(&Duration::ZERO);
    assert!(
        spread >= Duration::from_millis(800),
        "closes spread over the drain period, got {spread:?}"
    );
    let hints: HashSet<&str> = results
        .iter()
        .filter_map(|r| r.1.split("reconnect_after_ms=").nth(1))
        .collect();
    assert!(
        hints.len() >= 20,
        "distinct reconnect delays: {}",
        hints.len()
    );
    let acked: u64 = results.iter().map(|r| r.2).sum();

    // 200 reads in a row from one address: over the default HTTP read rate.
    let node = NodeProcess::start(dir.path(), &["--max-http-reads-per-ip", "0"]).await?;
    let mut stored = 0;
    for n in 0..200 {
        stored += node.track_count(&format!("d{n}")).await?;
    }
    assert!(acked > 30, "likes flowed during the drain ({acked})");
    assert_eq!(stored, acked, "every like acked during the drain is stored");
    Ok(())
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut child = tokio::process::Command::new(fanfare_tests::fanfare_bin())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--data-dir",
        ])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    let line = tokio::time::timeout(PATIENCE, lines.next_line())
        .await??
        .unwrap_or_default();
    let entry: serde_json::Value = serde_json::from_str(&line)?;
    assert!(
        entry["level"].is_string() && entry["fields"]["message"].is_string(),
        "{entry}"
    );
    child.kill().await?;
    Ok(())
}
