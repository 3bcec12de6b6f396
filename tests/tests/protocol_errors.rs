//! Bad input of every kind gets a clear answer and disturbs nobody else.

use std::time::Duration;

use fanfare_tests::{NodeProcess, PATIENCE};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn every_bad_frame_gets_an_error_frame() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&[]).await?;
    let mut bystander = node.connect("bystander").await?;
    bystander.subscribe("calm").await?;
    let mut client = node.connect("mallory").await?;
    let cases: Vec<(Message, Option<&str>)> = vec![
        (Message::text("{not json"), None),
        (Message::text("[1,2]"), None),
        (Message::text(r#"{"track":"t"}"#), None),
        (Message::text(r#"{"type":"dance"}"#), None),
        (Message::text(r#"{"type":42}"#), None),
        (Message::text(r#"{"type":"subscribe"}"#), None),
        (
            Message::text(r#"{"type":"subscribe","track":"white space"}"#),
            None,
        ),
        (
            Message::text(format!(
                r#"{{"type":"subscribe","track":"{}"}}"#,
                "t".repeat(129)
            )),
            None,
        ),
        (Message::text(r#"{"type":"like","track":"t"}"#), None),
        (
            Message::text(r#"{"type":"like","track":"t","id":""}"#),
            None,
        ),
        (Message::text(r#"{"type":"like","track":"t","id":7}"#), None),
        (
            Message::text(r#"{"type":"like","track":"t/x","id":"k7"}"#),
            Some("k7"),
        ),
        (Message::binary(vec![0u8, 159, 146, 150]), None),
    ];
    for (message, id) in cases {
        let shown = format!("{message:?}");
        client.send_raw(message).await?;
        let reply = client.recv().await?;
        assert_eq!(reply["type"], "error", "{shown} → {reply}");
        assert_eq!(reply["code"], "bad_request", "{shown} → {reply}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
        match id {
            Some(id) => assert_eq!(reply["id"], id),
            None => assert!(reply.get("id").is_none(), "{reply}"),
        }
    }
    // Still a working connection, and the bystander was never disturbed.
    assert_eq!(client.like("like", "calm", "ok1").await?["type"], "ack");
    let update = bystander.recv().await?;
    assert_eq!(
        (update["type"].as_str(), update["count"].as_u64()),
        (Some("likes"), Some(1))
    );
    assert_eq!(
        node.metric("fanfare_protocol_errors_total{code=\"bad_request\"}")
            .await?,
        13.0
    );
    Ok(())
}

#[tokio::test]
async fn oversized_frames_close_with_1009_and_garbage_floods_with_1008() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&["--max-frame-bytes", "512"]).await?;
    let mut bystander = node.connect("bystander").await?;

    // Just under the limit is fine (an error for the unknown type, not a close).
    let mut client = node.connect("big").await?;
    let padding = "p".repeat(512 - r#"{"type":"ping","pad":""}"#.len());
    client.send(json!({"type":"ping","pad":padding})).await?;
    assert_eq!(client.recv().await?, json!({"type":"pong"}));
    let padding = "p".repeat(600);
    client.send(json!({"type":"ping","pad":padding})).await?;
    let error = client.recv().await?;
    assert_eq!(error["code"], "too_large");
    let close = client
        .expect_close(PATIENCE)
        .await?
        .map(|f| u16::from(f.code));
    assert_eq!(close, Some(1009));

    let mut flooder = node.connect("flooder").await?;
    for _ in 0..25 {
        flooder.send_raw(Message::text("garbage")).await?;
    }
    let close = flooder
        .expect_close(PATIENCE)
        .await?
        .map(|f| u16::from(f.code));
    assert_eq!(close, Some(1008));
    node.wait_metric("fanfare_garbage_disconnects_total", |v| v == 1.0)
        .await?;

    bystander.send(json!({"type":"ping"})).await?;
    assert_eq!(bystander.recv().await?, json!({"type":"pong"}));
    Ok(())
}

#[tokio::test]
async fn bad_upgrades_are_refused_over_http() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&[]).await?;
    // No upgrade headers at all.
    assert_eq!(node.get("/v1/ws").await?.0, 426);
    // A user id outside the allowed alphabet never gets a socket.
    let refused = tokio_tungstenite::connect_async(node.ws_url("bad:user")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 400)
        }
        other => panic!("expected HTTP 400, got {other:?}"),
    }
    // Without a user the node assigns an anonymous one.
    let anon = fanfare_tests::WsClient::connect(&format!("ws://{}/v1/ws", node.addr)).await?;
    assert!(anon.user.starts_with("anon-"), "{}", anon.user);
    Ok(())
}

#[tokio::test]
async fn silent_connections_are_reaped_and_pinging_ones_kept() -> anyhow::Result<()> {
    let node =
        NodeProcess::fresh(&["--heartbeat-timeout", "600", "--heartbeat-interval", "200"]).await?;
    let mut silent = node.connect("silent").await?;
    silent.subscribe("t").await?;
    let mut lively = node.connect("lively").await?;
    lively.subscribe("t").await?;
    let welcome_to_close = tokio::time::Instant::now();
    // The lively client pings (app-level and WebSocket-level) while the silent one says nothing.
    let keep_alive = async {
        for round in 0..12 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            if round % 2 == 0 {
                lively.send(json!({"type":"ping"})).await?;
                lively.recv().await?;
            } else {
                lively.send_raw(Message::Ping(vec![1].into())).await?;
            }
        }
        anyhow::Ok(())
    };
    let (close, alive) = tokio::join!(silent.expect_close(PATIENCE), keep_alive);
    alive?;
    let close = close?.map(|f| u16::from(f.code));
    assert_eq!(close, Some(1000));
    assert!(welcome_to_close.elapsed() >= Duration::from_millis(500));
    assert_eq!(node.metric("fanfare_heartbeat_reaps_total").await?, 1.0);
    node.wait_metric("fanfare_subscriptions_active", |v| v == 1.0)
        .await?;
    lively.send(json!({"type":"ping"})).await?;
    assert_eq!(lively.recv().await?, json!({"type":"pong"}));
    Ok(())
}

#[tokio::test]
async fn a_data_directory_that_cannot_be_used_is_a_clear_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x")?;
    let output = tokio::process::Command::new(fanfare_tests::fanfare_bin())
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&file)
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot create data directory"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    Ok(())
}
