//! A connection's bounded queue of broadcast updates.
//!
//! Fan-out never waits on a socket: it drops the shared frame bytes into this queue and moves
//! on. Past `soft` entries a reader is behind, and a new update replaces the unsent one of the
//! same track (the reader gets the latest count, not every step). Entries only share frame
//! bytes, so holding one per subscribed track is cheap; `hard` (soft + the subscription limit)
//! is never reached by a well-behaved connection, and reaching it marks the outbox overflowed
//! so the session disconnects. A reader that is merely stuck is caught by the session's write
//! timeout.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

pub use crate::seams::bus::ConnId;

pub struct Outbox {
    pub conn: ConnId,
    soft: usize,
    hard: usize,
    state: Mutex<State>,
    wake: Notify,
}

#[derive(Default)]
struct State {
    updates: VecDeque<(Arc<str>, Utf8Bytes)>,
    overflowed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    Conflated,
    Overflowed,
}

impl Outbox {
    pub fn new(conn: ConnId, soft: usize, hard: usize) -> Outbox {
        Outbox {
            conn,
            soft,
            hard: hard.max(soft),
            state: Mutex::new(State::default()),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an update without ever blocking.
    pub fn push(&self, track: &Arc<str>, frame: &Utf8Bytes) -> Push {
        let outcome = {
            let mut state = self.lock();
            if state.overflowed {
                return Push::Overflowed;
            }
            let len = state.updates.len();
            if len < self.soft {
                state.updates.push_back((track.clone(), frame.clone()));
                Push::Queued
            } else if let Some(slot) = state.updates.iter_mut().rev().find(|(t, _)| t == track) {
                // The track's last queued frame, not its first: frames of the track queued
                // below `soft` may follow the first, and the newest must be delivered last.
                slot.1 = frame.clone();
                Push::Conflated
            } else if len < self.hard {
                state.updates.push_back((track.clone(), frame.clone()));
                Push::Queued
            } else {
                state.overflowed = true;
                Push::Overflowed
            }
        };
        if outcome != Push::Conflated {
            self.wake.notify_one();
        }
        outcome
    }

    /// Moves every queued frame into `into`; returns false if the outbox overflowed.
    pub fn take(&self, into: &mut Vec<Utf8Bytes>) -> bool {
        let mut state = self.lock();
        into.extend(state.updates.drain(..).map(|(_, frame)| frame));
        !state.overflowed
    }

    /// Resolves when something was pushed since the last call (no wake-up is ever lost).
    pub async fn wait(&self) {
        self.wake.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflates_then_overflows() {
        let outbox = Outbox::new(1, 2, 3);
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        assert_eq!(outbox.push(&a, &"a1".into()), Push::Queued);
        assert_eq!(outbox.push(&b, &"b1".into()), Push::Queued);
        assert_eq!(outbox.push(&a, &"a2".into()), Push::Conflated);
        let mut frames = Vec::new();
        assert!(outbox.take(&mut frames));
        assert_eq!(frames, vec![Utf8Bytes::from("a2"), Utf8Bytes::from("b1")]);
        outbox.push(&a, &"a3".into());
        outbox.push(&b, &"b3".into());
        assert_eq!(
            outbox.push(&c, &"c3".into()),
            Push::Queued,
            "a new track fits below hard"
        );
        assert_eq!(outbox.push(&c, &"c4".into()), Push::Conflated);
        let d: Arc<str> = "d".into();
        assert_eq!(outbox.push(&d, &"d4".into()), Push::Overflowed);
        assert!(!outbox.take(&mut frames));
    }

    #[test]
    fn the_newest_frame_of_a_track_is_delivered_last() {
        let outbox = Outbox::new(1, 2, 8);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        outbox.push(&a, &"a1".into());
        outbox.push(&a, &"a2".into());
        assert_eq!(outbox.push(&a, &"a3".into()), Push::Conflated);
        assert_eq!(outbox.push(&b, &"b1".into()), Push::Queued);
        let mut frames = Vec::new();
        assert!(outbox.take(&mut frames));
        let expected: Vec<Utf8Bytes> = vec!["a1".into(), "a3".into(), "b1".into()];
        assert_eq!(frames, expected);
    }
}
