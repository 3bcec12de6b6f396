//! Repeated warnings, rate-limited per call site: a warning that can fire once per like or per
//! call (Kafka slow, Redis away, a failing plugin) is written at most once per
//! [`THROTTLE_PERIOD`], with `suppressed` = how many were left out since the last one, so an
//! outage is one line every 10 s instead of thousands per second.
//!
//! Hand-written (≈40 lines) because the crates for it wrap the `log` crate (`log_limit`) or
//! need another runtime (`tor-log-ratelim`, arti's); see docs/dependencies.md.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// At most one line per call site in this period.
pub const THROTTLE_PERIOD: Duration = Duration::from_secs(10);

/// The state of one call site (a `static` inside the macros).
pub struct Throttle {
    /// Monotonic ms (since the first throttled line of the process) from which the next
    /// line may be written; 0 = never written.
    next_ms: AtomicI64,
    suppressed: AtomicU64,
}

impl Throttle {
    pub const fn new() -> Throttle {
        Throttle {
            next_ms: AtomicI64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(left out since the last line)` when this call may write its line.
    pub fn admit(&self) -> Option<u64> {
        static START: OnceLock<Instant> = OnceLock::new();
        let now = START.get_or_init(Instant::now).elapsed().as_millis() as i64 + 1;
        self.admit_at(now, THROTTLE_PERIOD.as_millis() as i64)
    }

    fn admit_at(&self, now_ms: i64, period_ms: i64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        if next != 0 && now_ms < next
            || self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms + period_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new()
    }
}

/// `tracing::warn!` at most once per [`THROTTLE_PERIOD`] from this call site, with a
/// `suppressed` field.
#[macro_export]
macro_rules! warn_throttled {
    ($($arg:tt)+) => {{
        static THROTTLE: $crate::logs::Throttle = $crate::logs::Throttle::new();
        if let Some(suppressed) = THROTTLE.admit() {
            tracing::warn!(suppressed, $($arg)+);
        }
    }};
}

/// `tracing::error!` at most once per [`THROTTLE_PERIOD`] from this call site, with a
/// `suppressed` field.
#[macro_export]
macro_rules! error_throttled {
    ($($arg:tt)+) => {{
        static THROTTLE: $crate::logs::Throttle = $crate::logs::Throttle::new();
        if let Some(suppressed) = THROTTLE.admit() {
            tracing::error!(suppressed, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::Throttle;

    #[test]
    fn one_line_per_period_with_the_count_left_out() {
        let throttle = Throttle::new();
        assert_eq!(
            throttle.admit_at(5, 1_000),
            Some(0),
            "the first line is written"
        );
        for at in [6, 500, 1_004] {
            assert_eq!(throttle.admit_at(at, 1_000), None, "at {at}");
        }
        assert_eq!(throttle.admit_at(1_005, 1_000), Some(3), "after the period");
        assert_eq!(throttle.admit_at(1_006, 1_000), None);
        assert_eq!(throttle.admit_at(9_000, 1_000), Some(1));
    }
}
