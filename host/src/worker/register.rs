//! A (track, user) pair's last-writer-wins register as the workers store it in `pairs`.

use mongodb::bson::{Document, doc};

use crate::event::LikeEvent;

/// A pair's register: its newest event, ordered by (stamp, event id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Register {
    pub liked: bool,
    pub stamp: i64,
    pub event_id: String,
    /// The client key of that event (so a refilled Redis still recognises its re-send).
    pub key: String,
}

impl Register {
    pub(super) fn of(e: &LikeEvent) -> Register {
        Register {
            liked: e.liked(),
            stamp: e.accepted_at_ms,
            event_id: e.event_id.clone(),
            key: e.key.clone(),
        }
    }

    /// The last-writer-wins order (the Redis script compares the same way: stamps as numbers,
    /// then event ids as byte strings).
    pub fn newer_than(&self, other: &Register) -> bool {
        (self.stamp, self.event_id.as_str()) > (other.stamp, other.event_id.as_str())
    }

    /// The filter and update of an upsert that takes this register only if it is newer than
    /// the stored one (a refused upsert is a duplicate-key error): registers only move
    /// forward, whoever writes.
    pub(super) fn merge(&self, track: &str, user: &str) -> (Document, Document) {
        (
            doc! { "_id": pair_id(track, user), "$or": [
                { "stamp": { "$lt": self.stamp } },
                { "stamp": self.stamp, "event": { "$lt": &self.event_id } },
            ] },
            doc! { "$set": self.document(track, user) },
        )
    }

    pub(super) fn document(&self, track: &str, user: &str) -> Document {
        doc! { "track": track, "user": user, "liked": self.liked, "stamp": self.stamp,
        "event": &self.event_id, "key": &self.key }
    }

    /// A register as stored in `pairs`.
    pub(super) fn from_document(d: &Document) -> Register {
        Register {
            liked: d.get_bool("liked").unwrap_or(false),
            stamp: number(d, "stamp"),
            event_id: d.get_str("event").unwrap_or_default().to_owned(),
            key: d.get_str("key").unwrap_or_default().to_owned(),
        }
    }
}

pub(super) fn pair_id(track: &str, user: &str) -> String {
    // Neither ids may contain a newline, so the joined id is unambiguous.
    format!("{track}\n{user}")
}

/// Integer fields may come back as int32, int64 or double depending on the server.
pub(super) fn number(d: &Document, key: &str) -> i64 {
    match d.get(key) {
        Some(mongodb::bson::Bson::Int32(v)) => i64::from(*v),
        Some(mongodb::bson::Bson::Int64(v)) => *v,
        Some(mongodb::bson::Bson::Double(v)) => *v as i64,
        _ => 0,
    }
}
