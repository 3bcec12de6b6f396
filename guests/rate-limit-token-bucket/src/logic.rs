//! The limit arithmetic, free of host calls so it is unit-tested natively (`cargo test`).

pub struct Limits {
    pub likes: u64,
    pub window_ms: u64,
    pub per_track: bool,
}

impl Limits {
    pub fn from_config(get: impl Fn(&str) -> Option<String>) -> Limits {
        let number = |key: &str, default: u64| {
            get(key)
                .and_then(|v| v.trim().parse().ok())
                .filter(|&v| v > 0)
                .unwrap_or(default)
        };
        Limits {
            likes: number("likes", 30),
            window_ms: number("window_ms", 10_000),
            per_track: get("per").is_some_and(|v| v == "user_track"),
        }
    }
}

/// `previous` and `current` are the counts of the previous and current fixed windows (current
/// includes this request). The previous window counts in proportion to how much of it still
/// overlaps the sliding window. Returns `Some(retry_after_ms)` when over the limit.
pub fn decide(limits: &Limits, now_ms: u64, previous: u64, current: u64) -> Option<u32> {
    let into_window = now_ms % limits.window_ms;
    let overlap = (limits.window_ms - into_window) as f64 / limits.window_ms as f64;
    let estimate = previous as f64 * overlap + current as f64;
    if estimate <= limits.likes as f64 {
        return None;
    }
    // Waiting for the current window to end always brings the estimate down.
    Some((limits.window_ms - into_window).min(u32::MAX as u64) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(likes: u64) -> Limits {
        Limits {
            likes,
            window_ms: 1000,
            per_track: false,
        }
    }

    #[test]
    fn allows_up_to_the_limit_then_refuses_with_a_retry_after() {
        let l = limits(3);
        assert_eq!(decide(&l, 10_000, 0, 3), None);
        assert_eq!(decide(&l, 10_250, 0, 4), Some(750));
    }

    #[test]
    fn the_previous_window_fades_out() {
        let l = limits(10);
        // Just after a window boundary the previous window still counts almost fully.
        assert!(decide(&l, 10_001, 10, 1).is_some());
        // Near the end of the current window it barely counts.
        assert_eq!(decide(&l, 10_990, 10, 1), None);
    }

    #[test]
    fn config_defaults_and_parsing() {
        let l = Limits::from_config(|k| (k == "likes").then(|| "5".to_owned()));
        assert_eq!((l.likes, l.window_ms, l.per_track), (5, 10_000, false));
        let l = Limits::from_config(|k| (k == "likes").then(|| "zero".to_owned()));
        assert_eq!(l.likes, 30);
    }
}
