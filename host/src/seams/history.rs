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

/// At most this many buckets per request (minute buckets: about a week).
pub const MAX_BUCKETS: i64 = 10_000;
/// At most this long a range per request, whatever the bucket: a store reads at most this
/// many minutes of one track (MongoDB keeps one document per minute).
pub const MAX_RANGE_DAYS: i64 = 400;
/// Times are accepted from 1970 to the end of year 9999 (no arithmetic near `i64` limits).
const LATEST_MS: i64 = 253_402_300_800_000;

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
            None => (to - 86_400_000).max(0),
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
        if end_ms - start_ms > MAX_RANGE_DAYS * Bucket::Day.millis() {
            return Err(format!(
                "at most {MAX_RANGE_DAYS} days per request; ask for the rest separately"
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

/// Sums minute rows into `bucket` rows as they stream in (MongoDB keeps minutes): memory
/// holds the answer's buckets, never the minutes read.
pub struct RollUp {
    size: i64,
    rows: std::collections::BTreeMap<i64, Row>,
}

impl RollUp {
    pub fn new(bucket: Bucket) -> RollUp {
        RollUp {
            size: bucket.millis(),
            rows: std::collections::BTreeMap::new(),
        }
    }

    pub fn add(&mut self, minute: Row) {
        let start_ms = minute.start_ms.div_euclid(self.size) * self.size;
        let row = self.rows.entry(start_ms).or_insert(Row {
            start_ms,
            likes: 0,
            unlikes: 0,
        });
        row.likes = row.likes.saturating_add(minute.likes);
        row.unlikes = row.unlikes.saturating_add(minute.unlikes);
    }

    /// The non-empty buckets in time order.
    pub fn finish(self) -> Vec<Row> {
        self.rows
            .into_values()
            .filter(|r| r.likes + r.unlikes > 0)
            .collect()
    }
}

/// Epoch milliseconds or an RFC 3339 time, from 1970 to the end of 9999.
fn parse_time(text: &str) -> Result<i64, String> {
    if let Ok(ms) = text.parse::<i64>() {
        if !(0..=LATEST_MS).contains(&ms) {
            return Err(format!(
                "`{text}` is outside 1970-01-01 .. 9999-12-31 (epoch milliseconds)"
            ));
        }
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
        let mut hours = RollUp::new(Bucket::Hour);
        for minute in [
            row(60_000, 2, 1),
            row(3_540_000, 1, 0),
            row(3_600_000, 5, 5),
            row(7_200_000, 0, 0),
        ] {
            hours.add(minute);
        }
        assert_eq!(hours.finish(), vec![row(0, 3, 1), row(3_600_000, 5, 5)]);
    }

    #[test]
    fn ranges_near_the_limits_of_time_are_refused_not_overflowed() {
        for (from, to) in [
            (i64::MIN.to_string(), "0".to_owned()),
            ("0".to_owned(), i64::MAX.to_string()),
            ("-1".to_owned(), "1000".to_owned()),
            (i64::MIN.to_string(), i64::MIN.to_string()),
        ] {
            let err = Query::new("t", Some("day"), Some(&from), Some(&to)).expect_err(&from);
            assert!(err.contains("outside"), "{from}..{to}: {err}");
        }
        assert!(
            Query::new("t", None, None, Some("1000")).is_ok(),
            "default from clamps"
        );
        let end = LATEST_MS.to_string();
        let q = Query::new("t", Some("day"), Some("253400000000000"), Some(&end));
        assert!(q.is_ok(), "{q:?}");
    }

    #[test]
    fn ranges_are_capped_in_days_whatever_the_bucket() {
        let day = Bucket::Day.millis();
        let most = (MAX_RANGE_DAYS * day).to_string();
        assert!(Query::new("t", Some("day"), Some("0"), Some(&most)).is_ok());
        let more = (MAX_RANGE_DAYS * day + 1).to_string();
        let err = Query::new("t", Some("day"), Some("0"), Some(&more)).expect_err("too long");
        assert!(err.contains("days per request"), "{err}");
    }
}
