//! Rate limit: at most `likes` likes/unlikes per user per `window_ms`, refilled continuously.
//!
//! A sliding-window token bucket over the node's shared counters (memory on one node, Redis in
//! a farm), so the limit holds across nodes. Config: `likes` (default 30), `window_ms`
//! (default 10000), `per` = `user` (default) or `user_track`.

wit_bindgen::generate!({ world: "rate-limiter", path: "../../wit" });

use fanfare::plugin::host;

mod logic;

struct Plugin;

/// Config is fixed for the life of an instance (a reload makes new instances): read it once.
static CONFIG: std::sync::OnceLock<logic::Limits> = std::sync::OnceLock::new();

impl Guest for Plugin {
    fn check(request: LikeRequest) -> RateDecision {
        let limits = CONFIG.get_or_init(|| logic::Limits::from_config(|key| host::config(key)));
        let subject = match limits.per_track {
            true => format!("{}|{}", request.user, request.track),
            false => request.user,
        };
        let now = host::now_ms();
        let window = now / limits.window_ms;
        let ttl = limits.window_ms * 2;
        let previous =
            host::counter_add(&format!("rl:{subject}:{}", window.wrapping_sub(1)), 0, ttl);
        let current = host::counter_add(&format!("rl:{subject}:{window}"), 1, ttl);
        match logic::decide(&limits, now, previous, current) {
            None => RateDecision::Allow,
            Some(retry_after_ms) => RateDecision::Limit(retry_after_ms),
        }
    }
}

export!(Plugin);
