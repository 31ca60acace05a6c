//! The accounting of `instream audit`: every raw record of the scanned range is one line of
//! the ledger, keyed by its partition and offset, and what the stages made of it is found by
//! that origin (the enricher's outputs and dead letters name it in headers, the archive's
//! files by their offsets). So a copy written twice (an at-least-once re-emit after a kill)
//! is one outcome, not two, and a record no stage answers for is a named difference, never a
//! count that happens to balance.

use std::collections::{BTreeMap, HashSet};

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HourReport {
    /// The hour's start, RFC 3339.
    pub hour: String,
    pub ingest: IngestCounts,
    pub enricher: EnricherCounts,
    /// `None` when the archive was not checked.
    pub archiver: Option<ArchiverCounts>,
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

#[derive(Default)]
pub struct Ledger {
    from: i64,
    to: i64,
    raw: BTreeMap<i32, RawPartition>,
    ingest: BTreeMap<i32, IngestCounts>,
    codes: Vec<String>,
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
            ..Default::default()
        }
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

    /// An enriched record, by the raw record it came from.
    pub fn enriched(&mut self, origin: Option<(i32, i64)>) {
        if let Some(fate) = origin.and_then(|(p, o)| self.raw.get_mut(&p)?.fate(o)) {
            fate.enriched = fate.enriched.saturating_add(1);
        }
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

    /// Per hour of the range that holds raw records, and every difference; `archive`: whether
    /// the archive was read.
    pub fn report(&self, archive: bool) -> (Vec<HourReport>, Vec<Difference>) {
        let mut hours: BTreeMap<i32, HourReport> = BTreeMap::new();
        for part in self.raw.values() {
            for fate in part.fates.iter().filter(|f| f.hour != NO_RECORD) {
                if !self.in_range(fate.hour) {
                    continue;
                }
                let hour = hours.entry(fate.hour).or_insert_with(|| HourReport {
                    hour: hour_label(fate.hour),
                    ingest: self.ingest.get(&fate.hour).cloned().unwrap_or_default(),
                    enricher: EnricherCounts::default(),
                    archiver: archive.then(ArchiverCounts::default),
                });
                let e = &mut hour.enricher;
                e.raw_records += 1;
                match (fate.enriched, fate.dead_lettered) {
                    (0, 0) => e.missing += 1,
                    (0, _) => {
                        let code = self
                            .codes
                            .get(usize::from(fate.code))
                            .cloned()
                            .unwrap_or_default();
                        *e.dead_lettered.entry(code).or_default() += 1;
                    }
                    (n, d) => {
                        e.enriched += 1;
                        e.extra_copies += u64::from(n - 1);
                        if d > 0 {
                            e.enriched_and_dead_lettered += 1;
                        }
                    }
                }
                if let Some(a) = &mut hour.archiver {
                    a.raw_records += 1;
                    if fate.archived {
                        a.archived += 1;
                    } else {
                        a.missing += 1;
                    }
                }
            }
        }
        let mut differences = Vec::new();
        for h in hours.values() {
            let mut differ = |stage, size, what: &str| {
                if size > 0 {
                    differences.push(Difference {
                        hour: h.hour.clone(),
                        stage,
                        size,
                        what: what.to_owned(),
                    });
                }
            };
            differ(
                "enricher",
                h.enricher.missing,
                "raw records neither enriched nor dead-lettered",
            );
            differ(
                "enricher",
                h.enricher.enriched_and_dead_lettered,
                "raw records both enriched and dead-lettered",
            );
            if let Some(a) = &h.archiver {
                differ(
                    "archiver",
                    a.missing,
                    "raw records in no archive file (not rolled yet, or lost)",
                );
            }
        }
        (hours.into_values().collect(), differences)
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

#[cfg(test)]
mod tests {
    use super::*;

    const H9: i64 = 1_765_098_000_000; // 2025-12-07T09:00Z

    fn envelope(id: &str, ingest_time: i64) -> Vec<u8> {
        format!(
            r#"{{"event_id":"{id}","pipeline":"p","key":"k","event_time":0,"ingest_time":{ingest_time},"payload":{{}}}}"#
        )
        .into_bytes()
    }

    fn ledger() -> Ledger {
        let mut l = Ledger::new(H9, H9 + 2 * HOUR_MS);
        // Partition 0: 5 records in 09:xx (one a resend), 2 in 10:xx, one before the range.
        l.raw(0, 100, None, &envelope("old", H9 - 60_000));
        for (o, id) in [(101, "a"), (102, "b"), (103, "a"), (104, "c"), (105, "d")] {
            l.raw(0, o, None, &envelope(id, H9 + o));
        }
        l.raw(0, 107, None, &envelope("e", H9 + HOUR_MS)); // 106 is a marker
        l.raw(0, 108, Some(H9 + HOUR_MS + 5), b"not json");
        l
    }

    #[test]
    fn counts_balance_when_every_raw_record_has_one_fate() {
        let mut l = ledger();
        for o in [101, 102, 103, 104, 107] {
            l.enriched(Some((0, o)));
        }
        l.enriched(Some((0, 104))); // re-emitted after a kill: one fate
        l.dead_lettered(Some((0, 105)), "quality");
        l.dead_lettered(Some((0, 108)), "decode_error");
        l.enriched(Some((0, 100))); // before the range: not reported
        l.enriched(Some((7, 1))); // no such raw record: ignored
        l.archived(0, |o| o != 106);
        let (hours, differences) = l.report(true);
        assert_eq!(differences, vec![], "{hours:#?}");
        assert_eq!(hours.len(), 2);
        assert_eq!(hours[0].hour, "2025-12-07T09:00:00Z");
        assert_eq!(
            hours[0].ingest,
            IngestCounts {
                raw_records: 5,
                events: 4,
                resent_copies: 1,
                unreadable: 0
            }
        );
        assert_eq!(hours[0].enricher.enriched, 4);
        assert_eq!(hours[0].enricher.extra_copies, 1);
        assert_eq!(hours[0].enricher.dead_lettered["quality"], 1);
        assert_eq!(hours[1].ingest.unreadable, 1);
        assert_eq!(hours[1].enricher.dead_lettered["decode_error"], 1);
        assert_eq!(hours[1].archiver.as_ref().unwrap().archived, 2);
    }

    #[test]
    fn a_record_without_a_fate_is_a_difference_of_its_hour_and_stage() {
        let mut l = ledger();
        for o in [101, 102, 103, 105, 107, 108] {
            l.enriched(Some((0, o)));
        }
        l.dead_lettered(Some((0, 102)), "enrich_miss");
        l.archived(0, |o| !(102..=103).contains(&o));
        let (_, differences) = l.report(true);
        let named: Vec<_> = differences
            .iter()
            .map(|d| (d.hour.as_str(), d.stage, d.size))
            .collect();
        assert_eq!(
            named,
            vec![
                ("2025-12-07T09:00:00Z", "enricher", 1), // 104 missing
                ("2025-12-07T09:00:00Z", "enricher", 1), // 102 both
                ("2025-12-07T09:00:00Z", "archiver", 2),
            ]
        );
        assert!(differences[0].what.contains("neither"));
        assert!(differences[1].what.contains("both"));
    }

    #[test]
    fn hours_are_whole_and_labelled() {
        let l = Ledger::new(H9 + 5, H9 + HOUR_MS + 1);
        assert_eq!((l.from, l.to), (H9, H9 + 2 * HOUR_MS));
        assert_eq!(
            hour_label(hour_of(H9 + 59 * 60_000)),
            "2025-12-07T09:00:00Z"
        );
        assert_eq!(origin(Some(b"3"), Some(b"42")), Some((3, 42)));
        assert_eq!(origin(Some(b"x"), Some(b"42")), None);
    }
}
