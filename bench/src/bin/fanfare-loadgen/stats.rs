//! Measurements: a mergeable latency histogram, Zipf sampling, /proc readings and the result
//! record one run writes (and `report` reads).

use std::collections::BTreeMap;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Latencies in 0.1 ms buckets (sparse), mergeable across processes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Histogram {
    buckets: BTreeMap<u32, u64>,
    pub count: u64,
    pub max_us: u64,
    /// Reconnect storm: time until every listener was subscribed again.
    pub reconnect_all_ms: Option<f64>,
}

impl Histogram {
    pub fn record(&mut self, micros: u64) {
        *self.buckets.entry((micros / 100) as u32).or_default() += 1;
        self.count += 1;
        self.max_us = self.max_us.max(micros);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (bucket, n) in &other.buckets {
            *self.buckets.entry(*bucket).or_default() += n;
        }
        self.count += other.count;
        self.max_us = self.max_us.max(other.max_us);
        self.reconnect_all_ms = match (self.reconnect_all_ms, other.reconnect_all_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }

    /// Milliseconds at quantile `q` (0..=1), upper edge of the bucket.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bucket, n) in &self.buckets {
            seen += n;
            if seen >= rank {
                return Some((*bucket as f64 + 1.0) / 10.0);
            }
        }
        Some(self.max_us as f64 / 1000.0)
    }

    /// (ms, fraction ≤ ms) points for a CDF chart.
    pub fn cdf(&self) -> Vec<(f64, f64)> {
        let mut seen = 0;
        self.buckets
            .iter()
            .map(|(bucket, n)| {
                seen += n;
                (
                    (*bucket as f64 + 1.0) / 10.0,
                    seen as f64 / self.count.max(1) as f64,
                )
            })
            .collect()
    }
}

/// Zipf-distributed track indexes: track k has weight 1/(k+1)^s.
pub struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Zipf {
        let mut total = 0.0;
        let cumulative = (0..n)
            .map(|k| {
                total += 1.0 / ((k + 1) as f64).powf(s);
                total
            })
            .collect();
        Zipf { cumulative }
    }

    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let x = rng.random::<f64>() * total;
        self.cumulative
            .partition_point(|c| *c < x)
            .min(self.cumulative.len() - 1)
    }
}

pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

pub use fanfare_bench::proc_stats;

/// What one run measured (all processes merged).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunResult {
    pub label: String,
    pub scenario: String,
    pub connections: u64,
    /// Listeners connected at the end.
    pub connected: u64,
    pub errors: u64,
    pub disconnects: u64,
    pub rate_offered: u64,
    pub likes_sent: u64,
    /// `likes` update frames received by all listeners.
    pub frames: u64,
    /// Likes named in those frames (deliveries).
    pub likes_seen: u64,
    pub seconds: f64,
    pub per_second: Vec<u64>,
    pub latency: Histogram,
    pub frames_per_s: f64,
    pub deliveries_per_s: f64,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub server_rss_kib: u64,
    /// Server RSS before the listeners connected.
    pub server_rss_base_kib: u64,
    /// (RSS − base) ÷ connected listeners.
    pub server_rss_per_conn_kib: Option<f64>,
    pub server_cpu_s: f64,
    /// CPU seconds of the load generator's own processes during the run.
    pub loadgen_cpu_s: f64,
    /// `loadgen_cpu_s` ÷ (seconds × cores it may use).
    pub loadgen_core_share: f64,
    /// The generator used more than 85 % of its cores: its latency figures include its lag.
    pub instrument_bound: bool,
    /// Server CPU µs per delivered update frame, and per delivered like.
    pub server_us_per_frame: Option<f64>,
    pub server_us_per_like: Option<f64>,
}

impl RunResult {
    pub fn scenario_name(&self) -> &str {
        &self.scenario
    }

    pub fn merge(&mut self, other: RunResult) {
        self.connected += other.connected;
        self.errors += other.errors;
        self.disconnects += other.disconnects;
        self.frames += other.frames;
        self.likes_seen += other.likes_seen;
        self.loadgen_cpu_s += other.loadgen_cpu_s;
        self.latency.merge(&other.latency);
        for (i, n) in other.per_second.iter().enumerate() {
            match self.per_second.get_mut(i) {
                Some(mine) => *mine += n,
                None => self.per_second.push(*n),
            }
        }
    }

    /// Derived numbers, once everything is merged.
    pub fn finish(&mut self) {
        let seconds = self.seconds.max(0.001);
        self.frames_per_s = self.frames as f64 / seconds;
        self.deliveries_per_s = self.likes_seen as f64 / seconds;
        self.p50_ms = self.latency.quantile_ms(0.5);
        self.p90_ms = self.latency.quantile_ms(0.9);
        self.p99_ms = self.latency.quantile_ms(0.99);
        self.max_ms = (self.latency.count > 0).then(|| self.latency.max_us as f64 / 1000.0);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        self.loadgen_core_share = self.loadgen_cpu_s / (seconds * cores);
        self.instrument_bound = self.loadgen_core_share > 0.85;
        self.server_us_per_frame =
            (self.frames > 0).then(|| self.server_cpu_s * 1e6 / self.frames as f64);
        self.server_us_per_like =
            (self.likes_seen > 0).then(|| self.server_cpu_s * 1e6 / self.likes_seen as f64);
        self.server_rss_per_conn_kib = (self.connected > 0 && self.server_rss_kib > 0).then(|| {
            self.server_rss_kib.saturating_sub(self.server_rss_base_kib) as f64
                / self.connected as f64
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_merge_and_give_quantiles() {
        let mut a = Histogram::default();
        let mut b = Histogram::default();
        for us in [1_000, 2_000, 3_000] {
            a.record(us);
        }
        b.record(50_000);
        a.merge(&b);
        assert_eq!(a.count, 4);
        assert_eq!(a.quantile_ms(0.5), Some(2.1));
        assert_eq!(a.quantile_ms(1.0), Some(50.1));
        assert_eq!(a.max_us, 50_000);
        assert_eq!(a.cdf().last().map(|p| p.1), Some(1.0));
    }

    #[test]
    fn zipf_favours_the_first_tracks() {
        let zipf = Zipf::new(100, 1.0);
        let mut rng = rand::rng();
        let mut hits = [0u32; 100];
        for _ in 0..20_000 {
            hits[zipf.sample(&mut rng)] += 1;
        }
        assert!(hits[0] > hits[9] * 5, "{:?}", &hits[..10]);
        assert!(hits.iter().all(|h| *h < 20_000));
    }
}
