//! How a node reaches its services securely: librdkafka settings passed through
//! (`--kafka-option`, e.g. SASL/SSL), and Redis with an ACL user over TLS (`rediss://`).

use fanfare_tests::PATIENCE;

/// Runs the node with `args` until it exits (it must refuse to start): its stderr.
async fn refused_start(args: &[&str]) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let mut node = tokio::process::Command::new(fanfare_tests::fanfare_bin());
    node.args(["--listen", "127.0.0.1:0", "--log", "warn"])
        .arg("--data-dir")
        .arg(dir.path())
        .args(args)
        .kill_on_drop(true);
    let output = tokio::time::timeout(PATIENCE, node.output())
        .await
        .map_err(|_| anyhow::anyhow!("the node started with {args:?}"))??;
    anyhow::ensure!(!output.status.success(), "exit: {:?}", output.status);
    Ok(String::from_utf8_lossy(&output.stderr).into_owned())
}

#[tokio::test]
async fn kafka_options_reach_librdkafka_and_guarantees_stay_fanfares() -> anyhow::Result<()> {
    // librdkafka itself refuses a setting it does not know: the option got that far.
    let stderr = refused_start(&[
        "--kafka",
        "127.0.0.1:1",
        "--kafka-option",
        "no.such.setting=1",
    ])
    .await?;
    assert!(
        stderr.contains("No such configuration property") && stderr.contains("no.such.setting"),
        "{stderr}"
    );
    // What the delivery guarantees rest on cannot be overridden.
    for owned in [
        "acks=0",
        "enable.idempotence=false",
        "bootstrap.servers=x:1",
    ] {
        let stderr = refused_start(&["--kafka", "127.0.0.1:1", "--kafka-option", owned]).await?;
        assert!(stderr.contains("set by Fanfare"), "{owned}: {stderr}");
    }
    Ok(())
}
