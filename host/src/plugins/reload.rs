//! Loading and hot reload: manifest → compile (cached, off the event loop) → link → canary →
//! atomic swap. Triggered at start, by a changed file next to the manifest, by SIGHUP, and by
//! `POST /admin/plugins/reload`. Reloads are serialized; a refused component never replaces
//! the one serving.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::tasks::Tasks;
use anyhow::{Context, anyhow, bail};
use notify::{EventKind, RecursiveMode, Watcher};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::bindings::{PluginContext, types};
use super::engine::PluginEngine;
use super::loaded::{Answer, Ask, LoadedPlugin};
use super::{Plugins, Refusal, index};
use fanfare_protocol::manifest::{self, SlotKind, SlotSpec};

/// The least time the canary call gets, whatever the slot's per-call budget.
const CANARY_MIN_BUDGET: Duration = Duration::from_millis(250);
/// Quiet time after the last file event before reloading (editors and copies write in steps).
const DEBOUNCE: Duration = Duration::from_millis(250);

impl Plugins {
    async fn engine(&self) -> anyhow::Result<Arc<PluginEngine>> {
        let cache_dir = self.cache_dir.clone();
        self.engine
            .get_or_try_init(|| async move {
                let engine =
                    tokio::task::spawn_blocking(move || PluginEngine::new(&cache_dir)).await??;
                anyhow::Ok(Arc::new(engine))
            })
            .await
            .cloned()
    }

    /// Loads the manifest at start; any slot that fails to load is an error (the node should
    /// not start without a plugin the operator asked for).
    pub async fn load_initial(&self) -> anyhow::Result<()> {
        if self.manifest.is_none() {
            return Ok(());
        }
        let report = self.reload().await;
        let failed: Vec<String> = report["slots"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["outcome"] == "refused")
            .map(|s| {
                format!(
                    "{}: {}",
                    s["slot"].as_str().unwrap_or("?"),
                    s["reason"].as_str().unwrap_or("?")
                )
            })
            .collect();
        if let Some(error) = report["error"].as_str() {
            bail!("{error}");
        }
        if !failed.is_empty() {
            bail!("plugins refused: {}", failed.join("; "));
        }
        Ok(())
    }

    /// Re-reads the manifest and swaps in every slot whose component or settings changed.
    pub async fn reload(&self) -> Value {
        let _one_at_a_time = self.reloading.lock().await;
        let Some(path) = self.manifest.clone() else {
            return json!({ "error": "no plugin manifest configured (--plugins)" });
        };
        let specs = match manifest::load(&path) {
            Ok(specs) => specs,
            Err(err) => {
                tracing::error!(
                    error = format!("{err:#}"),
                    "plugin manifest refused; keeping current plugins"
                );
                self.metrics.plugin_reload("manifest", "refused");
                return json!({ "error": format!("{err:#}") });
            }
        };
        let engine = match self.engine().await {
            Ok(engine) => engine,
            Err(err) => return json!({ "error": format!("{err:#}") }),
        };
        let mut slots = Vec::new();
        for kind in SlotKind::ALL {
            let spec = specs.iter().find(|s| s.kind == kind).cloned();
            slots.push(self.reload_slot(&engine, kind, spec).await);
        }
        json!({ "slots": slots })
    }

    async fn reload_slot(
        &self,
        engine: &Arc<PluginEngine>,
        kind: SlotKind,
        spec: Option<SlotSpec>,
    ) -> Value {
        let slot = &self.slots[index(kind)];
        let current = slot.load_full();
        let Some(spec) = spec else {
            if current.is_some() {
                retire(slot.swap(None));
                self.metrics.plugin_reload(kind.as_str(), "unloaded");
                tracing::info!(slot = kind.as_str(), "plugin unloaded; built-in behaviour");
                return json!({ "slot": kind.as_str(), "outcome": "unloaded" });
            }
            return json!({ "slot": kind.as_str(), "outcome": "built-in" });
        };
        let component = spec.component.display().to_string();
        let started = std::time::Instant::now();
        let bytes = match tokio::fs::read(&spec.component).await {
            Ok(bytes) => bytes,
            Err(err) => {
                return self.refuse(kind, component, anyhow!("cannot read component: {err}"));
            }
        };
        let (bytes, sha256) = match tokio::task::spawn_blocking(move || {
            let sha256 = hex::encode(Sha256::digest(&bytes));
            (bytes, sha256)
        })
        .await
        {
            Ok(hashed) => hashed,
            Err(err) => return self.refuse(kind, component, anyhow!("hashing failed: {err}")),
        };
        // Supply chain first: a component the manifest does not vouch for is never compiled.
        let signature = tokio::fs::read_to_string(super::signing::signature_path(&spec.component))
            .await
            .ok();
        if let Err(err) = super::signing::check(&spec, &bytes, &sha256, signature.as_deref()) {
            return self.refuse(kind, component, err);
        }
        if let Some(current) = &current
            && current.sha256 == sha256
            && current.spec == spec
        {
            return json!({ "slot": kind.as_str(), "outcome": "unchanged", "sha256": sha256 });
        }
        match self.prepare(engine, spec, bytes, sha256).await {
            Ok(plugin) => {
                let report = json!({
                    "slot": kind.as_str(),
                    "outcome": "loaded",
                    "name": plugin.name(),
                    "sha256": plugin.sha256,
                    "from_cache": plugin.from_cache,
                    "ms": started.elapsed().as_secs_f64() * 1000.0,
                });
                tracing::info!(slot = kind.as_str(), plugin = %plugin.name(), sha256 = %plugin.sha256, from_cache = plugin.from_cache, "plugin active");
                retire(slot.swap(Some(plugin)));
                self.refusals
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&kind);
                self.metrics.plugin_reload(kind.as_str(), "loaded");
                report
            }
            Err(err) => self.refuse(kind, component, err),
        }
    }

    fn refuse(&self, kind: SlotKind, component: String, err: anyhow::Error) -> Value {
        let reason = format!("{err:#}");
        tracing::error!(slot = kind.as_str(), %component, %reason, "plugin refused; the previous one (if any) keeps serving");
        self.metrics.plugin_reload(kind.as_str(), "refused");
        let refusal = Refusal {
            component: component.clone(),
            reason: reason.clone(),
            at: SystemTime::now(),
        };
        self.refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(kind, refusal);
        json!({ "slot": kind.as_str(), "outcome": "refused", "component": component, "reason": reason })
    }

    /// Compile (or fetch from cache) off the event loop, link, and pass the canary.
    async fn prepare(
        &self,
        engine: &Arc<PluginEngine>,
        spec: SlotSpec,
        bytes: Vec<u8>,
        sha256: String,
    ) -> anyhow::Result<Arc<LoadedPlugin>> {
        let context = Arc::new(PluginContext {
            slot: spec.kind,
            name: spec
                .component
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            config: spec.config.clone(),
            counters: self.counters.clone(),
        });
        // Compiling (or deserializing) and linking (type-checking every import) both take
        // milliseconds: keep them off the event loop.
        let engine = engine.clone();
        let runtime = tokio::runtime::Handle::current();
        let plugin = tokio::task::spawn_blocking(move || {
            let (component, from_cache) = engine.compile(&bytes, &sha256)?;
            let plugin = LoadedPlugin::link(&engine, &component, spec, sha256, from_cache, context)
                .context("component does not fit its slot")?;
            // The canary's first instantiation is the slow one: it too runs off the event loop.
            runtime.block_on(canary(&plugin))?;
            anyhow::Ok(plugin)
        })
        .await
        .context("compiler task failed")??;
        Ok(Arc::new(plugin))
    }
}

/// Drops a replaced plugin off the event loop: freeing its instances and compiled code
/// (munmap, decommit) takes milliseconds. Calls still running hold their own `Arc`.
fn retire(old: Option<Arc<LoadedPlugin>>) {
    if let Some(old) = old {
        tokio::task::spawn_blocking(move || drop(old));
    }
}

/// Instantiates the plugin and makes one self-test call of its slot.
async fn canary(plugin: &LoadedPlugin) -> anyhow::Result<()> {
    let request = types::LikeRequest {
        user: "fanfare-canary".into(),
        track: "fanfare:canary".into(),
        key: "canary".into(),
        action: types::Action::Like,
    };
    let update = types::Update {
        track: "fanfare:canary".into(),
        count: 1,
        delta: 1,
        recent: vec![types::RecentLike {
            user: "fanfare-canary".into(),
            id: "canary".into(),
            action: types::Action::Like,
        }],
    };
    // The self-test checks behaviour, not speed: a first instantiation on a busy machine, or
    // Redis round trips for counters, may take longer than the per-call budget.
    let budget = (plugin.spec.budget * 10).max(CANARY_MIN_BUDGET);
    let ask = match plugin.spec.kind {
        SlotKind::RateLimit => Ask::Check(request),
        SlotKind::Validate => Ask::Validate(request),
        SlotKind::Shape => Ask::Shape(update),
    };
    let answer = plugin
        .ask(budget, ask)
        .await
        .map_err(|failure| anyhow!("canary call {failure}"))?;
    if let Answer::Frame(frame) = answer
        && serde_json::from_str::<serde_json::Map<String, Value>>(&frame).is_err()
    {
        bail!("canary: the shaper's frame is not a JSON object");
    }
    Ok(())
}

/// Reloads on SIGHUP and on file changes next to the manifest, until shutdown.
pub fn spawn_triggers(plugins: Arc<Plugins>, tasks: &Tasks) -> anyhow::Result<()> {
    let Some(manifest) = plugins.manifest().cloned() else {
        return Ok(());
    };
    let dir = manifest
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_else(|| ".".into());
    let (changed, mut changes) = tokio::sync::mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && matches!(
                event.kind,
                EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
            )
        {
            let _ = changed.try_send(());
        }
    })
    .context("cannot watch the plugin directory")?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", dir.display()))?;
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot watch SIGHUP")?;
    let shutdown = tasks.shutdown().clone();
    tasks.spawn(async move {
        let _watcher = watcher;
        loop {
            let trigger = tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(()) = changes.recv() => {
                    // Let a burst of writes settle, then reload once.
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep(DEBOUNCE) => break,
                            Some(()) = changes.recv() => continue,
                        }
                    }
                    "file change"
                }
                _ = hangup.recv() => "SIGHUP",
            };
            let report = plugins.reload().await;
            tracing::info!(trigger, report = %report, "plugin reload");
        }
    });
    Ok(())
}
