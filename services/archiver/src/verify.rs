//! `instream archive verify`: reads a pipeline's files back and checks that, per partition,
//! their offset ranges meet end to end — no gap, no overlap — and that each file holds what
//! its name says.

use std::collections::BTreeMap;

use instream_archive::Archive;
use serde::Serialize;

use crate::format::read_file;
use crate::layout::{hour_of, parse_file_name};
use crate::ArchiverError;

/// Offsets `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OffsetRange {
    pub first: i64,
    pub last: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionReport {
    pub partition: i32,
    pub files: u64,
    /// The first and last offset any file answers for.
    pub first_offset: i64,
    pub last_offset: i64,
    pub records: u64,
    /// Offsets inside the files' ranges without a record: dead-lettered by the archiver.
    pub offsets_without_record: u64,
    /// Offsets between two files that no file answers for.
    pub gaps: Vec<OffsetRange>,
    /// Offsets two files answer for.
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

struct FileRange {
    first: i64,
    last: i64,
    records: u64,
}

/// Reads every completed file of `pipeline` and reports per partition.
pub async fn verify(archive: &dyn Archive, pipeline: &str) -> Result<VerifyReport, ArchiverError> {
    let mut per_partition: BTreeMap<i32, Vec<FileRange>> = BTreeMap::new();
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
        let span = u64::try_from(last - first + 1).unwrap_or(0);
        if last < first || contents.records > span {
            report.problems.push(problem(
                &file.path,
                format!(
                    "{} records cannot fit offsets {first}-{last}",
                    contents.records
                ),
            ));
        }
        if let Some(offsets) = &contents.offsets {
            let in_order = offsets.windows(2).all(|w| w[0] < w[1]);
            let inside = offsets.iter().all(|o| (first..=last).contains(o));
            if !in_order || !inside {
                report.problems.push(problem(
                    &file.path,
                    format!("its offsets are not increasing within {first}-{last}"),
                ));
            }
        }
        report.records += contents.records;
        if let Some(hour) = hour_of(&file.path) {
            *report.records_per_hour.entry(hour).or_default() += contents.records;
        }
        per_partition.entry(partition).or_default().push(FileRange {
            first,
            last,
            records: contents.records,
        });
    }
    for (partition, mut ranges) in per_partition {
        ranges.sort_by_key(|r| (r.first, r.last));
        let mut part = PartitionReport {
            partition,
            files: ranges.len() as u64,
            first_offset: ranges[0].first,
            last_offset: ranges[0].last,
            records: 0,
            offsets_without_record: 0,
            gaps: Vec::new(),
            overlaps: Vec::new(),
        };
        for (i, r) in ranges.iter().enumerate() {
            if i > 0 {
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
            }
            part.last_offset = part.last_offset.max(r.last);
            part.records += r.records;
            part.offsets_without_record += u64::try_from(r.last - r.first + 1)
                .unwrap_or(0)
                .saturating_sub(r.records);
        }
        report.partitions.push(part);
    }
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
        for &o in offsets {
            let raw = format!(
                r#"{{"event_id":"e{o}","pipeline":"p","key":"k","event_time":0,"ingest_time":0,"payload":{{}}}}"#
            );
            let event = instream_event::decode(raw.as_bytes()).unwrap();
            w.append(o, raw.as_bytes(), &event).unwrap();
        }
        let all: Vec<i64> = offsets.iter().chain(dead).copied().collect();
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
        let report = verify(&archive, "p").await.unwrap();
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
        let report = verify(&archive, "p").await.unwrap();
        assert!(!report.is_clean());
        let p0 = &report.partitions[0];
        assert_eq!(p0.overlaps, [OffsetRange { first: 2, last: 2 }]);
        assert_eq!(p0.gaps, [OffsetRange { first: 4, last: 5 }]);
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert!(report.problems[0].problem.starts_with("unreadable"));
    }
}
