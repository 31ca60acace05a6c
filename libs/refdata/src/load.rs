//! `instream refdata load`: a file of records becomes a new version of one rule's reference
//! data in Redis (see [`crate::versions`]).

use std::io::BufRead;
use std::path::Path;
use std::time::Duration;

use instream_pipeline::{EnrichmentRule, RecordShape};
use redis::aio::ConnectionLike;
use serde_json::{Map, Value};

use crate::versions::{counter_key, pointer_key, version_of_key, version_prefix, CHANGES_CHANNEL};

/// Records written per pipelined round trip: small enough that Redis answers enrichers
/// between two chunks, so a million-row load does not stall enrichment.
const CHUNK: usize = 1_000;

/// How long the keys of a retired version stay readable: an enricher that missed two switch
/// announcements in a row still finds its version until its periodic check catches up.
pub const RETIRED_VERSION_GRACE: Duration = Duration::from_secs(600);

/// Raises the pointer to ARGV[1] only if that is higher than what it holds, so two loads
/// finishing out of order never move it backwards. Returns the previous value.
const RAISE_POINTER: &str = r"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then
  redis.call('SET', KEYS[1], ARGV[1])
end
return current";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("{path} line {line}: {reason}")]
    Record {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("{0}")]
    Spec(String),
    #[error("redis: {0}")]
    Redis(String),
}

/// What a load did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    pub version: u64,
    pub previous: Option<u64>,
    pub records: u64,
    /// Keys of versions older than the previous one, given [`RETIRED_VERSION_GRACE`] to live.
    pub retired: u64,
    /// Whether the pointer now names this version (false: a later load switched first).
    pub switched: bool,
}

/// Where the records come from: CSV with a header row (every value a string) or JSON lines
/// (one object per line), told apart by the extension.
enum Format {
    Csv,
    JsonLines,
}

fn format_of(path: &Path) -> Result<Format, LoadError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => Ok(Format::Csv),
        Some("jsonl" | "ndjson" | "json") => Ok(Format::JsonLines),
        _ => Err(LoadError::File {
            path: path.display().to_string(),
            reason: "expected a .csv or .jsonl file".into(),
        }),
    }
}

/// Reads every record of `path`, calling `each` with (line number, record).
fn read_records(
    path: &Path,
    mut each: impl FnMut(usize, Map<String, Value>) -> Result<(), LoadError>,
) -> Result<(), LoadError> {
    let shown = path.display().to_string();
    let file_err = |reason: String| LoadError::File {
        path: shown.clone(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| file_err(e.to_string()))?;
    match format_of(path)? {
        Format::Csv => {
            let mut reader = csv::Reader::from_reader(std::io::BufReader::new(file));
            let headers = reader
                .headers()
                .map_err(|e| file_err(format!("header row: {e}")))?
                .clone();
            for (n, row) in reader.records().enumerate() {
                let line = n + 2;
                let row = row.map_err(|e| LoadError::Record {
                    path: shown.clone(),
                    line,
                    reason: e.to_string(),
                })?;
                let record = headers
                    .iter()
                    .zip(row.iter())
                    .map(|(h, v)| (h.to_owned(), Value::String(v.to_owned())))
                    .collect();
                each(line, record)?;
            }
        }
        Format::JsonLines => {
            for (n, text) in std::io::BufReader::new(file).lines().enumerate() {
                let line = n + 1;
                let text = text.map_err(|e| file_err(e.to_string()))?;
                if text.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Value>(&text) {
                    Ok(Value::Object(record)) => each(line, record)?,
                    Ok(_) => {
                        return Err(LoadError::Record {
                            path: shown.clone(),
                            line,
                            reason: "not a JSON object".into(),
                        })
                    }
                    Err(e) => {
                        return Err(LoadError::Record {
                            path: shown.clone(),
                            line,
                            reason: e.to_string(),
                        })
                    }
                }
            }
        }
    }
    Ok(())
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The records of one version, turned into Redis commands chunk by chunk.
struct Writer<C> {
    connection: C,
    timeout: Duration,
    pipe: redis::Pipeline,
    queued: usize,
    written: u64,
}

impl<C: ConnectionLike + Send> Writer<C> {
    async fn flush(&mut self) -> Result<(), LoadError> {
        if self.queued == 0 {
            return Ok(());
        }
        let pipe = std::mem::replace(&mut self.pipe, redis::pipe());
        tokio::time::timeout(self.timeout, pipe.query_async::<()>(&mut self.connection))
            .await
            .map_err(|_| LoadError::Redis("a write timed out".into()))?
            .map_err(|e| LoadError::Redis(e.to_string()))?;
        self.written += self.queued as u64;
        self.queued = 0;
        Ok(())
    }
}

/// Loads `path` as a new version of `rule` of `pipeline`. `key_fields` name, per field of the
/// rule's key template in order, the record field that fills it (`--key-field code` for
/// `airport:{origin}`). The key fields stay in the stored record.
/// `connection` goes to the server that takes writes: the one server, or the master.
pub async fn load_file<C: ConnectionLike + Clone + Send>(
    connection: C,
    timeout: Duration,
    pipeline: &str,
    rule: &EnrichmentRule,
    key_fields: &[String],
    path: &Path,
) -> Result<LoadReport, LoadError> {
    let template_fields = rule.key_template.fields().count();
    if key_fields.len() != template_fields {
        return Err(LoadError::Spec(format!(
            "rule `{}` has the key template `{}` with {template_fields} field(s); give one --key-field per field, in order (got {})",
            rule.name,
            rule.key_template,
            key_fields.len()
        )));
    }
    let mut connection = connection;
    let version: u64 = redis::cmd("INCR")
        .arg(counter_key(pipeline, &rule.name))
        .query_async(&mut connection)
        .await
        .map_err(|e| LoadError::Redis(e.to_string()))?;
    let prefix = version_prefix(pipeline, &rule.name, version);
    // The file is read on a blocking thread and handed over a chunk at a time through a
    // small channel: memory stays at a few chunks however large the file.
    let mut writer = Writer {
        connection: connection.clone(),
        timeout,
        pipe: redis::pipe(),
        queued: 0,
        written: 0,
    };
    let (tx, mut pending) = tokio::sync::mpsc::channel::<Vec<(usize, Map<String, Value>)>>(4);
    let owned_path = path.to_owned();
    let reader = tokio::task::spawn_blocking(move || {
        let mut chunk = Vec::with_capacity(CHUNK);
        read_records(&owned_path, |line, record| {
            chunk.push((line, record));
            if chunk.len() == CHUNK {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
                tx.blocking_send(full)
                    .map_err(|_| LoadError::Spec("the load was abandoned".into()))?;
            }
            Ok(())
        })?;
        // The writer may have stopped on an error of its own; that error is the one to report.
        let _ = tx.blocking_send(chunk);
        Ok::<(), LoadError>(())
    });
    let shown = path.display().to_string();
    let mut key = String::new();
    while let Some(records) = pending.recv().await {
        for (line, record) in records {
            let mut values = Vec::with_capacity(key_fields.len());
            for field in key_fields {
                match record.get(field).and_then(scalar_text) {
                    Some(v) if !v.is_empty() => values.push(v),
                    _ => {
                        return Err(LoadError::Record {
                            path: shown,
                            line,
                            reason: format!(
                                "key field `{field}` is missing, empty or not a scalar"
                            ),
                        })
                    }
                }
            }
            let refs: Vec<&str> = values.iter().map(String::as_str).collect();
            rule.key_template
                .render_values(&refs, &mut key)
                .map_err(|n| LoadError::Spec(format!("{n} key fields expected")))?;
            let full = format!("{prefix}{key}");
            match rule.shape {
                RecordShape::Hash => {
                    let mut hset = redis::cmd("HSET");
                    hset.arg(&full);
                    for (name, value) in &record {
                        let text = scalar_text(value).unwrap_or_else(|| value.to_string());
                        hset.arg(name).arg(text);
                    }
                    if record.is_empty() {
                        continue;
                    }
                    writer.pipe.cmd("DEL").arg(&full).ignore();
                    writer.pipe.add_command(hset).ignore();
                }
                RecordShape::Json => {
                    writer
                        .pipe
                        .cmd("SET")
                        .arg(&full)
                        .arg(Value::Object(record).to_string())
                        .ignore();
                }
            }
            writer.queued += 1;
        }
        writer.flush().await?;
    }
    reader
        .await
        .map_err(|e| LoadError::Spec(format!("reading the file: {e}")))??;
    let records = writer.written;
    // The switch: one atomic raise of the pointer, then the announcement enrichers follow.
    let pointer = pointer_key(pipeline, &rule.name);
    let previous: u64 = redis::cmd("EVAL")
        .arg(RAISE_POINTER)
        .arg(1)
        .arg(&pointer)
        .arg(version)
        .query_async(&mut connection)
        .await
        .map_err(|e| LoadError::Redis(e.to_string()))?;
    let switched = version > previous;
    if switched {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(CHANGES_CHANNEL)
            .arg(format!("{pipeline}:{}:{version}", rule.name))
            .query_async(&mut connection)
            .await
            .map_err(|e| LoadError::Redis(e.to_string()))?;
    }
    // Versions before the previous one are retired: they expire after a grace period. The
    // previous one stays for enrichers that have not seen the switch yet.
    let keep_from = if switched { previous } else { version };
    let retired = retire_versions_before(&mut connection, pipeline, &rule.name, keep_from).await?;
    Ok(LoadReport {
        version,
        previous: (previous > 0).then_some(previous),
        records,
        retired,
        switched,
    })
}

async fn retire_versions_before<C: ConnectionLike + Send>(
    connection: &mut C,
    pipeline: &str,
    rule: &str,
    keep_from: u64,
) -> Result<u64, LoadError> {
    let pattern = format!("instream:refdata:{pipeline}:{rule}:v*");
    let mut cursor: u64 = 0;
    let mut retired = 0;
    let grace = RETIRED_VERSION_GRACE.as_secs();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(CHUNK)
            .query_async(connection)
            .await
            .map_err(|e| LoadError::Redis(e.to_string()))?;
        let old: Vec<&String> = keys
            .iter()
            .filter(|k| version_of_key(pipeline, rule, k).is_some_and(|v| v < keep_from))
            .collect();
        if !old.is_empty() {
            let mut pipe = redis::pipe();
            for key in &old {
                // NX: a key already retired keeps its earlier deadline.
                pipe.cmd("EXPIRE").arg(*key).arg(grace).arg("NX");
            }
            let set: Vec<u64> = pipe
                .query_async(connection)
                .await
                .map_err(|e| LoadError::Redis(e.to_string()))?;
            retired += set.iter().sum::<u64>();
        }
        if next == 0 {
            return Ok(retired);
        }
        cursor = next;
    }
}
