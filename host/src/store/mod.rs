//! The embedded SQLite database, and its one owner: [`Store`] opens every connection and
//! holds every statement (the event log's writer, the ledger's and the farm's reads, the
//! Kafka spill, history); no SQL lives elsewhere.
//!
//! One file under the data directory holds every accepted like event and the per-track
//! counts. WAL mode lets the ledger read while the event-log writer commits; `synchronous=FULL`
//! makes a commit survive power loss, and group commit keeps that affordable.

mod read;
mod write;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use rusqlite::Connection;

pub use read::{HistoryRow, PAIR_EVENTS, PairEvent, Reader, SpilledEvent};
pub use write::Writer;

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

/// Reader connections kept for reuse (the farm's occasional reads, history, the spill).
const POOLED_READERS: usize = 4;

/// The embedded database of one data directory. Cheap to clone; one per node, made in the
/// composition root.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    data_dir: PathBuf,
    readers: Mutex<Vec<Connection>>,
}

impl Store {
    /// Opens (creating if needed) the database, applies the schema and checks it is writable.
    pub fn open(data_dir: &Path) -> anyhow::Result<Store> {
        let first = open_writable(data_dir)?;
        Ok(Store {
            inner: Arc::new(Inner {
                data_dir: data_dir.to_path_buf(),
                readers: Mutex::new(vec![first]),
            }),
        })
    }

    /// The connection the event log's group commit writes through (on its own thread).
    pub fn writer(&self) -> anyhow::Result<Writer> {
        Ok(Writer::new(open_writable(&self.inner.data_dir)?))
    }

    /// A reader of its own, for a part that reads on every like (the embedded ledger).
    pub fn reader(&self) -> anyhow::Result<Reader> {
        Ok(Reader::new(open_reader(&self.inner.data_dir)?))
    }

    /// Runs `f` on a pooled connection (blocking: call from a blocking thread or at start).
    pub fn with<T>(&self, f: impl FnOnce(&mut Reader) -> anyhow::Result<T>) -> anyhow::Result<T> {
        let pooled = lock(&self.inner.readers).pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => open_reader(&self.inner.data_dir)?,
        };
        let mut reader = Reader::new(conn);
        let result = f(&mut reader);
        let mut pool = lock(&self.inner.readers);
        if pool.len() < POOLED_READERS {
            pool.push(reader.into_connection());
        }
        result
    }

    /// `with` on a blocking thread.
    pub async fn with_async<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Reader) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.with(f))
            .await
            .context("a store read was cancelled")?
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Location of the database file inside the data directory.
fn database_path(data_dir: &Path) -> PathBuf {
    data_dir.join("fanfare.db")
}

fn open_writable(data_dir: &Path) -> anyhow::Result<Connection> {
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
fn open_reader(data_dir: &Path) -> anyhow::Result<Connection> {
    let path = database_path(data_dir);
    let conn = Connection::open(&path)
        .with_context(|| format!("cannot open database {}", path.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}
