//! Like history per track in time buckets, for `GET /v1/tracks/{track}/history`.
//!
//! Alone, a node answers from its own SQLite events; in a farm with `--mongo` it answers from
//! the per-minute totals the persistence workers keep in MongoDB. Both round the range out to
//! whole buckets (UTC), so the two give the same answer for the same events.

use std::time::UNIX_EPOCH;

use async_trait::async_trait;
use serde::Serialize;

use super::Part;
use crate::clock::now_ms;
use crate::store::Store;

/// At most this many buckets per request.
pub const MAX_BUCKETS: i64 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    Minute,
    Hour,
    Day,
}

impl Bucket {
    pub fn parse(text: &str) -> Option<Bucket> {
        match text {
            "minute" => Some(Bucket::Minute),
            "hour" => Some(Bucket::Hour),
            "day" => Some(Bucket::Day),
            _ => None,
        }
    }

    pub fn millis(self) -> i64 {
        match self {
            Bucket::Minute => 60_000,
            Bucket::Hour => 3_600_000,
            Bucket::Day => 86_400_000,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Bucket::Minute => "minute",
            Bucket::Hour => "hour",
            Bucket::Day => "day",
        }
    }
}

/// A validated history question: buckets starting in `[start_ms, end_ms)`.
#[derive(Debug, Clone)]
pub struct Query {
    pub track: String,
    pub bucket: Bucket,
    pub start_ms: i64,
    pub end_ms: i64,
}

impl Query {
    /// `from`/`to` are epoch milliseconds or RFC 3339 times; the default range is the last
    /// 24 hours. The range is widened to whole buckets.
    pub fn new(
        track: &str,
        bucket: Option<&str>,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<Query, String> {
        let bucket = match bucket {
            None => Bucket::Hour,
            Some(text) => {
                Bucket::parse(text).ok_or("bucket must be one of minute, hour, day".to_owned())?
            }
        };
        let to = match to {
            Some(text) => parse_time(text)?,
            None => now_ms() + 1,
        };
        let from = match from {
            Some(text) => parse_time(text)?,
            None => to - 86_400_000,
        };
        if from >= to {
            return Err("`from` must be before `to`".to_owned());
        }
        let size = bucket.millis();
        let start_ms = from.div_euclid(size) * size;
        let end_ms = (to - 1).div_euclid(size) * size + size;
        if (end_ms - start_ms) / size > MAX_BUCKETS {
            return Err(format!(
                "at most {MAX_BUCKETS} buckets per request; use a larger bucket"
            ));
        }
        Ok(Query {
            track: track.to_owned(),
            bucket,
            start_ms,
            end_ms,
        })
    }
}

/// Likes and unlikes accepted in one bucket (empty buckets are left out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    pub start_ms: i64,
    pub likes: u64,
    pub unlikes: u64,
}

#[async_trait]
pub trait History: Part {
    async fn buckets(&self, query: &Query) -> anyhow::Result<Vec<Row>>;
}

/// The node's own SQLite events (embedded mode, or a farm without `--mongo`).
pub struct SqliteHistory {
    store: Store,
}

impl SqliteHistory {
    pub fn new(store: Store) -> SqliteHistory {
        SqliteHistory { store }
    }
}

impl Part for SqliteHistory {
    fn name(&self) -> &'static str {
        "history (sqlite)"
    }
}

#[async_trait]
impl History for SqliteHistory {
    async fn buckets(&self, query: &Query) -> anyhow::Result<Vec<Row>> {
        let query = query.clone();
        let rows = self
            .store
            .with_async(move |r| {
                r.history(
                    &query.track,
                    query.bucket.millis(),
                    query.start_ms,
                    query.end_ms,
                )
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| Row {
                start_ms: row.start_ms,
                likes: row.likes,
                unlikes: row.unlikes,
            })
            .collect())
    }
}

/// Sums minute rows into `bucket` rows (MongoDB keeps minutes).
pub fn roll_up(minutes: impl IntoIterator<Item = Row>, bucket: Bucket) -> Vec<Row> {
    let size = bucket.millis();
    let mut rows: std::collections::BTreeMap<i64, Row> = std::collections::BTreeMap::new();
    for minute in minutes {
        let start_ms = minute.start_ms.div_euclid(size) * size;
        let row = rows.entry(start_ms).or_insert(Row {
            start_ms,
            likes: 0,
            unlikes: 0,
        });
        row.likes += minute.likes;
        row.unlikes += minute.unlikes;
    }
    rows.into_values().collect()
}

fn parse_time(text: &str) -> Result<i64, String> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let time = humantime::parse_rfc3339_weak(text)
        .map_err(|_| format!("`{text}` is neither epoch milliseconds nor an RFC 3339 time"))?;
    let since = time
        .duration_since(UNIX_EPOCH)
        .map_err(|_| format!("`{text}` is before 1970"))?;
    Ok(since.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_widen_to_whole_buckets() {
        let q = Query::new("t", Some("hour"), Some("3600001"), Some("7200001")).expect("query");
        assert_eq!((q.start_ms, q.end_ms), (3_600_000, 10_800_000));
        let q = Query::new(
            "t",
            Some("minute"),
            Some("1970-01-01T00:01:30Z"),
            Some("120000"),
        )
        .expect("query");
        assert_eq!((q.start_ms, q.end_ms), (60_000, 120_000));
        assert!(Query::new("t", Some("week"), None, None).is_err());
        assert!(Query::new("t", None, Some("5"), Some("5")).is_err());
        assert!(Query::new("t", Some("minute"), Some("0"), Some("86400000000")).is_err());
        assert!(Query::new("t", None, Some("yesterday"), None).is_err());
    }

    #[test]
    fn minutes_roll_up_into_hours() {
        let row = |start_ms, likes, unlikes| Row {
            start_ms,
            likes,
            unlikes,
        };
        let hours = roll_up(
            [
                row(60_000, 2, 1),
                row(3_540_000, 1, 0),
                row(3_600_000, 5, 5),
            ],
            Bucket::Hour,
        );
        assert_eq!(hours, vec![row(0, 3, 1), row(3_600_000, 5, 5)]);
    }
}
