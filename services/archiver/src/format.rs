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
use std::sync::Arc;

use bytes::Bytes;
use instream_event::Event;
use instream_pipeline::{ArchiveColumn, ArchiveFormat, ColumnType, RAW_COLUMNS};
use parquet::basic::{Compression, LogicalType, Repetition, TimeUnit, Type as PhysicalType};
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int64Type};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::{ColumnPath, Type};

/// Rows per Parquet row group: large enough for good compression, small enough to bound the
/// memory of a file's unwritten rows.
pub const ROW_GROUP_ROWS: usize = 65_536;
/// Unwritten row bytes that close a row group early, whatever the row count: large events
/// must not hold hundreds of MiB per open file.
pub const ROW_GROUP_BYTES: usize = 32 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("zstd: {0}")]
    Zstd(#[from] std::io::Error),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
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
/// Parquet key-value metadata key of the dead-lettered offsets (JSON runs).
const DEAD_LETTERED_KEY: &str = "instream.dead_lettered";

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
            Body::Parquet(mut w) => {
                if !self.dead_lettered.0.is_empty() {
                    let runs = serde_json::to_string(&self.dead_lettered).map_err(note_error)?;
                    w.writer
                        .append_key_value_metadata(KeyValue::new(DEAD_LETTERED_KEY.into(), runs));
                }
                w.finish()
            }
        }
    }
}

/// Strings of one column of a row group, in one buffer: one allocation per row group rather
/// than one per value.
#[derive(Default)]
struct Strings {
    data: Vec<u8>,
    ends: Vec<usize>,
}

impl Strings {
    fn push(&mut self, s: &[u8]) {
        self.data.extend_from_slice(s);
        self.ends.push(self.data.len());
    }

    fn take(&mut self) -> Vec<ByteArray> {
        let data = Bytes::from(std::mem::take(&mut self.data));
        let mut start = 0;
        let values = self
            .ends
            .iter()
            .map(|&end| {
                let v = ByteArray::from(data.slice(start..end));
                start = end;
                v
            })
            .collect();
        self.ends.clear();
        values
    }
}

/// A typed payload column's buffered values; `defined` is the definition level per row
/// (1: a value, 0: null).
struct TypedColumn {
    spec: ArchiveColumn,
    defined: Vec<i16>,
    values: TypedValues,
}

enum TypedValues {
    String(Strings),
    Int64(Vec<i64>),
    Float64(Vec<f64>),
    Boolean(Vec<bool>),
}

impl TypedColumn {
    fn push(&mut self, value: Option<&serde_json::Value>) {
        use serde_json::Value;
        let stored = match (&mut self.values, value) {
            (TypedValues::String(s), Some(Value::String(v))) => {
                s.push(v.as_bytes());
                true
            }
            (TypedValues::Int64(s), Some(Value::Number(n))) => {
                n.as_i64().map(|v| s.push(v)).is_some()
            }
            (TypedValues::Float64(s), Some(Value::Number(n))) => {
                n.as_f64().map(|v| s.push(v)).is_some()
            }
            (TypedValues::Boolean(s), Some(Value::Bool(v))) => {
                s.push(*v);
                true
            }
            _ => false,
        };
        if !stored && value.is_some_and(|v| !v.is_null()) {
            // Kept in the payload column all the same; the counter tells the columns are off.
            metrics::counter!("instream_archive_column_mismatch_total", "column" => self.spec.name.clone())
                .increment(1);
        }
        self.defined.push(i16::from(stored));
    }
}

pub struct ParquetWriter {
    writer: SerializedFileWriter<Vec<u8>>,
    offsets: Vec<i64>,
    event_ids: Strings,
    keys: Strings,
    event_times: Vec<i64>,
    ingest_times: Vec<i64>,
    headers: Strings,
    headers_defined: Vec<i16>,
    payloads: Strings,
    typed: Vec<TypedColumn>,
    /// Payload parsing is needed only for typed columns.
    parse_payload: bool,
}

fn required(name: &str, physical: PhysicalType, logical: Option<LogicalType>) -> Arc<Type> {
    field(name, physical, logical, Repetition::REQUIRED)
}

fn field(
    name: &str,
    physical: PhysicalType,
    logical: Option<LogicalType>,
    repetition: Repetition,
) -> Arc<Type> {
    Arc::new(
        Type::primitive_type_builder(name, physical)
            .with_repetition(repetition)
            .with_logical_type(logical)
            .build()
            .expect("a valid primitive column"),
    )
}

/// The Parquet schema of an archive file with these typed columns.
pub fn parquet_schema(columns: &[ArchiveColumn]) -> Result<Type, FormatError> {
    let millis = || Some(LogicalType::timestamp(true, TimeUnit::MILLIS));
    let mut fields = vec![
        required("offset", PhysicalType::INT64, None),
        required(
            "event_id",
            PhysicalType::BYTE_ARRAY,
            Some(LogicalType::String),
        ),
        required("key", PhysicalType::BYTE_ARRAY, Some(LogicalType::String)),
        required("event_time", PhysicalType::INT64, millis()),
        required("ingest_time", PhysicalType::INT64, millis()),
        field(
            "headers",
            PhysicalType::BYTE_ARRAY,
            Some(LogicalType::Json),
            Repetition::OPTIONAL,
        ),
        required("payload", PhysicalType::BYTE_ARRAY, Some(LogicalType::Json)),
    ];
    debug_assert_eq!(fields.len(), RAW_COLUMNS.len());
    for c in columns {
        let (physical, logical) = match c.kind {
            ColumnType::String => (PhysicalType::BYTE_ARRAY, Some(LogicalType::String)),
            ColumnType::Int64 => (PhysicalType::INT64, None),
            ColumnType::Float64 => (PhysicalType::DOUBLE, None),
            ColumnType::Boolean => (PhysicalType::BOOLEAN, None),
        };
        fields.push(field(&c.name, physical, logical, Repetition::OPTIONAL));
    }
    Ok(Type::group_type_builder("event")
        .with_fields(fields)
        .build()?)
}

impl ParquetWriter {
    fn new(columns: &[ArchiveColumn], zstd_level: i32) -> Result<ParquetWriter, FormatError> {
        let schema = Arc::new(parquet_schema(columns)?);
        let mut props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(parquet::basic::ZstdLevel::try_new(
                zstd_level,
            )?))
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS));
        // Unique per row: a dictionary or min/max statistics would cost CPU and save nothing.
        for unique in ["event_id", "headers", "payload"] {
            let path = ColumnPath::from(unique);
            props = props
                .set_column_dictionary_enabled(path.clone(), false)
                .set_column_statistics_enabled(path, EnabledStatistics::None);
        }
        let writer = SerializedFileWriter::new(Vec::new(), schema, Arc::new(props.build()))?;
        Ok(ParquetWriter {
            writer,
            offsets: Vec::new(),
            event_ids: Strings::default(),
            keys: Strings::default(),
            event_times: Vec::new(),
            ingest_times: Vec::new(),
            headers: Strings::default(),
            headers_defined: Vec::new(),
            payloads: Strings::default(),
            parse_payload: !columns.is_empty(),
            typed: columns
                .iter()
                .map(|c| TypedColumn {
                    spec: c.clone(),
                    defined: Vec::new(),
                    values: match c.kind {
                        ColumnType::String => TypedValues::String(Strings::default()),
                        ColumnType::Int64 => TypedValues::Int64(Vec::new()),
                        ColumnType::Float64 => TypedValues::Float64(Vec::new()),
                        ColumnType::Boolean => TypedValues::Boolean(Vec::new()),
                    },
                })
                .collect(),
        })
    }

    fn append(&mut self, offset: i64, event: &Event) -> Result<(), FormatError> {
        self.offsets.push(offset);
        self.event_ids.push(event.event_id.as_bytes());
        self.keys.push(event.key.as_bytes());
        self.event_times.push(event.event_time);
        self.ingest_times.push(event.ingest_time);
        match serde_json::to_vec(&event.headers) {
            Ok(json) if !event.headers.is_empty() => {
                self.headers.push(&json);
                self.headers_defined.push(1);
            }
            // No headers (a map of strings always serialises; were it not to, null is honest).
            _ => self.headers_defined.push(0),
        }
        self.payloads.push(event.payload.get().as_bytes());
        if self.parse_payload {
            let payload: Option<serde_json::Value> = serde_json::from_str(event.payload.get()).ok();
            for column in &mut self.typed {
                column.push(payload.as_ref().and_then(|p| column.spec.path.lookup(p)));
            }
        }
        if self.offsets.len() >= ROW_GROUP_ROWS || self.buffered_bytes() >= ROW_GROUP_BYTES {
            self.write_row_group()?;
        }
        Ok(())
    }

    fn buffered_bytes(&self) -> usize {
        self.payloads.data.len()
            + self.event_ids.data.len()
            + self.keys.data.len()
            + self.headers.data.len()
            + self.offsets.len() * 40
    }

    fn size(&self) -> u64 {
        // Unwritten rows compress too; counting them at a quarter keeps a file near its limit.
        (self.writer.bytes_written() + self.buffered_bytes() / 4) as u64
    }

    fn write_row_group(&mut self) -> Result<(), FormatError> {
        if self.offsets.is_empty() {
            return Ok(());
        }
        let mut group = self.writer.next_row_group()?;
        let mut index = 0;
        while let Some(mut column) = group.next_column()? {
            match index {
                0 => column
                    .typed::<Int64Type>()
                    .write_batch(&self.offsets, None, None)?,
                1 => column.typed::<ByteArrayType>().write_batch(
                    &self.event_ids.take(),
                    None,
                    None,
                )?,
                2 => column
                    .typed::<ByteArrayType>()
                    .write_batch(&self.keys.take(), None, None)?,
                3 => column
                    .typed::<Int64Type>()
                    .write_batch(&self.event_times, None, None)?,
                4 => column
                    .typed::<Int64Type>()
                    .write_batch(&self.ingest_times, None, None)?,
                5 => column.typed::<ByteArrayType>().write_batch(
                    &self.headers.take(),
                    Some(&self.headers_defined),
                    None,
                )?,
                6 => column.typed::<ByteArrayType>().write_batch(
                    &self.payloads.take(),
                    None,
                    None,
                )?,
                n => {
                    let typed = &mut self.typed[n - RAW_COLUMNS.len()];
                    let defined = Some(typed.defined.as_slice());
                    match &mut typed.values {
                        TypedValues::String(s) => {
                            column
                                .typed::<ByteArrayType>()
                                .write_batch(&s.take(), defined, None)?
                        }
                        TypedValues::Int64(v) => {
                            column.typed::<Int64Type>().write_batch(v, defined, None)?
                        }
                        TypedValues::Float64(v) => {
                            column.typed::<DoubleType>().write_batch(v, defined, None)?
                        }
                        TypedValues::Boolean(v) => {
                            column.typed::<BoolType>().write_batch(v, defined, None)?
                        }
                    }
                }
            };
            column.close()?;
            index += 1;
        }
        group.close()?;
        self.offsets.clear();
        self.event_times.clear();
        self.ingest_times.clear();
        self.headers_defined.clear();
        for typed in &mut self.typed {
            typed.defined.clear();
            match &mut typed.values {
                TypedValues::String(_) => {}
                TypedValues::Int64(v) => v.clear(),
                TypedValues::Float64(v) => v.clear(),
                TypedValues::Boolean(v) => v.clear(),
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<u8>, FormatError> {
        self.write_row_group()?;
        Ok(self.writer.into_inner()?)
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

fn note_error(e: impl std::fmt::Display) -> FormatError {
    FormatError::Note(e.to_string())
}

/// Reads a file back: its record count, and the offsets it answers for.
pub fn read_file(path: &str, data: Bytes) -> Result<FileContents, FormatError> {
    match format_of(path).ok_or_else(|| FormatError::UnknownFile(path.to_owned()))? {
        ArchiveFormat::JsonLines => {
            let mut note: Option<OffsetsNote> = None;
            let mut body = &data[..];
            if body.len() >= 8 && body[..4] == SKIPPABLE_MAGIC.to_le_bytes() {
                let len = u32::from_le_bytes([body[4], body[5], body[6], body[7]]) as usize;
                let text = body
                    .get(8..8 + len)
                    .ok_or_else(|| note_error("cut short"))?;
                note = Some(serde_json::from_slice(text).map_err(note_error)?);
                body = &body[8 + len..];
            }
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
        ArchiveFormat::Parquet => {
            let reader = SerializedFileReader::new(data)?;
            let mut offsets = Vec::new();
            for i in 0..reader.num_row_groups() {
                let group = reader.get_row_group(i)?;
                let rows = group.metadata().num_rows() as usize;
                match group.get_column_reader(0)? {
                    parquet::column::reader::ColumnReader::Int64ColumnReader(mut r) => {
                        let (read, _, _) = r.read_records(rows, None, None, &mut offsets)?;
                        if read != rows {
                            return Err(note_error(format!(
                                "row group {i}: {read} of {rows} offsets readable"
                            )));
                        }
                    }
                    _ => return Err(note_error("the first column is not the INT64 `offset`")),
                }
            }
            let mut runs = Runs::default();
            for o in &offsets {
                runs.push(*o)?;
            }
            let dead_lettered = match reader
                .metadata()
                .file_metadata()
                .key_value_metadata()
                .and_then(|kv| kv.iter().find(|kv| kv.key == DEAD_LETTERED_KEY))
                .and_then(|kv| kv.value.as_deref())
            {
                Some(text) => serde_json::from_str(text).map_err(note_error)?,
                None => Runs::default(),
            };
            Ok(FileContents {
                records: offsets.len() as u64,
                record_offsets: Some(runs),
                dead_lettered: Some(dead_lettered),
            })
        }
    }
}

#[cfg(test)]
mod tests {
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
        let read = read_file("p/part-0-0-1.jsonl.zst", Bytes::from(old)).unwrap();
        assert_eq!((read.records, read.record_offsets), (2, None));
    }

    #[test]
    fn parquet_round_trip_over_several_row_groups() {
        use parquet::record::Field;
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
