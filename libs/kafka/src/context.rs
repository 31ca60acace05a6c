use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::statistics::Statistics;
use rdkafka::TopicPartitionList;

use crate::tracker::OffsetTracker;

/// The client context of every instream Kafka client: librdkafka logs go to `tracing`,
/// statistics become lag gauges, and a revoke commits what is done of the lost partitions and
/// forgets them, so that this member never commits over their next owner.
pub struct InstreamContext {
    service: String,
    group: String,
    tracker: Arc<Mutex<OffsetTracker>>,
    /// Bumped on every assignment change, so a service can tell records consumed before a
    /// rebalance from those after it.
    generation: AtomicU64,
    /// The partitions of the last assignment, with the generation it made. Kept through a
    /// revoke until the next assignment, so that a stage looking between the two does not
    /// think it owns nothing.
    assignment: Mutex<(u64, HashSet<(String, i32)>)>,
    /// When the oldest unanswered asynchronous commit was sent: its answer (the commit
    /// callback) records the commit latency.
    commit_sent: Mutex<Option<std::time::Instant>>,
    /// Off when offsets are committed inside producer transactions: a commit of the
    /// consumer's own on a revoke (or when it closes) could land after a transaction's and
    /// move the group's offset back.
    commits_on_revoke: AtomicBool,
    /// The group's committed offset of each partition of the last assignment, read when it
    /// was assigned: where the consumer resumes (see [`crate::Continuity`]).
    starts: Mutex<Vec<((String, i32), i64)>>,
    /// Standalone mode: what this consumer receives is counted there, each offset once
    /// (the highest counted per partition kept, so a record read again is not counted again).
    backlog: Option<instream_core::backlog::Backlog>,
    counted: Mutex<std::collections::HashMap<(String, i32), i64>>,
}

impl InstreamContext {
    pub fn new(service: &str, group: &str) -> Self {
        Self {
            service: service.to_owned(),
            group: group.to_owned(),
            tracker: Arc::default(),
            generation: AtomicU64::new(0),
            assignment: Mutex::default(),
            commit_sent: Mutex::default(),
            commits_on_revoke: AtomicBool::new(true),
            starts: Mutex::default(),
            backlog: None,
            counted: Mutex::default(),
        }
    }

    /// Counts what this consumer receives in `backlog` (standalone mode).
    pub fn with_backlog(mut self, backlog: Option<instream_core::backlog::Backlog>) -> Self {
        self.backlog = backlog;
        self
    }

    /// Standalone: counts received records in the account, each offset once.
    pub fn count_received(&self, records: &[crate::Record]) {
        let Some(backlog) = &self.backlog else {
            return;
        };
        let mut counted = self.counted.lock().unwrap_or_else(|p| p.into_inner());
        for r in records {
            let highest = counted.get(&(r.topic.clone(), r.partition)).copied();
            if highest.is_some_and(|h| r.offset <= h) {
                continue;
            }
            counted.insert((r.topic.clone(), r.partition), r.offset);
            let headers = r.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
            let bytes = instream_core::backlog::record_bytes(
                r.key.as_ref().map_or(0, Vec::len),
                r.payload.len(),
                headers,
            );
            backlog.received(&self.service, &r.topic, bytes);
        }
    }

    /// The service this client belongs to.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Offsets are committed only inside producer transactions from now on: never by this
    /// consumer on a revoke.
    pub fn leave_commits_to_transactions(&self) {
        self.commits_on_revoke.store(false, Ordering::Release);
    }

    /// Notes that a commit was sent now (the first of several outstanding counts).
    pub fn commit_sent(&self) {
        let mut sent = self.commit_sent.lock().unwrap_or_else(|e| e.into_inner());
        sent.get_or_insert_with(std::time::Instant::now);
    }

    /// The offset tracker of this consumer.
    pub fn tracker(&self) -> MutexGuard<'_, OffsetTracker> {
        self.tracker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The assignment generation: changes whenever partitions are revoked or assigned.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The partitions of the last assignment (see the field's note).
    pub fn assignment(&self) -> HashSet<(String, i32)> {
        self.assignment
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .1
            .clone()
    }

    /// The partitions of the assignment in force with its generation, or `None` between a
    /// revoke and the assignment that follows it.
    pub fn current_assignment(&self) -> Option<(u64, HashSet<(String, i32)>)> {
        let assignment = self
            .assignment
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (assignment.0 == self.generation()).then(|| assignment.clone())
    }

    /// The committed offsets read at the last assignment (partitions without one left out).
    pub fn starts(&self) -> Vec<((String, i32), i64)> {
        self.starts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
        tpl.elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect()
    }
}

impl ClientContext for InstreamContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let service = self.service.as_str();
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => tracing::error!(service, fac, "librdkafka: {message}"),
            RDKafkaLogLevel::Warning => tracing::warn!(service, fac, "librdkafka: {message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(service, fac, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(service, fac, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::warn!(service = %self.service, %error, reason, "kafka client error");
        metrics::counter!("instream_kafka_client_errors_total", "service" => self.service.clone())
            .increment(1);
    }

    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // -1 is librdkafka's internal "unassigned" partition; a lag of -1 means unknown.
                if *partition >= 0 && p.consumer_lag >= 0 {
                    metrics::gauge!(
                        "instream_consumer_lag",
                        "group" => self.group.clone(),
                        "topic" => topic.clone(),
                        "partition" => partition.to_string()
                    )
                    .set(p.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for InstreamContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let lost = Self::partitions(tpl);
                let mut tracker = self.tracker();
                let done = tracker.take_committable_of(&lost);
                if !done.is_empty() && self.commits_on_revoke.load(Ordering::Acquire) {
                    let mut commit = TopicPartitionList::new();
                    for (topic, partition, next) in &done {
                        if let Err(e) = commit.add_partition_offset(
                            topic,
                            *partition,
                            rdkafka::Offset::Offset(*next),
                        ) {
                            tracing::warn!(error = %e, "bad offset in revoke commit");
                        }
                    }
                    if let Err(error) = consumer.commit(&commit, CommitMode::Sync) {
                        // The next owner re-reads from the last commit: duplicates, never loss.
                        tracing::warn!(%error, "commit on revoke failed");
                    }
                }
                for (topic, partition) in &lost {
                    tracker.forget(topic, *partition);
                    // The new owner reports this partition's lag from now on; a stale value
                    // here would be summed with its.
                    metrics::gauge!(
                        "instream_consumer_lag",
                        "group" => self.group.clone(),
                        "topic" => topic.clone(),
                        "partition" => partition.to_string()
                    )
                    .set(0.0);
                }
                self.generation.fetch_add(1, Ordering::AcqRel);
                tracing::info!(service = %self.service, partitions = ?lost, "partitions revoked");
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(error) => {
                tracing::warn!(service = %self.service, %error, "rebalance error")
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let got = Self::partitions(tpl);
            // Where the consumer resumes: a record received past it means records skipped.
            let starts = match consumer
                .committed_offsets((*tpl).clone(), crate::continuity::COMMITTED_TIMEOUT)
            {
                Ok(committed) => committed
                    .elements()
                    .iter()
                    .filter_map(|e| match e.offset() {
                        rdkafka::Offset::Offset(o) => {
                            Some(((e.topic().to_owned(), e.partition()), o))
                        }
                        _ => None,
                    })
                    .collect(),
                Err(error) => {
                    // Loss is then detected from the first record on only.
                    tracing::warn!(service = %self.service, %error, "committed offsets unreadable at assignment");
                    Vec::new()
                }
            };
            *self
                .starts
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = starts;
            let mut tracker = self.tracker();
            for (topic, partition) in &got {
                tracker.forget(topic, *partition);
            }
            let mut assignment = self
                .assignment
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
            *assignment = (generation, got.iter().cloned().collect());
            drop(assignment);
            tracing::info!(service = %self.service, partitions = ?got, "partitions assigned");
        }
        let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        metrics::gauge!("instream_assigned_partitions", "group" => self.group.clone())
            .set(assigned as f64);
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        let outcome = match &result {
            Ok(()) => "ok",
            Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::NoOffset,
            )) => "nothing",
            Err(error) => {
                tracing::warn!(service = %self.service, %error, "offset commit failed");
                "error"
            }
        };
        metrics::counter!("instream_offset_commits_total", "group" => self.group.clone(), "outcome" => outcome)
            .increment(1);
        let sent = self
            .commit_sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(sent) = sent {
            metrics::histogram!("instream_offset_commit_seconds", "group" => self.group.clone())
                .record(sent.elapsed().as_secs_f64());
        }
    }
}
