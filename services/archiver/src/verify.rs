//! `instream archive verify`: reads a pipeline's files back and checks, per partition, the
//! set of offsets they answer for — each file's records and dead letters, wherever its folder
//! (an event-time layout spreads a partition over many) — for gaps and overlaps, and that
//! each file holds what its name says.

use std::collections::BTreeMap;

use instream_archive::Archive;
use serde::Serialize;

use crate::format::{read_file, FileContents, OffsetRange};
use crate::layout::{hour_of, parse_file_name};
use crate::ArchiverError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionReport {
    pub partition: i32,
    pub files: u64,
    /// The lowest and highest offset any file answers for.
    pub first_offset: i64,
    pub last_offset: i64,
    pub records: u64,
    /// Offsets a file answers for without a record: dead-lettered by the archiver.
    pub offsets_without_record: u64,
    /// Files that do not list their offsets (written before files did): their name's range
    /// is taken as what they hold.
    pub files_without_offsets: u64,
    /// Offsets between the first and the last that no file answers for.
    pub gaps: Vec<OffsetRange>,
    /// Offsets more than one file answers for.
    pub overlaps: Vec<OffsetRange>,
}

/// A file that is not what its name says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileProblem {
    pub path: String,
    pub problem: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub pipeline: String,
    pub files: u64,
    pub records: u64,
    pub partitions: Vec<PartitionReport>,
    /// Records per `YYYY-MM-DDTHH` folder.
    pub records_per_hour: BTreeMap<String, u64>,
    pub problems: Vec<FileProblem>,
}

impl VerifyReport {
    /// No gap, no overlap, every file readable and consistent with its name.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
            && self
                .partitions
                .iter()
                .all(|p| p.gaps.is_empty() && p.overlaps.is_empty())
    }
}

#[derive(Default)]
struct PartitionFiles {
    files: u64,
    records: u64,
    without_record: u64,
    without_offsets: u64,
    runs: Vec<OffsetRange>,
}

impl PartitionFiles {
    /// Adds one file named for offsets `first`-`last`; what does not add up, as problems of
    /// that file.
    fn add(&mut self, first: i64, last: i64, contents: FileContents) -> Vec<String> {
        let mut problems = Vec::new();
        self.files += 1;
        self.records += contents.records;
        match (contents.record_offsets, contents.dead_lettered) {
            (Some(records), Some(dead)) => {
                if records.count() != contents.records {
                    problems.push(format!(
                        "{} records but {} offsets listed",
                        contents.records,
                        records.count()
                    ));
                }
                let mut runs: Vec<OffsetRange> =
                    records.0.into_iter().chain(dead.0.clone()).collect();
                runs.sort_by_key(|r| r.first);
                let (low, high) = (
                    runs.first().map(|r| r.first),
                    runs.iter().map(|r| r.last).max(),
                );
                if (low, high) != (Some(first), Some(last)) {
                    problems.push(format!(
                        "its name says offsets {first}-{last}, it holds {low:?}-{high:?}"
                    ));
                }
                self.without_record += dead.count();
                self.runs.extend(runs);
            }
            _ => {
                let span = u64::try_from(last - first + 1).unwrap_or(0);
                if last < first || contents.records > span {
                    problems.push(format!(
                        "{} records cannot fit offsets {first}-{last}",
                        contents.records
                    ));
                }
                self.without_offsets += 1;
                self.without_record += span.saturating_sub(contents.records);
                self.runs.push(OffsetRange { first, last });
            }
        }
        problems
    }

    /// The partition's span, with its gaps and overlaps; `None` when no file had offsets.
    fn report(mut self, partition: i32) -> Option<PartitionReport> {
        self.runs.sort_by_key(|r| (r.first, r.last));
        let start = self.runs.first().copied()?;
        let mut part = PartitionReport {
            partition,
            files: self.files,
            first_offset: start.first,
            last_offset: start.last,
            records: self.records,
            offsets_without_record: self.without_record,
            files_without_offsets: self.without_offsets,
            gaps: Vec::new(),
            overlaps: Vec::new(),
        };
        for r in &self.runs[1..] {
            let end = part.last_offset;
            if r.first > end + 1 {
                part.gaps.push(OffsetRange {
                    first: end + 1,
                    last: r.first - 1,
                });
            } else if r.first <= end {
                part.overlaps.push(OffsetRange {
                    first: r.first,
                    last: end.min(r.last),
                });
            }
            part.last_offset = end.max(r.last);
        }
        Some(part)
    }
}

/// Reads every completed file of `pipeline` and reports per partition.
pub async fn verify(
    archive: &dyn Archive,
    pipeline: &str,
    progress: &instream_core::Progress,
) -> Result<VerifyReport, ArchiverError> {
    let mut per_partition: BTreeMap<i32, PartitionFiles> = BTreeMap::new();
    let mut report = VerifyReport {
        pipeline: pipeline.to_owned(),
        files: 0,
        records: 0,
        partitions: Vec::new(),
        records_per_hour: BTreeMap::new(),
        problems: Vec::new(),
    };
    let problem = |path: &str, problem: String| FileProblem {
        path: path.to_owned(),
        problem,
    };
    for file in archive.list(pipeline).await? {
        progress.add(1);
        let Some((partition, first, last)) = parse_file_name(&file.path) else {
            report
                .problems
                .push(problem(&file.path, "not an archive file name".into()));
            continue;
        };
        report.files += 1;
        let data = archive.get(&file.path).await?;
        let contents = match read_file(&file.path, data) {
            Ok(c) => c,
            Err(e) => {
                report
                    .problems
                    .push(problem(&file.path, format!("unreadable: {e}")));
                continue;
            }
        };
        report.records += contents.records;
        if let Some(hour) = hour_of(&file.path) {
            *report.records_per_hour.entry(hour).or_default() += contents.records;
        }
        let part = per_partition.entry(partition).or_default();
        for reason in part.add(first, last, contents) {
            report.problems.push(problem(&file.path, reason));
        }
    }
    report.partitions = per_partition
        .into_iter()
        .filter_map(|(partition, files)| files.report(partition))
        .collect();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use instream_archive::LocalArchive;
    use instream_pipeline::ArchiveFormat;

    use super::*;
    use crate::format::FileWriter;
    use crate::layout::file_name;

    async fn put(
        archive: &LocalArchive,
        hour: &str,
        partition: i32,
        offsets: &[i64],
        dead: &[i64],
    ) {
        let mut w = FileWriter::new(ArchiveFormat::Parquet, &[], 1).unwrap();
        let mut all: Vec<i64> = offsets.iter().chain(dead).copied().collect();
        all.sort();
        for &o in &all {
            if dead.contains(&o) {
                w.dead_lettered(o).unwrap();
                continue;
            }
            let raw = format!(
                r#"{{"event_id":"e{o}","pipeline":"p","key":"k","event_time":0,"ingest_time":0,"payload":{{}}}}"#
            );
            let event = instream_event::decode(raw.as_bytes()).unwrap();
            w.append(o, raw.as_bytes(), &event).unwrap();
        }
        let (first, last) = (*all.iter().min().unwrap(), *all.iter().max().unwrap());
        let path = format!(
            "p/dt=2024-05-01/hour={hour}/{}",
            file_name(ArchiveFormat::Parquet, partition, first, last)
        );
        archive
            .put(&path, Bytes::from(w.finish().unwrap()))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn ranges_end_to_end_are_clean_and_dead_letters_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let archive = LocalArchive::new(dir.path());
        put(&archive, "10", 0, &[0, 1, 2], &[]).await;
        put(&archive, "11", 0, &[3, 5], &[4]).await;
        put(&archive, "11", 1, &[7, 8], &[]).await;
        let report = verify(&archive, "p", &instream_core::Progress::silent())
            .await
            .unwrap();
        assert!(report.is_clean(), "{report:#?}");
        assert_eq!(report.files, 3);
        assert_eq!(report.records, 7);
        assert_eq!(report.partitions[0].offsets_without_record, 1);
        assert_eq!(
            (
                report.partitions[0].first_offset,
                report.partitions[0].last_offset
            ),
            (0, 5)
        );
        assert_eq!(report.partitions[1].first_offset, 7);
        assert_eq!(
            report.records_per_hour,
            BTreeMap::from([("2024-05-01T10".into(), 3), ("2024-05-01T11".into(), 4)])
        );
    }

    /// Judged by the offsets the files hold, not by their names: interleaved files across
    /// folders are clean, a name wider than the contents is a problem, and a file from before
    /// files listed their offsets counts by its name.
    #[tokio::test]
    async fn the_set_of_offsets_is_checked_not_the_names() {
        let dir = tempfile::tempdir().unwrap();
        let archive = LocalArchive::new(dir.path());
        put(&archive, "12", 0, &[0, 1, 5], &[]).await; // named 0-5
        put(&archive, "10", 0, &[2, 4], &[3]).await; // named 2-4, in an earlier hour
        let legacy = zstd::encode_all(&b"{}\n{}\n"[..], 1).unwrap();
        archive
            .put(
                "p/dt=2024-05-01/hour=13/part-0-6-7.jsonl.zst",
                Bytes::from(legacy),
            )
            .await
            .unwrap();
        let report = verify(&archive, "p", &instream_core::Progress::silent())
            .await
            .unwrap();
        assert!(report.is_clean(), "{report:#?}");
        let p0 = &report.partitions[0];
        assert_eq!((p0.first_offset, p0.last_offset, p0.records), (0, 7, 7));
        assert_eq!(
            (p0.offsets_without_record, p0.files_without_offsets),
            (1, 1)
        );

        // A file whose name claims more than it holds hides nothing.
        let mut w = FileWriter::new(ArchiveFormat::JsonLines, &[], 1).unwrap();
        let raw = br#"{"event_id":"e","pipeline":"p","key":"k","event_time":0,"ingest_time":0,"payload":{}}"#;
        w.append(8, raw, &instream_event::decode(raw).unwrap())
            .unwrap();
        archive
            .put(
                "p/dt=2024-05-01/hour=13/part-0-8-9.jsonl.zst",
                Bytes::from(w.finish().unwrap()),
            )
            .await
            .unwrap();
        let report = verify(&archive, "p", &instream_core::Progress::silent())
            .await
            .unwrap();
        assert!(!report.is_clean());
        assert!(
            report.problems[0]
                .problem
                .contains("its name says offsets 8-9"),
            "{:?}",
            report.problems
        );
    }

    #[tokio::test]
    async fn gaps_overlaps_and_bad_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let archive = LocalArchive::new(dir.path());
        put(&archive, "10", 0, &[0, 1, 2], &[]).await;
        put(&archive, "10", 0, &[2, 3], &[]).await; // overlaps at 2
        put(&archive, "10", 0, &[6, 7], &[]).await; // 4..=5 missing
        archive
            .put(
                "p/dt=2024-05-01/hour=10/part-0-8-9.parquet",
                Bytes::from_static(b"junk"),
            )
            .await
            .unwrap();
        let report = verify(&archive, "p", &instream_core::Progress::silent())
            .await
            .unwrap();
        assert!(!report.is_clean());
        let p0 = &report.partitions[0];
        assert_eq!(p0.overlaps, [OffsetRange { first: 2, last: 2 }]);
        assert_eq!(p0.gaps, [OffsetRange { first: 4, last: 5 }]);
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert!(report.problems[0].problem.starts_with("unreadable"));
    }
}
