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
    /// Up to the asked number of sampled violations per rule, oldest first.
    pub samples: BTreeMap<String, Vec<ViolationRecord>>,
}

impl Report {
    /// Counts `records` whose ingest time is in `from..to` (epoch milliseconds), bucketed by
    /// the hour of ingest time: when the bad data arrived (its event time may be the very
    /// thing that is wrong).
    pub fn build(
        pipeline: &str,
        from: i64,
        to: i64,
        records: impl IntoIterator<Item = ViolationRecord>,
        samples_per_rule: usize,
    ) -> Report {
        let mut seen: HashSet<(String, String)> = HashSet::new();
        let mut counts: BTreeMap<(i64, String), (Severity, QualityAction, u64)> = BTreeMap::new();
        let mut samples: BTreeMap<String, Vec<ViolationRecord>> = BTreeMap::new();
        for record in records {
            if record.pipeline != pipeline || record.ingest_time < from || record.ingest_time >= to
            {
                continue;
            }
            if !seen.insert((record.event_id.clone(), record.rule.clone())) {
                continue;
            }
            let hour = record.ingest_time.div_euclid(HOUR_MS) * HOUR_MS;
            let entry = counts.entry((hour, record.rule.clone())).or_insert((
                record.severity,
                record.action,
                0,
            ));
            entry.2 += 1;
            if record.sample.is_some() {
                let kept = samples.entry(record.rule.clone()).or_default();
                if kept.len() < samples_per_rule {
                    kept.push(record);
                }
            }
        }
        Report {
            pipeline: pipeline.to_owned(),
            from: instream_event::format_rfc3339_millis(from),
            to: instream_event::format_rfc3339_millis(to),
            rows: counts
                .into_iter()
                .map(|((hour, rule), (severity, action, violations))| ReportRow {
                    hour: instream_event::format_rfc3339_millis(hour),
                    rule,
                    severity,
                    action,
                    violations,
                })
                .collect(),
            samples,
        }
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
