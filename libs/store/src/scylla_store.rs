use async_trait::async_trait;
use futures::future::try_join_all;
use instream_config::{StoreConfig, StoreConsistency};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Consistency;
use scylla::value::CqlTimestamp;

use std::collections::BTreeMap;

use crate::{
    AggregateQuery, AggregateStore, Checkpoint, CheckpointKey, LedgerRow, StoreError,
    WindowAggregate,
};

/// Writes in flight at once per upsert call: enough to keep every shard busy without
/// overrunning the driver's connection pools.
const UPSERT_CONCURRENCY: usize = 64;

/// ScyllaDB / Cassandra: one row per window, partitioned by (pipeline, aggregation, group) and
/// clustered by window start, with a table TTL for retention. Prepared statements (so the
/// driver routes each to a replica of its partition), `store.write_consistency` and
/// `store.read_consistency` (LOCAL_QUORUM by default); the windows of one group written in
/// one flush go as unlogged batches of one partition key.
pub struct ScyllaStore {
    session: Session,
    upsert: PreparedStatement,
    write_consistency: Consistency,
    batch_rows: usize,
    select: PreparedStatement,
    delete: PreparedStatement,
    save_checkpoint: PreparedStatement,
    load_checkpoint: PreparedStatement,
    save_ledger: PreparedStatement,
    load_ledger: PreparedStatement,
    keyspace: String,
    read_consistency: Consistency,
}

/// The columns of a window, in the order [`WindowRow`] reads them.
const WINDOW_COLUMNS: &str = "pipeline, aggregation, group_key, window_start, window_end, \
     definition_version, count, values_json, is_final";

type WindowRow = (
    String,
    String,
    String,
    CqlTimestamp,
    CqlTimestamp,
    i64,
    i64,
    Option<String>,
    Option<bool>,
);

fn window_of(row: WindowRow) -> WindowAggregate {
    let (pipeline, aggregation, group_key, start, end, version, count, values, fin) = row;
    WindowAggregate {
        pipeline,
        aggregation,
        group_key,
        window_start: start.0,
        window_end: end.0,
        definition_version: version,
        count,
        values: values
            .and_then(|v| serde_json::from_str(&v).ok())
            .unwrap_or_default(),
        is_final: fin.unwrap_or(false),
    }
}

fn consistency(c: StoreConsistency) -> Consistency {
    match c {
        StoreConsistency::One => Consistency::One,
        StoreConsistency::LocalOne => Consistency::LocalOne,
        StoreConsistency::Two => Consistency::Two,
        StoreConsistency::Quorum => Consistency::Quorum,
        StoreConsistency::LocalQuorum => Consistency::LocalQuorum,
        StoreConsistency::EachQuorum => Consistency::EachQuorum,
        StoreConsistency::All => Consistency::All,
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

type UpsertRow<'a> = (
    &'a str,
    &'a str,
    &'a str,
    CqlTimestamp,
    CqlTimestamp,
    i64,
    i64,
    String,
    bool,
);

fn upsert_row(r: &WindowAggregate) -> UpsertRow<'_> {
    (
        &r.pipeline,
        &r.aggregation,
        &r.group_key,
        CqlTimestamp(r.window_start),
        CqlTimestamp(r.window_end),
        r.definition_version,
        r.count,
        serde_json::Value::Object(r.values.clone()).to_string(),
        r.is_final,
    )
}

/// (pipeline, aggregation, group): the table's partition key.
type PartitionKey<'a> = (&'a str, &'a str, &'a str);

/// Most bytes of values in one batch, under Cassandra's default 50 KiB refusal threshold.
const BATCH_BYTES: usize = 32 * 1024;

/// What a row weighs in a batch, roughly: its key strings and its values' JSON.
fn row_bytes(r: &WindowAggregate) -> usize {
    r.group_key.len()
        + r.pipeline.len()
        + r.aggregation.len()
        + 48
        + serde_json::to_vec(&r.values).map_or(0, |v| v.len())
}

/// `rows` cut into runs of one partition key (pipeline, aggregation, group), each at most
/// `max` rows and about [`BATCH_BYTES`] long, in the order the rows first appear.
pub fn partition_runs(rows: &[WindowAggregate], max: usize) -> Vec<Vec<&WindowAggregate>> {
    let mut by_key: Vec<(PartitionKey<'_>, Vec<&WindowAggregate>)> = Vec::new();
    let mut index: std::collections::HashMap<PartitionKey<'_>, usize> =
        std::collections::HashMap::new();
    for r in rows {
        let key = (
            r.pipeline.as_str(),
            r.aggregation.as_str(),
            r.group_key.as_str(),
        );
        let i = *index.entry(key).or_insert_with(|| {
            by_key.push((key, Vec::new()));
            by_key.len() - 1
        });
        by_key[i].1.push(r);
    }
    let mut runs: Vec<Vec<&WindowAggregate>> = Vec::new();
    for (_, rows) in by_key {
        let mut run: Vec<&WindowAggregate> = Vec::new();
        let mut bytes = 0;
        for r in rows {
            // Weighed only when rows can share a batch.
            let size = if max <= 1 { 0 } else { row_bytes(r) };
            if !run.is_empty() && (run.len() >= max.max(1) || bytes + size > BATCH_BYTES) {
                runs.push(std::mem::take(&mut run));
                bytes = 0;
            }
            bytes += size;
            run.push(r);
        }
        if !run.is_empty() {
            runs.push(run);
        }
    }
    runs
}

impl ScyllaStore {
    /// Writes one run of a partition key: a plain execute for one row, an unlogged batch for
    /// more (one partition, so the batch costs the coordinator nothing extra).
    async fn write_run(&self, run: &[&WindowAggregate]) -> Result<(), StoreError> {
        if let [only] = run {
            return self
                .session
                .execute_unpaged(&self.upsert, upsert_row(only))
                .await
                .map(|_| ())
                .map_err(unavailable);
        }
        let mut batch = Batch::new(BatchType::Unlogged);
        for _ in run {
            batch.append_statement(self.upsert.clone());
        }
        batch.set_consistency(self.write_consistency);
        let values: Vec<UpsertRow<'_>> = run.iter().map(|r| upsert_row(r)).collect();
        self.session
            .batch(&batch, values)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    /// Connects, creates the keyspace and table if missing, and prepares the statements.
    pub async fn connect(cfg: &StoreConfig) -> Result<ScyllaStore, StoreError> {
        let mut builder = SessionBuilder::new().known_nodes(&cfg.scylla_nodes);
        if let (Some(user), Some(password)) = (&cfg.username, &cfg.password) {
            builder = builder.user(user, password.expose());
        }
        if let Some(tls) = &cfg.tls {
            builder = builder.tls_context(Some(crate::tls::context(tls)?));
        }
        if let Some(dc) = &cfg.local_dc {
            // Local nodes only: LOCAL_QUORUM then means this data centre's replicas, and a
            // request never crosses to another one behind the consistency level's back.
            let policy = scylla::policies::load_balancing::DefaultPolicy::builder()
                .prefer_datacenter(dc.clone())
                .token_aware(true)
                .permit_dc_failover(false)
                .build();
            let profile = scylla::client::execution_profile::ExecutionProfile::builder()
                .load_balancing_policy(policy)
                .build();
            builder = builder.default_execution_profile_handle(profile.into_handle());
        }
        let session = builder.build().await.map_err(unavailable)?;
        let ks = &cfg.keyspace;
        for ddl in schema(cfg) {
            session
                .query_unpaged(ddl, &[])
                .await
                .map_err(|e| StoreError::Rejected(e.to_string()))?;
        }
        // Tables made before windows carried `values_json` (or `is_final`) lack it; adding
        // a column that exists fails, which is the usual case and fine.
        for column in ["values_json text", "is_final boolean"] {
            if let Err(e) = session
                .query_unpaged(
                    format!("ALTER TABLE {ks}.window_aggregates ADD {column}"),
                    &[],
                )
                .await
            {
                // Usually the column is there already; anything else (no ALTER permission)
                // must be visible, or the statements that name it fail without saying why.
                let message = e.to_string();
                if message.contains("already exist") || message.contains("conflicts with") {
                    tracing::debug!(error = %message, column, "column already there");
                } else {
                    tracing::warn!(error = %message, column, "could not add the column");
                }
            }
        }
        session
            .await_schema_agreement()
            .await
            .map_err(unavailable)?;
        let mut upsert = session
            .prepare(format!(
                "INSERT INTO {ks}.window_aggregates (pipeline, aggregation, group_key, \
                 window_start, window_end, definition_version, count, values_json, is_final) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .await
            .map_err(|e| StoreError::Rejected(e.to_string()))?;
        let (write, read) = (
            consistency(cfg.write_consistency),
            consistency(cfg.read_consistency),
        );
        upsert.set_consistency(write);
        let mut select = session
            .prepare(format!(
                "SELECT {WINDOW_COLUMNS} FROM {ks}.window_aggregates WHERE pipeline = ? AND \
                 aggregation = ? AND group_key = ? AND window_start >= ? AND window_start < ? \
                 LIMIT ?"
            ))
            .await
            .map_err(|e| StoreError::Rejected(e.to_string()))?;
        select.set_consistency(read);
        let mut delete = session
            .prepare(format!(
                "DELETE FROM {ks}.window_aggregates WHERE pipeline = ? AND aggregation = ? \
                 AND group_key = ? AND window_start = ?"
            ))
            .await
            .map_err(|e| StoreError::Rejected(e.to_string()))?;
        delete.set_consistency(write);
        let mut save_checkpoint = session
            .prepare(format!(
                "INSERT INTO {ks}.aggregator_checkpoints (consumer_group, topic, partition, \
                 next_offset, state) VALUES (?, ?, ?, ?, ?)"
            ))
            .await
            .map_err(|e| StoreError::Rejected(e.to_string()))?;
        save_checkpoint.set_consistency(write);
        let mut load_checkpoint = session
            .prepare(format!(
                "SELECT next_offset, state FROM {ks}.aggregator_checkpoints \
                 WHERE consumer_group = ? AND topic = ? AND partition = ?"
            ))
            .await
            .map_err(|e| StoreError::Rejected(e.to_string()))?;
        load_checkpoint.set_consistency(read);
        let mut save_ledger = session
            .prepare(format!(
                "INSERT INTO {ks}.audit_ledger (pipeline, hour, source, since, aggregation, \
                 counts) VALUES (?, ?, ?, ?, ?, ?)"
            ))
            .await
            .map_err(|e| StoreError::Rejected(e.to_string()))?;
        save_ledger.set_consistency(write);
        let mut load_ledger = session
            .prepare(format!(
                "SELECT source, since, aggregation, counts FROM {ks}.audit_ledger \
                 WHERE pipeline = ? AND hour = ?"
            ))
            .await
            .map_err(|e| StoreError::Rejected(e.to_string()))?;
        load_ledger.set_consistency(read);
        Ok(ScyllaStore {
            session,
            upsert,
            write_consistency: write,
            batch_rows: cfg.upsert_batch_rows,
            select,
            delete,
            save_checkpoint,
            load_checkpoint,
            save_ledger,
            load_ledger,
            keyspace: ks.clone(),
            read_consistency: read,
        })
    }
}

/// The keyspace and table, idempotently (`IF NOT EXISTS`).
pub fn schema(cfg: &StoreConfig) -> Vec<String> {
    let ks = &cfg.keyspace;
    vec![
        format!(
            "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = \
             {{'class': 'NetworkTopologyStrategy', 'replication_factor': {}}}",
            cfg.replication_factor
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.window_aggregates (\
             pipeline text, aggregation text, group_key text, window_start timestamp, \
             window_end timestamp, definition_version bigint, count bigint, values_json text, \
             is_final boolean, \
             PRIMARY KEY ((pipeline, aggregation, group_key), window_start)) \
             WITH CLUSTERING ORDER BY (window_start ASC) AND default_time_to_live = {}",
            cfg.ttl.as_secs()
        ),
        // One row per consumer group and input partition, replaced on every checkpoint; no
        // TTL: a partition idle for longer than the retention must still resume exactly.
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.aggregator_checkpoints (\
             consumer_group text, topic text, partition int, next_offset bigint, state blob, \
             PRIMARY KEY ((consumer_group, topic, partition))) \
             WITH default_time_to_live = 0"
        ),
        // The audit ledger: one partition per pipeline and hour, kept as long as windows.
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.audit_ledger (\
             pipeline text, hour bigint, source text, since bigint, aggregation text, \
             counts frozen<map<text, bigint>>, \
             PRIMARY KEY ((pipeline, hour), source, since, aggregation)) \
             WITH default_time_to_live = {}",
            cfg.ttl.as_secs()
        ),
    ]
}

#[async_trait]
impl AggregateStore for ScyllaStore {
    async fn upsert(&self, rows: &[WindowAggregate]) -> Result<(), StoreError> {
        let runs = partition_runs(rows, self.batch_rows);
        for chunk in runs.chunks(UPSERT_CONCURRENCY) {
            try_join_all(chunk.iter().map(|run| self.write_run(run))).await?;
        }
        Ok(())
    }

    async fn delete(&self, rows: &[WindowAggregate]) -> Result<(), StoreError> {
        for chunk in rows.chunks(UPSERT_CONCURRENCY) {
            try_join_all(chunk.iter().map(|r| {
                self.session.execute_unpaged(
                    &self.delete,
                    (
                        &r.pipeline,
                        &r.aggregation,
                        &r.group_key,
                        CqlTimestamp(r.window_start),
                    ),
                )
            }))
            .await
            .map_err(unavailable)?;
        }
        Ok(())
    }

    async fn query(&self, q: &AggregateQuery) -> Result<Vec<WindowAggregate>, StoreError> {
        if q.from >= q.to || q.limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i32::try_from(q.limit).unwrap_or(i32::MAX);
        let result = self
            .session
            .execute_unpaged(
                &self.select,
                (
                    &q.pipeline,
                    &q.aggregation,
                    &q.group_key,
                    CqlTimestamp(q.from),
                    CqlTimestamp(q.to),
                    limit,
                ),
            )
            .await
            .map_err(unavailable)?;
        let rows = result.into_rows_result().map_err(unavailable)?;
        rows.rows::<WindowRow>()
            .map_err(unavailable)?
            .map(|row| row.map(window_of).map_err(unavailable))
            .collect()
    }

    async fn windows_between(
        &self,
        pipeline: &str,
        aggregation: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<WindowAggregate>, StoreError> {
        use futures::TryStreamExt;
        if from >= to {
            return Ok(Vec::new());
        }
        // The partition key holds the group, so every group of an aggregation is a scan:
        // paged, filtered by the nodes. Only `archive recompute` asks.
        let mut scan = scylla::statement::unprepared::Statement::new(format!(
            "SELECT {WINDOW_COLUMNS} FROM {}.window_aggregates WHERE pipeline = ? AND \
             aggregation = ? AND window_start >= ? AND window_start < ? ALLOW FILTERING",
            self.keyspace
        ));
        scan.set_consistency(self.read_consistency);
        scan.set_page_size(1000);
        self.session
            .query_iter(
                scan,
                (pipeline, aggregation, CqlTimestamp(from), CqlTimestamp(to)),
            )
            .await
            .map_err(unavailable)?
            .rows_stream::<WindowRow>()
            .map_err(unavailable)?
            .map_ok(window_of)
            .map_err(unavailable)
            .try_collect()
            .await
    }

    async fn save_checkpoints(&self, checkpoints: &[Checkpoint]) -> Result<(), StoreError> {
        try_join_all(checkpoints.iter().map(|c| {
            self.session.execute_unpaged(
                &self.save_checkpoint,
                (
                    &c.key.group,
                    &c.key.topic,
                    c.key.partition,
                    c.next_offset,
                    &c.state,
                ),
            )
        }))
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn load_checkpoint(&self, key: &CheckpointKey) -> Result<Option<Checkpoint>, StoreError> {
        let result = self
            .session
            .execute_unpaged(
                &self.load_checkpoint,
                (&key.group, &key.topic, key.partition),
            )
            .await
            .map_err(unavailable)?;
        let rows = result.into_rows_result().map_err(unavailable)?;
        let row = rows
            .maybe_first_row::<(i64, Vec<u8>)>()
            .map_err(unavailable)?;
        Ok(row.map(|(next_offset, state)| Checkpoint {
            key: key.clone(),
            next_offset,
            state,
        }))
    }

    async fn save_ledger(&self, rows: &[LedgerRow]) -> Result<(), StoreError> {
        for chunk in rows.chunks(UPSERT_CONCURRENCY) {
            try_join_all(chunk.iter().map(|r| {
                self.session.execute_unpaged(
                    &self.save_ledger,
                    (
                        &r.pipeline,
                        r.hour,
                        &r.source,
                        r.since,
                        &r.aggregation,
                        &r.counts,
                    ),
                )
            }))
            .await
            .map_err(unavailable)?;
        }
        Ok(())
    }

    async fn load_ledger(
        &self,
        pipeline: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<LedgerRow>, StoreError> {
        let mut out = Vec::new();
        for hour in crate::hours_in(from, to) {
            let result = self
                .session
                .execute_unpaged(&self.load_ledger, (pipeline, hour))
                .await
                .map_err(unavailable)?;
            let rows = result.into_rows_result().map_err(unavailable)?;
            for row in rows
                .rows::<(String, i64, String, BTreeMap<String, i64>)>()
                .map_err(unavailable)?
            {
                let (source, since, aggregation, counts) = row.map_err(unavailable)?;
                out.push(LedgerRow {
                    pipeline: pipeline.to_owned(),
                    hour,
                    source,
                    since,
                    aggregation,
                    counts,
                });
            }
        }
        Ok(out)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.session
            .query_unpaged("SELECT release_version FROM system.local", &[])
            .await
            .map(|_| ())
            .map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(group: &str, start: i64) -> WindowAggregate {
        WindowAggregate {
            pipeline: "p".into(),
            aggregation: "a".into(),
            group_key: group.into(),
            window_start: start,
            window_end: start + 60_000,
            definition_version: 1,
            count: 1,
            values: Default::default(),
            is_final: false,
        }
    }

    #[test]
    fn big_values_get_batches_of_their_own() {
        let mut big = row("x", 0);
        big.values
            .insert("sketch".into(), serde_json::json!("y".repeat(20_000)));
        let rows = [big.clone(), big.clone(), row("x", 120)];
        let sizes: Vec<usize> = partition_runs(&rows, 16).iter().map(Vec::len).collect();
        assert_eq!(sizes, [1, 2]);
    }

    #[test]
    fn rows_are_cut_into_bounded_runs_of_one_partition_key() {
        let rows = [
            row("x", 0),
            row("y", 0),
            row("x", 60),
            row("x", 120),
            row("y", 60),
        ];
        let runs: Vec<Vec<(&str, i64)>> = partition_runs(&rows, 2)
            .iter()
            .map(|run| {
                run.iter()
                    .map(|r| (r.group_key.as_str(), r.window_start))
                    .collect()
            })
            .collect();
        assert_eq!(
            runs,
            [
                vec![("x", 0), ("x", 60)],
                vec![("x", 120)],
                vec![("y", 0), ("y", 60)]
            ]
        );
    }
}
