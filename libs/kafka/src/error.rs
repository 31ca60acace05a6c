/// Errors of the Kafka layer, classified so callers can choose retry or stop.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// The client could not be created: a configuration problem, not worth retrying.
    #[error("kafka client configuration: {0}")]
    Config(rdkafka::error::KafkaError),
    /// The broker refused or lost a write, or could not be reached in time: retry later.
    #[error("kafka produce failed: {0}")]
    Produce(rdkafka::error::KafkaError),
    /// The producer stopped for good (librdkafka's fatal error: fenced by another instance,
    /// or a gap-less order it could not keep after a refused write): the process must stop;
    /// `reason` is librdkafka's account of it.
    #[error("kafka producer failed for good ({code}): {reason}")]
    ProducerFailed { code: String, reason: String },
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

    /// A write that failed because the broker could not be reached or did not answer in
    /// time (a delivery timed out, the leader moved, too few replicas in sync), not because
    /// it refused the record: writing it again once the broker is back can succeed.
    pub fn is_unreachable_broker(&self) -> bool {
        use rdkafka::types::RDKafkaErrorCode as Code;
        matches!(
            self,
            KafkaError::Produce(rdkafka::error::KafkaError::MessageProduction(
                Code::MessageTimedOut
                    | Code::RequestTimedOut
                    | Code::OperationTimedOut
                    | Code::BrokerTransportFailure
                    | Code::AllBrokersDown
                    | Code::Resolve
                    | Code::NetworkException
                    | Code::LeaderNotAvailable
                    | Code::NotLeaderForPartition
                    | Code::NotEnoughReplicas
                    | Code::NotEnoughReplicasAfterAppend
            ))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::KafkaError;
    use rdkafka::error::KafkaError as Rd;
    use rdkafka::types::RDKafkaErrorCode as Code;

    #[test]
    fn a_timed_out_write_is_an_unreachable_broker_and_a_refused_one_is_not() {
        let timed_out = KafkaError::Produce(Rd::MessageProduction(Code::MessageTimedOut));
        assert!(timed_out.is_unreachable_broker());
        for refused in [
            Code::TopicAuthorizationFailed,
            Code::MessageSizeTooLarge,
            Code::Fenced,
        ] {
            let error = KafkaError::Produce(Rd::MessageProduction(refused));
            assert!(!error.is_unreachable_broker(), "{refused:?}");
        }
        assert!(!KafkaError::QueueFull.is_unreachable_broker());
    }
}
