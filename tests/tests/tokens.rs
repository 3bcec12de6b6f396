//! JWT sessions against the real binary: public keys (RS256, ES256), `aud`/`iss`, a session
//! that ends at its token's `exp` (close 4001) unless the client sends a newer token, and key
//! files replaced while the node runs (SIGHUP and file change).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fanfare_tests::{NodeProcess, WsClient};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const SECRET: &str = "a-test-secret-that-is-at-least-32-bytes-long";

fn now() -> anyhow::Result<u64> {
    Ok(SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs())
}

fn hs256(claims: &Value) -> anyhow::Result<String> {
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    Ok(encode(&Header::default(), claims, &key)?)
}

/// Runs openssl with `args` (key generation for the public-key tests).
fn openssl(args: &[&str]) -> anyhow::Result<()> {
    let status = std::process::Command::new("openssl")
        .args(args)
        .stderr(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "openssl {args:?} failed");
    Ok(())
}

/// A fresh key pair in `dir`: `<name>.pem` (private) and `<name>.pub`.
fn key_pair(dir: &Path, name: &str, algorithm: &str, option: &str) -> anyhow::Result<()> {
    let private = dir
        .join(format!("{name}.pem"))
        .to_string_lossy()
        .to_string();
    let public = dir
        .join(format!("{name}.pub"))
        .to_string_lossy()
        .to_string();
    openssl(&[
        "genpkey",
        "-algorithm",
        algorithm,
        "-pkeyopt",
        option,
        "-out",
        &private,
    ])?;
    openssl(&["pkey", "-in", &private, "-pubout", "-out", &public])
}

/// The upgrade's HTTP status for `token` (101: a socket).
async fn status_for(node: &NodeProcess, token: &str) -> anyhow::Result<u16> {
    let url = format!("ws://{}/v1/ws?token={token}", node.addr);
    match tokio_tungstenite::connect_async(url).await {
        Ok((_, response)) => Ok(response.status().as_u16()),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Ok(response.status().as_u16())
        }
        Err(err) => Err(err.into()),
    }
}

async fn send(client: &mut WsClient, frame: Value) -> anyhow::Result<Value> {
    use futures_util::SinkExt;
    client.ws.send(Message::text(frame.to_string())).await?;
    client.recv().await
}

#[tokio::test]
async fn jwt_public_keys_rs256_and_es256() -> anyhow::Result<()> {
    let keys = tempfile::tempdir()?;
    key_pair(keys.path(), "rsa", "RSA", "rsa_keygen_bits:2048")?;
    key_pair(keys.path(), "ec", "EC", "ec_paramgen_curve:P-256")?;
    let path = |name: &str| keys.path().join(name).to_string_lossy().to_string();
    let claims = json!({"sub": "kim", "exp": now()? + 300});

    for (public, private, algorithm) in [
        ("rsa.pub", "rsa.pem", Algorithm::RS256),
        ("ec.pub", "ec.pem", Algorithm::ES256),
    ] {
        let node = NodeProcess::fresh(&["--auth", "jwt", "--jwt-key", &path(public)]).await?;
        let pem = std::fs::read(keys.path().join(private))?;
        let key = match algorithm {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem)?,
            _ => EncodingKey::from_ec_pem(&pem)?,
        };
        let good = encode(&Header::new(algorithm), &claims, &key)?;
        let client = WsClient::connect(&format!("ws://{}/v1/ws?token={good}", node.addr)).await?;
        assert_eq!(client.user, "kim", "{algorithm:?}");
        // The same claims signed with the HMAC of the public key text must not pass
        // (algorithm confusion).
        let confused = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&std::fs::read(keys.path().join(public))?),
        )?;
        assert_eq!(
            status_for(&node, &confused).await?,
            401,
            "{algorithm:?} key must not accept HS256"
        );
    }
    Ok(())
}

#[tokio::test]
async fn audience_and_issuer_must_be_this_services() -> anyhow::Result<()> {
    let node = NodeProcess::fresh(&[
        "--auth",
        "jwt",
        "--jwt-secret",
        SECRET,
        "--jwt-audience",
        "fanfare,fanfare-staging",
        "--jwt-issuer",
        "https://id.example",
    ])
    .await?;
    let exp = now()? + 300;
    let claims = |aud: Option<&str>, iss: Option<&str>| {
        let mut claims = json!({"sub": "ana", "exp": exp});
        if let Some(aud) = aud {
            claims["aud"] = json!(aud);
        }
        if let Some(iss) = iss {
            claims["iss"] = json!(iss);
        }
        claims
    };
    let good = hs256(&claims(Some("fanfare-staging"), Some("https://id.example")))?;
    assert_eq!(status_for(&node, &good).await?, 101);
    for (aud, iss) in [
        (Some("another-service"), Some("https://id.example")),
        (None, Some("https://id.example")),
        (Some("fanfare"), Some("https://evil.example")),
        (Some("fanfare"), None),
    ] {
        let token = hs256(&claims(aud, iss))?;
        assert_eq!(
            status_for(&node, &token).await?,
            401,
            "aud {aud:?}, iss {iss:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_session_ends_with_its_token_unless_refreshed() -> anyhow::Result<()> {
    let node =
        NodeProcess::fresh(&["--auth", "jwt", "--jwt-secret", SECRET, "--jwt-leeway", "0"]).await?;
    let url = |token: &str| format!("ws://{}/v1/ws?token={token}", node.addr);
    let short = |sub: &str| -> anyhow::Result<(String, u64)> {
        let exp = now()? + 3;
        Ok((hs256(&json!({"sub": sub, "exp": exp}))?, exp))
    };

    // Not refreshed: closed at exp with 4001, after serving until then.
    let (token, exp) = short("ana")?;
    let mut ana = WsClient::connect(&url(&token)).await?;
    assert_eq!(
        send(&mut ana, json!({"type": "ping"})).await?["type"],
        "pong"
    );
    let close = ana.expect_close(Duration::from_secs(8)).await?;
    let close = close.ok_or_else(|| anyhow::anyhow!("closed without a frame"))?;
    assert_eq!(close.code, CloseCode::Library(4001));
    assert_eq!(close.reason.as_str(), "token expired");
    assert!(now()? >= exp, "closed before its token expired");

    // Refreshed with a newer token of the same user: still served past the first exp.
    let (token, exp) = short("bo")?;
    let mut bo = WsClient::connect(&url(&token)).await?;
    // Refused refreshes change nothing: another user's token, a forged one, garbage.
    let other = hs256(&json!({"sub": "eve", "exp": now()? + 600}))?;
    let forged = encode(
        &Header::default(),
        &json!({"sub": "bo", "exp": now()? + 600}),
        &EncodingKey::from_secret(b"not-the-secret-not-the-secret-not-the-secret"),
    )?;
    for bad in [other.as_str(), forged.as_str(), "garbage"] {
        let reply = send(&mut bo, json!({"type": "refresh", "token": bad})).await?;
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], "unauthorized", "{reply}");
    }
    let later = now()? + 600;
    let newer = hs256(&json!({"sub": "bo", "exp": later}))?;
    let reply = send(&mut bo, json!({"type": "refresh", "token": newer})).await?;
    assert_eq!(reply, json!({"type": "refreshed", "expires_at": later}));
    while now()? <= exp + 1 {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        send(&mut bo, json!({"type": "ping"})).await?["type"],
        "pong",
        "a refreshed session outlives its first token"
    );
    assert_eq!(node.metric("fanfare_tokens_expired_total").await?, 1.0);
    Ok(())
}

#[tokio::test]
async fn key_files_reload_on_change_and_sighup() -> anyhow::Result<()> {
    let keys = tempfile::tempdir()?;
    key_pair(keys.path(), "a", "EC", "ec_paramgen_curve:P-256")?;
    key_pair(keys.path(), "b", "EC", "ec_paramgen_curve:P-256")?;
    let served = keys.path().join("served.pub");
    std::fs::copy(keys.path().join("a.pub"), &served)?;
    let served_arg = served.to_string_lossy().to_string();
    let node = NodeProcess::fresh(&["--auth", "jwt", "--jwt-key", &served_arg]).await?;
    let signed = |name: &str| -> anyhow::Result<String> {
        let pem = std::fs::read(keys.path().join(format!("{name}.pem")))?;
        let claims = json!({"sub": "kim", "exp": now()? + 300});
        Ok(encode(
            &Header::new(Algorithm::ES256),
            &claims,
            &EncodingKey::from_ec_pem(&pem)?,
        )?)
    };
    let (by_a, by_b) = (signed("a")?, signed("b")?);
    assert_eq!(status_for(&node, &by_a).await?, 101);
    assert_eq!(status_for(&node, &by_b).await?, 401);
    let reloads =
        |result: &str| format!("fanfare_reloads_total{{what=\"jwt_keys\",result=\"{result}\"}}");

    // SIGHUP reads the file again; nothing has changed it since the start, so only the
    // signal can have caused this reload.
    node.signal("HUP")?;
    node.wait_metric(&reloads("ok"), |n| n == 1.0).await?;
    assert_eq!(status_for(&node, &by_a).await?, 101);

    // The key is rotated in place: b's tokens pass, a's no longer do.
    std::fs::copy(keys.path().join("b.pub"), &served)?;
    node.wait_metric(&reloads("ok"), |n| n >= 2.0).await?;
    assert_eq!(status_for(&node, &by_b).await?, 101);
    assert_eq!(status_for(&node, &by_a).await?, 401);

    // A broken file is refused and the current key stays.
    std::fs::write(&served, "not a key")?;
    node.wait_metric(&reloads("refused"), |n| n >= 1.0).await?;
    assert_eq!(status_for(&node, &by_b).await?, 101);
    Ok(())
}
