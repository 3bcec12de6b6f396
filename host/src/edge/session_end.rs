//! Why a session ended, the close frame that says so, and which read errors end it how.

use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Why a session ended; decides the close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    ClientClosed,
    /// Drained on shutdown; the client is told to reconnect after this many milliseconds.
    Shutdown(u64),
    HeartbeatTimeout,
    SlowConsumer,
    TooLarge,
    Garbage,
    /// Its token's `exp` passed (plus the leeway) with no refresh.
    TokenExpired,
    Broken,
}

impl End {
    pub(super) fn close_frame(self) -> Option<CloseFrame> {
        let (code, reason) = match self {
            End::ClientClosed | End::Broken => return None,
            End::Shutdown(after_ms) => {
                let reason = format!("node draining; reconnect_after_ms={after_ms}");
                return Some(CloseFrame {
                    code: CloseCode::Away,
                    reason: reason.into(),
                });
            }
            End::HeartbeatTimeout => (CloseCode::Normal, "heartbeat timeout"),
            End::SlowConsumer => (CloseCode::Again, "slow consumer"),
            End::TooLarge => (CloseCode::Size, "frame too large"),
            End::Garbage => (CloseCode::Policy, "too many bad frames"),
            End::TokenExpired => (CloseCode::Library(4001), "token expired"),
        };
        Some(CloseFrame {
            code,
            reason: reason.into(),
        })
    }
}

pub(super) fn read_error(err: WsError) -> End {
    match err {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => End::TooLarge,
        WsError::Capacity(_) => End::TooLarge,
        WsError::ConnectionClosed | WsError::AlreadyClosed => End::ClientClosed,
        _ => End::Broken,
    }
}
