/// Errors of the Kafka layer, classified so callers can choose retry or stop.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// The client could not be created: a configuration problem, not worth retrying.
    #[error("kafka client configuration: {0}")]
    Config(rdkafka::error::KafkaError),
    /// The broker refused or lost a write, or could not be reached in time: retry later.
    #[error("kafka produce failed: {0}")]
    Produce(rdkafka::error::KafkaError),
    /// A commit failed: the records will be delivered again, which downstream tolerates.
    #[error("kafka commit failed: {0}")]
    Commit(rdkafka::error::KafkaError),
    /// The producer's local queue is full: the broker is slow or away. Back off.
    #[error("kafka producer queue is full")]
    QueueFull,
    #[error("kafka admin: {0}")]
    Admin(String),
    #[error("kafka consume failed: {0}")]
    Consume(rdkafka::error::KafkaError),
    #[error("embedded broker: {0}")]
    Embedded(String),
}

impl KafkaError {
    /// Whether trying again later may succeed.
    pub fn is_retriable(&self) -> bool {
        !matches!(self, KafkaError::Config(_))
    }
}
