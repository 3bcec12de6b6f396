//! TLS for wss:// and https:// on the node's one port (rustls), with certificate reload on
//! SIGHUP or when the certificate files change: new connections get the new certificate,
//! existing ones keep theirs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::metrics::Metrics;
use crate::tasks::Tasks;
use anyhow::{Context, bail};
use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    config: ArcSwap<ServerConfig>,
}

impl Tls {
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Arc<Tls>> {
        let config = build(cert, key)?;
        Ok(Arc::new(Tls {
            cert: cert.to_owned(),
            key: key.to_owned(),
            config: ArcSwap::from_pointee(config),
        }))
    }

    /// An acceptor with the current certificate.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.load_full())
    }

    /// Re-reads the files; a broken pair is refused and the current certificate stays.
    pub fn reload(&self) -> bool {
        let what = format!("TLS certificate {}", self.cert.display());
        crate::edge::watch::take_or_keep(&what, build(&self.cert, &self.key), |config| {
            self.config.store(Arc::new(config))
        })
    }

    /// Reloads on SIGHUP and when the certificate files change, until shutdown.
    pub fn spawn_watch(
        self: &Arc<Self>,
        tasks: &Tasks,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<()> {
        let tls = self.clone();
        let files = [self.cert.as_path(), self.key.as_path()];
        crate::edge::watch::spawn_reload(&files, "tls", tasks, metrics, move || tls.reload())
    }
}

fn build(cert: &Path, key: &Path) -> anyhow::Result<ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read --tls-cert {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("invalid certificate PEM in {}", cert.display()))?;
    if certs.is_empty() {
        bail!("no certificate in {}", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read a private key from --tls-key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("certificate and key do not match")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
