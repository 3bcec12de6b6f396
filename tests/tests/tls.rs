//! wss:// and https:// on the node's one port with a certificate generated at run time, and
//! certificate reload on SIGHUP without dropping an open connection.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fanfare_tests::{NodeProcess, PATIENCE, WsClient};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A self-signed certificate for 127.0.0.1 made with the openssl CLI.
fn self_signed(dir: &Path, name: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ])
        // A leaf certificate (webpki refuses a CA certificate used as the server's own).
        .args([
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth",
        ])
        .arg("-keyout")
        .arg(dir.join(format!("{name}.key")))
        .arg("-out")
        .arg(dir.join(format!("{name}.crt")))
        .stderr(std::process::Stdio::null())
        .status()
        .context("openssl is needed to generate test certificates")?;
    anyhow::ensure!(status.success(), "openssl failed");
    Ok(())
}

async fn tls_connect(addr: &str, trusted: &Path) -> anyhow::Result<TlsStream<TcpStream>> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(trusted)? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("127.0.0.1")?.to_owned();
    Ok(TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?)
}

#[tokio::test]
async fn wss_and_https_on_one_port_and_certificates_reload() -> anyhow::Result<()> {
    let certs = tempfile::tempdir()?;
    self_signed(certs.path(), "first")?;
    self_signed(certs.path(), "second")?;
    let (cert, key) = (certs.path().join("live.crt"), certs.path().join("live.key"));
    std::fs::copy(certs.path().join("first.crt"), &cert)?;
    std::fs::copy(certs.path().join("first.key"), &key)?;
    let data = tempfile::tempdir()?;
    let node = NodeProcess::start(
        data.path(),
        &[
            "--tls-cert",
            cert.to_str().unwrap_or_default(),
            "--tls-key",
            key.to_str().unwrap_or_default(),
        ],
    )
    .await?;

    // https://
    let mut https = tls_connect(&node.addr, &certs.path().join("first.crt")).await?;
    https
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = String::new();
    https.read_to_string(&mut response).await.ok();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    // wss://
    let stream = tls_connect(&node.addr, &certs.path().join("first.crt")).await?;
    let (ws, _) =
        tokio_tungstenite::client_async(format!("wss://{}/v1/ws?user=ana", node.addr), stream)
            .await?;
    let mut ana = WsClient::from_stream(ws).await?;
    assert_eq!(ana.user, "ana");
    assert_eq!(ana.like("like", "secure", "k1").await?["count"], 1);
    // A plain (non-TLS) client gets nothing usable.
    assert!(
        tokio_tungstenite::connect_async(node.ws_url("plain"))
            .await
            .is_err()
    );

    // Swap the certificate files and signal: new connections see the new certificate.
    std::fs::copy(
        certs.path().join("second.key"),
        certs.path().join("next.key"),
    )?;
    std::fs::copy(
        certs.path().join("second.crt"),
        certs.path().join("next.crt"),
    )?;
    std::fs::rename(certs.path().join("next.key"), &key)?;
    std::fs::rename(certs.path().join("next.crt"), &cert)?;
    node.signal("HUP")?;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tls_connect(&node.addr, &certs.path().join("second.crt"))
        .await
        .is_err()
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "new certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        tls_connect(&node.addr, &certs.path().join("first.crt"))
            .await
            .is_err(),
        "old certificate retired"
    );
    // The connection opened under the old certificate is still fine.
    ana.send(json!({"type":"ping"})).await?;
    assert_eq!(ana.recv().await?, json!({"type":"pong"}));
    Ok(())
}
