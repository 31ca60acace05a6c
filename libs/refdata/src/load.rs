//! `instream refdata load`: a file of records becomes a new version of one rule's reference
//! data in Redis (see [`crate::versions`]).

use std::path::Path;
use std::time::Duration;

use instream_pipeline::{EnrichmentRule, RecordShape};
use redis::aio::ConnectionLike;
use redis::cluster_async::ClusterConnection;
use serde_json::Value;

use crate::versions::{counter_key, pointer_key, version_prefix, CHANGES_CHANNEL};

mod records;
mod retire;

use records::{read_records, scalar_text, Loaded};
use retire::{retire_in_cluster, retire_versions_before};

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

/// How a load's records reach Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writes {
    /// One server, or the master a Sentinel names: a chunk is one pipelined round trip.
    Pipelined,
    /// A Redis Cluster, where a pipeline may not span hash slots: each record's commands
    /// are a pipeline of their own, a chunk's sent at once (each routed to its slot's node).
    PerRecord,
}

/// The records of one version, turned into Redis commands chunk by chunk.
struct Writer<C> {
    connection: C,
    writes: Writes,
    timeout: Duration,
    pipe: redis::Pipeline,
    /// [`Writes::PerRecord`]: the chunk's records, one pipeline each.
    records: Vec<redis::Pipeline>,
    queued: usize,
    written: u64,
    progress: instream_core::Progress,
}

impl<C: ConnectionLike + Clone + Send> Writer<C> {
    /// Queues the commands writing `record` at `key` in `shape`; false (nothing queued) for an
    /// empty hash, which Redis cannot hold.
    fn queue(
        &mut self,
        key: &str,
        shape: RecordShape,
        record: serde_json::Map<String, Value>,
    ) -> bool {
        match shape {
            RecordShape::Hash => {
                if record.is_empty() {
                    return false;
                }
                let mut hset = redis::cmd("HSET");
                hset.arg(key);
                for (name, value) in &record {
                    let text = scalar_text(value).unwrap_or_else(|| value.to_string());
                    hset.arg(name).arg(text);
                }
                self.pipe.cmd("DEL").arg(key).ignore();
                self.pipe.add_command(hset).ignore();
            }
            RecordShape::Json => {
                self.pipe
                    .cmd("SET")
                    .arg(key)
                    .arg(Value::Object(record).to_string())
                    .ignore();
            }
        }
        true
    }

    /// Closes the commands of one record.
    fn end_record(&mut self) {
        self.queued += 1;
        if self.writes == Writes::PerRecord {
            self.records
                .push(std::mem::replace(&mut self.pipe, redis::pipe()));
        }
    }

    async fn flush(&mut self) -> Result<(), LoadError> {
        if self.queued == 0 {
            return Ok(());
        }
        let sent = match self.writes {
            Writes::Pipelined => {
                let pipe = std::mem::replace(&mut self.pipe, redis::pipe());
                let mut connection = self.connection.clone();
                tokio::time::timeout(self.timeout, async move {
                    pipe.query_async::<()>(&mut connection).await
                })
                .await
            }
            Writes::PerRecord => {
                let records = std::mem::take(&mut self.records);
                let connection = &self.connection;
                tokio::time::timeout(
                    self.timeout,
                    futures::future::try_join_all(records.into_iter().map(|pipe| {
                        let mut connection = connection.clone();
                        async move { pipe.query_async::<()>(&mut connection).await }
                    })),
                )
                .await
                .map(|answers| answers.map(|_| ()))
            }
        };
        sent.map_err(|_| LoadError::Redis("a write timed out".into()))?
            .map_err(|e| LoadError::Redis(e.to_string()))?;
        self.written += self.queued as u64;
        self.progress.add(self.queued as u64);
        self.queued = 0;
        Ok(())
    }
}

/// Loads `path` as a new version of `rule` of `pipeline`. `key_fields` name, per field of the
/// rule's key template in order, the record field that fills it (`--key-field code` for
/// `airport:{origin}`). The key fields stay in the stored record.
/// `connection` goes to the server that takes writes: the one server, or the master.
/// `progress` counts the records as they are written.
pub async fn load_file<C: ConnectionLike + Clone + Send>(
    connection: C,
    timeout: Duration,
    pipeline: &str,
    rule: &EnrichmentRule,
    key_fields: &[String],
    path: &Path,
    progress: &instream_core::Progress,
) -> Result<LoadReport, LoadError> {
    let spec = Spec {
        progress,
        timeout,
        pipeline,
        rule,
        key_fields,
        path,
    };
    load(
        connection,
        Writes::Pipelined,
        &spec,
        |mut connection, keep_from| async move {
            retire_versions_before(&mut connection, pipeline, &rule.name, keep_from).await
        },
    )
    .await
}

/// [`load_file`] into a Redis Cluster: the records are written each to its slot's node, the
/// pointer switched as on one server, and older versions retired on every master.
pub async fn load_file_to_cluster(
    connection: ClusterConnection,
    timeout: Duration,
    pipeline: &str,
    rule: &EnrichmentRule,
    key_fields: &[String],
    path: &Path,
    progress: &instream_core::Progress,
) -> Result<LoadReport, LoadError> {
    let spec = Spec {
        progress,
        timeout,
        pipeline,
        rule,
        key_fields,
        path,
    };
    load(
        connection,
        Writes::PerRecord,
        &spec,
        |mut connection, keep_from| async move {
            retire_in_cluster(&mut connection, pipeline, &rule.name, keep_from).await
        },
    )
    .await
}

/// What one load writes: `path`'s records as a version of `rule` of `pipeline`.
struct Spec<'a> {
    progress: &'a instream_core::Progress,
    timeout: Duration,
    pipeline: &'a str,
    rule: &'a EnrichmentRule,
    key_fields: &'a [String],
    path: &'a Path,
}

/// Writes the version, switches the pointer to it, then retires older versions with
/// `retire(connection, keep_from)` (how depends on the deployment).
async fn load<C, R, F>(
    connection: C,
    writes: Writes,
    spec: &Spec<'_>,
    retire: R,
) -> Result<LoadReport, LoadError>
where
    C: ConnectionLike + Clone + Send,
    R: FnOnce(C, u64) -> F,
    F: std::future::Future<Output = Result<u64, LoadError>>,
{
    let mut connection = connection;
    let (version, records) = write_version(connection.clone(), writes, spec).await?;
    let (previous, switched) =
        switch(&mut connection, spec.pipeline, &spec.rule.name, version).await?;
    // Versions before the previous one are retired: they expire after a grace period. The
    // previous one stays for enrichers that have not seen the switch yet.
    let keep_from = if switched { previous } else { version };
    let retired = retire(connection, keep_from)
        .await
        .map_err(|e| after_switch(version, switched, e))?;
    Ok(LoadReport {
        version,
        previous: (previous > 0).then_some(previous),
        records,
        retired,
        switched,
    })
}

/// An error of the retirement step, which comes after the version is written (and maybe
/// switched to): says so, so that nobody loads again for nothing.
fn after_switch(version: u64, switched: bool, error: LoadError) -> LoadError {
    let state = if switched {
        "is loaded and switched to"
    } else {
        "is loaded (a later load switched first)"
    };
    LoadError::Redis(format!(
        "version {version} {state}, but retiring older versions failed (a later load retires them): {error}"
    ))
}

/// Chunks of records with their line numbers.
type Chunks = tokio::sync::mpsc::Receiver<Vec<(usize, Loaded)>>;

/// Reads the records of `path` on a blocking thread and hands them over a chunk at a time
/// through a small channel: memory stays at a few chunks however large the file.
fn spawn_reader(
    path: &Path,
    key_fields: &[String],
) -> (tokio::task::JoinHandle<Result<(), LoadError>>, Chunks) {
    let (tx, pending) = tokio::sync::mpsc::channel::<Vec<(usize, Loaded)>>(4);
    let (path, key_fields) = (path.to_owned(), key_fields.to_vec());
    let reader = tokio::task::spawn_blocking(move || {
        let mut chunk = Vec::with_capacity(CHUNK);
        read_records(&path, &key_fields, |line, record| {
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
    (reader, pending)
}

/// Takes a new version number and writes every record of `path` under its prefix. Returns
/// the version and how many records were written.
async fn write_version<C: ConnectionLike + Clone + Send>(
    connection: C,
    writes: Writes,
    spec: &Spec<'_>,
) -> Result<(u64, u64), LoadError> {
    let Spec {
        timeout,
        pipeline,
        rule,
        key_fields,
        path,
        ..
    } = *spec;
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
        connection,
        writes,
        timeout,
        pipe: redis::pipe(),
        records: Vec::new(),
        queued: 0,
        written: 0,
        progress: spec.progress.clone(),
    };
    let (reader, mut pending) = spawn_reader(path, key_fields);
    let shown = path.display().to_string();
    let mut key = String::new();
    while let Some(records) = pending.recv().await {
        for (line, Loaded { fields, keys }) in records {
            let keys = keys.into_iter().zip(key_fields).map(|(value, field)| {
                value.ok_or_else(|| LoadError::Record {
                    path: shown.clone(),
                    line,
                    reason: format!("key field `{field}` is missing, empty or not a scalar"),
                })
            });
            let values = keys.collect::<Result<Vec<String>, _>>()?;
            let refs: Vec<&str> = values.iter().map(String::as_str).collect();
            rule.key_template
                .render_values(&refs, &mut key)
                .map_err(|n| LoadError::Spec(format!("{n} key fields expected")))?;
            if writer.queue(&format!("{prefix}{key}"), rule.shape, fields) {
                writer.end_record();
            }
        }
        writer.flush().await?;
    }
    reader
        .await
        .map_err(|e| LoadError::Spec(format!("reading the file: {e}")))??;
    Ok((version, writer.written))
}

/// The switch: one atomic raise of the pointer, then the announcement enrichers follow.
/// Returns the version the pointer held before and whether it now names `version` (false:
/// a later load switched first).
async fn switch<C: ConnectionLike + Send>(
    connection: &mut C,
    pipeline: &str,
    rule: &str,
    version: u64,
) -> Result<(u64, bool), LoadError> {
    let pointer = pointer_key(pipeline, rule);
    let previous: u64 = redis::cmd("EVAL")
        .arg(RAISE_POINTER)
        .arg(1)
        .arg(&pointer)
        .arg(version)
        .query_async(connection)
        .await
        .map_err(|e| LoadError::Redis(e.to_string()))?;
    let switched = version > previous;
    if switched {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(CHANGES_CHANNEL)
            .arg(format!("{pipeline}:{rule}:{version}"))
            .query_async(connection)
            .await
            .map_err(|e| LoadError::Redis(e.to_string()))?;
    }
    Ok((previous, switched))
}
