//! [`Input`]: what a stage does with the consumer it reads from — mark records handled, learn
//! its assignment, hold partitions back — without naming librdkafka's types.

use std::collections::HashSet;

use rdkafka::consumer::Consumer as _;
use rdkafka::TopicPartitionList;

use crate::client::{self, Consumer};
use crate::{KafkaError, Record};

/// A stage's view of its group consumer for the length of one call.
#[derive(Clone, Copy)]
pub struct Input<'a> {
    consumer: &'a Consumer,
}

impl<'a> Input<'a> {
    pub fn new(consumer: &'a Consumer) -> Self {
        Self { consumer }
    }

    /// The consumer itself, for this crate's own helpers (continuity, transactions).
    pub fn consumer(&self) -> &'a Consumer {
        self.consumer
    }

    /// Marks records durably handled: their offsets may be committed once every earlier
    /// offset of their partition is too.
    pub fn complete<'r>(&self, records: impl IntoIterator<Item = &'r Record>) {
        client::complete(self.consumer, records);
    }

    /// Marks offsets of one partition durably handled (for stages that keep offsets rather
    /// than records).
    pub fn complete_offsets(&self, topic: &str, partition: i32, offsets: &[i64]) {
        client::complete_offsets(self.consumer, topic, partition, offsets);
    }

    /// The assignment generation now: it changes at every rebalance.
    pub fn generation(&self) -> u64 {
        client::generation(self.consumer)
    }

    /// The partitions of the assignment in force and its generation, or `None` between a
    /// revoke and the assignment that follows it.
    pub fn current_assignment(&self) -> Option<(u64, HashSet<(String, i32)>)> {
        client::current_assignment(self.consumer)
    }

    /// Stops fetching from these partitions until [`Self::resume`]d (back-pressure).
    pub fn pause(&self, partitions: &[(String, i32)]) -> Result<(), KafkaError> {
        self.consumer
            .pause(&list(partitions))
            .map_err(KafkaError::Consume)
    }

    pub fn resume(&self, partitions: &[(String, i32)]) -> Result<(), KafkaError> {
        self.consumer
            .resume(&list(partitions))
            .map_err(KafkaError::Consume)
    }

    /// The assigned partitions this consumer has received every record of, as far as the
    /// broker's last fetch answers tell (no request is made): the position (past any
    /// transaction markers) has reached the partition's end. A partition nothing was
    /// received from since its assignment has no position and is not listed.
    pub fn read_to_end(&self) -> HashSet<(String, i32)> {
        let Ok(positions) = self.consumer.position() else {
            return HashSet::new();
        };
        positions
            .elements()
            .into_iter()
            .filter_map(|e| {
                let rdkafka::Offset::Offset(position) = e.offset() else {
                    return None;
                };
                let high = self.known_end(e.topic(), e.partition())?;
                (position >= high).then(|| (e.topic().to_owned(), e.partition()))
            })
            .collect()
    }

    /// The end of a partition as the broker's last fetch answer gave it (`None`: no answer
    /// yet); no request is made.
    pub fn known_end(&self, topic: &str, partition: i32) -> Option<i64> {
        let topic = std::ffi::CString::new(topic).ok()?;
        let (mut low, mut high) = (-1i64, -1i64);
        // SAFETY: the consumer's handle is alive for the call; librdkafka reads `topic` (a
        // valid C string) and writes the two offsets from its cache without keeping either
        // pointer. rust-rdkafka does not wrap this cached read.
        let error = unsafe {
            rdkafka::bindings::rd_kafka_get_watermark_offsets(
                self.consumer.client().native_ptr(),
                topic.as_ptr(),
                partition,
                &mut low,
                &mut high,
            )
        };
        (error == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
            .then_some(high)
    }
}

fn list(partitions: &[(String, i32)]) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    for (topic, partition) in partitions {
        list.add_partition(topic, *partition);
    }
    list
}
