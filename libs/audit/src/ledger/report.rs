//! The audit's report: per hour what each stage answered for, the differences, and what could
//! not be audited.

use std::collections::BTreeMap;

use super::*;

impl Ledger {
    /// Per hour of the range that holds raw records, every difference, and notes on what could
    /// not be audited; `archive`: whether the archive was read.
    pub fn report(&self, archive: bool) -> (Vec<HourReport>, Vec<Difference>, Vec<String>) {
        let mut hours: BTreeMap<i32, HourReport> = BTreeMap::new();
        let mut unauditable: BTreeMap<i32, u64> = BTreeMap::new();
        let all = [Topic::Raw, Topic::Enriched, Topic::DeadLetters];
        for (&partition, part) in &self.raw {
            for fate in part.fates.iter().filter(|f| f.hour != NO_RECORD) {
                if !self.in_range(fate.hour) {
                    continue;
                }
                if !self.whole(&all, partition, fate.hour) {
                    *unauditable.entry(partition).or_default() += 1;
                    continue;
                }
                let hour = hours
                    .entry(fate.hour)
                    .or_insert_with(|| self.empty_hour(fate.hour, archive));
                self.count_fate(hour, fate);
            }
        }
        if let Some(agg) = &self.aggregator {
            self.add_aggregator_hours(agg, &mut hours, archive);
        }
        let differences = self.differences(&hours);
        let notes = self.notes(&unauditable);
        (hours.into_values().collect(), differences, notes)
    }

    /// An hour's report before any record is counted in it.
    fn empty_hour(&self, hour: i32, archive: bool) -> HourReport {
        HourReport {
            hour: hour_label(hour),
            ingest: self.ingest.get(&hour).cloned().unwrap_or_default(),
            enricher: EnricherCounts::default(),
            archiver: archive.then(ArchiverCounts::default),
            aggregator: None,
        }
    }

    /// Counts one raw record's fate in its hour: enriched (how often), dead-lettered (by
    /// code), neither; archived or not.
    fn count_fate(&self, hour: &mut HourReport, fate: &Fate) {
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

    /// The aggregator's counts for every hour it applied records of, or the enriched topic
    /// holds whole.
    fn add_aggregator_hours(
        &self,
        agg: &AggregatorLedger,
        hours: &mut BTreeMap<i32, HourReport>,
        archive: bool,
    ) {
        let mut hours_seen: Vec<i32> = self
            .enriched
            .keys()
            .chain(agg.applied.keys())
            .filter(|(h, p)| *h >= self.aggregator_from && self.whole(&[Topic::Enriched], *p, *h))
            .map(|(h, _)| *h)
            .collect();
        hours_seen.sort_unstable();
        hours_seen.dedup();
        for hour in hours_seen {
            let report = hours
                .entry(hour)
                .or_insert_with(|| self.empty_hour(hour, archive));
            report
                .aggregator
                .get_or_insert_with(|| self.aggregator_counts(agg, hour));
        }
    }

    /// Every difference of every hour: what a stage did not answer for, or answered for twice.
    fn differences(&self, hours: &BTreeMap<i32, HourReport>) -> Vec<Difference> {
        let mut differences = Vec::new();
        for (hour, h) in hours {
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
            if let Some(agg) = &self.aggregator {
                self.aggregator_differences(agg, *hour, h, &mut differ);
            }
        }
        differences
    }

    /// The aggregator's differences in `hour` (its report `h`), each given to `differ`.
    fn aggregator_differences(
        &self,
        agg: &AggregatorLedger,
        hour: i32,
        h: &HourReport,
        differ: &mut impl FnMut(&'static str, u64, &str),
    ) {
        let (behind, beyond) = self.applied_differences(agg, hour);
        differ(
            "aggregator",
            behind,
            "enriched records the aggregator has not applied (in flight, or lost)",
        );
        differ(
            "aggregator",
            beyond,
            "records the aggregator applied beyond what the enriched topic holds",
        );
        // Every record applied while an aggregation was defined has an outcome for it.
        let hour_start = i64::from(hour) * HOUR_MS;
        if let Some(counts) = &h.aggregator {
            for (name, since) in &agg.defined {
                let Some(since) = since else { continue };
                if hour_start < *since {
                    continue;
                }
                let missing = counts
                    .aggregations
                    .get(name)
                    .and_then(|o| o.get("not_defined"))
                    .copied()
                    .unwrap_or(0);
                differ(
                    "aggregator",
                    missing,
                    &format!("`{name}`: records applied without an outcome for it"),
                );
            }
            // Decided, but not counted anywhere: an event dropped by the origin rule
            // that was not a repeat.
            for (name, outcomes) in &counts.aggregations {
                differ(
                    "aggregator",
                    outcomes.get("out_of_order_origin").copied().unwrap_or(0),
                    &format!(
                        "`{name}`: dropped below an origin offset already counted without \
                     being a repeat (written out of order upstream): lost"
                    ),
                );
            }
        }
        for (name, outcomes) in agg.outcomes.range((hour, String::new())..) {
            if name.0 != hour {
                break;
            }
            let forwarded = outcomes.get("forwarded").copied().unwrap_or(0);
            let decided =
                outcomes.values().sum::<u64>() - agg.on_enriched.get(name).copied().unwrap_or(0);
            let what = |text: &str| format!("`{}`: {text}", name.1);
            differ(
            "aggregator",
            forwarded.saturating_sub(decided),
            &what("forwarded to its repartition topic, not counted there yet (in flight, or lost)"),
        );
            differ(
                "aggregator",
                decided.saturating_sub(forwarded),
                &what("counted on its repartition topic beyond what was forwarded"),
            );
        }
    }

    /// What could not be audited, and why.
    fn notes(&self, unauditable: &BTreeMap<i32, u64>) -> Vec<String> {
        let mut notes: Vec<String> = unauditable
            .iter()
            .map(|(p, n)| {
                format!(
                    "{n} raw records of partition {p} not audited: their hours are not whole on \
                 every topic (retention deleted the beginning, or the broker started after)"
                )
            })
            .collect();
        let skipped_partitions: Vec<String> = self
            .whole_from
            .iter()
            .filter(|((t, _), h)| *t == Topic::Enriched && **h > hour_of(self.from))
            .map(|((_, p), h)| match *h {
                i32::MAX => format!("{p} (emptied)"),
                h => format!("{p} (from {})", hour_label(h)),
            })
            .collect();
        if self.aggregator.is_some() && !skipped_partitions.is_empty() {
            notes.push(format!(
                "aggregator not audited for enriched partitions {} before the hours given: the \
             topic no longer holds them whole",
                skipped_partitions.join(", ")
            ));
        }
        notes
    }

    /// Per enriched partition, the enriched records of `hour` not applied, and the records
    /// applied beyond those on the topic; summed.
    fn applied_differences(&self, agg: &AggregatorLedger, hour: i32) -> (u64, u64) {
        let mut partitions: Vec<i32> = self
            .enriched
            .range((hour, i32::MIN)..=(hour, i32::MAX))
            .map(|((_, p), _)| *p)
            .collect();
        partitions.extend(
            agg.applied
                .range((hour, i32::MIN)..=(hour, i32::MAX))
                .map(|((_, p), _)| *p),
        );
        partitions.sort_unstable();
        partitions.dedup();
        let (mut behind, mut beyond) = (0, 0);
        for p in partitions {
            if hour < self.aggregator_from || !self.whole(&[Topic::Enriched], p, hour) {
                continue;
            }
            // What the aggregator dead-lettered unread (no definition yet) it could not apply.
            let on_topic = self
                .enriched
                .get(&(hour, p))
                .copied()
                .unwrap_or(0)
                .saturating_sub(self.aggregator_dead.get(&(hour, p)).copied().unwrap_or(0));
            let applied = agg.applied.get(&(hour, p)).copied().unwrap_or(0);
            behind += on_topic.saturating_sub(applied);
            beyond += applied.saturating_sub(on_topic);
        }
        (behind, beyond)
    }

    fn aggregator_counts(&self, agg: &AggregatorLedger, hour: i32) -> AggregatorCounts {
        let sum = |m: &BTreeMap<(i32, i32), u64>| {
            m.range((hour, i32::MIN)..=(hour, i32::MAX))
                .map(|(_, n)| n)
                .sum::<u64>()
        };
        let applied = sum(&agg.applied);
        let mut aggregations = BTreeMap::new();
        let mut names: Vec<String> = agg.defined.iter().map(|(n, _)| n.clone()).collect();
        names.extend(
            agg.outcomes
                .keys()
                .filter(|(h, _)| *h == hour)
                .map(|(_, a)| a.clone()),
        );
        names.sort();
        names.dedup();
        for name in names {
            let key = (hour, name.clone());
            let mut outcomes = agg.outcomes.get(&key).cloned().unwrap_or_default();
            let decided = agg.on_enriched.get(&key).copied().unwrap_or(0);
            let not_defined = applied.saturating_sub(decided);
            if not_defined > 0 {
                outcomes.insert("not_defined".into(), not_defined);
            }
            aggregations.insert(name, outcomes);
        }
        AggregatorCounts {
            enriched_records: sum(&self.enriched),
            applied,
            dead_lettered: sum(&self.aggregator_dead),
            aggregations,
        }
    }
}
