//! The deployment manifest (`plugins/fanfare.toml`): which component fills which slot, with
//! its config table, failure policy, time budget and memory cap — and what a component must
//! be: its `sha256` pinned per slot, and, with `[signing]`, an ed25519 signature
//! (`<component>.sig`) by one of the listed public keys.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SlotKind {
    RateLimit,
    Validate,
    Shape,
}

impl SlotKind {
    pub const ALL: [SlotKind; 3] = [SlotKind::RateLimit, SlotKind::Validate, SlotKind::Shape];

    pub fn as_str(self) -> &'static str {
        match self {
            SlotKind::RateLimit => "rate_limit",
            SlotKind::Validate => "validate",
            SlotKind::Shape => "shape",
        }
    }

    /// Rate limiting and validation refuse likes when their plugin fails; shaping falls back
    /// to the built-in frame.
    pub fn default_policy(self) -> Policy {
        match self {
            SlotKind::RateLimit | SlotKind::Validate => Policy::FailClosed,
            SlotKind::Shape => Policy::FailOpen,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// On a plugin failure, behave as if the plugin allowed (shaping: use the built-in frame).
    FailOpen,
    /// On a plugin failure, refuse the like.
    FailClosed,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    signing: Option<RawSigning>,
    rate_limit: Option<RawSlot>,
    validate: Option<RawSlot>,
    shape: Option<RawSlot>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSigning {
    /// ed25519 public keys (base64 of the 32 raw bytes) whose signatures are accepted.
    public_keys: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlot {
    component: PathBuf,
    policy: Option<Policy>,
    budget_ms: Option<u64>,
    memory_mb: Option<u64>,
    fuel: Option<u64>,
    sha256: Option<String>,
    #[serde(default)]
    config: toml::Table,
}

/// One slot's settings, resolved and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotSpec {
    pub kind: SlotKind,
    /// Absolute (or manifest-relative resolved) path of the `.wasm` component.
    pub component: PathBuf,
    pub policy: Policy,
    pub budget: Duration,
    /// Linear memory of one instance, all its memories together.
    pub memory_bytes: usize,
    /// Instructions (wasmtime fuel) one call may run, whatever the machine's speed or load.
    pub fuel: u64,
    pub config: HashMap<String, String>,
    /// The component's SHA-256 (lowercase hex) if the manifest pins it: any other file is
    /// refused.
    pub sha256: Option<String>,
    /// With `[signing]`: the public keys (base64) one of which must have signed the component
    /// (`<component>.sig`, base64 of the ed25519 signature of its bytes).
    pub signers: Vec<String>,
}

pub const DEFAULT_BUDGET_MS: u64 = 5;
pub const DEFAULT_MEMORY_MB: u64 = 16;
/// Ten million instructions: a few ms of guest code, far more than a like's question needs.
pub const DEFAULT_FUEL: u64 = 10_000_000;

/// Reads and checks a manifest; component paths are resolved relative to its directory.
pub fn load(path: &Path) -> anyhow::Result<Vec<SlotSpec>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read plugin manifest {}", path.display()))?;
    parse(&text, path.parent().unwrap_or(Path::new(".")))
        .with_context(|| format!("invalid plugin manifest {}", path.display()))
}

pub fn parse(text: &str, base: &Path) -> anyhow::Result<Vec<SlotSpec>> {
    let raw: RawManifest = toml::from_str(text)?;
    let signers = match raw.signing {
        Some(signing) if signing.public_keys.is_empty() => {
            bail!("[signing] public_keys must list at least one key")
        }
        Some(signing) => signing.public_keys,
        None => Vec::new(),
    };
    let mut specs = Vec::new();
    for (kind, slot) in [
        (SlotKind::RateLimit, raw.rate_limit),
        (SlotKind::Validate, raw.validate),
        (SlotKind::Shape, raw.shape),
    ] {
        let Some(slot) = slot else { continue };
        let budget_ms = slot.budget_ms.unwrap_or(DEFAULT_BUDGET_MS);
        if !(1..=1000).contains(&budget_ms) {
            bail!("[{}] budget_ms must be 1..=1000", kind.as_str());
        }
        let memory_mb = slot.memory_mb.unwrap_or(DEFAULT_MEMORY_MB);
        if !(1..=256).contains(&memory_mb) {
            bail!("[{}] memory_mb must be 1..=256", kind.as_str());
        }
        let fuel = slot.fuel.unwrap_or(DEFAULT_FUEL);
        if !(10_000..=1_000_000_000).contains(&fuel) {
            bail!("[{}] fuel must be 10000..=1000000000", kind.as_str());
        }
        if slot.component.as_os_str().is_empty() {
            bail!("[{}] component must name a .wasm file", kind.as_str());
        }
        if let Some(pin) = &slot.sha256
            && !(pin.len() == 64
                && pin
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        {
            bail!("[{}] sha256 must be 64 lowercase hex digits", kind.as_str());
        }
        let mut config = HashMap::new();
        for (key, value) in slot.config {
            let Some(text) = crate::toml_text::toml_text(&value) else {
                bail!(
                    "[{}] config.{key}: use a string, number, boolean or a list of them",
                    kind.as_str()
                );
            };
            config.insert(key, text);
        }
        specs.push(SlotSpec {
            kind,
            component: base.join(slot.component),
            policy: slot.policy.unwrap_or(kind.default_policy()),
            budget: Duration::from_millis(budget_ms),
            memory_bytes: (memory_mb as usize) << 20,
            fuel,
            config,
            sha256: slot.sha256,
            signers: signers.clone(),
        });
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_slots_with_defaults() -> anyhow::Result<()> {
        let specs = parse(
            r#"
            [validate]
            component = "v.wasm"
            config = { banned_users = ["a", "b"], max_track_len = 40 }
            [shape]
            component = "/abs/s.wasm"
            budget_ms = 2
            "#,
            Path::new("/plugins"),
        )?;
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].component, PathBuf::from("/plugins/v.wasm"));
        assert_eq!(specs[0].policy, Policy::FailClosed);
        assert_eq!(specs[0].config["banned_users"], "a,b");
        assert_eq!(specs[0].config["max_track_len"], "40");
        assert_eq!(specs[1].component, PathBuf::from("/abs/s.wasm"));
        assert_eq!(specs[1].policy, Policy::FailOpen);
        assert_eq!(specs[1].budget, Duration::from_millis(2));
        Ok(())
    }

    #[test]
    fn refuses_mistakes() {
        let base = Path::new(".");
        assert!(
            parse("[validat]\ncomponent = \"x\"", base).is_err(),
            "unknown slot"
        );
        assert!(parse("[validate]\ncomponent = \"x\"\nbudget_ms = 0", base).is_err());
        assert!(parse("[validate]\ncomponent = \"x\"\npolicy = \"maybe\"", base).is_err());
        assert!(
            parse("[validate]\npolicy = \"fail_open\"", base).is_err(),
            "component missing"
        );
        assert!(parse("not toml [", base).is_err());
        assert!(
            parse("[validate]\ncomponent = \"x\"\nsha256 = \"ABC\"", base).is_err(),
            "a pin is 64 lowercase hex digits"
        );
        assert!(parse("[signing]\npublic_keys = []", base).is_err());
    }

    #[test]
    fn pins_and_signers_reach_every_slot() -> anyhow::Result<()> {
        let pin = "ab".repeat(32);
        let specs = parse(
            &format!(
                "[signing]\npublic_keys = [\"k1\", \"k2\"]\n[validate]\ncomponent = \"v.wasm\"\nsha256 = \"{pin}\"\n[shape]\ncomponent = \"s.wasm\""
            ),
            Path::new("/p"),
        )?;
        assert_eq!(specs[0].sha256.as_deref(), Some(pin.as_str()));
        assert_eq!(specs[1].sha256, None);
        for spec in &specs {
            assert_eq!(spec.signers, ["k1", "k2"]);
        }
        Ok(())
    }
}
