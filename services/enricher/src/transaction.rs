//! `enricher.delivery = "transactional"`: each batch is one Kafka transaction holding its
//! enriched records, its dead letters and its input offsets (sent with the consumer group's
//! metadata, so a member deposed by a rebalance is fenced, KIP-447). librdkafka's
//! transactional calls block, so they run on the blocking pool.

use std::collections::BTreeMap;
use std::time::Duration;

use instream_kafka::client::{Consumer, Producer};
use instream_kafka::Record;
use rdkafka::consumer::{Consumer as _, ConsumerGroupMetadata};
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::producer::Producer as _;
use rdkafka::{Offset, TopicPartitionList};

use crate::EnricherError;

pub(crate) struct Transactions {
    producer: Producer,
    timeout: Duration,
}

/// How a batch's transaction ended.
pub(crate) enum Outcome {
    Committed,
    /// Aborted (a rebalance fenced it, or the broker refused it): nothing of it is visible,
    /// and the consumer was moved back to the batch's first offsets to do it again.
    Aborted,
}

fn failed(what: &str, e: impl std::fmt::Display) -> EnricherError {
    EnricherError::Transaction(format!("{what}: {e}"))
}

impl Transactions {
    pub async fn start(producer: Producer, timeout: Duration) -> Result<Self, EnricherError> {
        let p = producer.clone();
        // Also aborts whatever a previous instance with this transactional.id left open (with
        // a stable id; the default one holds the pid, stable only in a container).
        tokio::task::spawn_blocking(move || p.init_transactions(timeout))
            .await
            .map_err(|e| failed("init_transactions", e))?
            .map_err(|e| failed("init_transactions", e))?;
        Ok(Self { producer, timeout })
    }

    pub fn begin(&self) -> Result<(), EnricherError> {
        self.producer
            .begin_transaction()
            .map_err(|e| failed("begin_transaction", e))
    }

    /// Aborts the open transaction (shutdown in the middle of a batch).
    pub async fn abort(&self) -> Result<(), EnricherError> {
        let (p, timeout) = (self.producer.clone(), self.timeout);
        tokio::task::spawn_blocking(move || p.abort_transaction(timeout))
            .await
            .map_err(|e| failed("abort_transaction", e))?
            .map_err(|e| failed("abort_transaction", e))
    }

    /// Sends the batch's offsets into the transaction and commits it. An abortable failure
    /// aborts and rewinds the consumer; a fatal one (this instance was fenced by another with
    /// its transactional.id) is returned: the process must stop.
    pub async fn commit(
        &self,
        consumer: &Consumer,
        group: ConsumerGroupMetadata,
        batch: &[Record],
    ) -> Result<Outcome, EnricherError> {
        // Per partition, the first offset (to rewind to) and the next one (to commit).
        let mut ranges: BTreeMap<(&str, i32), (i64, i64)> = BTreeMap::new();
        for r in batch {
            let range = ranges
                .entry((r.topic.as_str(), r.partition))
                .or_insert((r.offset, r.offset + 1));
            range.0 = range.0.min(r.offset);
            range.1 = range.1.max(r.offset + 1);
        }
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), (_, next)) in &ranges {
            offsets
                .add_partition_offset(topic, *partition, Offset::Offset(*next))
                .map_err(|e| failed("offsets", e))?;
        }
        let (p, timeout) = (self.producer.clone(), self.timeout);
        let result = tokio::task::spawn_blocking(move || {
            p.send_offsets_to_transaction(&offsets, &group, timeout)?;
            p.commit_transaction(timeout)
        })
        .await
        .map_err(|e| failed("commit", e))?;
        match result {
            Ok(()) => {
                metrics::counter!("instream_enrich_transactions_total", "outcome" => "committed")
                    .increment(1);
                Ok(Outcome::Committed)
            }
            Err(RdKafkaError::Transaction(e)) if e.txn_requires_abort() => {
                tracing::warn!(error = %e, "transaction refused; aborting and doing the batch again");
                metrics::counter!("instream_enrich_transactions_total", "outcome" => "aborted")
                    .increment(1);
                self.abort().await?;
                let assigned = instream_kafka::client::assigned_partitions(consumer);
                for ((topic, partition), (first, _)) in &ranges {
                    // A partition no longer assigned is not ours to rewind: its next owner
                    // starts from the last committed offset anyway.
                    if !assigned.contains(&((*topic).to_owned(), *partition)) {
                        continue;
                    }
                    // Going on past aborted records would lose them: stop instead, and start
                    // again from the committed offsets.
                    consumer
                        .seek(topic, *partition, Offset::Offset(*first), self.timeout)
                        .map_err(|e| failed(&format!("rewinding {topic}/{partition}"), e))?;
                }
                Ok(Outcome::Aborted)
            }
            Err(e) => Err(failed("commit_transaction", e)),
        }
    }
}
