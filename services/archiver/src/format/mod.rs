//! The two file formats of the archive, written in memory and put whole.
//!
//! JSON lines: each record's bytes as consumed, one per line, the file compressed with zstd.
//! Parquet: one row per record with the raw columns ([`RAW_COLUMNS`]) — the payload kept
//! whole as JSON — plus the pipeline's typed columns read from the payload. Rows are buffered
//! per column and written as a row group every [`ROW_GROUP_ROWS`] rows, so memory holds at
//! most one row group of a file besides its compressed bytes.
//!
//! Each file also says which offsets it answers for, so `verify` can check the set of
//! offsets rather than trust names: Parquet has each row's `offset` and the dead-lettered
//! ones in its key-value metadata; a JSON-lines file starts with a zstd *skippable frame*
//! holding both as runs (zstd tools skip it, so `zstdcat` still prints just the lines).

use std::io::{Read, Write};

use bytes::Bytes;
use instream_event::Event;
use instream_pipeline::{ArchiveColumn, ArchiveFormat};

mod parquet;

pub use self::parquet::{parquet_schema, ParquetWriter, ROW_GROUP_BYTES, ROW_GROUP_ROWS};

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("zstd: {0}")]
    Zstd(#[from] std::io::Error),
    #[error("parquet: {0}")]
    Parquet(#[from] ::parquet::errors::ParquetError),
    #[error("`{0}` is not an archive file name")]
    UnknownFile(String),
    #[error("offset {offset} after {last}: a file's offsets must increase")]
    OffsetOrder { offset: i64, last: i64 },
    #[error("the offsets note: {0}")]
    Note(String),
}

/// Offsets `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OffsetRange {
    pub first: i64,
    pub last: i64,
}

/// Increasing offsets, as runs of consecutive ones (a file's are mostly one run).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Runs(pub Vec<OffsetRange>);

impl Runs {
    pub fn push(&mut self, offset: i64) -> Result<(), FormatError> {
        match self.0.last_mut() {
            Some(run) if offset <= run.last => Err(FormatError::OffsetOrder {
                offset,
                last: run.last,
            }),
            Some(run) if offset == run.last + 1 => {
                run.last = offset;
                Ok(())
            }
            _ => {
                self.0.push(OffsetRange {
                    first: offset,
                    last: offset,
                });
                Ok(())
            }
        }
    }

    pub fn count(&self) -> u64 {
        self.0.iter().map(|r| (r.last - r.first + 1) as u64).sum()
    }
}

/// What a JSON-lines file's skippable frame holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct OffsetsNote {
    records: Runs,
    dead_lettered: Runs,
}

/// zstd's first skippable-frame magic number; decoders skip such frames whole.
const SKIPPABLE_MAGIC: u32 = 0x184D_2A50;

/// The file name suffix of a format.
pub fn extension(format: ArchiveFormat) -> &'static str {
    match format {
        ArchiveFormat::JsonLines => "jsonl.zst",
        ArchiveFormat::Parquet => "parquet",
    }
}

/// The format a file name's suffix names.
pub fn format_of(path: &str) -> Option<ArchiveFormat> {
    [ArchiveFormat::JsonLines, ArchiveFormat::Parquet]
        .into_iter()
        .find(|f| path.ends_with(&format!(".{}", extension(*f))))
}

/// One archive file being filled.
pub struct FileWriter {
    body: Body,
    records: Runs,
    dead_lettered: Runs,
}

enum Body {
    JsonLines(zstd::stream::Encoder<'static, Vec<u8>>),
    Parquet(Box<ParquetWriter>),
}

impl FileWriter {
    pub fn new(
        format: ArchiveFormat,
        columns: &[ArchiveColumn],
        zstd_level: i32,
    ) -> Result<FileWriter, FormatError> {
        let body = match format {
            ArchiveFormat::JsonLines => {
                Body::JsonLines(zstd::stream::Encoder::new(Vec::new(), zstd_level)?)
            }
            ArchiveFormat::Parquet => {
                Body::Parquet(Box::new(ParquetWriter::new(columns, zstd_level)?))
            }
        };
        Ok(FileWriter {
            body,
            records: Runs::default(),
            dead_lettered: Runs::default(),
        })
    }

    /// Adds one record: `raw` is what was consumed, `event` its decoding.
    pub fn append(&mut self, offset: i64, raw: &[u8], event: &Event) -> Result<(), FormatError> {
        self.records.push(offset)?;
        match &mut self.body {
            Body::JsonLines(encoder) => {
                // One event per line. A line break in valid JSON is whitespace (it cannot
                // be inside a string), so a pretty-printed payload loses nothing as a space.
                if raw.iter().any(|&b| b == b'\n' || b == b'\r') {
                    let flat: Vec<u8> = raw
                        .iter()
                        .map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b })
                        .collect();
                    encoder.write_all(&flat)?;
                } else {
                    encoder.write_all(raw)?;
                }
                encoder.write_all(b"\n")?;
                Ok(())
            }
            Body::Parquet(w) => w.append(offset, event),
        }
    }

    /// Notes an offset the file answers for without a row: its record was dead-lettered.
    pub fn dead_lettered(&mut self, offset: i64) -> Result<(), FormatError> {
        self.dead_lettered.push(offset)
    }

    /// Bytes the file would have now (compressed bytes written, plus unwritten rows).
    pub fn size(&self) -> u64 {
        match &self.body {
            Body::JsonLines(encoder) => encoder.get_ref().len() as u64,
            Body::Parquet(w) => w.size(),
        }
    }

    pub fn finish(self) -> Result<Vec<u8>, FormatError> {
        match self.body {
            Body::JsonLines(encoder) => {
                let compressed = encoder.finish()?;
                let note = serde_json::to_vec(&OffsetsNote {
                    records: self.records,
                    dead_lettered: self.dead_lettered,
                })
                .map_err(note_error)?;
                let mut file = Vec::with_capacity(8 + note.len() + compressed.len());
                file.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
                file.extend_from_slice(&(note.len() as u32).to_le_bytes());
                file.extend_from_slice(&note);
                file.extend_from_slice(&compressed);
                Ok(file)
            }
            Body::Parquet(w) => w.finish(&self.dead_lettered),
        }
    }
}

/// What a file holds, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileContents {
    pub records: u64,
    /// The records' offsets; `None` for a file that does not say (JSON lines written before
    /// files carried their offsets).
    pub record_offsets: Option<Runs>,
    /// Offsets the file answers for without a row (dead-lettered); `None` as above.
    pub dead_lettered: Option<Runs>,
}

pub(crate) fn note_error(e: impl std::fmt::Display) -> FormatError {
    FormatError::Note(e.to_string())
}

/// A JSON-lines file split into its offsets note (if it has one) and its zstd body.
fn json_lines_parts(data: &[u8]) -> Result<(Option<OffsetsNote>, &[u8]), FormatError> {
    if data.len() >= 8 && data[..4] == SKIPPABLE_MAGIC.to_le_bytes() {
        let len = u32::from_le_bytes([data[4], data[5], data[6], data[7]]) as usize;
        let text = data
            .get(8..8 + len)
            .ok_or_else(|| note_error("cut short"))?;
        let note = serde_json::from_slice(text).map_err(note_error)?;
        return Ok((Some(note), &data[8 + len..]));
    }
    Ok((None, data))
}

/// One archived record read back: its offset in the raw topic and the envelope's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedRecord {
    pub offset: i64,
    pub bytes: Vec<u8>,
}

/// A file's records read back, and the offsets it answers for without a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecords {
    pub records: Vec<ArchivedRecord>,
    /// `None`: a JSON-lines file from before files listed their offsets (it answers for
    /// every offset its name gives).
    pub dead_lettered: Option<Runs>,
}

/// Reads every record of a file back, in offset order. A JSON-lines file from before files
/// listed their offsets numbers its lines from `first_offset` (the one its name gives): the
/// order is right, the offsets may not be. `pipeline` is the pipeline whose folder holds the
/// file (a Parquet row does not repeat it).
pub fn read_records(
    path: &str,
    data: Bytes,
    first_offset: i64,
    pipeline: &str,
) -> Result<FileRecords, FormatError> {
    match format_of(path).ok_or_else(|| FormatError::UnknownFile(path.to_owned()))? {
        ArchiveFormat::JsonLines => {
            let (note, body) = json_lines_parts(&data)?;
            let text = zstd::decode_all(body)?;
            let mut offsets = note
                .as_ref()
                .map(|n| {
                    n.records
                        .0
                        .iter()
                        .flat_map(|r| r.first..=r.last)
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
                .into_iter();
            let mut next = first_offset;
            let mut out = Vec::new();
            for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let offset = match (&note, offsets.next()) {
                    (Some(_), Some(o)) => o,
                    (Some(_), None) => {
                        return Err(note_error("more lines than listed offsets"));
                    }
                    (None, _) => next,
                };
                next = offset + 1;
                out.push(ArchivedRecord {
                    offset,
                    bytes: line.to_vec(),
                });
            }
            Ok(FileRecords {
                records: out,
                dead_lettered: note.map(|n| n.dead_lettered),
            })
        }
        ArchiveFormat::Parquet => parquet::read_records(data, pipeline),
    }
}

/// Reads a file back: its record count, and the offsets it answers for.
pub fn read_file(path: &str, data: Bytes) -> Result<FileContents, FormatError> {
    match format_of(path).ok_or_else(|| FormatError::UnknownFile(path.to_owned()))? {
        ArchiveFormat::JsonLines => {
            let (note, body) = json_lines_parts(&data)?;
            let mut decoder = zstd::stream::Decoder::new(body)?;
            let mut records = 0u64;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = decoder.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                records += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
            }
            Ok(FileContents {
                records,
                record_offsets: note.as_ref().map(|n| n.records.clone()),
                dead_lettered: note.map(|n| n.dead_lettered),
            })
        }
        ArchiveFormat::Parquet => parquet::read(data),
    }
}

#[cfg(test)]
mod tests {
    use ::parquet::file::reader::{FileReader, SerializedFileReader};
    use instream_pipeline::ColumnType;

    use super::*;

    fn event(i: i64) -> (Vec<u8>, Event) {
        let raw = serde_json::json!({
            "event_id": format!("e{i}"), "pipeline": "p", "key": format!("k{}", i % 7),
            "event_time": 1_714_564_800_000i64 + i, "ingest_time": 1_714_564_800_000i64,
            "headers": if i % 2 == 0 { serde_json::json!({"source": "test"}) } else { serde_json::json!({}) },
            "payload": {"n": i, "name": format!("item {i}"), "price": {"amount": i as f64 / 2.0}, "ok": i % 3 == 0},
        })
        .to_string()
        .into_bytes();
        let event = instream_event::decode(&raw).unwrap();
        (raw, event)
    }

    fn columns() -> Vec<ArchiveColumn> {
        let c = |name: &str, path: &str, kind| ArchiveColumn {
            name: name.into(),
            path: path.parse().unwrap(),
            kind,
        };
        vec![
            c("n", "n", ColumnType::Int64),
            c("name", "name", ColumnType::String),
            c("amount", "price.amount", ColumnType::Float64),
            c("ok", "ok", ColumnType::Boolean),
            c("missing", "nowhere", ColumnType::String),
            c("n_as_text", "n", ColumnType::String),
        ]
    }

    #[test]
    fn json_lines_round_trip() {
        let mut w = FileWriter::new(ArchiveFormat::JsonLines, &[], 3).unwrap();
        for i in (0..100).filter(|i| i % 40 != 39) {
            let (raw, e) = event(i);
            w.append(i, &raw, &e).unwrap();
        }
        w.dead_lettered(39).unwrap();
        w.dead_lettered(79).unwrap();
        // A pretty-printed record stays one line, and still the same JSON.
        let pretty = serde_json::to_vec_pretty(
            &serde_json::from_slice::<serde_json::Value>(&event(100).0).unwrap(),
        )
        .unwrap();
        assert!(pretty.contains(&b'\n'));
        w.append(100, &pretty, &instream_event::decode(&pretty).unwrap())
            .unwrap();
        let (raw, e) = event(0);
        assert!(w.append(5, &raw, &e).is_err(), "offsets only increase");
        let bytes = Bytes::from(w.finish().unwrap());
        // A plain zstd decoder skips the offsets note: the lines, and nothing else.
        let text = zstd::decode_all(&bytes[..]).unwrap();
        assert_eq!(text.split(|&b| b == b'\n').next(), Some(&event(0).0[..]));
        assert_eq!(text.iter().filter(|&&b| b == b'\n').count(), 99);
        let last = text.split(|&b| b == b'\n').nth(98).unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(last).unwrap(),
            serde_json::from_slice::<serde_json::Value>(&event(100).0).unwrap()
        );
        // Each record back with its offset, the line as consumed (flattened when pretty).
        let read = read_records("p/part-0-0-100.jsonl.zst", bytes.clone(), 0, "p").unwrap();
        let records = read.records;
        assert_eq!(records.len(), 99);
        assert_eq!(read.dead_lettered.map(|r| r.count()), Some(2));
        assert_eq!((records[0].offset, &records[0].bytes), (0, &event(0).0));
        assert_eq!((records[39].offset, &records[39].bytes), (40, &event(40).0));
        assert_eq!(records[98].offset, 100);
        let read = read_file("p/part-0-0-100.jsonl.zst", bytes).unwrap();
        assert_eq!(read.records, 99);
        let run = |first, last| OffsetRange { first, last };
        assert_eq!(
            read.record_offsets,
            Some(Runs(vec![run(0, 38), run(40, 78), run(80, 100)]))
        );
        assert_eq!(
            read.dead_lettered,
            Some(Runs(vec![run(39, 39), run(79, 79)]))
        );
        // A file from before the note: lines only, offsets unknown.
        let old = zstd::encode_all(&b"{}\n{}\n"[..], 3).unwrap();
        let read = read_file("p/part-0-0-1.jsonl.zst", Bytes::from(old.clone())).unwrap();
        assert_eq!((read.records, read.record_offsets), (2, None));
        let records = read_records("p/part-0-7-8.jsonl.zst", Bytes::from(old), 7, "p")
            .unwrap()
            .records;
        let offsets: Vec<i64> = records.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, [7, 8], "numbered from the name's first offset");
    }

    #[test]
    fn parquet_round_trip_over_several_row_groups() {
        use ::parquet::record::Field;
        let rows = ROW_GROUP_ROWS as i64 + 10;
        let mut w = FileWriter::new(ArchiveFormat::Parquet, &columns(), 3).unwrap();
        for i in 0..rows {
            let (raw, e) = event(i);
            w.append(1000 + i, &raw, &e).unwrap();
        }
        w.dead_lettered(1000 + rows).unwrap();
        let bytes = Bytes::from(w.finish().unwrap());
        let name = format!("p/part-0-1000-{}.parquet", 1000 + rows);
        let read = read_file(&name, bytes.clone()).unwrap();
        assert_eq!(read.records, rows as u64);
        let run = |first, last| OffsetRange { first, last };
        assert_eq!(
            read.record_offsets,
            Some(Runs(vec![run(1000, 1000 + rows - 1)]))
        );
        assert_eq!(
            read.dead_lettered,
            Some(Runs(vec![run(1000 + rows, 1000 + rows)]))
        );

        // Every row back as its envelope, the pipeline from the caller.
        let read = read_records(&name, bytes.clone(), 0, "p").unwrap();
        assert_eq!(read.dead_lettered.map(|r| r.count()), Some(1));
        let records = read.records;
        assert_eq!(records.len(), rows as usize);
        for (i, r) in records.iter().enumerate().step_by(997) {
            assert_eq!(r.offset, 1000 + i as i64);
            let back = instream_event::decode(&r.bytes).unwrap();
            let (_, sent) = event(i as i64);
            assert_eq!(
                (
                    back.event_id,
                    back.pipeline,
                    back.key,
                    back.event_time,
                    back.ingest_time
                ),
                (
                    sent.event_id,
                    sent.pipeline,
                    sent.key,
                    sent.event_time,
                    sent.ingest_time
                )
            );
            assert_eq!(
                (back.headers, back.payload.get()),
                (sent.headers, sent.payload.get())
            );
        }

        let reader = SerializedFileReader::new(bytes).unwrap();
        assert_eq!(reader.num_row_groups(), 2);
        let row = reader.get_row_iter(None).unwrap().nth(3).unwrap().unwrap();
        let fields: std::collections::HashMap<String, Field> = row
            .get_column_iter()
            .map(|(n, f)| (n.clone(), f.clone()))
            .collect();
        assert_eq!(fields["offset"], Field::Long(1003));
        assert_eq!(fields["event_id"], Field::Str("e3".into()));
        assert_eq!(fields["key"], Field::Str("k3".into()));
        assert_eq!(
            fields["event_time"],
            Field::TimestampMillis(1_714_564_800_003)
        );
        assert_eq!(fields["headers"], Field::Null);
        assert_eq!(fields["n"], Field::Long(3));
        assert_eq!(fields["name"], Field::Str("item 3".into()));
        assert_eq!(fields["amount"], Field::Double(1.5));
        assert_eq!(fields["ok"], Field::Bool(true));
        assert_eq!(fields["missing"], Field::Null);
        // A value of another type is null in its column, and whole in the payload.
        assert_eq!(fields["n_as_text"], Field::Null);
        let Field::Str(payload) = &fields["payload"] else {
            panic!("payload is {:?}", fields["payload"]);
        };
        let payload: serde_json::Value = serde_json::from_str(payload).unwrap();
        assert_eq!(payload["n"], 3);
        let row = reader.get_row_iter(None).unwrap().nth(2).unwrap().unwrap();
        let headers = row
            .get_column_iter()
            .find(|(n, _)| n.as_str() == "headers")
            .map(|(_, f)| f.clone());
        assert_eq!(headers, Some(Field::Str(r#"{"source":"test"}"#.into())));
    }

    #[test]
    fn file_names_name_their_format() {
        assert_eq!(
            format_of("a/part-1-2-3.parquet"),
            Some(ArchiveFormat::Parquet)
        );
        assert_eq!(
            format_of("a/part-1-2-3.jsonl.zst"),
            Some(ArchiveFormat::JsonLines)
        );
        assert_eq!(format_of("a/part-1-2-3.csv"), None);
        assert!(read_file("a/b.csv", Bytes::new()).is_err());
    }
}
