//! Per-user and per-address limits against the real binary: connections per user across
//! addresses, likes per second per user across connections, HTTP reads per second per client
//! address, and the history range caps.

use std::time::Duration;

use fanfare_tests::{NodeProcess, raw_http};

#[tokio::test]
async fn a_user_holds_at_most_its_connections() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&["--max-connections-per-user", "2"]).await?;
    let first = node.connect("ana").await?;
    let _second = node.connect("ana").await?;
    let refused = tokio_tungstenite::connect_async(node.ws_url("ana")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 429);
        }
        other => anyhow::bail!(
            "a third connection of ana was not refused: {:?}",
            other.is_ok()
        ),
    }
    assert_eq!(
        node.metric("fanfare_upgrades_refused_total{reason=\"user_full\"}")
            .await?,
        1.0
    );
    let _bo = node.connect("bo").await?;
    drop(first);
    // The place is given back when the session ends.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match node.connect("ana").await {
            Ok(_) => break,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_users_likes_are_limited_over_all_its_connections() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&["--max-likes-per-user", "5"]).await?;
    let mut a = node.connect("ana").await?;
    let mut b = node.connect("ana").await?;
    let (mut acked, mut limited, mut retry_after) = (0, 0, 0);
    for i in 0..30 {
        let client = if i % 2 == 0 { &mut a } else { &mut b };
        let reply = client
            .like("like", &format!("t{i}"), &format!("k{i}"))
            .await?;
        match reply["type"].as_str() {
            Some("ack") => acked += 1,
            _ => {
                assert_eq!(reply["code"], "rate_limited", "{reply}");
                assert_eq!(reply["id"], format!("k{i}"), "{reply}");
                retry_after = reply["retry_after_ms"].as_u64().unwrap_or(0);
                limited += 1;
            }
        }
    }
    // A burst of 10 (twice the rate), plus what refilled meanwhile.
    assert!((10..=15).contains(&acked), "acked {acked}");
    assert_eq!(acked + limited, 30);
    assert!((1..=200).contains(&retry_after), "{retry_after}");
    // Another user is not affected, and ana may like again after the hint.
    let mut bo = node.connect("bo").await?;
    assert_eq!(bo.like("like", "t0", "bo-1").await?["type"], "ack");
    tokio::time::sleep(Duration::from_millis(retry_after)).await;
    assert_eq!(a.like("like", "again", "k-again").await?["type"], "ack");
    Ok(())
}

#[tokio::test]
async fn http_reads_are_limited_per_address() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&["--max-http-reads-per-ip", "5"]).await?;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut statuses = Vec::new();
    let mut limited = String::new();
    for _ in 0..20 {
        let response = raw_http(&node.addr, &get("/v1/tracks/t1")).await?;
        let status = response.get(9..12).unwrap_or_default().to_owned();
        if status == "429" {
            limited = response.clone();
        }
        statuses.push(status);
    }
    let ok = statuses.iter().filter(|s| *s == "200").count();
    assert!((10..=12).contains(&ok), "{statuses:?}");
    assert!(
        limited.to_ascii_lowercase().contains("retry-after: 1"),
        "{limited}"
    );
    // Health checks are not reads.
    assert_eq!(node.get("/healthz").await?.0, 200);
    assert!(node.metric("fanfare_http_reads_limited_total").await? >= 8.0);
    Ok(())
}

#[tokio::test]
async fn history_ranges_are_capped_and_never_overflow() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&[]).await?;
    let mut client = node.connect("ana").await?;
    client.like("like", "h", "k1").await?;
    let (status, body) = node.get("/v1/tracks/h/history?bucket=hour").await?;
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(body["buckets"][0]["likes"], 1, "{body}");
    let day = 86_400_000i64;
    for (query, says) in [
        (format!("from={}&to=0", i64::MIN), "outside"),
        (format!("from=0&to={}", i64::MAX), "outside"),
        (format!("bucket=day&from=0&to={}", 401 * day), "400 days"),
        ("bucket=minute&from=0&to=86400000000".to_owned(), "buckets"),
    ] {
        let (status, body) = node.get(&format!("/v1/tracks/h/history?{query}")).await?;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.contains(says), "{query}: {body}");
    }
    Ok(())
}

/// SIGHUP re-reads the config file: limits and allowed origins change without a restart, and
/// a file that no longer loads changes nothing.
#[tokio::test]
async fn sighup_reloads_limits_and_origins_from_the_config_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("fanfare.toml");
    std::fs::write(
        &file,
        "max-connections-per-user = 1\nallowed-origins = \"https://a.example\"\n",
    )?;
    let path = file.to_string_lossy().to_string();
    let node = NodeProcess::fresh(&["--config", &path]).await?;
    let upgrade = |origin: &'static str| {
        let url = node.ws_url(&format!("o{}", origin.len()));
        async move {
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            let mut request = url.into_client_request()?;
            request.headers_mut().insert("Origin", origin.parse()?);
            anyhow::Ok(match tokio_tungstenite::connect_async(request).await {
                Ok(_) => 101,
                Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
                Err(err) => return Err(err.into()),
            })
        }
    };
    let _first = node.connect("ana").await?;
    assert!(node.connect("ana").await.is_err(), "limit 1 at start");
    assert_eq!(upgrade("https://a.example").await?, 101);
    assert_eq!(upgrade("https://b.example").await?, 403);

    std::fs::write(
        &file,
        "max-connections-per-user = 3\nallowed-origins = \"https://b.example\"\n",
    )?;
    node.signal("HUP")?;
    let reloads =
        |result: &str| format!("fanfare_reloads_total{{what=\"config\",result=\"{result}\"}}");
    node.wait_metric(&reloads("ok"), |n| n == 1.0).await?;
    let _second = node.connect("ana").await?;
    assert_eq!(upgrade("https://b.example").await?, 101);
    assert_eq!(upgrade("https://a.example").await?, 403);

    std::fs::write(&file, "max-connections-per-user = \"many\"\n")?;
    node.signal("HUP")?;
    node.wait_metric(&reloads("refused"), |n| n == 1.0).await?;
    assert_eq!(
        upgrade("https://b.example").await?,
        101,
        "the last good settings stay"
    );
    let _third = node.connect("ana").await?;
    assert!(node.connect("ana").await.is_err(), "still 3");
    Ok(())
}
