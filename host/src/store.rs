//! The embedded SQLite database: schema, opening, and the read queries the node serves.
//!
//! One file under the data directory holds every accepted like event and the per-track
//! counts. WAL mode lets the ledger read while the event-log writer commits; `synchronous=FULL`
//! makes a commit survive power loss, and group commit keeps that affordable.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS like_events (
    seq            INTEGER PRIMARY KEY,
    event_id       TEXT NOT NULL UNIQUE,
    user           TEXT NOT NULL,
    track          TEXT NOT NULL,
    action         TEXT NOT NULL CHECK (action IN ('like', 'unlike')),
    key            TEXT NOT NULL,
    accepted_at_ms INTEGER NOT NULL,
    node           TEXT NOT NULL,
    changed        INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS like_events_by_pair ON like_events (user, track, seq);
CREATE INDEX IF NOT EXISTS like_events_by_track_time ON like_events (track, accepted_at_ms);
CREATE TABLE IF NOT EXISTS track_counts (
    track TEXT PRIMARY KEY,
    count INTEGER NOT NULL
) WITHOUT ROWID;
-- Farm with Kafka: events committed here and not yet confirmed by Kafka, in commit order
-- (the spill). Rows up to the shipped position are deleted as Kafka confirms them.
CREATE TABLE IF NOT EXISTS kafka_outbox (
    pos     INTEGER PRIMARY KEY AUTOINCREMENT,
    seq     INTEGER NOT NULL,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Location of the database file inside the data directory.
pub fn database_path(data_dir: &Path) -> PathBuf {
    data_dir.join("fanfare.db")
}

/// Opens (creating if needed) the database, applies the schema and checks it is writable.
pub fn open(data_dir: &Path) -> anyhow::Result<Connection> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let path = database_path(data_dir);
    let conn = Connection::open(&path)
        .with_context(|| format!("cannot open database {}", path.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .with_context(|| {
            format!(
                "cannot write to database {} (is the data directory writable?)",
                path.display()
            )
        })?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(SCHEMA)
        .with_context(|| format!("cannot create schema in {}", path.display()))?;
    add_changed_column(&conn)
        .with_context(|| format!("cannot upgrade the schema of {}", path.display()))?;
    Ok(conn)
}

/// Stores made before actions that change nothing became events lack `changed`; every row
/// they hold was a change.
fn add_changed_column(conn: &Connection) -> rusqlite::Result<()> {
    let present: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('like_events') WHERE name = 'changed'",
        [],
        |row| row.get(0),
    )?;
    if !present {
        conn.execute_batch(
            "ALTER TABLE like_events ADD COLUMN changed INTEGER NOT NULL DEFAULT 1",
        )?;
    }
    Ok(())
}

/// Opens an extra connection for reads beside the writer.
pub fn open_reader(data_dir: &Path) -> anyhow::Result<Connection> {
    let path = database_path(data_dir);
    let conn = Connection::open(&path)
        .with_context(|| format!("cannot open database {}", path.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// Highest event sequence number stored so far (0 for an empty store).
pub fn last_seq(conn: &Connection) -> anyhow::Result<u64> {
    let seq: Option<i64> =
        conn.query_row("SELECT MAX(seq) FROM like_events", [], |row| row.get(0))?;
    Ok(seq.unwrap_or(0).max(0) as u64)
}

/// The stored like count of a track.
pub fn track_count(conn: &Connection, track: &str) -> rusqlite::Result<u64> {
    let count: Option<i64> = conn
        .prepare_cached("SELECT count FROM track_counts WHERE track = ?1")?
        .query_row(params![track], |row| row.get(0))
        .optional()?;
    Ok(count.unwrap_or(0).max(0) as u64)
}

/// The newest events of one (user, track) pair, newest first.
pub fn recent_pair_events(
    conn: &Connection,
    user: &str,
    track: &str,
    limit: usize,
) -> rusqlite::Result<Vec<PairEvent>> {
    let mut stmt = conn.prepare_cached(
        "SELECT key, action, accepted_at_ms FROM like_events WHERE user = ?1 AND track = ?2 ORDER BY seq DESC LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![user, track, limit as i64], |row| {
        Ok(PairEvent {
            key: row.get(0)?,
            action: row.get(1)?,
            accepted_at_ms: row.get(2)?,
        })
    })?;
    rows.collect()
}

/// One of a pair's events, as the ledger needs it.
pub struct PairEvent {
    pub key: String,
    pub action: String,
    pub accepted_at_ms: i64,
}

/// A small integer setting kept beside the data (e.g. the farm's degraded-mode marker).
pub fn meta_get(conn: &Connection, key: &str) -> anyhow::Result<Option<u64>> {
    let value: Option<i64> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = ?1",
            params![key],
            |row| row.get(0),
        )
        .optional()?;
    Ok(value.map(|v| v.max(0) as u64))
}

pub fn meta_set(conn: &Connection, key: &str, value: u64) -> anyhow::Result<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = ?2",
        params![key, value as i64],
    )?;
    Ok(())
}

/// An event as stored, for replays.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: u64,
    pub event_id: String,
    pub node: String,
    pub user: String,
    pub track: String,
    pub action: String,
    pub key: String,
    pub accepted_at_ms: i64,
    pub changed: bool,
}

/// Up to `limit` events with `seq >= from`, in order.
pub fn events_from(conn: &Connection, from: u64, limit: usize) -> anyhow::Result<Vec<StoredEvent>> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, user, track, action, key, accepted_at_ms, event_id, node, changed FROM like_events WHERE seq >= ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![from as i64, limit as i64], |row| {
        Ok(StoredEvent {
            seq: row.get::<_, i64>(0)?.max(0) as u64,
            user: row.get(1)?,
            track: row.get(2)?,
            action: row.get(3)?,
            key: row.get(4)?,
            accepted_at_ms: row.get(5)?,
            event_id: row.get(6)?,
            node: row.get(7)?,
            changed: row.get(8)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The first event accepted at or after `since_ms`.
pub fn first_seq_since(conn: &Connection, since_ms: i64) -> anyhow::Result<Option<u64>> {
    let seq: Option<i64> = conn.query_row(
        "SELECT MIN(seq) FROM like_events WHERE accepted_at_ms >= ?1",
        params![since_ms],
        |row| row.get(0),
    )?;
    Ok(seq.map(|s| s.max(0) as u64))
}
