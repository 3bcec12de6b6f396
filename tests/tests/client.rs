//! The Rust client (`fanfare-client`) against a node that is killed and restarted: it
//! reconnects by itself, resubscribes, takes the current count, and resends an unacked like
//! with its original key so it is counted exactly once.

use std::time::Duration;

use fanfare_client::{Ack, Client, ClientError, State};
use fanfare_tests::{NodeProcess, PATIENCE};

async fn wait_connected(client: &Client) -> anyhow::Result<()> {
    let mut state = client.state();
    tokio::time::timeout(
        PATIENCE,
        state.wait_for(|s| matches!(s, State::Connected { .. })),
    )
    .await??;
    Ok(())
}

/// The next `likes` update among the client's updates for which `want` holds.
async fn next_likes(
    updates: &mut tokio::sync::broadcast::Receiver<serde_json::Value>,
    want: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let frame = updates.recv().await?;
            if frame["type"] == "likes" && want(&frame) {
                return anyhow::Ok(frame);
            }
        }
    })
    .await?
}

#[tokio::test]
async fn reconnects_resubscribes_and_resends_after_a_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut node = NodeProcess::start(dir.path(), &[]).await?;
    let addr = node.addr.clone();
    let listener = Client::connect(node.ws_url("listener"));
    let liker = Client::connect(node.ws_url("liker"));
    let mut updates = listener.updates();
    assert_eq!(listener.subscribe("resume").await?, 0);
    assert_eq!(
        liker.like("resume", "k1").await?,
        Ack {
            count: 1,
            duplicate: false
        }
    );
    let update = next_likes(&mut updates, |_| true).await?;
    assert_eq!(update["count"], 1);

    // The node dies; both clients notice and keep retrying.
    node.kill().await?;
    let mut state = listener.state();
    tokio::time::timeout(
        PATIENCE,
        state.wait_for(|s| matches!(s, State::Reconnecting { .. })),
    )
    .await??;

    // A like made while the node is down waits, unacked, for the node to return.
    let second = Client::connect(format!("ws://{addr}/v1/ws?user=second"));
    let pending = tokio::spawn({
        let second = second.clone();
        async move { second.like("resume", "k2").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "no ack while the node is down");

    let node = NodeProcess::start_on(&addr, dir.path(), &[]).await?;
    wait_connected(&listener).await?;
    let ack = tokio::time::timeout(PATIENCE, pending).await???;
    assert_eq!(
        ack,
        Ack {
            count: 2,
            duplicate: false
        },
        "resent and counted once"
    );

    // The listener resubscribed by itself and took the current count (from the update or from
    // its resubscription, whichever came after the restart)...
    tokio::time::timeout(PATIENCE, async {
        loop {
            let frame = updates.recv().await?;
            if frame["count"] == 2 {
                return anyhow::Ok(frame);
            }
        }
    })
    .await??;
    // ...and hears new likes again.
    let third = Client::connect(node.ws_url("third"));
    assert_eq!(third.like("resume", "k3").await?.count, 3);
    let update = next_likes(&mut updates, |f| f["count"] == 3).await?;
    assert_eq!(update["recent"][0]["user"], "third");

    // Re-sending the first like's key after the restart changes nothing.
    assert_eq!(
        liker.like("resume", "k1").await?,
        Ack {
            count: 3,
            duplicate: false
        }
    );
    assert_eq!(node.track_count("resume").await?, 3);
    // Refusals surface as errors with their code.
    let refused = liker.like("bad track", "k9").await.unwrap_err();
    assert!(
        matches!(refused, ClientError::Refused { ref code, .. } if code == "bad_request"),
        "{refused:?}"
    );
    listener.close().await;
    Ok(())
}

const SECRET: &str = "a-test-secret-that-is-at-least-32-bytes-long";

/// A token for `sub` that expires in `seconds`.
fn token(sub: &str, seconds: u64) -> Result<String, String> {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs()
        + seconds;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": sub, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .map_err(|e| e.to_string())
}

#[tokio::test]
async fn tokens_are_refreshed_before_the_session_ends_and_renewed_after_4001() -> anyhow::Result<()>
{
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let node =
        NodeProcess::fresh(&["--auth", "jwt", "--jwt-secret", SECRET, "--jwt-leeway", "0"]).await?;
    let url = format!("ws://{}/v1/ws", node.addr);
    // 3-second tokens; `refuse` makes the source fail (a login service that is down).
    let asked = Arc::new(AtomicUsize::new(0));
    let refuse = Arc::new(AtomicBool::new(false));
    let client = Client::connect_with_tokens(url, {
        let (asked, refuse) = (asked.clone(), refuse.clone());
        move || {
            asked.fetch_add(1, Ordering::SeqCst);
            let refused = refuse.load(Ordering::SeqCst);
            async move {
                if refused {
                    Err("the login service is down".to_owned())
                } else {
                    token("ana", 3)
                }
            }
        }
    });
    wait_connected(&client).await?;
    let connected = std::time::Instant::now();
    let mut state = client.state();
    state.mark_unchanged();
    assert_eq!(client.subscribe("tokens").await?, 0);

    // Refreshed at 80 % of each token's time: on 3-second tokens, served past the first two
    // tokens' ends (the third asked, more than 4 s after connecting), never reconnecting.
    let deadline = tokio::time::Instant::now() + PATIENCE * 2;
    while asked.load(Ordering::SeqCst) < 3 || connected.elapsed() < Duration::from_secs(4) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {} tokens asked in {:?}",
            asked.load(Ordering::SeqCst),
            connected.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!state.has_changed()?, "the client never reconnected");
    assert_eq!(client.like("tokens", "k1").await?.count, 1);
    assert_eq!(node.metric("fanfare_tokens_expired_total").await?, 0.0);

    // No token for the refresh: the session ends with 4001; the client comes back with a
    // fresh token once the source answers again, subscribed as before.
    refuse.store(true, Ordering::SeqCst);
    node.wait_metric("fanfare_tokens_expired_total", |v| v == 1.0)
        .await?;
    tokio::time::timeout(
        PATIENCE,
        state.wait_for(|s| matches!(s, State::Reconnecting { .. })),
    )
    .await??;
    refuse.store(false, Ordering::SeqCst);
    wait_connected(&client).await?;
    let mut updates = client.updates();
    let other = Client::connect_with_tokens(format!("ws://{}/v1/ws", node.addr), || async {
        token("bo", 60)
    });
    assert_eq!(other.like("tokens", "b1").await?.count, 2);
    let update = next_likes(&mut updates, |_| true).await?;
    assert_eq!(
        update["count"], 2,
        "resubscribed after the renewal: {update}"
    );
    Ok(())
}
