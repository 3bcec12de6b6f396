//! Host-level limits that hold no matter what plugins do: connections per node, per source
//! IP and per user (checked at the upgrade), inbound messages per second per connection,
//! likes per second per user, and HTTP reads per second per client address. Per-user and
//! per-address rates are this node's: a user spread over N nodes gets N times the rate.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The upgrade's connection limits; they can change while the node runs (SIGHUP), and apply
/// to connections opened after the change.
pub struct ConnectionGate {
    max_total: AtomicUsize,
    max_per_ip: AtomicUsize,
    max_per_user: AtomicUsize,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
    per_user: HashMap<Arc<str>, usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NodeFull,
    IpFull,
    UserFull,
}

/// A place held by one connection; released when dropped.
pub struct Admission {
    gate: Arc<ConnectionGate>,
    ip: IpAddr,
    user: Arc<str>,
}

impl ConnectionGate {
    pub fn new(max_total: usize, max_per_ip: usize, max_per_user: usize) -> Arc<ConnectionGate> {
        Arc::new(ConnectionGate {
            max_total: AtomicUsize::new(max_total),
            max_per_ip: AtomicUsize::new(max_per_ip),
            max_per_user: AtomicUsize::new(max_per_user),
            counts: Mutex::new(Counts::default()),
        })
    }

    pub fn set_limits(&self, max_total: usize, max_per_ip: usize, max_per_user: usize) {
        self.max_total.store(max_total, Ordering::Relaxed);
        self.max_per_ip.store(max_per_ip, Ordering::Relaxed);
        self.max_per_user.store(max_per_user, Ordering::Relaxed);
    }

    pub fn admit(self: &Arc<Self>, ip: IpAddr, user: &Arc<str>) -> Result<Admission, Refusal> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if counts.total >= self.max_total.load(Ordering::Relaxed) {
            return Err(Refusal::NodeFull);
        }
        if counts.per_ip.get(&ip).copied().unwrap_or(0) >= self.max_per_ip.load(Ordering::Relaxed) {
            return Err(Refusal::IpFull);
        }
        let max_per_user = self.max_per_user.load(Ordering::Relaxed);
        if counts.per_user.get(user).copied().unwrap_or(0) >= max_per_user {
            return Err(Refusal::UserFull);
        }
        *counts.per_ip.entry(ip).or_insert(0) += 1;
        *counts.per_user.entry(user.clone()).or_insert(0) += 1;
        counts.total += 1;
        Ok(Admission {
            gate: self.clone(),
            ip,
            user: user.clone(),
        })
    }
}

/// One fewer for `key`; the entry goes when it reaches 0, so the maps hold only who is here.
fn release<K: Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut counts = self.gate.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.total = counts.total.saturating_sub(1);
        release(&mut counts.per_ip, &self.ip);
        release(&mut counts.per_user, &self.user);
    }
}

/// A token bucket per key (a user, a client address), `rate` per second with bursts of twice
/// that; idle keys are forgotten after a minute (a full bucket again), and at most a million
/// are kept. Rate 0: no limit.
pub struct RateByKey<K: Hash + Eq + Send + Sync + 'static> {
    rate: AtomicU32,
    buckets: moka::sync::Cache<K, Arc<Mutex<MessageBucket>>>,
}

impl<K: Hash + Eq + Send + Sync + Clone + 'static> RateByKey<K> {
    pub fn new(rate: u32) -> RateByKey<K> {
        RateByKey {
            rate: AtomicU32::new(rate),
            buckets: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_idle(Duration::from_secs(60))
                .build(),
        }
    }

    /// A new rate from now on: every key starts again with a full bucket of it.
    pub fn set_rate(&self, rate: u32) {
        if self.rate.swap(rate, Ordering::Relaxed) != rate {
            self.buckets.invalidate_all();
        }
    }

    /// Takes one token for `key`; `Err(ms)` says when the next one is there.
    pub fn take(&self, key: &K) -> Result<(), u32> {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 {
            return Ok(());
        }
        let bucket = self
            .buckets
            .get_with_by_ref(key, || Arc::new(Mutex::new(MessageBucket::new(rate))));
        let mut bucket = bucket.lock().unwrap_or_else(|p| p.into_inner());
        if bucket.take() {
            Ok(())
        } else {
            Err(bucket.retry_after_ms())
        }
    }
}

/// A token bucket: `rate` messages per second with bursts of twice that.
pub struct MessageBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl MessageBucket {
    pub fn new(rate: u32) -> MessageBucket {
        let rate = f64::from(rate.max(1));
        MessageBucket {
            rate,
            tokens: rate * 2.0,
            last: Instant::now(),
        }
    }

    /// Takes one token; false when the connection is over its rate.
    pub fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate)
            .min(self.rate * 2.0);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Tokens per second.
    pub fn rate(&self) -> u32 {
        self.rate as u32
    }

    /// Milliseconds until the next token (after a refused `take`).
    pub fn retry_after_ms(&self) -> u32 {
        (((1.0 - self.tokens) / self.rate) * 1000.0).ceil().max(1.0) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_counts_per_ip_and_total() {
        let gate = ConnectionGate::new(3, 2, 10);
        let a: IpAddr = "127.0.0.2".parse().unwrap_or(IpAddr::from([127, 0, 0, 2]));
        let b: IpAddr = IpAddr::from([127, 0, 0, 3]);
        let (ana, bo, cy): (Arc<str>, Arc<str>, Arc<str>) =
            ("ana".into(), "bo".into(), "cy".into());
        let first = gate.admit(a, &ana);
        let second = gate.admit(a, &bo);
        assert!(first.is_ok() && second.is_ok());
        assert_eq!(gate.admit(a, &cy).err(), Some(Refusal::IpFull));
        let third = gate.admit(b, &cy);
        assert!(third.is_ok());
        assert_eq!(gate.admit(b, &cy).err(), Some(Refusal::NodeFull));
        drop(first);
        assert!(
            gate.admit(a, &ana).is_ok(),
            "a released place is free again"
        );
    }

    #[test]
    fn gate_counts_per_user_across_addresses() {
        let gate = ConnectionGate::new(100, 100, 2);
        let ana: Arc<str> = "ana".into();
        let held: Vec<_> = (1..=2u8)
            .map(|i| gate.admit(IpAddr::from([10, 0, 0, i]), &ana))
            .collect();
        assert!(held.iter().all(Result::is_ok));
        let third = gate.admit(IpAddr::from([10, 0, 0, 3]), &ana);
        assert_eq!(third.err(), Some(Refusal::UserFull));
        assert!(
            gate.admit(IpAddr::from([10, 0, 0, 3]), &"bo".into())
                .is_ok()
        );
        drop(held);
        assert!(gate.admit(IpAddr::from([10, 0, 0, 3]), &ana).is_ok());
        assert!(
            gate.counts.lock().unwrap().per_user.len() <= 2,
            "released users leave"
        );
    }

    #[test]
    fn rates_by_key_are_separate_and_say_when_to_retry() {
        let rates = RateByKey::new(5);
        assert_eq!((0..10).filter(|_| rates.take(&"ana").is_ok()).count(), 10);
        let retry = rates.take(&"ana").expect_err("over the rate");
        assert!((1..=200).contains(&retry), "{retry}");
        assert!(rates.take(&"bo").is_ok(), "another key has its own bucket");
        let unlimited = RateByKey::new(0);
        assert!((0..1000).all(|_| unlimited.take(&"ana").is_ok()));
    }

    #[test]
    fn bucket_allows_bursts_then_refuses() {
        let mut bucket = MessageBucket::new(5);
        assert_eq!((0..10).filter(|_| bucket.take()).count(), 10);
        assert!(!bucket.take());
    }
}
