//! The node's wall clock, in one place: event times, stamps, history ranges and the skew
//! guard all read it here.
//!
//! Tests of clock skew shift it with the hidden `--test-clock-offset-ms` flag (a node "2 s
//! ahead" without touching the machine's clock); nothing else sets the offset.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// Milliseconds since the Unix epoch, as this node sees them.
pub fn now_ms() -> i64 {
    let system = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    system + OFFSET_MS.load(Ordering::Relaxed)
}

/// Shifts [`now_ms`] (set once at startup, from the test-only flag).
pub fn set_test_offset_ms(offset: i64) {
    OFFSET_MS.store(offset, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_offset_moves_the_clock() {
        let before = super::now_ms();
        super::set_test_offset_ms(3_600_000);
        let shifted = super::now_ms();
        super::set_test_offset_ms(0);
        assert!(shifted - before >= 3_600_000 && shifted - before < 3_660_000);
    }
}
