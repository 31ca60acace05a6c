//! One polled table: its columns, the query of its mode, and the position after each row.
//!
//! Rows are turned into JSON by PostgreSQL itself (`row_to_json`), so every column type —
//! numeric, json, arrays, enums — comes out as PostgreSQL renders it. `timestamp` columns
//! (without time zone) are read as UTC and written with their offset, so an event-time column
//! of that type parses. Positions are kept as PostgreSQL's own text of the timestamp
//! (microseconds, UTC) and the id as a 64-bit integer, and compared in SQL, so nothing is lost
//! to a float or a client-side clock.

use std::time::Duration;

use instream_core::config::{PollMode, SqlTableConfig};
use serde::{Deserialize, Serialize};
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("table `{table}`: {reason}")]
    Shape { table: String, reason: String },
    #[error("a query ran longer than {0:?}")]
    Timeout(Duration),
}

/// Where a table's reading stands: the last row handed to the broker (its id and/or
/// timestamp). Stored in ZooKeeper after the broker acknowledged the rows up to it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Position {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    /// `2026-11-26 03:00:00.123456+00`, as PostgreSQL prints a timestamptz in UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<String>,
}

impl Position {
    /// A short label for logs, dead-letter reasons and event ids.
    pub fn label(&self) -> String {
        match (&self.ts, self.id) {
            (Some(ts), Some(id)) => format!("{ts}/{id}"),
            (Some(ts), None) => ts.clone(),
            (None, Some(id)) => id.to_string(),
            (None, None) => "start".into(),
        }
    }
}

/// One row read: its JSON and its position.
#[derive(Debug, Clone)]
pub struct Row {
    pub json: String,
    pub position: Position,
}

/// A table's queries, built once from its columns.
pub struct Table {
    config: SqlTableConfig,
    /// The mode's columns that may hold NULL: rows where they do are never read.
    pub nullable: Vec<String>,
    batch: String,
    /// Timestamp mode: every row of one timestamp (a full batch that all shares one).
    same_timestamp: Option<String>,
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// The incrementing and timestamp columns the config names exist and have types a position
/// can be kept in; `columns`: every column with its type. `Err`: what is wrong.
fn check_position_columns(
    config: &SqlTableConfig,
    columns: &[(String, String)],
) -> Result<(), String> {
    let type_of = |name: &Option<String>| -> Result<Option<&str>, String> {
        let Some(name) = name else { return Ok(None) };
        columns
            .iter()
            .find(|(c, _)| c == name)
            .map(|(_, t)| Some(t.as_str()))
            .ok_or_else(|| format!("no column `{name}`"))
    };
    if let Some(t) = type_of(&config.incrementing_column)? {
        if !matches!(t, "smallint" | "integer" | "bigint") {
            return Err(format!(
                "incrementing column `{}` is {t}; it must be an integer type",
                config.incrementing_column.as_deref().unwrap_or_default()
            ));
        }
    }
    if let Some(t) = type_of(&config.timestamp_column)? {
        if !t.starts_with("timestamp") {
            return Err(format!(
                "timestamp column `{}` is {t}; it must be timestamp or timestamptz",
                config.timestamp_column.as_deref().unwrap_or_default()
            ));
        }
    }
    Ok(())
}

/// The select list of every column, `timestamp` ones converted to `timestamptz` at UTC.
fn select_list(columns: &[(String, String)]) -> String {
    columns
        .iter()
        .map(|(name, ty)| {
            if ty.starts_with("timestamp") && ty.ends_with("without time zone") {
                format!("(t.{0} AT TIME ZONE 'UTC') AS {0}", quote(name))
            } else {
                format!("t.{}", quote(name))
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn quoted_table(name: &str) -> String {
    name.split('.').map(quote).collect::<Vec<_>>().join(".")
}

impl Table {
    /// Reads the table's columns (within `timeout`) and checks the mode's columns exist with
    /// usable types.
    pub async fn describe(
        client: &Client,
        config: &SqlTableConfig,
        timeout: Duration,
    ) -> Result<Table, TableError> {
        tokio::time::timeout(timeout, Self::read_columns(client, config))
            .await
            .map_err(|_| TableError::Timeout(timeout))?
    }

    async fn read_columns(client: &Client, config: &SqlTableConfig) -> Result<Table, TableError> {
        let shape = |reason: String| TableError::Shape {
            table: config.table.clone(),
            reason,
        };
        // `to_regclass` answers null (not an error) for a missing table.
        let found = client
            .query_one(
                "SELECT to_regclass($1::text)::oid::bigint",
                &[&quoted_table(&config.table)],
            )
            .await?;
        let Some(oid) = found.get::<_, Option<i64>>(0) else {
            return Err(shape(
                "no such table (names are case-sensitive as given)".into(),
            ));
        };
        let columns = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull \
                 FROM pg_attribute a WHERE a.attrelid = $1::bigint::oid AND a.attnum > 0 \
                 AND NOT a.attisdropped ORDER BY a.attnum",
                &[&oid],
            )
            .await?;
        let not_null: Vec<String> = columns
            .iter()
            .filter(|r| r.get::<_, bool>(2))
            .map(|r| r.get(0))
            .collect();
        let columns: Vec<(String, String)> = columns.iter().map(|r| (r.get(0), r.get(1))).collect();
        check_position_columns(config, &columns).map_err(shape)?;
        let nullable = [
            config
                .incrementing_column
                .as_ref()
                .filter(|_| config.mode.uses_incrementing()),
            config
                .timestamp_column
                .as_ref()
                .filter(|_| config.mode.uses_timestamp()),
        ]
        .into_iter()
        .flatten()
        .filter(|c| !not_null.contains(c))
        .cloned()
        .collect();
        let mut table = Table::with_select(config.clone(), select_list(&columns));
        table.nullable = nullable;
        Ok(table)
    }

    /// `select`: every column, `timestamp` ones converted to `timestamptz` at UTC.
    fn with_select(config: SqlTableConfig, select: String) -> Table {
        let table = quoted_table(&config.table);
        let id = config.incrementing_column.as_deref().map(quote);
        let ts = config.timestamp_column.as_deref().map(quote);
        let (id, ts) = (id.unwrap_or_default(), ts.unwrap_or_default());
        // Timestamps are compared as timestamptz; the session runs at UTC, so a `timestamp`
        // column compares as the UTC time it holds.
        let (condition, order, outer_order) = match config.mode {
            PollMode::Incrementing => (
                format!("t.{id} > $1::bigint"),
                format!("t.{id}"),
                format!("r.{id}"),
            ),
            PollMode::Timestamp => (
                format!("t.{ts} > $1::text::timestamptz AND t.{ts} < now() - $2::text::interval"),
                format!("t.{ts}"),
                format!("r.{ts}"),
            ),
            PollMode::TimestampIncrementing => (
                format!(
                    "t.{ts} < now() - $3::text::interval AND (t.{ts} > $1::text::timestamptz \
                     OR (t.{ts} = $1::text::timestamptz AND t.{id} > $2::bigint))"
                ),
                format!("t.{ts}, t.{id}"),
                format!("r.{ts}, r.{id}"),
            ),
        };
        let id_out = if config.mode.uses_incrementing() {
            format!("r.{id}::bigint")
        } else {
            "NULL::bigint".into()
        };
        let ts_out = if config.mode.uses_timestamp() {
            format!("r.{ts}::timestamptz::text")
        } else {
            "NULL::text".into()
        };
        let limit = match config.mode {
            PollMode::Incrementing => "$2",
            PollMode::Timestamp => "$3",
            PollMode::TimestampIncrementing => "$4",
        };
        let batch = format!(
            "SELECT row_to_json(r)::text, {id_out}, {ts_out} FROM \
             (SELECT {select} FROM {table} t WHERE {condition} ORDER BY {order} \
             LIMIT {limit}::bigint) r ORDER BY {outer_order}"
        );
        let same_timestamp = (config.mode == PollMode::Timestamp).then(|| {
            format!(
                "SELECT row_to_json(r)::text, NULL::bigint, r.{ts}::timestamptz::text FROM \
                 (SELECT {select} FROM {table} t WHERE t.{ts} = $1::text::timestamptz) r"
            )
        });
        Table {
            config,
            nullable: Vec::new(),
            batch,
            same_timestamp,
        }
    }

    /// The next rows after `from`, at most `limit` (in timestamp mode fewer, or more, so that
    /// the rows of one timestamp are never split between two batches: the next query starts
    /// after the last timestamp read), and whether more may be waiting (the query filled its
    /// limit).
    pub async fn next_rows(
        &self,
        client: &Client,
        from: &Position,
        limit: u32,
        timeout: Duration,
    ) -> Result<(Vec<Row>, bool), TableError> {
        let limit = i64::from(limit);
        let id = from.id.unwrap_or(i64::MIN);
        let ts = from.ts.clone().unwrap_or_else(|| "-infinity".into());
        let delay = format!("{} milliseconds", self.config.delay.as_millis());
        let params: Vec<&(dyn ToSql + Sync)> = match self.config.mode {
            PollMode::Incrementing => vec![&id, &limit],
            PollMode::Timestamp => vec![&ts, &delay, &limit],
            PollMode::TimestampIncrementing => vec![&ts, &id, &delay, &limit],
        };
        let mut rows = query(client, &self.batch, &params, timeout).await?;
        let more = rows.len() as i64 == limit;
        if let Some(same) = &self.same_timestamp {
            if rows.len() as i64 == limit {
                let last = rows.last().and_then(|r| r.position.ts.clone());
                rows.retain(|r| r.position.ts != last);
                if rows.is_empty() {
                    // A whole batch of one timestamp: read all of its rows at once.
                    if let Some(last) = last {
                        rows = query(client, same, &[&last], timeout).await?;
                    }
                }
            }
        }
        Ok((rows, more))
    }

    pub fn config(&self) -> &SqlTableConfig {
        &self.config
    }
}

async fn query(
    client: &Client,
    statement: &str,
    params: &[&(dyn ToSql + Sync)],
    timeout: Duration,
) -> Result<Vec<Row>, TableError> {
    let rows = tokio::time::timeout(timeout, client.query(statement, params))
        .await
        .map_err(|_| TableError::Timeout(timeout))??;
    Ok(rows
        .iter()
        .map(|r| Row {
            json: r.get(0),
            position: Position {
                id: r.get(1),
                ts: r.get(2),
            },
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(mode: PollMode) -> Table {
        Table::with_select(
            SqlTableConfig {
                name: "orders".into(),
                pipeline: "orders".into(),
                table: "shop.orders".into(),
                mode,
                incrementing_column: Some("id".into()),
                timestamp_column: Some("updated_at".into()),
                ..Default::default()
            },
            "t.\"id\"".into(),
        )
    }

    #[test]
    fn each_mode_orders_and_bounds_its_query() {
        let inc = table(PollMode::Incrementing);
        assert!(
            inc.batch.contains(
                "FROM \"shop\".\"orders\" t WHERE t.\"id\" > $1::bigint ORDER BY t.\"id\" LIMIT $2"
            ),
            "{}",
            inc.batch
        );
        assert!(inc.same_timestamp.is_none());
        let ts = table(PollMode::Timestamp);
        assert!(
            ts.batch
                .contains("t.\"updated_at\" < now() - $2::text::interval"),
            "{}",
            ts.batch
        );
        assert!(ts.same_timestamp.is_some());
        let both = table(PollMode::TimestampIncrementing);
        assert!(
            both.batch
                .contains("ORDER BY t.\"updated_at\", t.\"id\" LIMIT $4"),
            "{}",
            both.batch
        );
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quoted_table("a.b"), "\"a\".\"b\"");
        assert_eq!(quote("we\"ird"), "\"we\"\"ird\"");
    }

    #[test]
    fn positions_label_what_they_hold() {
        let p = Position {
            id: Some(7),
            ts: Some("2026-01-01 00:00:00+00".into()),
        };
        assert_eq!(p.label(), "2026-01-01 00:00:00+00/7");
        assert_eq!(Position::default().label(), "start");
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(serde_json::from_value::<Position>(json).unwrap(), p);
    }
}
