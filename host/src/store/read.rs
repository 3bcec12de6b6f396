//! Every read of the embedded database (and the few writes made beside the group commit:
//! small settings, the Kafka spill's cursor).

use std::sync::Arc;

use anyhow::Context;
use fanfare_protocol::Action;
use rusqlite::{Connection, OptionalExtension, params};

use crate::event::LikeEvent;

/// A connection for reads; see [`super::Store`] for how one is had.
/// How many of a pair's newest events [`Reader::recent_pair_events`] returns (the ledger keeps
/// that many keys per pair).
pub const PAIR_EVENTS: usize = 4;
/// The limit is written into the statement, not bound: SQLite (3.50 here) reads a bound LIMIT
/// while planning (`sqlite3ExprIsInteger` sets the statement's variable mask), so every new
/// binding re-prepared the statement — 12 % of the node's CPU in the ingest profile, since
/// every like that meets a new pair runs this read.
const RECENT_PAIR_EVENTS: &str = "SELECT key, action, accepted_at_ms FROM like_events \
     WHERE user = ?1 AND track = ?2 ORDER BY seq DESC LIMIT 4";

pub struct Reader {
    conn: Connection,
}

/// One of a pair's events, as the ledger needs it.
pub struct PairEvent {
    pub key: String,
    pub action: String,
    pub accepted_at_ms: i64,
}

/// An event waiting in the Kafka spill.
pub struct SpilledEvent {
    /// Its position in the spill (commit order).
    pub pos: u64,
    pub event: LikeEvent,
}

/// Likes and unlikes that changed a pair, in one time bucket of a track.
pub struct HistoryRow {
    pub start_ms: i64,
    pub likes: u64,
    pub unlikes: u64,
}

const EVENT_COLUMNS: &str =
    "e.seq, e.user, e.track, e.action, e.key, e.accepted_at_ms, e.event_id, e.node, e.changed";

/// An event from its row; `version` where the row has none (`like_events` keeps no Redis
/// version) is its local sequence, as the embedded ledger gives it.
fn stored_event(
    row: &rusqlite::Row<'_>,
    at: usize,
    version: Option<u64>,
) -> rusqlite::Result<LikeEvent> {
    let seq = row.get::<_, i64>(at)?.max(0) as u64;
    let action: String = row.get(at + 3)?;
    Ok(LikeEvent {
        seq,
        version: version.unwrap_or(seq),
        user: Arc::from(row.get::<_, String>(at + 1)?),
        track: Arc::from(row.get::<_, String>(at + 2)?),
        // The schema's CHECK allows nothing else.
        action: Action::parse(&action).unwrap_or(Action::Like),
        key: row.get(at + 4)?,
        accepted_at_ms: row.get(at + 5)?,
        event_id: row.get(at + 6)?,
        node: Arc::from(row.get::<_, String>(at + 7)?),
        changed: row.get(at + 8)?,
    })
}

impl Reader {
    pub(super) fn new(conn: Connection) -> Reader {
        Reader { conn }
    }

    pub(super) fn into_connection(self) -> Connection {
        self.conn
    }

    /// Highest event sequence number stored so far (0 for an empty store).
    pub fn last_seq(&self) -> anyhow::Result<u64> {
        let seq: Option<i64> =
            self.conn
                .query_row("SELECT MAX(seq) FROM like_events", [], |row| row.get(0))?;
        Ok(seq.unwrap_or(0).max(0) as u64)
    }

    /// The stored like count of a track.
    pub fn track_count(&self, track: &str) -> rusqlite::Result<u64> {
        let count: Option<i64> = self
            .conn
            .prepare_cached("SELECT count FROM track_counts WHERE track = ?1")?
            .query_row(params![track], |row| row.get(0))
            .optional()?;
        Ok(count.unwrap_or(0).max(0) as u64)
    }

    /// The newest [`PAIR_EVENTS`] events of one (user, track) pair, newest first.
    pub fn recent_pair_events(&self, user: &str, track: &str) -> rusqlite::Result<Vec<PairEvent>> {
        let mut stmt = self.conn.prepare_cached(RECENT_PAIR_EVENTS)?;
        let rows = stmt.query_map(params![user, track], |row| {
            Ok(PairEvent {
                key: row.get(0)?,
                action: row.get(1)?,
                accepted_at_ms: row.get(2)?,
            })
        })?;
        rows.collect()
    }

    /// A small integer setting kept beside the data (e.g. the farm's degraded-mode marker).
    pub fn meta_get(&self, key: &str) -> anyhow::Result<Option<u64>> {
        let value: Option<i64> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                params![key],
                |row| row.get(0),
            )
            .optional()?;
        Ok(value.map(|v| v.max(0) as u64))
    }

    pub fn meta_set(&self, key: &str, value: u64) -> anyhow::Result<()> {
        meta_set(&self.conn, key, value)
    }

    /// Up to `limit` events with `seq >= from`, in order.
    pub fn events_from(&self, from: u64, limit: usize) -> anyhow::Result<Vec<LikeEvent>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM like_events e WHERE e.seq >= ?1 ORDER BY e.seq LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![from as i64, limit as i64], |row| {
            stored_event(row, 0, None)
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The first event accepted at or after `since_ms`.
    pub fn first_seq_since(&self, since_ms: i64) -> anyhow::Result<Option<u64>> {
        let seq: Option<i64> = self.conn.query_row(
            "SELECT MIN(seq) FROM like_events WHERE accepted_at_ms >= ?1",
            params![since_ms],
            |row| row.get(0),
        )?;
        Ok(seq.map(|s| s.max(0) as u64))
    }

    /// Likes and unlikes that changed a pair, per `bucket_ms` of `[start_ms, end_ms)`.
    pub fn history(
        &self,
        track: &str,
        bucket_ms: i64,
        start_ms: i64,
        end_ms: i64,
    ) -> anyhow::Result<Vec<HistoryRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT (accepted_at_ms / ?1) * ?1 AS b,
                    SUM(action = 'like'), SUM(action = 'unlike')
             FROM like_events
             WHERE changed AND track = ?2 AND accepted_at_ms >= ?3 AND accepted_at_ms < ?4
             GROUP BY b ORDER BY b",
        )?;
        let rows = stmt.query_map(params![bucket_ms, track, start_ms, end_ms], |row| {
            Ok(HistoryRow {
                start_ms: row.get(0)?,
                likes: row.get::<_, i64>(1)?.max(0) as u64,
                unlikes: row.get::<_, i64>(2)?.max(0) as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The highest position in the Kafka spill, if it holds anything.
    pub fn last_spill_pos(&self) -> anyhow::Result<Option<u64>> {
        let last: Option<i64> =
            self.conn
                .query_row("SELECT MAX(pos) FROM kafka_outbox", [], |row| row.get(0))?;
        Ok(last.map(|p| p.max(0) as u64))
    }

    /// Up to `limit` spilled events after position `after`, in commit order.
    pub fn spill_after(&self, after: u64, limit: usize) -> anyhow::Result<Vec<SpilledEvent>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT o.pos, o.version, {EVENT_COLUMNS}
             FROM kafka_outbox o JOIN like_events e ON e.seq = o.seq
             WHERE o.pos > ?1 ORDER BY o.pos LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![after as i64, limit as i64], |row| {
            let version = row.get::<_, i64>(1)?.max(0) as u64;
            Ok(SpilledEvent {
                pos: row.get::<_, i64>(0)?.max(0) as u64,
                event: stored_event(row, 2, Some(version))?,
            })
        })?;
        rows.collect::<Result<Vec<_>, _>>()
            .context("cannot read the Kafka spill")
    }

    /// Records that Kafka confirmed the spill through `pos` (under `cursor_key`) and drops
    /// those rows, in one transaction.
    pub fn spill_shipped(&mut self, cursor_key: &str, pos: u64) -> anyhow::Result<()> {
        let tx = self.conn.transaction()?;
        meta_set(&tx, cursor_key, pos)?;
        tx.execute("DELETE FROM kafka_outbox WHERE pos <= ?1", [pos as i64])?;
        tx.commit()?;
        Ok(())
    }
}

fn meta_set(conn: &Connection, key: &str, value: u64) -> anyhow::Result<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = ?2",
        params![key, value as i64],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_pair_read_is_limited_to_pair_events() {
        let limit = format!("LIMIT {}", super::PAIR_EVENTS);
        assert!(super::RECENT_PAIR_EVENTS.ends_with(&limit));
    }
}
