//! The wasmtime engine shared by every plugin: pooled instances, epoch interruption for time
//! budgets, a linker with the host interface and an empty WASI, and a compiled-artifact cache.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings::{HostState, host, types};

/// Epoch tick: the granularity of per-call time budgets.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);
/// Instances the pooling allocator reserves room for, across all plugins.
const POOLED_INSTANCES: u32 = 256;

/// wasmtime has its own error type; keep its full chain as text in ours.
pub fn wasm_error(err: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{err:#}")
}

pub struct PluginEngine {
    pub engine: Engine,
    pub linker: Arc<Linker<HostState>>,
    cache_dir: PathBuf,
}

impl PluginEngine {
    pub fn new(cache_dir: &Path) -> anyhow::Result<PluginEngine> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(POOLED_INSTANCES)
            .total_core_instances(POOLED_INSTANCES * 4)
            .total_memories(POOLED_INSTANCES * 2)
            .total_tables(POOLED_INSTANCES * 4)
            .total_stacks(POOLED_INSTANCES)
            .max_memory_size(256 << 20);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .consume_fuel(true)
            .max_wasm_stack(512 << 10)
            .async_stack_size(1 << 20)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)
            .map_err(wasm_error)
            .context("cannot create the wasmtime engine")?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(wasm_error)
            .context("cannot link WASI")?;
        host::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |state| state)
            .map_err(wasm_error)
            .context("cannot link the host interface")?;
        types::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |state| state)
            .map_err(wasm_error)
            .context("cannot link the types interface")?;

        // One thread advances the epoch; a call's deadline is counted in these ticks.
        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while let Some(engine) = ticker.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .context("cannot start the epoch thread")?;

        std::fs::create_dir_all(cache_dir)
            .with_context(|| format!("cannot create plugin cache {}", cache_dir.display()))?;
        Ok(PluginEngine {
            engine,
            linker: Arc::new(linker),
            cache_dir: cache_dir.to_owned(),
        })
    }

    /// Compiles a component, or loads it from the cache keyed by content hash and engine.
    /// Blocking: call it off the event loop.
    pub fn compile(&self, bytes: &[u8], sha256: &str) -> anyhow::Result<(Component, bool)> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        let cached = self
            .cache_dir
            .join(format!("{sha256}-{:016x}.cwasm", hasher.finish()));
        if cached.exists() {
            // SAFETY: the cache directory is written only by this function, from components
            // this engine compiled; the file name binds content hash and engine settings.
            match unsafe { Component::deserialize_file(&self.engine, &cached) } {
                Ok(component) => return Ok((component, true)),
                Err(err) => {
                    tracing::warn!(error = %err, file = %cached.display(), "ignoring bad cache entry")
                }
            }
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(wasm_error)
            .context("not a valid component")?;
        match component.serialize() {
            Ok(artifact) => {
                let partial = cached.with_extension("tmp");
                if let Err(err) = std::fs::write(&partial, artifact)
                    .and_then(|()| std::fs::rename(&partial, &cached))
                {
                    tracing::warn!(error = %err, "cannot write plugin cache");
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot serialize compiled plugin"),
        }
        Ok((component, false))
    }
}
