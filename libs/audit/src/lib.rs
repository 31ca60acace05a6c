//! instream-audit: per hour of ingest time, what each stage made of every raw record, and
//! whether it balances (docs/guarantees.md, "Auditing what happened"). The counts come from
//! the data, not from metrics: the raw topic read over the range, each record then looked for
//! among the enricher's outputs and dead letters (by the origin they carry) and among the
//! archive's offsets, and the aggregator's ledger (its rows in the store) set against the
//! enriched topic. `instream audit` and query-api's periodic check both build on it.

pub mod ledger;

use std::collections::BTreeMap;
use std::time::Duration;

use instream_core::config::KafkaConfig;
use instream_kafka::headers;
use instream_kafka::ops::{scan_records_between, ScannedRecord};
use instream_pipeline::{topics, PipelineDefinition};
use serde::Serialize;

pub use ledger::{
    hour_label, AggregatorCounts, ArchiverCounts, Difference, EnricherCounts, HourReport,
    IngestCounts, Ledger, Topic, HOUR_MS,
};

/// How long before the range the topics are read from: ingest times and broker timestamps
/// come from different clocks, and the enricher writes after ingest.
pub const SCAN_MARGIN: Duration = Duration::from_secs(10 * 60);

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("reading `{topic}`: {source}")]
    Read {
        topic: String,
        source: instream_kafka::KafkaError,
    },
    #[error("listing the archive of `{pipeline}`: {source}")]
    Archive {
        pipeline: String,
        source: instream_archive::ArchiveError,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub pipeline: String,
    pub from: String,
    pub to: String,
    pub balanced: bool,
    /// The stages audited: the enricher always, the archiver when the archive was read, the
    /// aggregator when the pipeline aggregates.
    pub stages: Vec<&'static str>,
    pub hours: Vec<HourReport>,
    pub differences: Vec<Difference>,
    /// What the audit could not see (a read that skipped records, an unreadable archive
    /// file), and what it does not cover.
    pub notes: Vec<String>,
    /// Events ingest refused (they never reach a topic), when its processes were asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingest_refusals: Option<IngestRefusals>,
}

/// Events ingest refused for the pipeline, by code, from the `/metrics` of the ingest
/// processes running now: counted since each started (a restarted one forgot its own), not
/// per hour — approximate, never part of the balance.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IngestRefusals {
    pub approximate: bool,
    /// The processes asked, and how many answered.
    pub processes: usize,
    pub answered: usize,
    pub by_code: BTreeMap<String, u64>,
}

impl AuditReport {
    /// Records that do not balance, by stage (every stage audited, 0 when it balances).
    pub fn unbalanced_by_stage(&self) -> BTreeMap<&'static str, u64> {
        let mut by_stage: BTreeMap<&'static str, u64> =
            self.stages.iter().map(|s| (*s, 0)).collect();
        for d in &self.differences {
            *by_stage.entry(d.stage).or_default() += d.size;
        }
        by_stage
    }
}

/// Reads `pipeline`'s raw, enriched and dead-letter topics for the hours of ingest time in
/// `[from, to)` (widened to whole hours) into a ledger; returns it with notes on what could
/// not be read. The raw topic is read up to `SCAN_MARGIN` past the range (the ledger holds a
/// line per raw record); the enriched and dead-letter topics to their end, since a stage that
/// lags writes a range's outputs later (of those only counts are kept).
pub async fn read_topics(
    kafka: &KafkaConfig,
    pipeline: &str,
    from: i64,
    to: i64,
) -> Result<(Ledger, Vec<String>), AuditError> {
    let margin = SCAN_MARGIN.as_millis() as i64;
    let since = from.div_euclid(HOUR_MS) * HOUR_MS - margin;
    let until = to.saturating_add(HOUR_MS).saturating_add(margin);
    let raw = topics::raw(pipeline);
    let mut notes = Vec::new();
    let mut skipped = |topic: &str, lost: Vec<instream_kafka::Lost>| {
        for l in lost {
            notes.push(format!(
                "{topic}: offsets {}..{} of partition {} could not be read (deleted meanwhile, \
                 or skipped by the broker)",
                l.from, l.to, l.partition
            ));
        }
    };
    let read = |topic: &str| {
        let topic = topic.to_owned();
        move |source| AuditError::Read { topic, source }
    };
    let (mut ledger, lost, read_raw) = scan_records_between(
        kafka,
        &raw,
        since,
        Some(until),
        false,
        Ledger::new(from, to),
        |l, r| {
            l.read(Topic::Raw, r.partition, r.timestamp_millis);
            l.raw(r.partition, r.offset, r.timestamp_millis, r.payload)
        },
    )
    .await
    .map_err(read(&raw))?;
    ledger.scanned(Topic::Raw, &read_raw);
    skipped(&raw, lost);
    let enriched = topics::enriched(pipeline);
    let (mut ledger, lost, read_enriched) =
        scan_records_between(kafka, &enriched, since, None, true, ledger, |l, r| {
            l.read(Topic::Enriched, r.partition, r.timestamp_millis);
            l.enriched(r.partition, origin_of(r), r.payload)
        })
        .await
        .map_err(read(&enriched))?;
    ledger.scanned(Topic::Enriched, &read_enriched);
    skipped(&enriched, lost);
    let dlq = topics::dead_letter(pipeline);
    let ((mut ledger, _), lost, read_dlq) = scan_records_between(
        kafka,
        &dlq,
        since,
        None,
        true,
        (ledger, (raw.clone(), enriched.clone())),
        |(l, (raw, enriched)), r| {
            l.read(Topic::DeadLetters, r.partition, r.timestamp_millis);
            let service = r.header(headers::DLQ_SERVICE).unwrap_or_default();
            let origin_topic = r.header(headers::ORIGIN_TOPIC).unwrap_or_default();
            let code = r.header(headers::DLQ_CODE).unwrap_or_default();
            if service == instream_core::Service::Enricher.as_str().as_bytes()
                && origin_topic == raw.as_bytes()
            {
                l.dead_lettered(origin_of(r), &String::from_utf8_lossy(code));
            } else if service == instream_core::Service::Aggregator.as_str().as_bytes()
                && origin_topic == enriched.as_bytes()
                && code != b"too_late"
                && code != b"future_time"
            {
                // Dead-lettered instead of applied (no definition of its pipeline yet); too
                // late and future time are in the aggregator's ledger.
                if let Some((partition, _)) = origin_of(r) {
                    l.aggregator_dead_lettered(partition, r.payload);
                }
            }
        },
    )
    .await
    .map_err(read(&dlq))?;
    ledger.scanned(Topic::DeadLetters, &read_dlq);
    skipped(&dlq, lost);
    Ok((ledger, notes))
}

fn origin_of(r: &ScannedRecord<'_>) -> Option<(i32, i64)> {
    ledger::origin(
        r.header(headers::ORIGIN_PARTITION),
        r.header(headers::ORIGIN_OFFSET),
    )
}

/// Marks the raw offsets the archive's file names answer for (`part-<p>-<first>-<last>`):
/// exact when files hold whole offset ranges (ingest-time layout); with an event-time layout
/// a partition's range is spread over several folders' files, so a lost one is seen only
/// when no other file names its offsets (`instream audit` reads the offsets each file lists).
pub async fn archive_by_file_names(
    archive: &dyn instream_archive::Archive,
    pipeline: &str,
    ledger: &mut Ledger,
) -> Result<(), AuditError> {
    let files = archive
        .list(pipeline)
        .await
        .map_err(|source| AuditError::Archive {
            pipeline: pipeline.to_owned(),
            source,
        })?;
    let mut ranges: BTreeMap<i32, Vec<(i64, i64)>> = BTreeMap::new();
    for (partition, first, last) in files
        .iter()
        .filter_map(|f| instream_archive::file_offsets(&f.path))
    {
        ranges.entry(partition).or_default().push((first, last));
    }
    let partitions: Vec<i32> = ledger.raw_partitions().map(|(p, ..)| p).collect();
    for p in partitions {
        let covered = merged(ranges.remove(&p).unwrap_or_default());
        ledger.archived(p, |o| {
            // The last run starting at or before `o`.
            let at = covered.partition_point(|(first, _)| *first <= o);
            at > 0 && o <= covered[at - 1].1
        });
    }
    Ok(())
}

/// Offset ranges sorted and merged where they overlap or touch.
fn merged(mut ranges: Vec<(i64, i64)>) -> Vec<(i64, i64)> {
    ranges.sort_unstable();
    let mut out: Vec<(i64, i64)> = Vec::with_capacity(ranges.len());
    for (first, last) in ranges {
        match out.last_mut() {
            Some(run) if first <= run.1.saturating_add(1) => run.1 = run.1.max(last),
            _ => out.push((first, last)),
        }
    }
    out
}

/// Every aggregation `def` keeps (its versions' too), by name, with the time from which the
/// current version and those before it without a break have had it (`None` for one the
/// current version dropped): every record ingested from then on was applied by an aggregator
/// that knew it (a version takes over at its `effective_from`, after every aggregator has
/// it), so each has an outcome for it.
pub fn aggregations_of(def: &PipelineDefinition) -> Vec<(String, Option<i64>)> {
    let mut names: Vec<String> = def
        .versions()
        .flat_map(|(v, ..)| v.aggregations.iter().map(|a| a.name.clone()))
        .collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let mut since = None;
            for (version, ..) in def.versions() {
                if !version.aggregations.iter().any(|a| a.name == name) {
                    break;
                }
                // The first version has been there since the pipeline was made.
                since = Some(version.effective_from.unwrap_or(i64::MIN));
            }
            (name, since)
        })
        .collect()
}

/// The report of a ledger read (and given the archive's and the aggregator's parts).
pub fn report(
    pipeline: &str,
    ledger: &Ledger,
    archive: bool,
    mut notes: Vec<String>,
) -> AuditReport {
    let (hours, differences, unaudited) = ledger.report(archive);
    notes.extend(unaudited);
    let (from, to) = ledger.range();
    let mut stages = vec!["enricher"];
    if archive {
        stages.push("archiver");
    }
    if ledger.has_aggregator() {
        stages.push("aggregator");
    }
    AuditReport {
        pipeline: pipeline.to_owned(),
        from: instream_event::format_rfc3339_millis(from),
        to: instream_event::format_rfc3339_millis(to),
        balanced: differences.is_empty(),
        stages,
        hours,
        differences,
        notes,
        ingest_refusals: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use instream_archive::{Archive, LocalArchive};

    #[tokio::test]
    async fn the_archive_answers_for_the_offsets_its_file_names_cover() {
        let dir = tempfile::tempdir().unwrap();
        let archive = LocalArchive::new(dir.path());
        for name in [
            "part-0-0-9.jsonl.zst",
            "part-0-15-19.parquet",
            "part-1-0-4.jsonl.zst",
        ] {
            let path = format!("p/dt=2025-12-07/hour=09/{name}");
            archive
                .put(&path, bytes::Bytes::from_static(b"x"))
                .await
                .unwrap();
        }
        let h9 = 1_765_098_000_000;
        let mut ledger = Ledger::new(h9, h9 + HOUR_MS);
        let envelope = format!(
            r#"{{"event_id":"e","pipeline":"p","key":"k","event_time":0,"ingest_time":{h9},"payload":{{}}}}"#
        );
        for o in 0..20 {
            ledger.raw(0, o, None, envelope.as_bytes());
        }
        archive_by_file_names(&archive, "p", &mut ledger)
            .await
            .unwrap();
        let (hours, differences, _) = ledger.report(true);
        let archived = hours[0].archiver.as_ref().unwrap();
        assert_eq!(
            (archived.archived, archived.missing),
            (15, 5),
            "10..=14 in no file"
        );
        assert_eq!(
            differences.iter().filter(|d| d.stage == "archiver").count(),
            1
        );
    }
}
