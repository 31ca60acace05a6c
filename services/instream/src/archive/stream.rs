//! A raw partition's archived records read back in offset order, as the stages read the topic:
//! file by file, files whose offsets interleave (an event-time layout puts a late event in an
//! old hour's folder; ingest times a little out of order do so across an hour's edge) merged
//! by offset, an offset archived twice given once. What no file answers for (neither a record
//! nor a dead letter) is noted as a gap.

use std::collections::{BTreeMap, VecDeque};

use anyhow::Context;
use instream_archive::{Archive, ArchivedFile};
use instream_archiver::{ArchivedRecord, OffsetRange};

/// One archive file of a partition, by its name.
#[derive(Debug, Clone)]
pub struct PartFile {
    pub partition: i32,
    pub first: i64,
    pub last: i64,
    /// `YYYY-MM-DDTHH` of its folder.
    pub hour: String,
    pub file: ArchivedFile,
}

/// The archive files of `pipeline` whose folder's hour `keep` takes, per partition, by first
/// offset.
pub async fn partition_files(
    archive: &dyn Archive,
    pipeline: &str,
    keep: impl Fn(&str) -> bool,
) -> anyhow::Result<BTreeMap<i32, Vec<PartFile>>> {
    let mut out: BTreeMap<i32, Vec<PartFile>> = BTreeMap::new();
    for file in archive.list(pipeline).await? {
        let (Some((partition, first, last)), Some(hour)) = (
            instream_archiver::parse_file_name(&file.path),
            instream_archiver::hour_of(&file.path),
        ) else {
            continue;
        };
        if keep(&hour) {
            out.entry(partition).or_default().push(PartFile {
                partition,
                first,
                last,
                hour,
                file,
            });
        }
    }
    for files in out.values_mut() {
        files.sort_by_key(|f| (f.first, f.last));
    }
    Ok(out)
}

/// One partition's records in offset order.
pub struct PartitionStream<'a> {
    archive: &'a dyn Archive,
    pipeline: &'a str,
    pub partition: i32,
    pending: VecDeque<PartFile>,
    /// Files read and not used up: only those whose offsets interleave are open at once.
    open: Vec<VecDeque<ArchivedRecord>>,
    /// The last offset given: a repeat (a file overlapping another) is skipped.
    last_given: Option<i64>,
    /// Offsets the files read answer for (records and dead letters), as runs.
    covered: Vec<OffsetRange>,
    pub files_read: u64,
    pub hours: Vec<String>,
    progress: instream_core::Progress,
}

impl<'a> PartitionStream<'a> {
    /// Reads `files` (sorted by first offset); each file read counts one on `progress`.
    pub fn new(
        archive: &'a dyn Archive,
        pipeline: &'a str,
        files: Vec<PartFile>,
        progress: instream_core::Progress,
    ) -> Self {
        PartitionStream {
            archive,
            pipeline,
            partition: files.first().map_or(0, |f| f.partition),
            pending: files.into(),
            open: Vec::new(),
            last_given: None,
            covered: Vec::new(),
            files_read: 0,
            hours: Vec::new(),
            progress,
        }
    }

    /// Counts `ranges` as answered for without reading them: files left out of the read (a
    /// straggler in an hour's folder before the range) whose names give their offsets.
    pub fn also_covered(&mut self, ranges: impl IntoIterator<Item = OffsetRange>) {
        for range in ranges {
            self.cover(range);
        }
    }

    /// Adds a run to `covered`, merged with the last one when they touch: records come
    /// mostly in offset order, so the runs stay few.
    fn cover(&mut self, range: OffsetRange) {
        if let Some(last) = self.covered.last_mut() {
            if range.first <= last.last.saturating_add(1)
                && range.last >= last.first.saturating_sub(1)
            {
                last.first = last.first.min(range.first);
                last.last = last.last.max(range.last);
                return;
            }
        }
        self.covered.push(range);
    }

    /// The next record in offset order; `None` once every file is used up.
    pub async fn next(&mut self) -> anyhow::Result<Option<ArchivedRecord>> {
        loop {
            let head = self
                .open
                .iter()
                .enumerate()
                .filter_map(|(i, f)| f.front().map(|r| (r.offset, i)))
                .min();
            // A file not read yet could hold an offset before the smallest one at hand.
            if let Some(next) = self.pending.front() {
                if head.is_none_or(|(offset, _)| next.first <= offset) {
                    let file = self.pending.pop_front().context("a pending file")?;
                    self.read(file).await?;
                    continue;
                }
            }
            let Some((_, i)) = head else {
                return Ok(None);
            };
            let record = self.open[i].pop_front().context("the head record")?;
            self.open.retain(|f| !f.is_empty());
            if self.last_given.is_some_and(|last| record.offset <= last) {
                continue;
            }
            self.last_given = Some(record.offset);
            return Ok(Some(record));
        }
    }

    async fn read(&mut self, file: PartFile) -> anyhow::Result<()> {
        let data = self.archive.get(&file.file.path).await?;
        let read =
            instream_archiver::read_records(&file.file.path, data, file.first, self.pipeline)
                .with_context(|| format!("reading {}", file.file.path))?;
        match read.dead_lettered {
            Some(dead) => {
                let mut runs: Vec<OffsetRange> = dead.0;
                runs.extend(read.records.iter().map(|r| OffsetRange {
                    first: r.offset,
                    last: r.offset,
                }));
                runs.sort_by_key(|r| r.first);
                for run in runs {
                    self.cover(run);
                }
            }
            // A file that lists no offsets answers for its name's range.
            None => self.cover(OffsetRange {
                first: file.first,
                last: file.last,
            }),
        }
        self.files_read += 1;
        self.progress.add(1);
        if self.hours.last() != Some(&file.hour) {
            self.hours.push(file.hour);
        }
        self.open.push(read.records.into());
        Ok(())
    }

    /// The offsets between the first and the last one read that no file read answers for.
    pub fn gaps(&self) -> Vec<OffsetRange> {
        let mut runs = self.covered.clone();
        runs.sort_by_key(|r| r.first);
        let mut gaps = Vec::new();
        let mut end: Option<i64> = None;
        for r in runs {
            if let Some(e) = end {
                if r.first > e + 1 {
                    gaps.push(OffsetRange {
                        first: e + 1,
                        last: r.first - 1,
                    });
                }
            }
            end = Some(end.map_or(r.last, |e| e.max(r.last)));
        }
        gaps
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use instream_archive::LocalArchive;
    use instream_pipeline::ArchiveFormat;

    use super::*;

    async fn put(archive: &LocalArchive, hour: u32, offsets: &[i64], dead: &[i64]) {
        let mut w = instream_archiver::FileWriter::new(ArchiveFormat::JsonLines, &[], 1).unwrap();
        let mut all: Vec<(i64, bool)> = offsets.iter().map(|o| (*o, true)).collect();
        all.extend(dead.iter().map(|o| (*o, false)));
        all.sort();
        for (o, record) in all {
            if record {
                let raw = format!(
                    r#"{{"event_id":"e{o}","pipeline":"p","key":"k","event_time":0,"ingest_time":0,"payload":{{}}}}"#
                );
                w.append(
                    o,
                    raw.as_bytes(),
                    &instream_event::decode(raw.as_bytes()).unwrap(),
                )
                .unwrap();
            } else {
                w.dead_lettered(o).unwrap();
            }
        }
        let first = offsets.iter().chain(dead).min().unwrap();
        let last = offsets.iter().chain(dead).max().unwrap();
        let name = instream_archiver::file_name(ArchiveFormat::JsonLines, 0, *first, *last);
        archive
            .put(
                &format!("p/dt=2024-05-01/hour={hour:02}/{name}"),
                Bytes::from(w.finish().unwrap()),
            )
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn interleaved_files_come_in_offset_order_repeats_once_and_gaps_named() {
        let dir = tempfile::tempdir().unwrap();
        let archive = LocalArchive::new(dir.path());
        // Hour 12 holds 0-4 and a late event at 9; hour 13 holds 5-8 (7 dead-lettered); an
        // overlapping file repeats 8 and 9; then 10-11 are in no file, and 12 is.
        put(&archive, 12, &[0, 1, 2, 3, 4, 9], &[]).await;
        put(&archive, 13, &[5, 6, 8], &[7]).await;
        put(&archive, 13, &[8, 9], &[]).await;
        put(&archive, 14, &[12], &[]).await;
        let mut files = partition_files(&archive, "p", |_| true).await.unwrap();
        let mut stream = PartitionStream::new(
            &archive,
            "p",
            files.remove(&0).unwrap(),
            instream_core::Progress::silent(),
        );
        let mut offsets = Vec::new();
        while let Some(r) = stream.next().await.unwrap() {
            offsets.push(r.offset);
        }
        assert_eq!(offsets, [0, 1, 2, 3, 4, 5, 6, 8, 9, 12]);
        assert_eq!(
            stream.gaps(),
            [OffsetRange {
                first: 10,
                last: 11
            }]
        );
        assert_eq!(stream.files_read, 4);
    }
}
