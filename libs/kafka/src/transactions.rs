//! Transactional delivery (`enricher.delivery = "transactional"`): each batch is one Kafka
//! transaction holding its outputs, its dead letters and its input offsets (sent with the consumer group's
//! metadata, so a member deposed by a rebalance is fenced, KIP-447). librdkafka's
//! transactional calls block, so they run on the blocking pool. A broker that does not answer
//! is waited for: a timed-out commit or abort is called again (librdkafka goes on with it in
//! the background), and a batch whose writes timed out is aborted and done again.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::client::{Consumer, Producer};
use crate::{KafkaError, Record};
use rdkafka::consumer::Consumer as _;
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::producer::Producer as _;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

/// The longest a call librdkafka goes on with in the background waits before it is called
/// again (see `Transactions::slice`).
const CALL_SLICE: Duration = Duration::from_secs(2);

pub struct Transactions {
    producer: Producer,
    timeout: Duration,
    shutdown: CancellationToken,
}

/// How a batch's transaction ended.
pub enum Outcome {
    Committed,
    /// Aborted (a rebalance fenced it, the broker refused it, or its writes timed out):
    /// nothing of it is visible, and the consumer was moved back to the batch's first
    /// offsets to do it again.
    Aborted,
    /// Shutdown came while the broker did not answer: the transaction is left to the broker
    /// (committed if its commit had reached the coordinator; otherwise aborted when this
    /// `transactional.id` starts again or at its timeout, and the batch read again).
    Interrupted,
}

fn failed(what: &str, e: impl std::fmt::Display) -> KafkaError {
    KafkaError::Transaction(format!("{what}: {e}"))
}

impl Transactions {
    /// Registers the producer's `transactional.id` with its coordinator, waiting for a
    /// broker that does not answer yet (as the consumers do). `None`: shutdown came first.
    pub async fn start(
        producer: Producer,
        timeout: Duration,
        shutdown: CancellationToken,
    ) -> Result<Option<Self>, KafkaError> {
        let transactions = Self {
            producer,
            timeout,
            shutdown,
        };
        // Also aborts whatever a previous instance with this transactional.id left open (with
        // a stable id; the default one holds the pid, stable only in a container).
        let started = transactions
            .retrying("init_transactions", transactions.slice(), |p, timeout| {
                p.init_transactions(timeout)
            })
            .await
            .map_err(|e| failed("init_transactions", e))?;
        Ok(started.map(|()| transactions))
    }

    /// How long a call that librdkafka goes on with in the background (init, commit, abort)
    /// waits before it is called again: a timed-out call is picked up by the next, and
    /// shutdown is seen between calls, well within a pod's grace.
    fn slice(&self) -> Duration {
        self.timeout.min(CALL_SLICE)
    }

    /// Why the open transaction failed, when it did (librdkafka's abortable state): its
    /// writes' own errors say only "timed out" or "purged" for records caught up in it, and
    /// a partition refused when added to the transaction has no record error at all. Asked
    /// of `begin_transaction`, which answers with the transaction's error in that state and
    /// changes nothing in any state but `Ready`, which an open transaction is not in.
    pub fn failure(&self) -> Option<rdkafka::error::RDKafkaError> {
        match self.producer.begin_transaction() {
            Err(RdKafkaError::Transaction(e)) if e.txn_requires_abort() => Some(e),
            _ => None,
        }
    }

    /// Whether the producer failed for good (another instance with its `transactional.id`
    /// fenced it): nothing it sends can succeed any more.
    pub fn failed_for_good(&self) -> bool {
        self.producer.fatal_error().is_some()
    }

    /// Begins a batch's transaction, under the consumer group generation the batch was
    /// consumed in: a member deposed since (a rebalance, or a poll interval missed while a
    /// backend was down) is then fenced by the broker instead of committing over the
    /// partitions' new owner.
    pub fn begin(&self, consumer: &Consumer) -> Result<Batch, KafkaError> {
        let group = consumer
            .group_metadata()
            .ok_or_else(|| failed("begin_transaction", "the consumer has no group metadata"))?;
        self.producer
            .begin_transaction()
            .map_err(|e| failed("begin_transaction", e))?;
        Ok(Batch { group })
    }

    /// Runs a transactional call on the blocking pool, again after a pause each time it
    /// fails with an error librdkafka calls retriable (the broker did not answer in time),
    /// until it succeeds, fails otherwise, or shutdown comes (`Ok(None)`). Each call waits
    /// at most `timeout`.
    async fn retrying(
        &self,
        what: &str,
        timeout: Duration,
        call: impl Fn(&Producer, Duration) -> Result<(), RdKafkaError> + Clone + Send + 'static,
    ) -> Result<Option<()>, RdKafkaError> {
        let mut pauses =
            instream_core::Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
                .pauses();
        loop {
            let (p, call) = (self.producer.clone(), call.clone());
            let result = tokio::task::spawn_blocking(move || call(&p, timeout))
                .await
                .map_err(|_| RdKafkaError::Canceled)?;
            match result {
                Err(RdKafkaError::Transaction(e)) if e.is_retriable() => {
                    tracing::warn!(error = %e, "{what} did not complete; calling it again");
                    if !pauses.sleep(&self.shutdown).await {
                        return Ok(None);
                    }
                }
                other => return other.map(Some),
            }
        }
    }

    /// Aborts the open transaction (shutdown in the middle of a batch, or a batch to do
    /// again). `false`: shutdown came while the broker did not answer.
    pub async fn abort(&self) -> Result<bool, KafkaError> {
        self.retrying("abort_transaction", self.slice(), |p, timeout| {
            p.abort_transaction(timeout)
        })
        .await
        .map(|done| done.is_some())
        .map_err(|e| failed("abort_transaction", e))
    }

    /// The batch's writes failed because the broker could not be reached: aborts its
    /// transaction and moves the consumer back to the batch's first offsets to do it again.
    pub async fn redo(&self, consumer: &Consumer, ranges: &Ranges) -> Result<Outcome, KafkaError> {
        if !self.abort().await? {
            return Ok(Outcome::Interrupted);
        }
        metrics::counter!("instream_enrich_transactions_total", "outcome" => "aborted")
            .increment(1);
        self.rewind(consumer, ranges)?;
        Ok(Outcome::Aborted)
    }

    /// Moves the consumer back to the first offset of each range still assigned.
    fn rewind(&self, consumer: &Consumer, ranges: &Ranges) -> Result<(), KafkaError> {
        let assigned = crate::client::assigned_partitions(consumer);
        for ((topic, partition), (first, _)) in ranges {
            // A partition no longer assigned is not ours to rewind: its next owner starts
            // from the last committed offset anyway.
            if !assigned.contains(&(topic.clone(), *partition)) {
                continue;
            }
            // Going on past aborted records would lose them: start again from the first.
            consumer
                .seek(topic, *partition, Offset::Offset(*first), self.timeout)
                .map_err(|e| failed(&format!("rewinding {topic}/{partition}"), e))?;
        }
        Ok(())
    }

    /// Sends the batch's offsets into the transaction and commits it. An abortable failure
    /// aborts and rewinds the consumer; a fatal one (this instance was fenced by another with
    /// its transactional.id) is returned: the process must stop.
    pub async fn commit(
        &self,
        consumer: &Consumer,
        batch: Batch,
        ranges: &Ranges,
    ) -> Result<Outcome, KafkaError> {
        let group = batch.group;
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), (_, next)) in ranges {
            offsets
                .add_partition_offset(topic, *partition, Offset::Offset(*next))
                .map_err(|e| failed("offsets", e))?;
        }
        let group = std::sync::Arc::new(group);
        let sent = self
            // The whole timeout: a call timed out here fails the transaction rather than
            // going on in the background.
            .retrying(
                "send_offsets_to_transaction",
                self.timeout,
                move |p, timeout| p.send_offsets_to_transaction(&offsets, &group, timeout),
            )
            .await;
        let result = match sent {
            Ok(Some(())) => self
                .retrying("commit_transaction", self.slice(), |p, timeout| {
                    p.commit_transaction(timeout)
                })
                .await
                .map_err(|e| ("commit_transaction", e)),
            Ok(None) => Ok(None),
            Err(e) => Err(("send_offsets_to_transaction", e)),
        };
        match result {
            Ok(None) => Ok(Outcome::Interrupted),
            Ok(Some(())) => {
                metrics::counter!("instream_enrich_transactions_total", "outcome" => "committed")
                    .increment(1);
                Ok(Outcome::Committed)
            }
            Err((what, RdKafkaError::Transaction(e)))
                if e.txn_requires_abort() && crate::is_refusal(e.code()) =>
            {
                // Done again it would be refused again: stop, saying why.
                self.abort().await?;
                Err(failed(what, e))
            }
            Err((_, RdKafkaError::Transaction(e))) if e.txn_requires_abort() => {
                tracing::warn!(error = %e, "transaction refused; aborting and doing the batch again");
                self.redo(consumer, ranges).await
            }
            Err((what, e)) => Err(failed(what, e)),
        }
    }
}

/// An open batch transaction (see [`Transactions::begin`]).
pub struct Batch {
    group: rdkafka::consumer::ConsumerGroupMetadata,
}

/// Per partition of a batch: the first offset (to rewind to) and the next one (to commit).
pub type Ranges = BTreeMap<(String, i32), (i64, i64)>;

/// The [`Ranges`] of a batch's records.
pub fn ranges(batch: &[Record]) -> Ranges {
    let mut ranges = Ranges::new();
    for r in batch {
        let range = ranges
            .entry((r.topic.clone(), r.partition))
            .or_insert((r.offset, r.offset + 1));
        range.0 = range.0.min(r.offset);
        range.1 = range.1.max(r.offset + 1);
    }
    ranges
}
