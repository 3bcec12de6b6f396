//! Plugin overhead on the like path, reload time from the compiled cache, and how long a
//! reload stalls the event loop. Needs the built components: `./scripts/build-plugins`.
//!
//!     cargo bench -p fanfare --bench plugins

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use fanfare::metrics::Metrics;
use fanfare::plugins::Plugins;
use fanfare::seams::counters::MemoryCounters;
use fanfare_protocol::{Action, LikeRequest, RecentLike};

const MANIFEST: &str = r#"
[rate_limit]
component = "rate_limit_token_bucket.wasm"
config = { likes = 1000000000, window_ms = 60000 }
[validate]
component = "validate_basic.wasm"
config = { banned_users = ["spammer"], blocked_tracks = ["leak:*"] }
[shape]
component = "shape_json.wasm"
"#;

fn load(runtime: &tokio::runtime::Runtime, dir: &Path, manifest: Option<&str>) -> Arc<Plugins> {
    let path = dir.join("fanfare.toml");
    if let Some(text) = manifest {
        std::fs::write(&path, text).expect("write manifest");
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
    for name in [
        "rate_limit_token_bucket.wasm",
        "validate_basic.wasm",
        "shape_json.wasm",
    ] {
        std::fs::copy(built.join(name), dir.join(name)).expect("run ./scripts/build-plugins first");
    }
    let plugins = Arc::new(Plugins::new(
        manifest.map(|_| path),
        dir.join("cache"),
        Arc::new(MemoryCounters::default()),
        Arc::new(Metrics::new()),
    ));
    runtime
        .block_on(plugins.load_initial())
        .expect("plugins load");
    plugins
}

/// One worker thread: plugin calls and the stall ticker share a single event loop.
fn one_worker_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

fn like_path(c: &mut Criterion) {
    let runtime = one_worker_runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let with = load(&runtime, dir.path(), Some(MANIFEST));
    let without = load(&runtime, dir.path(), None);
    let request = LikeRequest {
        action: Action::Like,
        track: "album:42".into(),
        key: "k1".into(),
    };

    let mut group = c.benchmark_group("like_path");
    group.bench_function("rate_limit+validate wasm", |b| {
        b.to_async(&runtime).iter(|| async {
            with.rate_limit("ana", &request).await;
            with.validate("ana", &request).await
        })
    });
    group.bench_function("validate wasm alone", |b| {
        b.to_async(&runtime)
            .iter(|| async { with.validate("ana", &request).await })
    });
    group.bench_function("rate_limit wasm alone", |b| {
        b.to_async(&runtime)
            .iter(|| async { with.rate_limit("ana", &request).await })
    });
    group.bench_function("rate_limit+validate built-in", |b| {
        b.to_async(&runtime).iter(|| async {
            without.rate_limit("ana", &request).await;
            without.validate("ana", &request).await
        })
    });
    let recent: Vec<RecentLike> = (0..10)
        .map(|i| RecentLike {
            user: format!("user{i}"),
            id: format!("k{i}"),
            action: Action::Like,
        })
        .collect();
    group.bench_function("shape wasm (10 recent)", |b| {
        b.to_async(&runtime)
            .iter(|| async { with.shape("album:42", 1234, 10, &recent).await })
    });
    group.finish();
}

/// Reload with a changed config (component bytes unchanged, so compiled artifacts come from
/// the cache) and record the worst lateness of a 1 ms ticker on the same event loop.
fn reload(c: &mut Criterion) {
    let runtime = one_worker_runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let plugins = load(&runtime, dir.path(), Some(MANIFEST));
    let manifest = dir.path().join("fanfare.toml");
    let stall = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let ticker_stall = stall.clone();
    runtime.spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_millis(1));
        let mut last = Instant::now();
        loop {
            interval.tick().await;
            let late = last.elapsed().saturating_sub(Duration::from_millis(1));
            let mut worst = ticker_stall.lock().expect("lock");
            *worst = (*worst).max(late);
            last = Instant::now();
        }
    });
    // Baseline: the same ticker with no reloads, for the same kind of duration.
    runtime.block_on(async { tokio::time::sleep(Duration::from_secs(3)).await });
    let idle = std::mem::take(&mut *stall.lock().expect("lock"));
    let mut flip = 0u64;
    c.bench_function("reload one changed slot (artifact from cache)", |b| {
        b.to_async(&runtime).iter(|| {
            flip += 1;
            std::fs::write(
                &manifest,
                MANIFEST.replace("1000000000", &format!("{}", 1_000_000_000 + flip)),
            )
            .expect("write manifest");
            let plugins = plugins.clone();
            // Run the reload as a task on the single worker thread, the same event loop as
            // the ticker, so the ticker's lateness is the reload's own blocking time.
            let task =
                tokio::runtime::Handle::current().spawn(async move { plugins.reload().await });
            async move { task.await.expect("reload task") }
        })
    });
    println!(
        "1 ms ticker worst lateness: {idle:?} idle, {:?} during back-to-back reloads",
        *stall.lock().expect("lock")
    );
}

criterion_group!(benches, like_path, reload);
criterion_main!(benches);
