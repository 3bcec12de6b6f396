//! A connection's bounded queue of broadcast updates, and the update they share.
//!
//! Fan-out never waits on a socket: it drops a shared [`Update`] into this queue and moves
//! on. A connection holds at most one unsent update per key (a track, or a track's listener
//! count): a newer one replaces it, so a reader that is behind gets the latest count, never a
//! backlog of stale ones. Each update belongs to a [`Round`] (one flush of one track to its
//! listeners); fan-out starts a track's next round when the previous one has been taken by
//! every listener that was not already behind, so under load counts update less often instead
//! of queuing (docs/architecture.md, "Delivery"). `hard` distinct keys is never reached by a
//! well-behaved connection; reaching it marks the outbox overflowed and the session
//! disconnects. A reader that is merely stuck is caught by the session's write timeout.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

pub use crate::seams::bus::ConnId;

/// One update as every listener receives it: its JSON text (for SSE and tests) and its
/// WebSocket frame, built once on first use and then the same bytes for every socket (server
/// frames are unmasked).
pub struct Update {
    pub text: Utf8Bytes,
    frame: OnceLock<Bytes>,
    round: Arc<Round>,
}

impl Update {
    pub fn new(text: Utf8Bytes, round: Arc<Round>) -> Arc<Update> {
        Arc::new(Update {
            text,
            frame: OnceLock::new(),
            round,
        })
    }

    /// The complete WebSocket text frame (header + payload).
    pub fn ws_frame(&self) -> &Bytes {
        self.frame
            .get_or_init(|| ws_text_frame(self.text.as_bytes()))
    }
}

/// An unmasked, final WebSocket text frame carrying `payload` (RFC 6455 §5.2).
pub fn ws_text_frame(payload: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(payload.len() + 10);
    push_ws_text_frame(&mut frame, payload);
    Bytes::from(frame)
}

/// Appends one unmasked WebSocket text frame (a server's) holding `payload` to `out`.
pub fn push_ws_text_frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.push(0x81);
    match payload.len() {
        len @ 0..=125 => out.push(len as u8),
        len @ 126..=0xffff => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// How many connections still hold one round's update unsent. Starts at one (the fan-out's
/// own hold while it queues), so the round cannot finish before it has been queued
/// everywhere.
pub struct Round {
    outstanding: AtomicUsize,
    finished: Notify,
}

impl Round {
    pub fn new() -> Arc<Round> {
        Arc::new(Round {
            outstanding: AtomicUsize::new(1),
            finished: Notify::new(),
        })
    }

    fn hold(&self) {
        self.outstanding.fetch_add(1, Ordering::AcqRel);
    }

    /// One holder is done (taken for writing, replaced, or the fan-out finished queuing).
    pub fn release(&self) {
        if self.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finished.notify_waiters();
        }
    }

    pub fn is_finished(&self) -> bool {
        self.outstanding.load(Ordering::Acquire) == 0
    }

    /// Resolves when every holder is done, or after `at_most`.
    pub async fn finished(&self, at_most: std::time::Duration) {
        let notified = self.finished.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.is_finished() {
            return;
        }
        let _ = tokio::time::timeout(at_most, notified).await;
    }
}

/// A socket fan-out may write a whole frame to itself (edge/direct.rs), when nothing else is
/// queued or being written to it.
pub trait DirectSocket: Send + Sync {
    /// One non-blocking write; `WouldBlock` when the socket takes nothing.
    fn try_write(&self, bytes: &[u8]) -> std::io::Result<usize>;
}

pub struct Outbox {
    pub conn: ConnId,
    hard: usize,
    state: Mutex<State>,
    wake: Notify,
}

#[derive(Default)]
struct State {
    /// (key, update, whether this entry holds its update's round).
    updates: VecDeque<(Arc<str>, Arc<Update>, bool)>,
    overflowed: bool,
    /// The session is closing: nothing more is queued or written.
    closed: bool,
    direct: Option<Arc<dyn DirectSocket>>,
    /// The session wrote bytes it has not flushed (a frame may be half in the kernel).
    session_writing: bool,
    /// The part of a directly written frame the socket did not take; it goes out first.
    rest: Option<Bytes>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// Written to the socket by the caller: no queue, no wake-up.
    Written,
    Conflated,
    Overflowed,
}

impl Outbox {
    /// At most `hard` distinct keys queued at once.
    pub fn new(conn: ConnId, hard: usize) -> Outbox {
        Outbox {
            conn,
            hard: hard.max(1),
            state: Mutex::new(State::default()),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on fan-out may write whole frames to `socket` while the session is idle.
    pub fn attach(&self, socket: Arc<dyn DirectSocket>) {
        self.lock().direct = Some(socket);
    }

    /// The session is closing: a fan-out still holding this outbox (it listed the listeners
    /// before the unsubscribe) queues and writes nothing after the close frame.
    /// Updates it still holds stop holding their rounds: a connection that went away must
    /// not make its tracks' next updates wait.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        for (_, update, holds) in state.updates.drain(..) {
            if holds {
                update.round.release();
            }
        }
    }

    /// The session is over: the socket is released (closed once the session drops its end).
    pub fn detach(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.direct = None;
    }

    /// A write of the session's own (edge/direct.rs): the rest of a half-written direct frame
    /// first, then `bytes`; fan-out writes nothing until the session has flushed.
    pub fn session_write(&self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut state = self.lock();
        let socket = state.direct.clone().ok_or_else(not_attached)?;
        write_rest(&mut state, &*socket)?;
        state.session_writing = true;
        socket.try_write(bytes)
    }

    /// The session's writes are complete; fan-out may write directly again.
    pub fn session_flushed(&self) -> std::io::Result<()> {
        let mut state = self.lock();
        if let Some(socket) = state.direct.clone() {
            write_rest(&mut state, &*socket)?;
        }
        state.session_writing = false;
        Ok(())
    }

    /// Queues an update without ever blocking. A replaced update's round stops waiting for
    /// this connection, and the new one does not start: a connection already behind never
    /// holds a round up.
    pub fn push(&self, key: &Arc<str>, update: &Arc<Update>) -> Push {
        let outcome = {
            let mut state = self.lock();
            if state.overflowed || state.closed {
                return Push::Overflowed;
            }
            if let Some(slot) = state.updates.iter_mut().find(|(k, ..)| k == key) {
                let replaced = std::mem::replace(&mut slot.1, update.clone());
                if std::mem::replace(&mut slot.2, false) {
                    replaced.round.release();
                }
                Push::Conflated
            } else if let Some(written) = Self::write_direct(&mut state, update) {
                written
            } else if state.updates.len() < self.hard {
                update.round.hold();
                state.updates.push_back((key.clone(), update.clone(), true));
                Push::Queued
            } else {
                state.overflowed = true;
                Push::Overflowed
            }
        };
        if outcome == Push::Queued {
            self.wake.notify_one();
        }
        outcome
    }

    /// Writes the update's frame straight to an idle socket. `None`: not possible now (no
    /// socket, something queued or half-written, or the socket is full), queue it.
    fn write_direct(state: &mut State, update: &Update) -> Option<Push> {
        if !state.updates.is_empty() || state.session_writing || state.rest.is_some() {
            return None;
        }
        let socket = state.direct.as_ref()?;
        let frame = update.ws_frame();
        match socket.try_write(frame) {
            Ok(n) if n == frame.len() => Some(Push::Written),
            Ok(n) if n > 0 => {
                // The session writes the rest before anything else (it is woken for it).
                state.rest = Some(frame.slice(n..));
                Some(Push::Queued)
            }
            _ => None,
        }
    }

    /// Moves every queued update into `into`; returns false if the outbox overflowed.
    pub fn take(&self, into: &mut Vec<Arc<Update>>) -> bool {
        let mut state = self.lock();
        into.extend(state.updates.drain(..).map(|(_, update, holds)| {
            if holds {
                update.round.release();
            }
            update
        }));
        !state.overflowed
    }

    /// Resolves when something was pushed since the last call (no wake-up is ever lost).
    pub async fn wait(&self) {
        self.wake.notified().await
    }
}

/// Writes what is left of a half-written direct frame; `WouldBlock` while it cannot.
fn write_rest(state: &mut State, socket: &dyn DirectSocket) -> std::io::Result<()> {
    while let Some(rest) = state.rest.as_mut() {
        let n = socket.try_write(rest)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        if n == rest.len() {
            state.rest = None;
        } else {
            bytes::Buf::advance(rest, n);
        }
    }
    Ok(())
}

fn not_attached() -> std::io::Error {
    std::io::Error::other("the outbox has no socket attached")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(text: &str, round: &Arc<Round>) -> Arc<Update> {
        Update::new(text.into(), round.clone())
    }

    fn texts(updates: &[Arc<Update>]) -> Vec<&str> {
        updates.iter().map(|u| u.text.as_str()).collect()
    }

    #[test]
    fn one_unsent_update_per_key_then_overflow() {
        let outbox = Outbox::new(1, 2);
        let round = Round::new();
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        assert_eq!(outbox.push(&a, &update("a1", &round)), Push::Queued);
        assert_eq!(outbox.push(&b, &update("b1", &round)), Push::Queued);
        assert_eq!(outbox.push(&a, &update("a2", &round)), Push::Conflated);
        let mut taken = Vec::new();
        assert!(outbox.take(&mut taken));
        assert_eq!(texts(&taken), ["a2", "b1"]);
        outbox.push(&a, &update("a3", &round));
        outbox.push(&b, &update("b3", &round));
        assert_eq!(outbox.push(&c, &update("c3", &round)), Push::Overflowed);
        assert!(!outbox.take(&mut taken));
    }

    #[test]
    fn a_round_finishes_when_every_fresh_holder_took_it() {
        let (behind, reading) = (Outbox::new(1, 8), Outbox::new(2, 8));
        let track: Arc<str> = "t".into();
        let first = Round::new();
        behind.push(&track, &update("1", &first));
        reading.push(&track, &update("1", &first));
        first.release();
        let mut taken = Vec::new();
        reading.take(&mut taken);
        assert!(!first.is_finished(), "one connection has not taken it");
        let second = Round::new();
        assert_eq!(behind.push(&track, &update("2", &second)), Push::Conflated);
        assert!(
            first.is_finished(),
            "the replaced update no longer holds its round"
        );
        assert_eq!(reading.push(&track, &update("2", &second)), Push::Queued);
        second.release();
        reading.take(&mut taken);
        assert!(
            second.is_finished(),
            "a connection already behind does not hold the next round"
        );
    }

    /// A socket that takes up to `room` bytes, then would block.
    #[derive(Default)]
    struct Socket {
        room: Mutex<usize>,
        wire: Mutex<Vec<u8>>,
    }

    impl DirectSocket for Socket {
        fn try_write(&self, bytes: &[u8]) -> std::io::Result<usize> {
            let mut room = self.room.lock().unwrap_or_else(|p| p.into_inner());
            if *room == 0 {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            let n = bytes.len().min(*room);
            *room -= n;
            self.wire
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(&bytes[..n]);
            Ok(n)
        }
    }

    #[test]
    fn direct_writes_never_interleave_with_the_sessions() {
        let socket = Arc::new(Socket::default());
        *socket.room.lock().unwrap() = 1000;
        let outbox = Outbox::new(1, 8);
        outbox.attach(socket.clone());
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let round = Round::new();
        assert_eq!(outbox.push(&a, &update("a1", &round)), Push::Written);
        // The session has written part of a frame of its own: fan-out queues.
        assert_eq!(outbox.session_write(b"S1").unwrap(), 2);
        assert_eq!(outbox.push(&b, &update("b1", &round)), Push::Queued);
        outbox.session_flushed().unwrap();
        let mut taken = Vec::new();
        outbox.take(&mut taken);
        assert_eq!(texts(&taken), ["b1"]);
        // Idle again: the socket takes only part of the next frame; the rest goes out before
        // the session's next bytes, and nothing is written directly meanwhile.
        *socket.room.lock().unwrap() = 3;
        assert_eq!(outbox.push(&a, &update("a2", &round)), Push::Queued);
        assert_eq!(outbox.push(&b, &update("b2", &round)), Push::Queued);
        assert!(outbox.session_write(b"S2").is_err(), "the socket is full");
        *socket.room.lock().unwrap() = 1000;
        assert_eq!(outbox.session_write(b"S2").unwrap(), 2);
        outbox.session_flushed().unwrap();
        let wire = socket.wire.lock().unwrap().clone();
        assert_eq!(wire, b"\x81\x02a1S1\x81\x02a2S2");
        let next = Round::new();
        outbox.push(&a, &update("a3", &next));
        next.release();
        assert!(!next.is_finished());
        outbox.close();
        assert!(next.is_finished(), "a closed connection holds no round");
        assert_eq!(outbox.push(&a, &update("a4", &next)), Push::Overflowed);
    }

    #[test]
    fn the_frame_is_built_once_with_the_right_header() {
        let round = Round::new();
        let short = update("hi", &round);
        assert_eq!(&short.ws_frame()[..], b"\x81\x02hi");
        assert!(std::ptr::eq(short.ws_frame(), short.ws_frame()));
        let long = "x".repeat(300);
        let frame = ws_text_frame(long.as_bytes());
        assert_eq!(&frame[..4], &[0x81, 126, 0x01, 0x2c]);
        assert_eq!(frame.len(), 304);
    }
}
