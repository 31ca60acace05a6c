//! The Parquet side of the archive's files: columns buffered per row group, written with
//! the crate's own (non-Arrow) writer, and the offsets read back for `verify`.

use std::sync::Arc;

use bytes::Bytes;
use instream_event::Event;
use instream_pipeline::{ArchiveColumn, ColumnType, RAW_COLUMNS};
use parquet::basic::{Compression, LogicalType, Repetition, TimeUnit, Type as PhysicalType};
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int64Type};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::{ColumnPath, Type};

use super::{note_error, FileContents, FormatError, Runs};

/// Rows per Parquet row group: large enough for good compression, small enough to bound the
/// memory of a file's unwritten rows.
pub const ROW_GROUP_ROWS: usize = 65_536;
/// Unwritten row bytes that close a row group early, whatever the row count: large events
/// must not hold hundreds of MiB per open file.
pub const ROW_GROUP_BYTES: usize = 32 * 1024 * 1024;
/// Key-value metadata key of the dead-lettered offsets (JSON runs).
const DEAD_LETTERED_KEY: &str = "instream.dead_lettered";

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
    pub(super) fn new(
        columns: &[ArchiveColumn],
        zstd_level: i32,
    ) -> Result<ParquetWriter, FormatError> {
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

    pub(super) fn append(&mut self, offset: i64, event: &Event) -> Result<(), FormatError> {
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

    pub(super) fn size(&self) -> u64 {
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

    /// Writes what is left, notes the dead-lettered offsets, and returns the file.
    pub(super) fn finish(mut self, dead_lettered: &Runs) -> Result<Vec<u8>, FormatError> {
        self.write_row_group()?;
        if !dead_lettered.0.is_empty() {
            let runs = serde_json::to_string(dead_lettered).map_err(note_error)?;
            self.writer
                .append_key_value_metadata(KeyValue::new(DEAD_LETTERED_KEY.into(), runs));
        }
        Ok(self.writer.into_inner()?)
    }
}

/// A Parquet file read back: its rows' offsets and its dead-lettered ones.
pub(super) fn read(data: Bytes) -> Result<FileContents, FormatError> {
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
    let dead_lettered = dead_lettered_of(&reader)?;
    Ok(FileContents {
        records: offsets.len() as u64,
        record_offsets: Some(runs),
        dead_lettered: Some(dead_lettered),
    })
}

/// Every row of a Parquet file as the envelope it was made from (the raw columns hold it
/// whole — id, key, times, headers and the payload's own bytes — except the pipeline, which
/// the file's folder names), with its offset.
pub(super) fn read_records(data: Bytes, pipeline: &str) -> Result<super::FileRecords, FormatError> {
    use parquet::record::RowAccessor;
    let reader = SerializedFileReader::new(data)?;
    let dead_lettered = dead_lettered_of(&reader)?;
    let mut out = Vec::new();
    for row in reader.get_row_iter(None)? {
        let row = row?;
        let headers: std::collections::BTreeMap<String, String> = match row.get_string(5) {
            Ok(text) => serde_json::from_str(text).map_err(note_error)?,
            Err(_) => Default::default(),
        };
        let payload = serde_json::value::RawValue::from_string(row.get_string(6)?.clone())
            .map_err(note_error)?;
        let event = Event {
            event_id: row.get_string(1)?.clone(),
            pipeline: pipeline.to_owned(),
            key: row.get_string(2)?.clone(),
            event_time: row.get_timestamp_millis(3)?,
            ingest_time: row.get_timestamp_millis(4)?,
            headers,
            payload,
            enrichment: None,
        };
        out.push(super::ArchivedRecord {
            offset: row.get_long(0)?,
            bytes: instream_event::encode(&event),
        });
    }
    Ok(super::FileRecords {
        records: out,
        dead_lettered: Some(dead_lettered),
    })
}

/// The dead-lettered offsets a file's key-value metadata lists (none listed: none).
fn dead_lettered_of(reader: &SerializedFileReader<Bytes>) -> Result<Runs, FormatError> {
    match reader
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|kv| kv.key == DEAD_LETTERED_KEY))
        .and_then(|kv| kv.value.as_deref())
    {
        Some(text) => serde_json::from_str(text).map_err(note_error),
        None => Ok(Runs::default()),
    }
}
