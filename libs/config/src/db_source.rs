//! The SQL source's settings: which database, and which tables it polls into which pipelines.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::secret::{Secret, SecretSlot};
use super::Problems;

/// How a table's new rows are found (the Kafka Connect JDBC source's modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PollMode {
    /// Rows with a strictly increasing id column above the last one seen. Sees inserts only.
    #[serde(rename = "incrementing")]
    Incrementing,
    /// Rows whose timestamp column is past the last one seen (and older than now minus
    /// `delay`). Sees inserts and updates; rows sharing one timestamp are read together.
    #[serde(rename = "timestamp")]
    Timestamp,
    /// Ordered by (timestamp, id): inserts and updates, exact even when many rows share a
    /// timestamp. The mode to choose when the table has both columns.
    #[serde(rename = "timestamp+incrementing")]
    TimestampIncrementing,
}

impl PollMode {
    pub fn uses_timestamp(self) -> bool {
        matches!(self, PollMode::Timestamp | PollMode::TimestampIncrementing)
    }

    pub fn uses_incrementing(self) -> bool {
        matches!(
            self,
            PollMode::Incrementing | PollMode::TimestampIncrementing
        )
    }
}

#[derive(Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DbSourceConfig {
    /// `postgres://user@host:port/database` (a password given in it is never logged, but
    /// belongs in `password`). TLS to the database is not built in: reach it over a trusted
    /// network or a sidecar.
    pub url: String,
    /// The database password, over any in `url`: `INSTREAM__DB_SOURCE__PASSWORD` or
    /// `password_file`. Never logged.
    pub password: Option<Secret>,
    /// A file holding `password`, read at start.
    pub password_file: Option<std::path::PathBuf>,
    /// How long to wait between polls of a table that had no new rows.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub poll_interval: Duration,
    /// Rows read per query (and produced per batch).
    pub batch_rows: u32,
    /// Longest a query may run before it is abandoned and retried.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub query_timeout: Duration,
    /// The tables to poll, each into one pipeline. One instance at a time polls a table
    /// (a ZooKeeper election per table); the others stand by.
    pub tables: Vec<SqlTableConfig>,
}

impl std::fmt::Debug for DbSourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbSourceConfig")
            .field("url", &super::redact_url(&self.url))
            .field("poll_interval", &self.poll_interval)
            .field("batch_rows", &self.batch_rows)
            .field("query_timeout", &self.query_timeout)
            .field("password", &self.password)
            .field("password_file", &self.password_file)
            .field("tables", &self.tables)
            .finish()
    }
}

impl Default for DbSourceConfig {
    fn default() -> Self {
        Self {
            url: "postgres://instream@127.0.0.1:5432/instream".into(),
            poll_interval: Duration::from_secs(1),
            batch_rows: 1000,
            query_timeout: Duration::from_secs(30),
            password: None,
            password_file: None,
            tables: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SqlTableConfig {
    /// Names this source's progress (`sources/<name>` in ZooKeeper) and its election: keep it
    /// when the table is renamed, change it to read the table again from the start.
    pub name: String,
    /// The pipeline each row becomes an event of (its key and time fields are columns).
    pub pipeline: String,
    /// `table` or `schema.table`.
    pub table: String,
    pub mode: PollMode,
    /// The strictly increasing id column (`incrementing`, `timestamp+incrementing`).
    pub incrementing_column: Option<String>,
    /// The last-modified timestamp column (`timestamp`, `timestamp+incrementing`);
    /// `timestamp` or `timestamptz`.
    pub timestamp_column: Option<String>,
    /// Timestamp modes read only rows older than now minus this, so that a transaction that
    /// commits late with an earlier timestamp is not skipped. Longer than your longest
    /// writing transaction.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub delay: Duration,
}

impl Default for SqlTableConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            pipeline: String::new(),
            table: String::new(),
            mode: PollMode::Incrementing,
            incrementing_column: None,
            timestamp_column: None,
            delay: Duration::from_secs(5),
        }
    }
}

/// Whether `name` is a plain SQL identifier (quoted as given when queries are built).
pub fn is_sql_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
}

impl DbSourceConfig {
    pub(super) fn secret_slots(&mut self) -> [SecretSlot<'_>; 1] {
        [SecretSlot {
            key: "db_source.password",
            value: &mut self.password,
            file: &self.password_file,
        }]
    }

    pub(super) fn validate(&self, p: &mut Problems) {
        p.check(
            self.url.starts_with("postgres://") || self.url.starts_with("postgresql://"),
            "db_source.url",
            || "must be a `postgres://` URL".into(),
        );
        p.non_zero_duration(self.poll_interval, "db_source.poll_interval");
        p.non_zero_duration(self.query_timeout, "db_source.query_timeout");
        p.check(
            (1..=100_000).contains(&self.batch_rows),
            "db_source.batch_rows",
            || "must be between 1 and 100000".into(),
        );
        for (i, t) in self.tables.iter().enumerate() {
            let key = |field: &str| format!("db_source.tables[{i}].{field}");
            p.check(
                !t.name.is_empty()
                    && t.name.len() <= 100
                    && t.name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                &key("name"),
                || "must be letters, digits, `_` or `-` (it names a ZooKeeper node)".into(),
            );
            p.check(
                !self.tables[..i].iter().any(|o| o.name == t.name),
                &key("name"),
                || format!("`{}` names two tables", t.name),
            );
            p.non_empty(&t.pipeline, &key("pipeline"));
            let parts: Vec<&str> = t.table.split('.').collect();
            p.check(
                parts.len() <= 2 && parts.iter().all(|s| is_sql_identifier(s)),
                &key("table"),
                || {
                    format!(
                        "`{}` is not `table` or `schema.table` of plain identifiers",
                        t.table
                    )
                },
            );
            for (column, needed, field) in [
                (
                    &t.incrementing_column,
                    t.mode.uses_incrementing(),
                    "incrementing_column",
                ),
                (
                    &t.timestamp_column,
                    t.mode.uses_timestamp(),
                    "timestamp_column",
                ),
            ] {
                match column {
                    None if needed => p.add(key(field), "the mode needs this column"),
                    Some(c) if !is_sql_identifier(c) => {
                        p.add(key(field), format!("`{c}` is not a plain identifier"))
                    }
                    _ => {}
                }
            }
        }
    }
}
