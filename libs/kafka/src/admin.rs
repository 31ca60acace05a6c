//! Topic creation. Configs are set explicitly at creation: some Kafka-protocol brokers report
//! configs that were never set as absent, and retention must never be left to a broker default.

use std::collections::HashSet;
use std::time::Duration;

use instream_core::config::KafkaConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::RDKafkaErrorCode;

use crate::error::KafkaError;

/// A topic instream needs.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
}

/// Creates the topics that do not exist yet. Existing topics are left as they are (their
/// partition count is not changed: that would move keys between partitions).
pub async fn ensure_topics(cfg: &KafkaConfig, topics: &[TopicSpec]) -> Result<(), KafkaError> {
    if topics.is_empty() {
        return Ok(());
    }
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.bootstrap_servers);
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    let existing = existing_topics(c.clone()).await?;
    let topics: Vec<&TopicSpec> = topics
        .iter()
        .filter(|t| !existing.contains(&t.name))
        .collect();
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = c.create().map_err(KafkaError::Config)?;
    let retention = cfg.retention.as_millis().to_string();
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            NewTopic::new(
                &t.name,
                t.partitions,
                TopicReplication::Fixed(cfg.replication_factor),
            )
            .set("retention.ms", &retention)
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new, &options)
        .await
        .map_err(|e| KafkaError::Admin(e.to_string()))?;
    for result in results {
        match result {
            Ok(name) => tracing::info!(topic = %name, "topic created"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(KafkaError::Admin(format!(
                    "creating topic `{name}`: {code}"
                )))
            }
        }
    }
    Ok(())
}

/// The names of all topics, from a metadata request that never auto-creates one. Asking
/// first also spares brokers without a CreateTopics API (the embedded one) a request they
/// would not answer.
async fn existing_topics(mut c: ClientConfig) -> Result<HashSet<String>, KafkaError> {
    c.set("allow.auto.create.topics", "false");
    let consumer: BaseConsumer = c.create().map_err(KafkaError::Config)?;
    tokio::task::spawn_blocking(move || {
        let metadata = consumer
            .fetch_metadata(None, Duration::from_secs(30))
            .map_err(|e| KafkaError::Admin(format!("listing topics: {e}")))?;
        Ok(metadata
            .topics()
            .iter()
            .map(|t| t.name().to_owned())
            .collect())
    })
    .await
    .map_err(|e| KafkaError::Admin(format!("listing topics: {e}")))?
}
