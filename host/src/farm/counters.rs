//! Plugin counters in Redis, so a rate limit holds across every node of the farm. While Redis
//! is unreachable they fall back to this node's memory (limits then hold per node).

use std::sync::Arc;

use async_trait::async_trait;

use super::keys;
use super::link::RedisLink;
use crate::seams::counters::{Counters, MemoryCounters};
use crate::seams::{Health, Part};

pub struct RedisCounters {
    link: Arc<RedisLink>,
    fallback: MemoryCounters,
}

impl RedisCounters {
    pub fn new(link: Arc<RedisLink>) -> RedisCounters {
        RedisCounters {
            link,
            fallback: MemoryCounters::default(),
        }
    }
}

impl Part for RedisCounters {
    fn name(&self) -> &'static str {
        "plugin counters (redis)"
    }

    fn health(&self) -> Health {
        self.link.health("rate limits hold per node")
    }
}

#[async_trait]
impl Counters for RedisCounters {
    async fn add(&self, key: &str, delta: u64, ttl_ms: u64) -> u64 {
        if let Some(mut conn) = self.link.connection() {
            let key = keys::counter(key);
            let result: Result<(u64,), _> = redis::pipe()
                .atomic()
                .cmd("INCRBY")
                .arg(&key)
                .arg(delta)
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(ttl_ms.max(1))
                .arg("NX")
                .ignore()
                .query_async(&mut conn)
                .await;
            match result {
                Ok((total,)) => return total,
                Err(err) => self.link.report(&err),
            }
        }
        self.fallback.add(key, delta, ttl_ms).await
    }
}
