//! Protocol v1: the JSON frames a client and a node exchange, and the rules for ids.
//!
//! Decoding is strict about what it needs (type, field types, id syntax) and lenient about
//! what it does not (unknown extra fields are ignored, so clients can evolve). Every failure
//! maps to one [`ErrorCode`] plus a message a human can act on. See `docs/protocol.md`.
//!
//! A crate of its own so the node, the Rust client, the load generator and the fuzz targets
//! share one definition (the fuzz build stays free of wasmtime, rdkafka and mongodb). It also
//! holds the plugin manifest parser, the other input the fuzzers exercise.

pub mod manifest;
pub mod toml_text;

use serde::Serialize;
use serde_json::{Map, Value};

/// What a client asks of the node, after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    Subscribe {
        track: String,
        /// Also send `listeners` frames when only the number of listeners changes.
        listeners: bool,
    },
    Unsubscribe {
        track: String,
    },
    Like(LikeRequest),
    Ping,
    /// A newer token for the same user, so the session outlives its first token's `exp`.
    Refresh {
        token: String,
    },
}

/// A like or unlike, as sent by a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LikeRequest {
    pub action: Action,
    pub track: String,
    /// The client's idempotency key for this operation.
    pub key: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Like,
    Unlike,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Like => "like",
            Action::Unlike => "unlike",
        }
    }

    pub fn parse(text: &str) -> Option<Action> {
        match text {
            "like" => Some(Action::Like),
            "unlike" => Some(Action::Unlike),
            _ => None,
        }
    }
}

/// Error codes of protocol v1; the wire form is the snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    TooLarge,
    RateLimited,
    Rejected,
    Unauthorized,
    Overloaded,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Rejected => "rejected",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A frame the client got wrong: the code, a message, and the idempotency key if one was readable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
    pub key: Option<String>,
}

impl FrameError {
    fn bad(message: impl Into<String>, key: Option<String>) -> Self {
        FrameError {
            code: ErrorCode::BadRequest,
            message: message.into(),
            key,
        }
    }
}

pub const MAX_USER_LEN: usize = 64;
pub const MAX_TRACK_LEN: usize = 128;
pub const MAX_KEY_LEN: usize = 64;

/// User ids: `[A-Za-z0-9_.-]{1,64}`.
pub fn is_valid_user(user: &str) -> bool {
    (1..=MAX_USER_LEN).contains(&user.len())
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Track ids: `[A-Za-z0-9_.:-]{1,128}`.
pub fn is_valid_track(track: &str) -> bool {
    (1..=MAX_TRACK_LEN).contains(&track.len())
        && track
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// Idempotency keys: 1–64 characters, no control characters.
pub fn is_valid_key(key: &str) -> bool {
    let chars = key.chars().count();
    (1..=MAX_KEY_LEN).contains(&chars) && !key.chars().any(char::is_control)
}

/// Decodes one text frame into a validated [`ClientFrame`].
impl ClientFrame {
    /// The frame as a client sends it: exactly what [`decode`] reads back.
    pub fn to_json(&self) -> String {
        let value = match self {
            ClientFrame::Subscribe {
                track,
                listeners: false,
            } => serde_json::json!({"type": "subscribe", "track": track}),
            ClientFrame::Subscribe {
                track,
                listeners: true,
            } => serde_json::json!({"type": "subscribe", "track": track, "listeners": true}),
            ClientFrame::Unsubscribe { track } => {
                serde_json::json!({"type": "unsubscribe", "track": track})
            }
            ClientFrame::Like(request) => serde_json::json!({
                "type": request.action.as_str(),
                "track": request.track,
                "id": request.key,
            }),
            ClientFrame::Ping => serde_json::json!({"type": "ping"}),
            ClientFrame::Refresh { token } => {
                serde_json::json!({"type": "refresh", "token": token})
            }
        };
        value.to_string()
    }
}

pub fn decode(text: &str) -> Result<ClientFrame, FrameError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|err| FrameError::bad(format!("invalid JSON: {err}"), None))?;
    let Value::Object(fields) = value else {
        return Err(FrameError::bad("a frame must be a JSON object", None));
    };
    // Read the key first so that every later error can carry it back to the client.
    let key = match fields.get("id") {
        Some(Value::String(key)) if is_valid_key(key) => Some(key.clone()),
        _ => None,
    };
    let kind = match fields.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        Some(_) => return Err(FrameError::bad("field `type` must be a string", key)),
        None => return Err(FrameError::bad("missing field `type`", key)),
    };
    match kind {
        "subscribe" => Ok(ClientFrame::Subscribe {
            track: track_field(&fields, &key)?,
            listeners: match fields.get("listeners") {
                None | Some(Value::Bool(false)) => false,
                Some(Value::Bool(true)) => true,
                Some(_) => return Err(FrameError::bad("field `listeners` must be a boolean", key)),
            },
        }),
        "unsubscribe" => Ok(ClientFrame::Unsubscribe {
            track: track_field(&fields, &key)?,
        }),
        "like" | "unlike" => {
            let track = track_field(&fields, &key)?;
            let key = key_field(&fields, key)?;
            let action = Action::parse(kind).unwrap_or(Action::Like);
            Ok(ClientFrame::Like(LikeRequest { action, track, key }))
        }
        "ping" => Ok(ClientFrame::Ping),
        "refresh" => match fields.get("token") {
            Some(Value::String(token)) if !token.is_empty() => Ok(ClientFrame::Refresh {
                token: token.clone(),
            }),
            Some(_) => Err(FrameError::bad(
                "field `token` must be a non-empty string",
                key,
            )),
            None => Err(FrameError::bad("missing field `token`", key)),
        },
        other => Err(FrameError::bad(
            format!("unknown frame type `{}`", truncate(other, 32)),
            key,
        )),
    }
}

fn track_field(fields: &Map<String, Value>, key: &Option<String>) -> Result<String, FrameError> {
    match fields.get("track") {
        Some(Value::String(track)) if is_valid_track(track) => Ok(track.clone()),
        Some(Value::String(_)) => Err(FrameError::bad(
            "field `track` must match [A-Za-z0-9_.:-]{1,128}",
            key.clone(),
        )),
        Some(_) => Err(FrameError::bad(
            "field `track` must be a string",
            key.clone(),
        )),
        None => Err(FrameError::bad("missing field `track`", key.clone())),
    }
}

fn key_field(fields: &Map<String, Value>, key: Option<String>) -> Result<String, FrameError> {
    match (fields.get("id"), key) {
        (_, Some(key)) => Ok(key),
        (Some(Value::String(_)), None) => Err(FrameError::bad(
            "field `id` must be 1-64 characters without control characters",
            None,
        )),
        (Some(_), None) => Err(FrameError::bad("field `id` must be a string", None)),
        (None, None) => Err(FrameError::bad("missing field `id`", None)),
    }
}

fn truncate(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

/// Frames the node sends. Serialized with serde so escaping is always right.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerFrame<'a> {
    Welcome {
        user: &'a str,
        heartbeat_ms: u64,
        /// With tokens: the Unix second the session ends unless the client sends `refresh`.
        #[serde(skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
    },
    Subscribed {
        track: &'a str,
        count: u64,
        /// Listening now: sockets on this track across the farm (this one included).
        listeners: u64,
    },
    /// Only the number of listeners changed (to subscriptions that asked, at most every 2 s).
    Listeners {
        track: &'a str,
        listeners: u64,
    },
    Unsubscribed {
        track: &'a str,
    },
    Ack {
        id: &'a str,
        track: &'a str,
        count: u64,
        duplicate: bool,
    },
    Pong,
    /// A refresh was accepted: the session now ends at this Unix second.
    Refreshed {
        expires_at: u64,
    },
    Error {
        code: ErrorCode,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
        /// For `rate_limited`: when the client may try again.
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u32>,
    },
}

impl ServerFrame<'_> {
    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail: no maps with non-string keys, no floats.
        serde_json::to_string(self).unwrap_or_else(|_| {
            String::from(r#"{"type":"error","code":"internal","message":"encoding"}"#)
        })
    }
}

/// One like folded into a broadcast update, as shown in `recent`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RecentLike {
    pub user: String,
    pub id: String,
    pub action: Action,
}

/// The built-in `likes` frame: what every other subscriber of a track receives.
#[derive(Debug, Serialize)]
pub struct LikesFrame<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub track: &'a str,
    pub count: u64,
    pub delta: i64,
    pub recent: &'a [RecentLike],
    /// Listening now, as in `subscribed`.
    pub listeners: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_decode_to_themselves() {
        let frames = [
            ClientFrame::Subscribe {
                track: "demo:t1".into(),
                listeners: false,
            },
            ClientFrame::Subscribe {
                track: "demo:t1".into(),
                listeners: true,
            },
            ClientFrame::Unsubscribe {
                track: "demo:t1".into(),
            },
            ClientFrame::Like(LikeRequest {
                action: Action::Unlike,
                track: "demo:t1".into(),
                key: "k-1".into(),
            }),
            ClientFrame::Ping,
            ClientFrame::Refresh {
                token: "eyJ.e30.sig".into(),
            },
        ];
        for frame in frames {
            assert_eq!(decode(&frame.to_json()), Ok(frame.clone()));
        }
    }

    #[test]
    fn decodes_every_client_frame() {
        assert_eq!(
            decode(r#"{"type":"subscribe","track":"album:1"}"#),
            Ok(ClientFrame::Subscribe {
                track: "album:1".into(),
                listeners: false,
            })
        );
        assert_eq!(
            decode(r#"{"type":"subscribe","track":"album:1","listeners":1}"#)
                .map_err(|e| e.message),
            Err("field `listeners` must be a boolean".to_owned())
        );
        assert_eq!(
            decode(r#"{"type":"unlike","track":"t","id":"k1","extra":true}"#),
            Ok(ClientFrame::Like(LikeRequest {
                action: Action::Unlike,
                track: "t".into(),
                key: "k1".into()
            }))
        );
        assert_eq!(decode(r#"{"type":"ping"}"#), Ok(ClientFrame::Ping));
    }

    #[test]
    fn rejects_bad_frames_with_the_key_when_known() {
        let err = decode(r#"{"type":"like","track":"bad track","id":"k9"}"#).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        assert_eq!(err.key.as_deref(), Some("k9"));
        for bad in [
            "not json",
            "[]",
            r#"{"track":"t"}"#,
            r#"{"type":7}"#,
            r#"{"type":"dance"}"#,
            r#"{"type":"like","track":"t"}"#,
            r#"{"type":"like","track":"t","id":""}"#,
            r#"{"type":"like","track":5,"id":"k"}"#,
            r#"{"type":"subscribe","track":""}"#,
            r#"{"type":"refresh"}"#,
            r#"{"type":"refresh","token":""}"#,
            r#"{"type":"refresh","token":42}"#,
        ] {
            assert_eq!(
                decode(bad).unwrap_err().code,
                ErrorCode::BadRequest,
                "{bad}"
            );
        }
        let long_key = format!(r#"{{"type":"like","track":"t","id":"{}"}}"#, "k".repeat(65));
        assert!(decode(&long_key).is_err());
    }

    #[test]
    fn id_rules() {
        assert!(is_valid_user("ana_01.x-y"));
        assert!(!is_valid_user("ana:1"));
        assert!(!is_valid_user(&"u".repeat(65)));
        assert!(is_valid_track("spotify:track:42"));
        assert!(!is_valid_track("a/b"));
        assert!(is_valid_key("é-key"));
        assert!(!is_valid_key("a\nb"));
    }

    #[test]
    fn server_frames_serialize_as_documented() {
        let ack = ServerFrame::Ack {
            id: "k",
            track: "t",
            count: 3,
            duplicate: false,
        };
        assert_eq!(
            ack.to_json(),
            r#"{"type":"ack","id":"k","track":"t","count":3,"duplicate":false}"#
        );
        let err = ServerFrame::Error {
            code: ErrorCode::TooLarge,
            message: "m",
            id: None,
            retry_after_ms: None,
        };
        assert_eq!(
            err.to_json(),
            r#"{"type":"error","code":"too_large","message":"m"}"#
        );
    }
}
