//! The accounting of `instream audit`: every raw record of the scanned range is one line of
//! the ledger, keyed by its partition and offset, and what the stages made of it is found by
//! that origin (the enricher's outputs and dead letters name it in headers, the archive's
//! files by their offsets). So a copy written twice (an at-least-once re-emit after a kill)
//! is one outcome, not two, and a record no stage answers for is a named difference, never a
//! count that happens to balance.

use std::collections::{BTreeMap, HashSet};

use instream_kafka::ops::ScannedPartition;
use instream_store::LedgerRow;
use serde::Serialize;

pub const HOUR_MS: i64 = 3_600_000;

/// What became of one raw offset.
#[derive(Debug, Clone, Copy)]
struct Fate {
    /// The hour (hours since the epoch) of the record's ingest time; [`NO_RECORD`] for an
    /// offset the scan did not receive (a transaction marker, or skipped).
    hour: i32,
    /// Copies of its enriched output (more than one: re-emitted).
    enriched: u32,
    /// The enricher's dead letters of it; the code of the first.
    dead_lettered: u16,
    code: u16,
    archived: bool,
}

const NO_RECORD: i32 = i32::MIN;

/// One raw partition's offsets, from the first the scan received.
#[derive(Default)]
struct RawPartition {
    first: i64,
    fates: Vec<Fate>,
    /// Event identities seen in this partition (a producer's resends stay in the partition
    /// of their key).
    ids: HashSet<u128>,
}

impl RawPartition {
    fn fate(&mut self, offset: i64) -> Option<&mut Fate> {
        let at = usize::try_from(offset.checked_sub(self.first)?).ok()?;
        self.fates.get_mut(at).filter(|f| f.hour != NO_RECORD)
    }
}

/// What ingest wrote in one hour.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IngestCounts {
    /// Raw records whose ingest time falls in the hour.
    pub raw_records: u64,
    /// Distinct events (producer and event id) among them, each counted in the first hour
    /// it was seen in.
    pub events: u64,
    /// Records repeating an event seen before (a client's resend, a source's re-read).
    pub resent_copies: u64,
    /// Raw records that are no instream envelope (hour from their broker timestamp).
    pub unreadable: u64,
}

/// Where the enricher sent the raw records of one hour.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EnricherCounts {
    pub raw_records: u64,
    pub enriched: u64,
    /// Dead-lettered by the enricher, by code (quality included).
    pub dead_lettered: BTreeMap<String, u64>,
    /// Neither enriched nor dead-lettered: in flight, or lost.
    pub missing: u64,
    /// Enriched copies beyond the first (at-least-once re-emits the aggregator drops).
    pub extra_copies: u64,
    /// Both enriched and dead-lettered: counted once, as enriched, and named as a difference.
    pub enriched_and_dead_lettered: u64,
}

/// What the archive holds of the raw records of one hour.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ArchiverCounts {
    pub raw_records: u64,
    pub archived: u64,
    /// In no archive file: not written yet, or lost.
    pub missing: u64,
}

/// What the aggregator made of the enriched records of one hour (from its ledger).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AggregatorCounts {
    /// Records of the hour on the enriched topic, every copy.
    pub enriched_records: u64,
    /// Records the aggregator applied (each copy once).
    pub applied: u64,
    /// Records it dead-lettered without applying them (no definition of their pipeline yet).
    pub dead_lettered: u64,
    /// Per aggregation, records by outcome (`counted`, `repeated_event`, `repeated_origin`,
    /// `out_of_order_origin`, `too_late`, `future_time`, `filtered_out`, `outside_windows`, `forwarded` to its
    /// repartition topic; `not_defined`: applied while the aggregation was not in the
    /// definition).
    pub aggregations: BTreeMap<String, BTreeMap<String, u64>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HourReport {
    /// The hour's start, RFC 3339.
    pub hour: String,
    pub ingest: IngestCounts,
    pub enricher: EnricherCounts,
    /// `None` when the archive was not checked.
    pub archiver: Option<ArchiverCounts>,
    /// `None` when the pipeline has no aggregation.
    pub aggregator: Option<AggregatorCounts>,
}

/// A count that does not balance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    pub hour: String,
    pub stage: &'static str,
    /// Records.
    pub size: u64,
    pub what: String,
}

/// The topics an audit reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Topic {
    Raw,
    Enriched,
    DeadLetters,
}

#[derive(Default)]
pub struct Ledger {
    from: i64,
    to: i64,
    /// Per topic and partition, the first hour (hours since the epoch) the topic still holds
    /// whole; the hours before are not auditable there (retention deleted their start).
    whole_from: BTreeMap<(Topic, i32), i32>,
    /// No hour before this one is audited for the aggregator (its ledger rows outlive the
    /// broker of a standalone that keeps its store in a file).
    aggregator_from: i32,
    /// The broker timestamp of the first record read, per topic and partition.
    first_read: BTreeMap<(Topic, i32), i64>,
    raw: BTreeMap<i32, RawPartition>,
    ingest: BTreeMap<i32, IngestCounts>,
    codes: Vec<String>,
    /// Enriched records by (hour, enriched partition), every copy.
    enriched: BTreeMap<(i32, i32), u64>,
    /// Enriched records the aggregator dead-lettered instead of applying them (their pipeline
    /// had no definition there yet), by (hour, enriched partition).
    aggregator_dead: BTreeMap<(i32, i32), u64>,
    aggregator: Option<AggregatorLedger>,
}

/// The aggregator's ledger rows, summed.
#[derive(Default)]
struct AggregatorLedger {
    /// Records applied by (hour, enriched partition).
    applied: BTreeMap<(i32, i32), u64>,
    /// By (hour, aggregation): outcomes, every input partition's.
    outcomes: BTreeMap<(i32, String), BTreeMap<String, u64>>,
    /// By (hour, aggregation): what the enriched partitions decided (the rest was decided
    /// on a repartition topic).
    on_enriched: BTreeMap<(i32, String), u64>,
    /// The aggregations the definition keeps, with the time from which the current one has
    /// had each without a break (`None`: not in the current version).
    defined: Vec<(String, Option<i64>)>,
}

fn hour_of(millis: i64) -> i32 {
    i32::try_from(millis.div_euclid(HOUR_MS)).unwrap_or(if millis < 0 {
        i32::MIN + 1
    } else {
        i32::MAX
    })
}

/// `2026-12-07T09:00:00Z` for an hour index.
pub fn hour_label(hour: i32) -> String {
    let text = instream_event::format_rfc3339_millis(i64::from(hour) * HOUR_MS);
    format!("{}:00:00Z", &text[..13.min(text.len())])
}

impl Ledger {
    /// A ledger of the hours of ingest time in `[from, to)` (epoch milliseconds; widened to
    /// whole hours).
    pub fn new(from: i64, to: i64) -> Self {
        Self {
            from: from.div_euclid(HOUR_MS) * HOUR_MS,
            to: to.div_euclid(HOUR_MS) * HOUR_MS + if to % HOUR_MS == 0 { 0 } else { HOUR_MS },
            aggregator_from: i32::MIN,
            ..Default::default()
        }
    }

    /// A record of `topic` was read (the first of its partition says where reading began).
    pub fn read(&mut self, topic: Topic, partition: i32, timestamp: Option<i64>) {
        if let Some(t) = timestamp {
            self.first_read.entry((topic, partition)).or_insert(t);
        }
    }

    /// What the read of `topic` covered: a partition read from its log start past 0 may have
    /// lost the beginning of the range to retention, so its hours before the first whole hour
    /// after the first record read are not audited (nor any of a partition emptied since).
    pub fn scanned(&mut self, topic: Topic, partitions: &[ScannedPartition]) {
        for p in partitions.iter().filter(|p| p.low > 0 && p.start == p.low) {
            let whole_from = match self.first_read.get(&(topic, p.partition)) {
                Some(t) => hour_of(t.saturating_add(HOUR_MS - 1)),
                None => i32::MAX,
            };
            self.whole_from.insert((topic, p.partition), whole_from);
        }
    }

    /// The broker started empty at `millis` while the store kept the aggregator's ledger
    /// rows of earlier runs (a standalone with a store file): no hour that began before it is
    /// audited for the aggregator (its rows count records this broker never held).
    pub fn broker_started(&mut self, millis: i64) {
        self.aggregator_from = hour_of(millis.saturating_add(HOUR_MS - 1));
    }

    fn whole(&self, topics: &[Topic], partition: i32, hour: i32) -> bool {
        topics.iter().all(|t| {
            hour >= self
                .whole_from
                .get(&(*t, partition))
                .copied()
                .unwrap_or(i32::MIN)
        })
    }

    fn in_range(&self, hour: i32) -> bool {
        let start = i64::from(hour) * HOUR_MS;
        start >= self.from && start < self.to
    }

    /// A record of the raw topic, in offset order per partition.
    pub fn raw(&mut self, partition: i32, offset: i64, timestamp: Option<i64>, payload: &[u8]) {
        let envelope = instream_event::decode(payload).ok();
        let hour = match &envelope {
            Some(event) => hour_of(event.ingest_time),
            None => hour_of(timestamp.unwrap_or(0)),
        };
        let part = self.raw.entry(partition).or_insert_with(|| RawPartition {
            first: offset,
            ..Default::default()
        });
        let Ok(at) = usize::try_from(offset - part.first) else {
            return;
        };
        if at < part.fates.len() {
            return; // read twice
        }
        let absent = Fate {
            hour: NO_RECORD,
            enriched: 0,
            dead_lettered: 0,
            code: 0,
            archived: false,
        };
        part.fates.resize(at, absent);
        part.fates.push(Fate { hour, ..absent });
        let first_sight = match &envelope {
            Some(event) => part.ids.insert(instream_event::scoped_id_hash(
                event
                    .headers
                    .get(instream_pipeline::PRODUCER_HEADER)
                    .map(String::as_str),
                &event.event_id,
            )),
            None => true,
        };
        if !self.in_range(hour) {
            return;
        }
        let counts = self.ingest.entry(hour).or_default();
        counts.raw_records += 1;
        match envelope {
            None => counts.unreadable += 1,
            Some(_) if first_sight => counts.events += 1,
            Some(_) => counts.resent_copies += 1,
        }
    }

    /// A record of enriched partition `partition`, by the raw record it came from.
    pub fn enriched(&mut self, partition: i32, origin: Option<(i32, i64)>, payload: &[u8]) {
        if let Some(fate) = origin.and_then(|(p, o)| self.raw.get_mut(&p)?.fate(o)) {
            fate.enriched = fate.enriched.saturating_add(1);
        }
        if let Ok(event) = instream_event::decode(payload) {
            let hour = hour_of(event.ingest_time);
            if self.in_range(hour) {
                *self.enriched.entry((hour, partition)).or_default() += 1;
            }
        }
    }

    /// A dead letter the aggregator wrote of an enriched record of `partition` it did not
    /// apply (`payload`: the record).
    pub fn aggregator_dead_lettered(&mut self, partition: i32, payload: &[u8]) {
        if let Ok(event) = instream_event::decode(payload) {
            let hour = hour_of(event.ingest_time);
            if self.in_range(hour) {
                *self.aggregator_dead.entry((hour, partition)).or_default() += 1;
            }
        }
    }

    /// The aggregator's ledger rows for the range; `aggregations`: those the definition
    /// keeps; `enriched_topic`: the rows of its partitions count the records applied.
    pub fn aggregator(
        &mut self,
        rows: &[LedgerRow],
        aggregations: Vec<(String, Option<i64>)>,
        enriched_topic: &str,
    ) {
        let mut ledger = AggregatorLedger {
            defined: aggregations,
            ..Default::default()
        };
        for r in rows {
            let hour = hour_of(r.hour);
            let Some((topic, partition)) = r.source.rsplit_once(':') else {
                continue;
            };
            let (Ok(partition), true) = (partition.parse::<i32>(), self.in_range(hour)) else {
                continue;
            };
            let on_enriched = topic == enriched_topic;
            if r.aggregation.is_empty() {
                if on_enriched {
                    let records = r.counts.get("records").copied().unwrap_or(0);
                    *ledger.applied.entry((hour, partition)).or_default() += records.max(0) as u64;
                }
                continue;
            }
            let key = (hour, r.aggregation.clone());
            let outcomes = ledger.outcomes.entry(key.clone()).or_default();
            for (outcome, n) in &r.counts {
                let n = (*n).max(0) as u64;
                *outcomes.entry(outcome.clone()).or_default() += n;
                if on_enriched {
                    *ledger.on_enriched.entry(key.clone()).or_default() += n;
                }
            }
        }
        self.aggregator = Some(ledger);
    }

    /// A dead letter the enricher wrote of a raw record.
    pub fn dead_lettered(&mut self, origin: Option<(i32, i64)>, code: &str) {
        let index = match self.codes.iter().position(|c| c == code) {
            Some(i) => i,
            None => {
                self.codes.push(code.to_owned());
                self.codes.len() - 1
            }
        };
        if let Some(fate) = origin.and_then(|(p, o)| self.raw.get_mut(&p)?.fate(o)) {
            if fate.dead_lettered == 0 {
                fate.code = u16::try_from(index).unwrap_or(u16::MAX);
            }
            fate.dead_lettered = fate.dead_lettered.saturating_add(1);
        }
    }

    /// The offsets of `partition` the archive answers for.
    pub fn archived(&mut self, partition: i32, covers: impl Fn(i64) -> bool) {
        if let Some(part) = self.raw.get_mut(&partition) {
            for (i, fate) in part.fates.iter_mut().enumerate() {
                fate.archived = covers(part.first + i as i64);
            }
        }
    }

    /// Whether the aggregator's ledger was given.
    pub fn has_aggregator(&self) -> bool {
        self.aggregator.is_some()
    }

    /// The range, widened to whole hours: its first hour's start and its end.
    pub fn range(&self) -> (i64, i64) {
        (self.from, self.to)
    }

    /// Raw partitions read, with the first offset read and the count of offsets after it.
    pub fn raw_partitions(&self) -> impl Iterator<Item = (i32, i64, usize)> + '_ {
        self.raw.iter().map(|(&p, r)| (p, r.first, r.fates.len()))
    }
}

/// Origins by partition and offset (`instream.origin.*` headers) as numbers.
pub fn origin(partition: Option<&[u8]>, offset: Option<&[u8]>) -> Option<(i32, i64)> {
    let partition = std::str::from_utf8(partition?).ok()?.parse().ok()?;
    let offset = std::str::from_utf8(offset?).ok()?.parse().ok()?;
    Some((partition, offset))
}

mod report;
#[cfg(test)]
mod tests;
