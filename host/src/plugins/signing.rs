//! Supply chain: what a component must be before it is compiled — the manifest's `sha256` pin,
//! and with `[signing]` an ed25519 signature of its bytes (`<component>.sig`, base64) by one of
//! the listed public keys — and the `fanfare plugin` tools: `sign` and `public-key` to make
//! them, `check` to load a manifest (or one component) exactly as a node would, without one.
//!
//! Keys are PKCS#8 PEM files, as `openssl genpkey -algorithm ed25519 -out key.pem` writes.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::pkcs8::DecodePrivateKey;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use fanfare_protocol::manifest::SlotSpec;

/// Where a component's signature lives: next to it, `.sig` appended to its name.
pub fn signature_path(component: &Path) -> PathBuf {
    let mut name = component.as_os_str().to_owned();
    name.push(".sig");
    PathBuf::from(name)
}

/// Refuses a component that is not the one the manifest pins, or not signed by a key it
/// trusts. `signature`: the `.sig` file's text, if there is one.
pub fn check(
    spec: &SlotSpec,
    bytes: &[u8],
    sha256: &str,
    signature: Option<&str>,
) -> anyhow::Result<()> {
    if let Some(pin) = &spec.sha256
        && pin != sha256
    {
        bail!("its sha256 {sha256} is not the manifest's pin {pin}");
    }
    if spec.signers.is_empty() {
        return Ok(());
    }
    let sig_path = signature_path(&spec.component);
    let Some(text) = signature else {
        bail!(
            "the manifest requires a signature and {} is missing",
            sig_path.display()
        );
    };
    let raw = BASE64
        .decode(text.trim())
        .with_context(|| format!("{} is not base64", sig_path.display()))?;
    let signature = Signature::from_slice(&raw)
        .with_context(|| format!("{} is not an ed25519 signature", sig_path.display()))?;
    for key in &spec.signers {
        if public_key(key)?.verify(bytes, &signature).is_ok() {
            return Ok(());
        }
    }
    bail!(
        "{} is not a signature of this component by any key in [signing] public_keys",
        sig_path.display()
    )
}

/// A `[signing] public_keys` entry: base64 of the 32 raw key bytes.
fn public_key(text: &str) -> anyhow::Result<VerifyingKey> {
    let raw = BASE64
        .decode(text.trim())
        .with_context(|| format!("[signing] public key {text:?} is not base64"))?;
    let bytes: [u8; 32] = raw
        .as_slice()
        .try_into()
        .with_context(|| format!("[signing] public key {text:?} is not 32 bytes (ed25519)"))?;
    VerifyingKey::from_bytes(&bytes)
        .with_context(|| format!("[signing] public key {text:?} is not an ed25519 key"))
}

fn signing_key(path: &Path) -> anyhow::Result<SigningKey> {
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read key {}", path.display()))?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|err| {
        anyhow::anyhow!(
            "{} is not an ed25519 private key in PKCS#8 PEM (openssl genpkey -algorithm ed25519): {err}",
            path.display()
        )
    })
}

/// `fanfare plugin …`: tools for the manifest's supply-chain checks.
#[derive(Debug, clap::Parser)]
#[command(
    name = "fanfare plugin",
    version,
    about = "Sign components for the plugin manifest"
)]
pub enum PluginCommand {
    /// Signs a component with an ed25519 private key: writes `<file>.sig` next to it.
    Sign {
        /// PKCS#8 PEM private key (`openssl genpkey -algorithm ed25519 -out key.pem`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The component (`.wasm`).
        file: PathBuf,
    },
    /// Prints the public key of a private key, as `[signing] public_keys` lists it.
    PublicKey {
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
    /// Loads a manifest's slots — or one component in a slot — as a node does (pin,
    /// signature, compile, link against the slot's world, the canary call within the limits)
    /// and prints the per-slot report; exits 1 if any slot is refused.
    Check {
        /// The manifest (`fanfare.toml`), or a `.wasm` component with `--slot`.
        file: PathBuf,
        /// The slot a lone component is checked for (rate_limit, validate, shape).
        #[arg(long)]
        slot: Option<String>,
    },
}

pub fn run(command: PluginCommand) -> anyhow::Result<()> {
    match command {
        PluginCommand::Sign { key, file } => {
            let key = signing_key(&key)?;
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let signature = BASE64.encode(key.sign(&bytes).to_bytes());
            let out = signature_path(&file);
            std::fs::write(&out, format!("{signature}\n"))
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!("{}", out.display());
        }
        PluginCommand::PublicKey { key } => {
            println!(
                "{}",
                BASE64.encode(signing_key(&key)?.verifying_key().to_bytes())
            );
        }
        PluginCommand::Check { file, slot } => {
            let scratch = std::env::temp_dir().join(format!(
                "fanfare-plugin-check-{}-{:x}",
                std::process::id(),
                rand::random::<u32>()
            ));
            std::fs::create_dir_all(&scratch)
                .with_context(|| format!("cannot make {}", scratch.display()))?;
            let result = check_files(&scratch, file, slot);
            let _ = std::fs::remove_dir_all(&scratch);
            return result;
        }
    }
    Ok(())
}

/// `fanfare plugin check`: the node's own load path (`Plugins::reload`) with a scratch cache.
fn check_files(scratch: &Path, file: PathBuf, slot: Option<String>) -> anyhow::Result<()> {
    let manifest = match slot {
        None => file,
        Some(slot) => {
            if !["rate_limit", "validate", "shape"].contains(&slot.as_str()) {
                bail!("--slot must be rate_limit, validate or shape, not {slot:?}");
            }
            let component = std::fs::canonicalize(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let manifest = scratch.join("fanfare.toml");
            let text = format!(
                "[{slot}]\ncomponent = {}\n",
                toml::Value::String(component.to_string_lossy().into_owned())
            );
            std::fs::write(&manifest, text)?;
            manifest
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let report = runtime.block_on(async {
        let plugins = super::Plugins::new(
            Some(manifest),
            scratch.join("cache"),
            std::sync::Arc::new(crate::seams::counters::MemoryCounters::default()),
            std::sync::Arc::new(crate::metrics::Metrics::new()),
        );
        plugins.reload().await
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(error) = report["error"].as_str() {
        bail!("{error}");
    }
    let refused: Vec<&str> = report["slots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["outcome"] == "refused")
        .filter_map(|s| s["slot"].as_str())
        .collect();
    if !refused.is_empty() {
        bail!("refused: {}", refused.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Duration;

    fn spec(sha256: Option<String>, signers: Vec<String>) -> SlotSpec {
        SlotSpec {
            kind: fanfare_protocol::manifest::SlotKind::Validate,
            component: PathBuf::from("/p/v.wasm"),
            policy: fanfare_protocol::manifest::Policy::FailClosed,
            budget: Duration::from_millis(5),
            memory_bytes: 1 << 20,
            fuel: 10_000_000,
            config: HashMap::new(),
            sha256,
            signers,
        }
    }

    #[test]
    fn pins_and_signatures_decide() -> anyhow::Result<()> {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let other = SigningKey::from_bytes(&[8u8; 32]);
        let public = BASE64.encode(key.verifying_key().to_bytes());
        let bytes = b"component bytes";
        let signed = BASE64.encode(key.sign(bytes).to_bytes());
        let by_other = BASE64.encode(other.sign(bytes).to_bytes());

        assert!(
            check(&spec(None, vec![]), bytes, "aa", None).is_ok(),
            "no rules"
        );
        let pinned = spec(Some("aa".into()), vec![]);
        assert!(check(&pinned, bytes, "aa", None).is_ok());
        let err = check(&pinned, bytes, "bb", None).map_err(|e| e.to_string());
        assert!(err.is_err_and(|e| e.contains("pin")));

        let trusting = spec(None, vec![public]);
        assert!(check(&trusting, bytes, "aa", Some(&signed)).is_ok());
        for (signature, why) in [
            (None, "missing"),
            (Some(by_other.as_str()), "by any key"),
            (Some("not base64!"), "base64"),
        ] {
            let err = check(&trusting, bytes, "aa", signature).map_err(|e| e.to_string());
            assert!(
                err.as_ref().is_err_and(|e| e.contains(why)),
                "{why}: {err:?}"
            );
        }
        let tampered = check(&trusting, b"other bytes", "aa", Some(&signed));
        assert!(tampered.is_err(), "a signature covers the bytes");
        Ok(())
    }

    #[test]
    fn the_signature_sits_next_to_the_component() {
        assert_eq!(
            signature_path(Path::new("/p/v.wasm")),
            PathBuf::from("/p/v.wasm.sig")
        );
    }
}
