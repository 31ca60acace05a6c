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
use instream_kafka::ops::{scan_records_since, ScannedRecord};
use instream_pipeline::{topics, PipelineDefinition};
use serde::Serialize;

pub use ledger::{
    hour_label, AggregatorCounts, ArchiverCounts, Difference, EnricherCounts, HourReport,
    IngestCounts, Ledger, HOUR_MS,
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
/// not be read.
pub async fn read_topics(
    kafka: &KafkaConfig,
    pipeline: &str,
    from: i64,
    to: i64,
) -> Result<(Ledger, Vec<String>), AuditError> {
    let since = from - SCAN_MARGIN.as_millis() as i64;
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
    let (ledger, lost) =
        scan_records_since(kafka, &raw, since, false, Ledger::new(from, to), |l, r| {
            l.raw(r.partition, r.offset, r.timestamp_millis, r.payload)
        })
        .await
        .map_err(read(&raw))?;
    skipped(&raw, lost);
    let enriched = topics::enriched(pipeline);
    let (ledger, lost) = scan_records_since(kafka, &enriched, since, true, ledger, |l, r| {
        l.enriched(r.partition, origin_of(r), r.payload)
    })
    .await
    .map_err(read(&enriched))?;
    skipped(&enriched, lost);
    let dlq = topics::dead_letter(pipeline);
    let ((ledger, _), lost) = scan_records_since(
        kafka,
        &dlq,
        since,
        true,
        (ledger, raw.clone()),
        |(l, raw), r| {
            let enricher = instream_core::Service::Enricher.as_str().as_bytes();
            if r.header(headers::DLQ_SERVICE) == Some(enricher)
                && r.header(headers::ORIGIN_TOPIC) == Some(raw.as_bytes())
            {
                let code = r.header(headers::DLQ_CODE).unwrap_or_default();
                l.dead_lettered(origin_of(r), &String::from_utf8_lossy(code));
            }
        },
    )
    .await
    .map_err(read(&dlq))?;
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
        let covered = ranges.remove(&p).unwrap_or_default();
        ledger.archived(p, |o| covered.iter().any(|(f, l)| o >= *f && o <= *l));
    }
    Ok(())
}

/// Every aggregation `def` keeps (its versions' too), by name.
pub fn aggregations_of(def: &PipelineDefinition) -> Vec<String> {
    let mut names: Vec<String> = def
        .versions()
        .flat_map(|(v, ..)| v.aggregations.iter().map(|a| a.name.clone()))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The report of a ledger read (and given the archive's and the aggregator's parts).
pub fn report(pipeline: &str, ledger: &Ledger, archive: bool, notes: Vec<String>) -> AuditReport {
    let (hours, differences) = ledger.report(archive);
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
        let (hours, differences) = ledger.report(true);
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
