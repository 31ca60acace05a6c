//! Operator actions on topics and consumer groups: moving a group's offsets to a point in time
//! (replay), and reading and re-driving dead letters. Used by the `instream` CLI; blocking
//! librdkafka calls run on the blocking pool.

use std::collections::HashMap;
use std::time::Duration;

use instream_core::config::KafkaConfig;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};

use crate::client::{delivered, send};
use crate::continuity::Lost;
use crate::error::KafkaError;
use crate::headers;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Where one partition of a group would move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionReset {
    pub partition: i32,
    /// The group's committed offset now (`None`: nothing committed).
    pub committed: Option<i64>,
    /// The first offset whose timestamp is at or after the requested time; the partition's
    /// end when every record is older.
    pub target: i64,
}

fn client_config(cfg: &KafkaConfig, group: &str) -> ClientConfig {
    let mut c = crate::client::connection_config(cfg, &cfg.consumer);
    c.set("group.id", group);
    c.set("enable.auto.commit", "false");
    c.set("isolation.level", "read_committed");
    c
}

fn partitions_of(consumer: &BaseConsumer, topic: &str) -> Result<Vec<i32>, KafkaError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), TIMEOUT)
        .map_err(KafkaError::Consume)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(KafkaError::Admin(format!(
            "topic `{topic}` does not exist or has no partitions"
        )));
    }
    Ok(partitions)
}

/// What `group` would commit on `topic` to re-read everything from `at_millis` (epoch ms) on.
pub async fn plan_offset_reset(
    cfg: &KafkaConfig,
    group: &str,
    topic: &str,
    at_millis: i64,
) -> Result<Vec<PartitionReset>, KafkaError> {
    let c = client_config(cfg, group);
    let topic = topic.to_owned();
    blocking(move || {
        let consumer: BaseConsumer = c.create().map_err(KafkaError::Config)?;
        let partitions = partitions_of(&consumer, &topic)?;
        let mut current = TopicPartitionList::new();
        for &p in &partitions {
            current.add_partition(&topic, p);
        }
        let targets = offsets_at(&consumer, &c, &topic, &partitions, at_millis)?;
        let committed = consumer
            .committed_offsets(current, TIMEOUT)
            .map_err(KafkaError::Consume)?;
        let mut plan = Vec::new();
        for (p, target) in targets {
            let committed = match committed.find_partition(&topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => Some(o),
                _ => None,
            };
            plan.push(PartitionReset {
                partition: p,
                committed,
                target,
            });
        }
        Ok(plan)
    })
    .await
}

/// Per partition, the offset of the first record at or after `at_millis` (the partition's
/// end when there is none).
fn offsets_at(
    consumer: &BaseConsumer,
    c: &ClientConfig,
    topic: &str,
    partitions: &[i32],
    at_millis: i64,
) -> Result<Vec<(i32, i64)>, KafkaError> {
    let mut at = TopicPartitionList::new();
    for &p in partitions {
        at.add_partition_offset(topic, p, Offset::Offset(at_millis))
            .map_err(KafkaError::Consume)?;
    }
    let found = consumer
        .offsets_for_times(at, TIMEOUT)
        .map_err(KafkaError::Consume)?;
    let mut targets = Vec::new();
    for &p in partitions {
        let target = match found.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            // "No record at or after the time" — or a broker that cannot look up times
            // (librdkafka's mock answers that for every time). Check the last record and
            // scan when the answer cannot be right.
            _ => {
                let (low, high) = consumer
                    .fetch_watermarks(topic, p, TIMEOUT)
                    .map_err(KafkaError::Consume)?;
                let last_is_older =
                    first_at_or_after(c, topic, p, at_millis, (high - 1).max(low), high)? == high;
                if last_is_older {
                    high
                } else {
                    first_at_or_after(c, topic, p, at_millis, low, high)?
                }
            }
        };
        targets.push((p, target));
    }
    Ok(targets)
}

/// The offset of the first record in `[start, end)` of one partition whose timestamp is at or
/// after `at_millis`; `end` when there is none. Reads the records one by one.
fn first_at_or_after(
    c: &ClientConfig,
    topic: &str,
    partition: i32,
    at_millis: i64,
    start: i64,
    end: i64,
) -> Result<i64, KafkaError> {
    let mut found = end;
    // Looking for a time: what the partition no longer holds cannot be the answer anyway.
    scan(c, topic, partition, start, end, true, |m| {
        if m.timestamp().to_millis().unwrap_or(i64::MIN) >= at_millis {
            found = m.offset();
            false
        } else {
            true
        }
    })?;
    Ok(found)
}

/// Hands the records of one partition in `[start, end)` to `visit`, in offset order, until
/// `visit` returns false or `end` is reached. Returns the ranges the read skipped: offsets
/// past `start` that were never handed over because the partition no longer held them (or the
/// broker skipped them). Where `markers` (a topic written in transactions), offsets no record
/// took (markers, aborted records) are not counted: only what the log start passed.
fn scan(
    c: &ClientConfig,
    topic: &str,
    partition: i32,
    start: i64,
    end: i64,
    markers: bool,
    mut visit: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> bool,
) -> Result<Vec<Lost>, KafkaError> {
    let mut skipped = Skipped {
        topic,
        partition,
        end,
        markers,
        expected: start,
        lost: Vec::new(),
    };
    if start >= end {
        return Ok(skipped.lost);
    }
    let mut c = c.clone();
    // A start deleted meanwhile is read from the log start, and the jump counted below.
    c.set("auto.offset.reset", "earliest");
    let consumer: BaseConsumer = c.create().map_err(KafkaError::Config)?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(start))
        .map_err(KafkaError::Consume)?;
    consumer.assign(&tpl).map_err(KafkaError::Consume)?;
    let mut deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        if std::time::Instant::now() > deadline {
            return Err(KafkaError::Admin(format!(
                "reading {topic}/{partition} stalled: nothing arrived for {TIMEOUT:?}"
            )));
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(message) => {
                let m = message.map_err(KafkaError::Consume)?;
                deadline = std::time::Instant::now() + TIMEOUT;
                skipped.reached(&consumer, m.offset())?;
                if m.offset() >= end || !visit(&m) || m.offset() + 1 >= end {
                    return Ok(skipped.lost);
                }
            }
            None => {
                // Only transaction markers left before `end` — or the log start moved past it.
                let position = consumer.position().map_err(KafkaError::Consume)?;
                if let Some(Offset::Offset(o)) = position
                    .find_partition(topic, partition)
                    .map(|e| e.offset())
                {
                    if o >= end {
                        skipped.reached(&consumer, end)?;
                        return Ok(skipped.lost);
                    }
                }
            }
        }
    }
}

/// The ranges a [`scan`] skipped.
struct Skipped<'a> {
    topic: &'a str,
    partition: i32,
    end: i64,
    markers: bool,
    /// The offset the next record should have.
    expected: i64,
    lost: Vec<Lost>,
}

impl Skipped<'_> {
    /// The read reached `offset` (a record's, or the end).
    fn reached(&mut self, consumer: &BaseConsumer, offset: i64) -> Result<(), KafkaError> {
        let (from, to) = (self.expected, offset.min(self.end));
        self.expected = self.expected.max(offset + 1);
        if to <= from {
            return Ok(());
        }
        if self.markers && to - from < 2 {
            // A transaction's marker.
            return Ok(());
        }
        let to = if self.markers {
            let (low, _) = consumer
                .fetch_watermarks(self.topic, self.partition, TIMEOUT)
                .map_err(KafkaError::Consume)?;
            low.min(to)
        } else {
            to
        };
        if to > from {
            self.lost.push(Lost {
                topic: self.topic.to_owned(),
                partition: self.partition,
                from,
                to,
            });
        }
        Ok(())
    }
}

/// The low and high watermarks (first offset still held, offset after the last) of one
/// partition.
pub async fn watermarks(
    cfg: &KafkaConfig,
    topic: &str,
    partition: i32,
) -> Result<(i64, i64), KafkaError> {
    let c = client_config(cfg, "instream-scan");
    let topic = topic.to_owned();
    blocking(move || {
        let consumer: BaseConsumer = c.create().map_err(KafkaError::Config)?;
        consumer
            .fetch_watermarks(&topic, partition, TIMEOUT)
            .map_err(KafkaError::Consume)
    })
    .await
}

/// Reads one partition of `topic` from `start` up to (not including) `end`, handing each
/// record's offset and payload to `visit` with `state`; returns the state and the ranges the
/// read skipped (see [`scan`]). For a stage that rebuilds what it knew from its input after a
/// restart.
#[allow(clippy::too_many_arguments)]
pub async fn scan_partition<S: Send + 'static>(
    cfg: &KafkaConfig,
    topic: &str,
    partition: i32,
    start: i64,
    end: i64,
    markers: bool,
    mut state: S,
    visit: fn(&mut S, i64, &[u8]),
) -> Result<(S, Vec<Lost>), KafkaError> {
    let c = client_config(cfg, "instream-scan");
    let topic = topic.to_owned();
    blocking(move || {
        let lost = scan(&c, &topic, partition, start, end, markers, |m| {
            visit(&mut state, m.offset(), m.payload().unwrap_or_default());
            true
        })?;
        Ok((state, lost))
    })
    .await
}

/// [`scan_partition`] handing `visit` each record's offset, the value of one header (if the
/// record has it) and its payload.
#[allow(clippy::too_many_arguments)]
pub async fn scan_partition_with_header<S: Send + 'static>(
    cfg: &KafkaConfig,
    topic: &str,
    partition: i32,
    start: i64,
    end: i64,
    header: &'static str,
    mut state: S,
    visit: fn(&mut S, i64, Option<&[u8]>, &[u8]),
) -> Result<(S, Vec<Lost>), KafkaError> {
    let c = client_config(cfg, "instream-scan");
    let topic = topic.to_owned();
    blocking(move || {
        let lost = scan(&c, &topic, partition, start, end, false, |m| {
            let value = m
                .headers()
                .and_then(|hs| hs.iter().find(|h| h.key == header).and_then(|h| h.value));
            visit(
                &mut state,
                m.offset(),
                value,
                m.payload().unwrap_or_default(),
            );
            true
        })?;
        Ok((state, lost))
    })
    .await
}

/// Hands every committed record of `topic` written at or after `since_millis` (its broker
/// timestamp) up to the end now to `visit`, with its partition, one partition after the other
/// (for operator reports over a time range, without holding the topic in memory). Returns the
/// state and the ranges the read skipped (`markers`: the topic may be written in
/// transactions; see [`scan`]).
pub async fn scan_topic_since<S: Send + 'static>(
    cfg: &KafkaConfig,
    topic: &str,
    since_millis: i64,
    markers: bool,
    state: S,
    visit: fn(&mut S, i32, &[u8]),
) -> Result<(S, Vec<Lost>), KafkaError> {
    let ((state, _), lost) = scan_records_since(
        cfg,
        topic,
        since_millis,
        markers,
        (state, visit),
        |(state, visit), record| visit(state, record.partition, record.payload),
    )
    .await?;
    Ok((state, lost))
}

/// One record of a scan: where it is, its payload, and its headers by name.
pub struct ScannedRecord<'a> {
    pub partition: i32,
    pub offset: i64,
    /// The broker timestamp (the producer's create time unless the topic says otherwise).
    pub timestamp_millis: Option<i64>,
    pub payload: &'a [u8],
    headers: Option<&'a rdkafka::message::BorrowedHeaders>,
}

impl<'a> ScannedRecord<'a> {
    /// The value of the first header called `name`.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers
            .and_then(|hs| hs.iter().find(|h| h.key == name).and_then(|h| h.value))
    }
}

/// [`scan_topic_since`] handing `visit` each record whole: partition, offset, payload and
/// headers.
pub async fn scan_records_since<S: Send + 'static>(
    cfg: &KafkaConfig,
    topic: &str,
    since_millis: i64,
    markers: bool,
    state: S,
    visit: fn(&mut S, &ScannedRecord<'_>),
) -> Result<(S, Vec<Lost>), KafkaError> {
    let (state, lost, _) =
        scan_records_between(cfg, topic, since_millis, None, markers, state, visit).await?;
    Ok((state, lost))
}

/// What a scan read of one partition: from `start` (the first offset at or after the time
/// asked) to `end`, and the partition's log start (`low`) then: when `start == low > 0`,
/// records older than the first one read may have been deleted (retention).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScannedPartition {
    pub partition: i32,
    pub low: i64,
    pub start: i64,
    pub end: i64,
}

/// [`scan_records_since`] up to the first record written at or after `until_millis` (the
/// end now when `None`), saying what it read of each partition.
pub async fn scan_records_between<S: Send + 'static>(
    cfg: &KafkaConfig,
    topic: &str,
    since_millis: i64,
    until_millis: Option<i64>,
    markers: bool,
    mut state: S,
    visit: fn(&mut S, &ScannedRecord<'_>),
) -> Result<(S, Vec<Lost>, Vec<ScannedPartition>), KafkaError> {
    let c = client_config(cfg, "instream-scan");
    let topic = topic.to_owned();
    blocking(move || {
        let consumer: BaseConsumer = c.create().map_err(KafkaError::Config)?;
        let partitions = partitions_of(&consumer, &topic)?;
        let ends: HashMap<i32, i64> = match until_millis {
            Some(until) => offsets_at(&consumer, &c, &topic, &partitions, until)?
                .into_iter()
                .collect(),
            None => HashMap::new(),
        };
        let mut lost = Vec::new();
        let mut read = Vec::new();
        for (p, start) in offsets_at(&consumer, &c, &topic, &partitions, since_millis)? {
            let (low, high) = consumer
                .fetch_watermarks(&topic, p, TIMEOUT)
                .map_err(KafkaError::Consume)?;
            let end = ends.get(&p).copied().unwrap_or(high).min(high);
            read.push(ScannedPartition {
                partition: p,
                low,
                start,
                end,
            });
            lost.extend(scan(&c, &topic, p, start, end, markers, |m| {
                let record = ScannedRecord {
                    partition: p,
                    offset: m.offset(),
                    timestamp_millis: m.timestamp().to_millis(),
                    payload: m.payload().unwrap_or_default(),
                    headers: m.headers(),
                };
                visit(&mut state, &record);
                true
            })?);
        }
        Ok((state, lost, read))
    })
    .await
}

/// Commits the planned offsets for `group`. The group must have no live members (scale its
/// service to zero first): a live member would overwrite these offsets with its own commits.
pub async fn apply_offset_reset(
    cfg: &KafkaConfig,
    group: &str,
    topic: &str,
    plan: &[PartitionReset],
) -> Result<(), KafkaError> {
    let c = client_config(cfg, group);
    let mut tpl = TopicPartitionList::new();
    for r in plan {
        tpl.add_partition_offset(topic, r.partition, Offset::Offset(r.target))
            .map_err(KafkaError::Commit)?;
    }
    blocking(move || {
        let consumer: BaseConsumer = c.create().map_err(KafkaError::Config)?;
        consumer
            .commit(&tpl, CommitMode::Sync)
            .map_err(KafkaError::Commit)
    })
    .await
}

/// A record of a dead-letter topic, with the headers `DeadLetters` wrote.
#[derive(Debug, Clone)]
pub struct StoredDeadLetter {
    pub partition: i32,
    pub offset: i64,
    pub timestamp_millis: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub code: String,
    pub reason: String,
    pub service: String,
    pub origin_topic: Option<String>,
    pub origin_partition: Option<i32>,
    pub origin_offset: Option<i64>,
}

/// Reads `topic` (a dead-letter topic) up to its end as it was when the call started: from
/// `from` (per partition; the beginning when absent), or only the newest `newest` records of
/// each partition when given. Returns them with the ranges the read skipped (`markers`: the
/// topic may be written in transactions; see [`scan`]).
pub async fn read_dead_letters(
    cfg: &KafkaConfig,
    topic: &str,
    from: HashMap<i32, i64>,
    newest: Option<i64>,
    markers: bool,
) -> Result<(Vec<StoredDeadLetter>, Vec<Lost>), KafkaError> {
    // A group id librdkafka needs but never uses: nothing is committed.
    let c = client_config(cfg, "instream-dlq-reader");
    let topic = topic.to_owned();
    blocking(move || {
        let consumer: BaseConsumer = c.create().map_err(KafkaError::Config)?;
        let mut out = Vec::new();
        let mut lost = Vec::new();
        for p in partitions_of(&consumer, &topic)? {
            let (low, high) = consumer
                .fetch_watermarks(&topic, p, TIMEOUT)
                .map_err(KafkaError::Consume)?;
            // A start given below the log start is read from there, the gap reported.
            let mut start = from.get(&p).copied().unwrap_or(low);
            if let Some(n) = newest {
                start = start.max(high - n);
            }
            lost.extend(scan(&c, &topic, p, start, high, markers, |m| {
                out.push(stored(m));
                true
            })?);
        }
        out.sort_by_key(|d| (d.partition, d.offset));
        Ok((out, lost))
    })
    .await
}

fn stored(m: &rdkafka::message::BorrowedMessage<'_>) -> StoredDeadLetter {
    let header = |name: &str| -> Option<String> {
        m.headers().and_then(|hs| {
            hs.iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        })
    };
    StoredDeadLetter {
        partition: m.partition(),
        offset: m.offset(),
        timestamp_millis: m.timestamp().to_millis(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().unwrap_or_default().to_vec(),
        code: header(headers::DLQ_CODE).unwrap_or_default(),
        reason: header(headers::DLQ_REASON).unwrap_or_default(),
        service: header(headers::DLQ_SERVICE).unwrap_or_default(),
        origin_topic: header(headers::ORIGIN_TOPIC),
        origin_partition: header(headers::ORIGIN_PARTITION).and_then(|v| v.parse().ok()),
        origin_offset: header(headers::ORIGIN_OFFSET).and_then(|v| v.parse().ok()),
    }
}

/// Writes each dead letter's record back to `topic` (keyed as before, so it lands in the same
/// partition as the key's other events), marked with `instream.redriven.from =
/// <dlq topic>:<partition>:<offset>`; returns once the broker has all of them.
pub async fn redrive(
    cfg: &KafkaConfig,
    dead_letter_topic: &str,
    topic: &str,
    letters: &[StoredDeadLetter],
    progress: &instream_core::Progress,
) -> Result<(), KafkaError> {
    let producer = crate::client::producer(cfg, "instream-cli")?;
    let mut pending = Vec::with_capacity(letters.len());
    for d in letters {
        let from = format!("{dead_letter_topic}:{}:{}", d.partition, d.offset);
        let hs = OwnedHeaders::new().insert(Header {
            key: headers::REDRIVEN_FROM,
            value: Some(&from),
        });
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
            .payload(d.payload.as_slice())
            .headers(hs);
        if let Some(key) = &d.key {
            record = record.key(key.as_slice());
        }
        pending.push(send(&producer, record).await?);
    }
    for delivery in pending {
        delivered(delivery).await?;
        progress.add(1);
    }
    Ok(())
}

/// One record to write again, with where it came from (the [`headers::REPLAYED_FROM`]
/// header).
pub struct Copy<'a> {
    pub key: &'a [u8],
    pub payload: &'a [u8],
    pub from: String,
}

/// Writes `records` to `topic` (keyed, so one key's records keep their order) and waits for
/// every acknowledgement.
pub async fn produce_copies(
    producer: &crate::client::Producer,
    topic: &str,
    records: &[Copy<'_>],
    progress: &instream_core::Progress,
) -> Result<(), KafkaError> {
    let mut pending = Vec::with_capacity(records.len());
    for r in records {
        let hs = OwnedHeaders::new().insert(Header {
            key: headers::REPLAYED_FROM,
            value: Some(&r.from),
        });
        let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
            .key(r.key)
            .payload(r.payload)
            .headers(hs);
        pending.push(send(producer, record).await?);
    }
    for delivery in pending {
        delivered(delivery).await?;
        progress.add(1);
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, KafkaError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| KafkaError::Admin(format!("blocking task failed: {e}")))?
}

/// One partition of a group's progress on a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    pub partition: i32,
    /// The group's committed offset (`None`: nothing committed yet).
    pub committed: Option<i64>,
    /// The partition's end (the offset the next record will get).
    pub end: i64,
    /// Records not yet processed: `end - committed`, or `end - start` when nothing is
    /// committed (the group reads from the earliest).
    pub lag: i64,
}

/// How far `group` is behind on every partition of `topic`.
pub async fn group_lag(
    cfg: &KafkaConfig,
    group: &str,
    topic: &str,
) -> Result<Vec<PartitionLag>, KafkaError> {
    let c = client_config(cfg, group);
    let topic = topic.to_owned();
    blocking(move || {
        let consumer: BaseConsumer = c.create().map_err(KafkaError::Config)?;
        let partitions = partitions_of(&consumer, &topic)?;
        let mut current = TopicPartitionList::new();
        for &p in &partitions {
            current.add_partition(&topic, p);
        }
        let committed = consumer
            .committed_offsets(current, TIMEOUT)
            .map_err(KafkaError::Consume)?;
        let mut lags = Vec::with_capacity(partitions.len());
        for &p in &partitions {
            let (low, high) = consumer
                .fetch_watermarks(&topic, p, TIMEOUT)
                .map_err(KafkaError::Consume)?;
            let committed = match committed.find_partition(&topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => Some(o),
                _ => None,
            };
            lags.push(PartitionLag {
                partition: p,
                committed,
                end: high,
                lag: (high - committed.unwrap_or(low).max(low)).max(0),
            });
        }
        Ok(lags)
    })
    .await
}
