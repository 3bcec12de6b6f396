//! One loaded plugin: its pre-linked component, a pool of warm instances, and the bounded,
//! classified call that every slot goes through.
//!
//! A call checks out a warm instance (instantiating only when the pool is empty), sets the
//! epoch deadline, runs, and returns the instance. An instance that trapped, ran out of time
//! or memory is discarded, never reused. In-flight calls keep their `Arc` to this version, so
//! a reload never cuts them off.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Semaphore;
use wasmtime::Store;
use wasmtime::component::{Component, InstancePre};

use super::bindings::{HostState, PluginContext, rate_limiter, shaper, types, validator};
use super::engine::{EPOCH_TICK, PluginEngine, wasm_error};
use fanfare_protocol::manifest::{SlotKind, SlotSpec};

/// Concurrent calls per plugin; more wait (within the call budget) for a free instance.
const MAX_CONCURRENT: usize = 64;
/// Warm instances kept per plugin.
const MAX_WARM: usize = 16;

enum Pre {
    RateLimit(rate_limiter::RateLimiterPre<HostState>),
    Validate(validator::ValidatorPre<HostState>),
    Shape(shaper::ShaperPre<HostState>),
}

enum Bindings {
    RateLimit(rate_limiter::RateLimiter),
    Validate(validator::Validator),
    Shape(shaper::Shaper),
}

struct Warm {
    store: Store<HostState>,
    bindings: Bindings,
}

/// Why a call produced no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallFailure {
    Timeout,
    OutOfMemory,
    OutOfFuel,
    Trap(String),
    Busy,
}

impl std::fmt::Display for CallFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallFailure::Timeout => write!(f, "exceeded its time budget"),
            CallFailure::OutOfMemory => write!(f, "exceeded its memory cap"),
            CallFailure::OutOfFuel => write!(f, "exceeded its instruction budget (fuel)"),
            CallFailure::Trap(msg) => write!(f, "trapped: {msg}"),
            CallFailure::Busy => write!(f, "no free instance within the budget"),
        }
    }
}

#[derive(Default)]
pub struct Stats {
    pub calls: AtomicU64,
    pub rejections: AtomicU64,
    pub errors: AtomicU64,
    pub timeouts: AtomicU64,
}

pub struct LoadedPlugin {
    pub spec: SlotSpec,
    pub sha256: String,
    pub loaded_at: SystemTime,
    pub from_cache: bool,
    pub stats: Stats,
    engine: wasmtime::Engine,
    context: Arc<PluginContext>,
    pre: Pre,
    warm: Mutex<Vec<Warm>>,
    permits: Semaphore,
}

type CallFuture<'a, R> = Pin<Box<dyn Future<Output = wasmtime::Result<R>> + Send + 'a>>;

/// One call into a plugin; the variant must match the plugin's slot.
pub enum Ask {
    Check(types::LikeRequest),
    Validate(types::LikeRequest),
    Shape(types::Update),
}

/// A plugin's answer, by slot.
pub enum Answer {
    Rate(types::RateDecision),
    Verdict(types::Verdict),
    Frame(String),
}

impl LoadedPlugin {
    /// Links a compiled component for its slot; fails if it does not export the slot's world.
    pub fn link(
        engine: &PluginEngine,
        component: &Component,
        spec: SlotSpec,
        sha256: String,
        from_cache: bool,
        context: Arc<PluginContext>,
    ) -> anyhow::Result<LoadedPlugin> {
        let instance_pre: InstancePre<HostState> = engine
            .linker
            .instantiate_pre(component)
            .map_err(wasm_error)?;
        let pre = match spec.kind {
            SlotKind::RateLimit => {
                Pre::RateLimit(rate_limiter::RateLimiterPre::new(instance_pre).map_err(wasm_error)?)
            }
            SlotKind::Validate => {
                Pre::Validate(validator::ValidatorPre::new(instance_pre).map_err(wasm_error)?)
            }
            SlotKind::Shape => {
                Pre::Shape(shaper::ShaperPre::new(instance_pre).map_err(wasm_error)?)
            }
        };
        Ok(LoadedPlugin {
            spec,
            sha256,
            loaded_at: SystemTime::now(),
            from_cache,
            stats: Stats::default(),
            engine: engine.engine.clone(),
            context,
            pre,
            warm: Mutex::new(Vec::new()),
            permits: Semaphore::new(MAX_CONCURRENT),
        })
    }

    pub fn name(&self) -> String {
        self.spec
            .component
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    async fn instantiate(&self, budget: Duration) -> wasmtime::Result<Warm> {
        let mut store = Store::new(
            &self.engine,
            HostState::new(self.context.clone(), self.spec.memory_bytes),
        );
        store.limiter(|state| &mut state.limiter);
        store.epoch_deadline_trap();
        store.set_fuel(self.spec.fuel)?;
        // Instantiation runs guest start code: it gets a budget too.
        store.set_epoch_deadline(ticks(budget));
        let bindings = match &self.pre {
            Pre::RateLimit(pre) => Bindings::RateLimit(pre.instantiate_async(&mut store).await?),
            Pre::Validate(pre) => Bindings::Validate(pre.instantiate_async(&mut store).await?),
            Pre::Shape(pre) => Bindings::Shape(pre.instantiate_async(&mut store).await?),
        };
        Ok(Warm { store, bindings })
    }

    /// Asks the plugin its slot's question within `budget` (the slot's own, or the canary's).
    pub async fn ask(&self, budget: Duration, ask: Ask) -> Result<Answer, CallFailure> {
        self.call_with_budget(budget, move |bindings, store| {
            Box::pin(async move {
                match (bindings, ask) {
                    (Bindings::RateLimit(b), Ask::Check(r)) => {
                        b.call_check(store, &r).await.map(Answer::Rate)
                    }
                    (Bindings::Validate(b), Ask::Validate(r)) => {
                        b.call_validate(store, &r).await.map(Answer::Verdict)
                    }
                    (Bindings::Shape(b), Ask::Shape(u)) => {
                        b.call_shape(store, &u).await.map(Answer::Frame)
                    }
                    _ => Err(wasmtime::Error::msg(
                        "the call does not match the plugin's slot",
                    )),
                }
            })
        })
        .await
    }

    /// Runs `call` on a warm instance within `budget`.
    async fn call_with_budget<R>(
        &self,
        budget: Duration,
        call: impl for<'a> FnOnce(&'a Bindings, &'a mut Store<HostState>) -> CallFuture<'a, R>,
    ) -> Result<R, CallFailure> {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let Ok(Ok(_permit)) = tokio::time::timeout(budget, self.permits.acquire()).await else {
            return Err(self.failed(CallFailure::Busy));
        };
        let pooled = self.warm.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut warm = match pooled {
            Some(warm) => warm,
            None => match self.instantiate(budget).await {
                Ok(warm) => warm,
                Err(err) => return Err(self.failed(classify(&err, false))),
            },
        };
        warm.store.set_epoch_deadline(ticks(budget));
        if let Err(err) = warm.store.set_fuel(self.spec.fuel) {
            return Err(self.failed(classify(&err, false)));
        }
        // The epoch deadline stops guest code; this outer bound also covers host awaits
        // (e.g. a slow counter store). Either way the instance is discarded afterwards.
        let wall = budget.saturating_sub(started.elapsed()) * 2 + Duration::from_millis(10);
        let outcome = tokio::time::timeout(wall, call(&warm.bindings, &mut warm.store)).await;
        match outcome {
            Ok(Ok(value)) => {
                let mut pool = self.warm.lock().unwrap_or_else(|p| p.into_inner());
                if pool.len() < MAX_WARM {
                    pool.push(warm);
                }
                Ok(value)
            }
            Ok(Err(err)) => Err(self.failed(classify(&err, warm.store.data().limiter.refused))),
            Err(_) => Err(self.failed(CallFailure::Timeout)),
        }
    }

    fn failed(&self, failure: CallFailure) -> CallFailure {
        let counter = match failure {
            // Out of fuel is the time budget counted in instructions.
            CallFailure::Timeout | CallFailure::OutOfFuel => &self.stats.timeouts,
            _ => &self.stats.errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        failure
    }
}

fn ticks(budget: Duration) -> u64 {
    (budget.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64
}

fn classify(err: &wasmtime::Error, memory_refused: bool) -> CallFailure {
    match err.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => return CallFailure::Timeout,
        Some(wasmtime::Trap::OutOfFuel) => return CallFailure::OutOfFuel,
        _ => {}
    }
    if memory_refused {
        return CallFailure::OutOfMemory;
    }
    let message: String = format!("{err:#}").chars().take(300).collect();
    CallFailure::Trap(message)
}
