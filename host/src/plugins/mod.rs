//! WebAssembly plugins: per-deployment rate limiting, validation and shaping.
//!
//! Each slot holds at most one loaded plugin behind an `ArcSwapOption`; an empty slot means
//! built-in behaviour. Calls are bounded (epoch deadline, memory cap) and a failing plugin
//! gets its slot's failure policy, never the node. Reloads compile off the event loop, run
//! a canary, then swap atomically; a refused component leaves the old one serving.

mod bindings;
mod engine;
mod loaded;
pub mod reload;
pub mod signing;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use serde_json::{Value, json};

use self::bindings::types;
use self::engine::PluginEngine;
use self::loaded::{Answer, Ask, CallFailure, LoadedPlugin};
use crate::metrics::Metrics;
use crate::seams::counters::Counters;
use fanfare_protocol::manifest::{Policy, SlotKind};
use fanfare_protocol::{Action, ErrorCode, LikeRequest, RecentLike};

/// The answer of the rate-limit and validation slots for one like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    Pass,
    Refuse {
        code: ErrorCode,
        message: String,
        retry_after_ms: Option<u32>,
    },
}

/// A refused reload, kept for `GET /admin/plugins`.
#[derive(Debug, Clone)]
struct Refusal {
    component: String,
    reason: String,
    at: SystemTime,
}

pub struct Plugins {
    manifest: Option<PathBuf>,
    cache_dir: PathBuf,
    engine: tokio::sync::OnceCell<Arc<PluginEngine>>,
    slots: [ArcSwapOption<LoadedPlugin>; 3],
    refusals: Mutex<HashMap<SlotKind, Refusal>>,
    counters: Arc<dyn Counters>,
    metrics: Arc<Metrics>,
    reloading: tokio::sync::Mutex<()>,
}

fn index(kind: SlotKind) -> usize {
    match kind {
        SlotKind::RateLimit => 0,
        SlotKind::Validate => 1,
        SlotKind::Shape => 2,
    }
}

fn wit_request(user: &str, request: &LikeRequest) -> types::LikeRequest {
    types::LikeRequest {
        user: user.to_owned(),
        track: request.track.clone(),
        key: request.key.clone(),
        action: wit_action(request.action),
    }
}

fn wit_action(action: Action) -> types::Action {
    match action {
        Action::Like => types::Action::Like,
        Action::Unlike => types::Action::Unlike,
    }
}

impl Plugins {
    /// With no manifest every slot stays built-in and no engine is created.
    pub fn new(
        manifest: Option<PathBuf>,
        cache_dir: PathBuf,
        counters: Arc<dyn Counters>,
        metrics: Arc<Metrics>,
    ) -> Plugins {
        Plugins {
            manifest,
            cache_dir,
            engine: tokio::sync::OnceCell::new(),
            slots: Default::default(),
            refusals: Mutex::new(HashMap::new()),
            counters,
            metrics,
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    pub fn manifest(&self) -> Option<&PathBuf> {
        self.manifest.as_ref()
    }

    /// Step 1 of a like.
    pub async fn rate_limit(&self, user: &str, request: &LikeRequest) -> Gate {
        let Some(plugin) = self.slots[index(SlotKind::RateLimit)].load_full() else {
            return Gate::Pass;
        };
        let result = self
            .timed(&plugin, Ask::Check(wit_request(user, request)))
            .await;
        match result {
            Ok(Answer::Rate(types::RateDecision::Allow)) => Gate::Pass,
            Ok(Answer::Rate(types::RateDecision::Limit(retry_after_ms))) => {
                self.rejected(&plugin);
                Gate::Refuse {
                    code: ErrorCode::RateLimited,
                    message: format!("too many likes; retry in {retry_after_ms} ms"),
                    retry_after_ms: Some(retry_after_ms),
                }
            }
            Ok(_) => self.failure_gate(&plugin, unexpected(), ErrorCode::RateLimited),
            Err(failure) => self.failure_gate(&plugin, failure, ErrorCode::RateLimited),
        }
    }

    /// Step 2 of a like.
    pub async fn validate(&self, user: &str, request: &LikeRequest) -> Gate {
        let Some(plugin) = self.slots[index(SlotKind::Validate)].load_full() else {
            return Gate::Pass;
        };
        let result = self
            .timed(&plugin, Ask::Validate(wit_request(user, request)))
            .await;
        match result {
            Ok(Answer::Verdict(types::Verdict::Accept)) => Gate::Pass,
            Ok(Answer::Verdict(types::Verdict::Reject(reason))) => {
                self.rejected(&plugin);
                let message: String = reason.chars().take(200).collect();
                Gate::Refuse {
                    code: ErrorCode::Rejected,
                    message,
                    retry_after_ms: None,
                }
            }
            Ok(_) => self.failure_gate(&plugin, unexpected(), ErrorCode::Rejected),
            Err(failure) => self.failure_gate(&plugin, failure, ErrorCode::Rejected),
        }
    }

    /// Shapes one update; `None` means "use the built-in frame" (no plugin, or it failed).
    pub async fn shape(
        &self,
        track: &str,
        count: u64,
        delta: i64,
        recent: &[RecentLike],
    ) -> Option<String> {
        let plugin = self.slots[index(SlotKind::Shape)].load_full()?;
        let update = types::Update {
            track: track.to_owned(),
            count,
            delta,
            recent: recent
                .iter()
                .map(|r| types::RecentLike {
                    user: r.user.clone(),
                    id: r.id.clone(),
                    action: wit_action(r.action),
                })
                .collect(),
        };
        let result = self.timed(&plugin, Ask::Shape(update)).await;
        match result {
            Ok(Answer::Frame(frame)) if !frame.is_empty() && frame.len() <= 64 * 1024 => {
                Some(frame)
            }
            Ok(_) => {
                plugin.stats.errors.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .plugin_event(plugin.spec.kind.as_str(), "invalid_output");
                crate::warn_throttled!(plugin = %plugin.name(), "shaper returned an empty or oversized frame; using built-in");
                None
            }
            Err(failure) => {
                crate::warn_throttled!(plugin = %plugin.name(), %failure, "shaping failed; using built-in frame");
                None
            }
        }
    }

    async fn timed(&self, plugin: &LoadedPlugin, ask: Ask) -> Result<Answer, CallFailure> {
        let slot = plugin.spec.kind.as_str();
        let started = std::time::Instant::now();
        let result = plugin.ask(plugin.spec.budget, ask).await;
        self.metrics
            .plugin_call(slot, started.elapsed().as_secs_f64());
        match &result {
            Err(CallFailure::Timeout | CallFailure::OutOfFuel) => {
                self.metrics.plugin_event(slot, "timeout")
            }
            Err(_) => self.metrics.plugin_event(slot, "trap"),
            Ok(_) => {}
        }
        result
    }

    fn rejected(&self, plugin: &LoadedPlugin) {
        plugin.stats.rejections.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .plugin_event(plugin.spec.kind.as_str(), "rejection");
    }

    fn failure_gate(&self, plugin: &LoadedPlugin, failure: CallFailure, code: ErrorCode) -> Gate {
        crate::warn_throttled!(slot = plugin.spec.kind.as_str(), plugin = %plugin.name(), %failure, policy = ?plugin.spec.policy, "plugin call failed");
        match plugin.spec.policy {
            Policy::FailOpen => Gate::Pass,
            Policy::FailClosed => Gate::Refuse {
                code,
                message: format!(
                    "the {} plugin is unavailable; retry later",
                    plugin.spec.kind.as_str()
                ),
                retry_after_ms: None,
            },
        }
    }

    /// `GET /admin/plugins`: one entry per slot.
    pub fn status(&self) -> Value {
        let refusals = self
            .refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let slots: Vec<Value> = SlotKind::ALL
            .iter()
            .map(|&kind| {
                let refusal = refusals.get(&kind).map(|r| {
                    json!({ "component": r.component, "reason": r.reason, "at": unix_ms(r.at) })
                });
                match self.slots[index(kind)].load_full() {
                    Some(p) => json!({
                        "slot": kind.as_str(),
                        "status": "active",
                        "name": p.name(),
                        "sha256": p.sha256,
                        "loaded_at": unix_ms(p.loaded_at),
                        "from_cache": p.from_cache,
                        "policy": format!("{:?}", p.spec.policy),
                        "budget_ms": p.spec.budget.as_millis() as u64,
                        "memory_mb": p.spec.memory_bytes >> 20,
                        "fuel": p.spec.fuel,
                        "calls": p.stats.calls.load(Ordering::Relaxed),
                        "rejections": p.stats.rejections.load(Ordering::Relaxed),
                        "errors": p.stats.errors.load(Ordering::Relaxed),
                        "timeouts": p.stats.timeouts.load(Ordering::Relaxed),
                        "last_refusal": refusal,
                    }),
                    None => json!({ "slot": kind.as_str(), "status": "built-in", "last_refusal": refusal }),
                }
            })
            .collect();
        json!({ "manifest": self.manifest.as_ref().map(|p| p.display().to_string()), "slots": slots })
    }
}

/// A plugin answered with another slot's kind of answer (cannot happen for a linked slot).
fn unexpected() -> CallFailure {
    CallFailure::Trap("unexpected answer for this slot".into())
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
