//! Host-level limits that hold no matter what plugins do: connections per node and per
//! source IP (checked at the upgrade), and inbound messages per second per connection.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub struct ConnectionGate {
    max_total: usize,
    max_per_ip: usize,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NodeFull,
    IpFull,
}

/// A place held by one connection; released when dropped.
pub struct Admission {
    gate: Arc<ConnectionGate>,
    ip: IpAddr,
}

impl ConnectionGate {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<ConnectionGate> {
        Arc::new(ConnectionGate {
            max_total,
            max_per_ip,
            counts: Mutex::new(Counts::default()),
        })
    }

    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admission, Refusal> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if counts.total >= self.max_total {
            return Err(Refusal::NodeFull);
        }
        let from_ip = counts.per_ip.entry(ip).or_insert(0);
        if *from_ip >= self.max_per_ip {
            return Err(Refusal::IpFull);
        }
        *from_ip += 1;
        counts.total += 1;
        Ok(Admission {
            gate: self.clone(),
            ip,
        })
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut counts = self.gate.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.per_ip.remove(&self.ip);
            }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_counts_per_ip_and_total() {
        let gate = ConnectionGate::new(3, 2);
        let a: IpAddr = "127.0.0.2".parse().unwrap_or(IpAddr::from([127, 0, 0, 2]));
        let b: IpAddr = IpAddr::from([127, 0, 0, 3]);
        let first = gate.admit(a);
        let second = gate.admit(a);
        assert!(first.is_ok() && second.is_ok());
        assert_eq!(gate.admit(a).err(), Some(Refusal::IpFull));
        let third = gate.admit(b);
        assert!(third.is_ok());
        assert_eq!(gate.admit(b).err(), Some(Refusal::NodeFull));
        drop(first);
        assert!(gate.admit(a).is_ok(), "a released place is free again");
    }

    #[test]
    fn bucket_allows_bursts_then_refuses() {
        let mut bucket = MessageBucket::new(5);
        assert_eq!((0..10).filter(|_| bucket.take()).count(), 10);
        assert!(!bucket.take());
    }
}
