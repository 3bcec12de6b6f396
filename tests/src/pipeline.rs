//! The farm's outside services started together for one test: Redis between the nodes,
//! Apache Kafka and FerretDB (MongoDB protocol), with topic, group and database names of
//! their own, and the flags that point nodes and workers at them.

use crate::services::{KafkaBroker, MongoServer, WorkerProcess, unique};
use crate::{NodeProcess, RedisProcess};

/// Redis, a broker and MongoDB, with names of their own for this test.
pub struct Pipeline {
    pub redis: RedisProcess,
    pub kafka: KafkaBroker,
    pub mongo: MongoServer,
    pub topic: String,
    pub group: String,
    pub database: String,
}

impl Pipeline {
    pub async fn start() -> anyhow::Result<Pipeline> {
        Pipeline::start_with(1).await
    }

    /// With a Kafka cluster of `kafka_brokers` (see `KafkaBroker::start_cluster`).
    pub async fn start_with(kafka_brokers: usize) -> anyhow::Result<Pipeline> {
        Ok(Pipeline {
            redis: RedisProcess::start().await?,
            kafka: KafkaBroker::start_cluster(kafka_brokers).await?,
            mongo: MongoServer::start().await?,
            topic: unique("likes"),
            group: unique("workers"),
            database: unique("fanfare").replace('-', "_"),
        })
    }

    pub fn node_args(&self) -> Vec<String> {
        [
            "--redis",
            &self.redis.url(),
            "--kafka",
            &self.kafka.brokers,
            "--kafka-topic",
            &self.topic,
            "--kafka-ack-timeout",
            "200",
            "--mongo",
            &self.mongo.url,
            "--mongo-database",
            &self.database,
            "--drain-period",
            "100",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    pub async fn node(&self, data_dir: &std::path::Path) -> anyhow::Result<NodeProcess> {
        let args = self.node_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        NodeProcess::start(data_dir, &args).await
    }

    pub async fn worker(&self, extra: &[&str]) -> anyhow::Result<WorkerProcess> {
        let redis = self.redis.url();
        let mut args = vec![
            "--kafka",
            &self.kafka.brokers,
            "--kafka-topic",
            &self.topic,
            "--group",
            &self.group,
            "--session-timeout",
            "6000",
            "--mongo",
            &self.mongo.url,
            "--mongo-database",
            &self.database,
            "--redis",
            &redis,
        ];
        args.extend_from_slice(extra);
        WorkerProcess::start(&args).await
    }

    pub async fn db(&self) -> anyhow::Result<mongodb::Database> {
        self.mongo.database(&self.database).await
    }
}
