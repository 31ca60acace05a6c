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
    /// The cluster refused this client: a TLS handshake failed (an unknown authority, a
    /// missing client certificate) or SASL authentication failed (a wrong password). Retrying
    /// with the same settings cannot succeed.
    #[error("kafka refused the connection: {0}")]
    Refused(String),
    #[error("kafka consume failed: {0}")]
    Consume(rdkafka::error::KafkaError),
    /// A producer transaction failed in a way doing the batch again does not mend.
    #[error("transaction: {0}")]
    Transaction(String),
    #[error("embedded broker: {0}")]
    Embedded(String),
    /// Records the consumer can no longer read were found and `kafka.on_records_lost` says
    /// stop: nothing after them is handled.
    #[error("records lost: {0} (kafka.on_records_lost = \"stop\")")]
    RecordsLost(crate::Lost),
    /// A read meant to see every record of a range did not: the partition no longer holds
    /// them, or the broker skipped them.
    #[error("reading {0} skipped records the partition does not hold any more (or the broker skipped them)")]
    Skipped(crate::Lost),
}

impl KafkaError {
    /// Whether trying again later may succeed.
    pub fn is_retriable(&self) -> bool {
        !matches!(
            self,
            KafkaError::Config(_) | KafkaError::ProducerFailed { .. } | KafkaError::Refused(_)
        )
    }

    /// A record the broker will never take as it is (too large, malformed): that record is
    /// refused, and the client must change it. Not a failure of the producer or the topic
    /// (see [`Self::is_refused_write`]), which a later attempt may get past.
    pub fn is_record_refused(&self) -> bool {
        use rdkafka::types::RDKafkaErrorCode as Code;
        matches!(
            self,
            KafkaError::Produce(e) if matches!(
                e.rdkafka_error_code(),
                Some(Code::MessageSizeTooLarge | Code::InvalidMessage | Code::InvalidRecord | Code::InvalidTimestamp)
            )
        )
    }

    /// A write the broker refused for a reason no retry mends (not authorized, a record it
    /// will never take), or the producer failed for good; any other failed write (timed
    /// out, the broker or its coordinator away, a transaction already failing) can succeed
    /// when done again.
    pub fn is_refused_write(&self) -> bool {
        match self {
            KafkaError::ProducerFailed { .. } => true,
            KafkaError::Produce(e) => e.rdkafka_error_code().is_some_and(is_refusal),
            _ => false,
        }
    }
}

impl KafkaError {
    /// A write the broker refused because the record is larger than it takes.
    pub fn is_record_too_large(&self) -> bool {
        matches!(
            self,
            KafkaError::Produce(e)
                if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge)
        )
    }
}

/// A broker's answer to a write (or to adding a partition or offsets to a transaction) that
/// no retry mends: not authorized, a record it will never take, a producer failed for good.
pub fn is_refusal(code: rdkafka::types::RDKafkaErrorCode) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        code,
        Code::Fatal
            | Code::Fenced
            | Code::TopicAuthorizationFailed
            | Code::ClusterAuthorizationFailed
            | Code::TransactionalIdAuthorizationFailed
            | Code::GroupAuthorizationFailed
            | Code::MessageSizeTooLarge
            | Code::InvalidMessage
            | Code::InvalidRecord
            | Code::InvalidTimestamp
            | Code::InvalidRequiredAcks
            | Code::UnsupportedForMessageFormat
            | Code::PolicyViolation
            | Code::UnknownTopic
            | Code::UnknownPartition
            | Code::InvalidArgument
    )
}

#[cfg(test)]
mod tests {
    use super::KafkaError;
    use rdkafka::error::KafkaError as Rd;
    use rdkafka::types::RDKafkaErrorCode as Code;

    #[test]
    fn a_timed_out_or_failing_transaction_write_is_not_a_refusal_and_an_unauthorized_one_is() {
        for transient in [
            Code::MessageTimedOut,
            Code::State,
            Code::UnknownProducerId,
            Code::KafkaStorageError,
        ] {
            let error = KafkaError::Produce(Rd::MessageProduction(transient));
            assert!(!error.is_refused_write(), "{transient:?}");
        }
        for refused in [
            Code::TopicAuthorizationFailed,
            Code::MessageSizeTooLarge,
            Code::Fenced,
        ] {
            let error = KafkaError::Produce(Rd::MessageProduction(refused));
            assert!(error.is_refused_write(), "{refused:?}");
        }
        let failed = KafkaError::ProducerFailed {
            code: "GaplessGuarantee".into(),
            reason: "a record could not be written".into(),
        };
        assert!(failed.is_refused_write() && !failed.is_retriable());
        assert!(!KafkaError::QueueFull.is_refused_write());
    }
}
