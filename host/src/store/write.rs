//! The group commit's statements: events, their counts, and the Kafka spill.

use rusqlite::{Connection, params};

use crate::event::LikeEvent;

/// The one connection that writes events (the event log's writer thread owns it).
pub struct Writer {
    conn: Connection,
}

impl Writer {
    pub(super) fn new(conn: Connection) -> Writer {
        Writer { conn }
    }

    /// Stores the events in one transaction (an event id already stored is kept as it is)
    /// and moves the counts of those that changed their pair; with `spill`, also queues each
    /// in the Kafka spill (even one already stored: a restored re-send still waits for
    /// Kafka). Returns (spill position, index in `events`) in commit order.
    pub fn commit(
        &mut self,
        events: &[&LikeEvent],
        spill: bool,
    ) -> rusqlite::Result<Vec<(u64, usize)>> {
        let mut spilled = Vec::new();
        if events.is_empty() {
            return Ok(spilled);
        }
        let tx = self.conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO like_events (seq, event_id, user, track, action, key, accepted_at_ms, node, changed)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            let mut count = tx.prepare_cached(
                "INSERT INTO track_counts (track, count) VALUES (?1, MAX(?2, 0))
                 ON CONFLICT (track) DO UPDATE SET count = MAX(count + ?2, 0)",
            )?;
            let mut outbox =
                tx.prepare_cached("INSERT INTO kafka_outbox (seq, version) VALUES (?1, ?2)")?;
            let mut existing =
                tx.prepare_cached("SELECT seq FROM like_events WHERE event_id = ?1")?;
            for (index, event) in events.iter().enumerate() {
                let inserted = insert.execute(params![
                    event.seq as i64,
                    event.event_id,
                    &*event.user,
                    &*event.track,
                    event.action.as_str(),
                    event.key,
                    event.accepted_at_ms,
                    &*event.node,
                    event.changed,
                ])?;
                if inserted == 1 && event.changed {
                    let delta: i64 = if event.liked() { 1 } else { -1 };
                    count.execute(params![&*event.track, delta])?;
                }
                if spill {
                    let stored_seq: i64 = if inserted == 1 {
                        event.seq as i64
                    } else {
                        existing.query_row(params![event.event_id], |row| row.get(0))?
                    };
                    let pos = outbox.insert(params![stored_seq, event.version as i64])?;
                    spilled.push((pos.max(0) as u64, index));
                }
            }
        }
        tx.commit()?;
        Ok(spilled)
    }
}
