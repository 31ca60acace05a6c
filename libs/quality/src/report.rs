//! `instream quality report`: violations per rule per hour, from the records on
//! `<pipeline>.quality`. Each (event, rule) counts once however often a crash made the
//! enricher record it, so the counts are exact in at-least-once delivery too.

use std::collections::{BTreeMap, HashSet};

use instream_pipeline::quality::{QualityAction, Severity};
use serde::Serialize;

use crate::ViolationRecord;

const HOUR_MS: i64 = 3_600_000;

/// One row: a rule's violations in one hour (of ingest time).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReportRow {
    /// Start of the hour, RFC 3339.
    pub hour: String,
    pub rule: String,
    pub severity: Severity,
    pub action: QualityAction,
    pub violations: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub pipeline: String,
    pub from: String,
    pub to: String,
    pub rows: Vec<ReportRow>,
    /// Up to the asked number of sampled violations per rule, in the order read.
    pub samples: BTreeMap<String, Vec<ViolationRecord>>,
}

/// Builds a [`Report`] from records read one at a time, partition after partition: copies of
/// one violation share their event id as key, so they are in one partition, and the set that
/// recognises them is emptied between partitions.
pub struct ReportBuilder {
    pipeline: String,
    from: i64,
    to: i64,
    samples_per_rule: usize,
    seen: HashSet<(String, String)>,
    counts: BTreeMap<(i64, String, Severity, QualityAction), u64>,
    samples: BTreeMap<String, Vec<ViolationRecord>>,
}

impl ReportBuilder {
    /// Counts records whose ingest time is in `from..to` (epoch milliseconds).
    pub fn new(pipeline: &str, from: i64, to: i64, samples_per_rule: usize) -> Self {
        Self {
            pipeline: pipeline.to_owned(),
            from,
            to,
            samples_per_rule,
            seen: HashSet::new(),
            counts: BTreeMap::new(),
            samples: BTreeMap::new(),
        }
    }

    pub fn add(&mut self, record: ViolationRecord) {
        if record.pipeline != self.pipeline
            || record.ingest_time < self.from
            || record.ingest_time >= self.to
        {
            return;
        }
        if !self
            .seen
            .insert((record.event_id.clone(), record.rule.clone()))
        {
            return;
        }
        let hour = record.ingest_time.div_euclid(HOUR_MS) * HOUR_MS;
        *self
            .counts
            .entry((hour, record.rule.clone(), record.severity, record.action))
            .or_default() += 1;
        if record.sample.is_some() {
            let kept = self.samples.entry(record.rule.clone()).or_default();
            if kept.len() < self.samples_per_rule {
                kept.push(record);
            }
        }
    }

    /// Records of the next partition follow.
    pub fn partition_done(&mut self) {
        self.seen.clear();
    }

    pub fn finish(self) -> Report {
        Report {
            pipeline: self.pipeline,
            from: instream_event::format_rfc3339_millis(self.from),
            to: instream_event::format_rfc3339_millis(self.to),
            rows: self
                .counts
                .into_iter()
                .map(|((hour, rule, severity, action), violations)| ReportRow {
                    hour: instream_event::format_rfc3339_millis(hour),
                    rule,
                    severity,
                    action,
                    violations,
                })
                .collect(),
            samples: self.samples,
        }
    }
}

impl Report {
    /// Counts `records` whose ingest time is in `from..to` (epoch milliseconds), bucketed by
    /// the hour of ingest time: when the bad data arrived (its event time may be the very
    /// thing that is wrong). A rule whose severity or action changed within an hour has a
    /// row for each.
    pub fn build(
        pipeline: &str,
        from: i64,
        to: i64,
        records: impl IntoIterator<Item = ViolationRecord>,
        samples_per_rule: usize,
    ) -> Report {
        let mut builder = ReportBuilder::new(pipeline, from, to, samples_per_rule);
        for record in records {
            builder.add(record);
        }
        builder.finish()
    }

    /// Total violations of `rule` in the report.
    pub fn total(&self, rule: &str) -> u64 {
        self.rows
            .iter()
            .filter(|r| r.rule == rule)
            .map(|r| r.violations)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(event: &str, rule: &str, ingest_time: i64) -> ViolationRecord {
        ViolationRecord {
            pipeline: "p".into(),
            version: 1,
            rule: rule.into(),
            severity: Severity::Error,
            action: QualityAction::Tag,
            event_id: event.into(),
            key: "k".into(),
            event_time: ingest_time,
            ingest_time,
            value: None,
            message: "is missing".into(),
            raw_partition: 0,
            raw_offset: 0,
            sample: serde_json::value::RawValue::from_string("{\"a\":1}".into()).ok(),
        }
    }

    #[test]
    fn counts_each_event_and_rule_once_per_hour_within_the_range() {
        let records = vec![
            record("e1", "r", 10),
            record("e1", "r", 10), // a copy after a crash
            record("e2", "r", HOUR_MS + 5),
            record("e2", "other", HOUR_MS + 5),
            record("e3", "r", 3 * HOUR_MS), // outside `to`
        ];
        let report = Report::build("p", 0, 3 * HOUR_MS, records, 1);
        assert_eq!(report.total("r"), 2);
        assert_eq!(report.total("other"), 1);
        assert_eq!(report.rows.len(), 3);
        assert_eq!(report.rows[0].hour, "1970-01-01T00:00:00Z");
        assert_eq!(report.samples["r"].len(), 1);
    }
}
