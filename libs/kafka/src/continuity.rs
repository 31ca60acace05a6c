//! Loss detection. A consumer can skip records without any error: its position fell below a
//! partition's log start (retention, truncation, the embedded broker's size cap) and
//! librdkafka reset it to the earliest offset, or a broker answered a fetch with a later batch
//! than the one asked for (tansu 0.6 does, for an offset inside a batch). Either way the next
//! record a stage receives of that partition is not the one it expected. [`Continuity`] notices,
//! counts the skipped offsets exactly in `instream_records_lost_total{service,topic,partition}`,
//! logs an ERROR naming the range, and — under `kafka.on_records_lost = "stop"` — fails the
//! batch before anything of it is handled.

use std::time::Duration;

use instream_core::config::{KafkaConfig, OnRecordsLost};
use rdkafka::consumer::Consumer as _;

use crate::client::{Consumer, Record};
use crate::error::KafkaError;

/// A range of offsets of one partition a reader skipped: `[from, to)`. On a topic written in
/// transactions some of them may be transaction markers rather than records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    pub topic: String,
    pub partition: i32,
    pub from: i64,
    pub to: i64,
}

impl Lost {
    pub fn count(&self) -> u64 {
        (self.to - self.from).max(0) as u64
    }
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} offsets {}..{} ({} records)",
            self.topic,
            self.partition,
            self.from,
            self.to,
            self.count()
        )
    }
}

/// Counts and logs a lost range for `service` (the one place `instream_records_lost_total`
/// is written).
pub fn report_lost(service: &'static str, lost: &Lost, why: &str) {
    metrics::counter!(
        "instream_records_lost_total",
        "service" => service,
        "topic" => lost.topic.clone(),
        "partition" => lost.partition.to_string()
    )
    .increment(lost.count());
    tracing::error!(
        service,
        topic = %lost.topic,
        partition = lost.partition,
        from = lost.from,
        to = lost.to,
        records = lost.count(),
        "records lost: {why}; they were never handled by this stage"
    );
}

/// Where the next record of each partition a consumer receives should be.
pub struct Continuity {
    service: &'static str,
    kafka: KafkaConfig,
    /// Whether a topic may hold transaction markers and aborted records (whose offsets no
    /// reader ever receives): its gaps are losses only when the log start passed them.
    transactional: Box<dyn Fn(&str) -> bool + Send + Sync>,
    /// `(topic, partition, next offset)`; few partitions per consumer, so a list.
    next: Vec<(String, i32, i64)>,
    generation: Option<u64>,
}

impl Continuity {
    pub fn new(
        service: &'static str,
        kafka: &KafkaConfig,
        transactional: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self {
            service,
            kafka: kafka.clone(),
            transactional: Box::new(transactional),
            next: Vec::new(),
            generation: None,
        }
    }

    /// Moves where `partition`'s next record is expected forward to `next`: a stage that
    /// skips what it already made durable (a checkpoint's offset, archived offsets) resumes
    /// past the group's commit when that is older. Called after an assignment, before
    /// [`Self::check`] sees the partition's first record; never moves the expectation back (a
    /// commit ahead of a checkpoint covers records the stage dead-lettered).
    pub fn expect_at_least(&mut self, consumer: &Consumer, topic: &str, partition: i32, next: i64) {
        self.follow(consumer);
        match self.position(topic, partition) {
            Some(i) => self.next[i].2 = self.next[i].2.max(next),
            None => self.next.push((topic.to_owned(), partition, next)),
        }
    }

    /// After an assignment the expectations start again from the group's committed offsets
    /// (what the consumer resumes from, unless the broker no longer holds it).
    fn follow(&mut self, consumer: &Consumer) {
        let generation = consumer.context().generation();
        if self.generation != Some(generation) {
            self.generation = Some(generation);
            // Each partition's counter exists from its assignment on, so that an alert on
            // its increase sees the first loss too.
            for (topic, partition) in consumer.context().assignment() {
                metrics::counter!(
                    "instream_records_lost_total",
                    "service" => self.service,
                    "topic" => topic,
                    "partition" => partition.to_string()
                )
                .increment(0);
            }
            self.next = consumer
                .context()
                .starts()
                .into_iter()
                .map(|((topic, partition), next)| (topic, partition, next))
                .collect();
        }
    }

    fn position(&self, topic: &str, partition: i32) -> Option<usize> {
        self.next
            .iter()
            .position(|(t, p, _)| *p == partition && t == topic)
    }

    /// Checks a received batch (every record of the current assignment, in the order
    /// received) against where each partition should be. Every skipped range is counted and
    /// logged; under `kafka.on_records_lost = "stop"` the first one is returned as an error
    /// and nothing of the batch may be handled.
    pub async fn check(
        &mut self,
        consumer: &Consumer,
        batch: &[Record],
    ) -> Result<Vec<Lost>, KafkaError> {
        self.follow(consumer);
        let mut gaps = Vec::new();
        let mut at: Option<usize> = None;
        for record in batch {
            let i = match at {
                Some(i) if self.next[i].1 == record.partition && self.next[i].0 == record.topic => {
                    i
                }
                _ => match self.position(&record.topic, record.partition) {
                    Some(i) => i,
                    None => {
                        // Nothing known (a group that never committed starts at the log start).
                        self.next
                            .push((record.topic.clone(), record.partition, record.offset + 1));
                        at = None;
                        continue;
                    }
                },
            };
            at = Some(i);
            let expected = self.next[i].2;
            if record.offset > expected {
                gaps.push((i, expected, record.offset));
            }
            // A record behind the expectation is one read again (a seek back, a restart from
            // an older commit): what follows it is expected from there.
            self.next[i].2 = record.offset + 1;
        }
        let mut lost = Vec::new();
        for (i, from, to) in gaps {
            let (topic, partition) = (self.next[i].0.clone(), self.next[i].1);
            let range = if (self.transactional)(&topic) {
                // A gap of one is a transaction's marker; a wider one may be an aborted
                // transaction: lost only what the log no longer holds.
                if to - from < 2 {
                    continue;
                }
                let low = match crate::ops::watermarks(&self.kafka, &topic, partition).await {
                    Ok((low, _)) => low,
                    Err(error) => {
                        // Not known to be lost; the next gap is checked again.
                        tracing::warn!(%error, %topic, partition, from, to, "could not ask where the partition starts; a gap of a transactional topic not checked");
                        continue;
                    }
                };
                if low <= from {
                    continue;
                }
                Lost {
                    topic,
                    partition,
                    from,
                    to: low.min(to),
                }
            } else {
                Lost {
                    topic,
                    partition,
                    from,
                    to,
                }
            };
            report_lost(
                self.service,
                &range,
                "the consumer's next record was past them (deleted under it, or skipped by the broker)",
            );
            lost.push(range);
        }
        if let (OnRecordsLost::Stop, Some(first)) = (self.kafka.on_records_lost, lost.first()) {
            return Err(KafkaError::RecordsLost(first.clone()));
        }
        Ok(lost)
    }
}

/// How long the rebalance callback waits for the group's committed offsets.
pub(crate) const COMMITTED_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_range_counts_its_offsets() {
        let lost = Lost {
            topic: "t".into(),
            partition: 3,
            from: 10,
            to: 25,
        };
        assert_eq!(lost.count(), 15);
        assert_eq!(lost.to_string(), "t/3 offsets 10..25 (15 records)");
    }
}
