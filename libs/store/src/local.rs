use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, TableDefinition};

use crate::{
    AggregateQuery, AggregateStore, Checkpoint, CheckpointKey, LedgerRow, StoreError,
    WindowAggregate,
};

/// (pipeline, aggregation, group, window start).
type WindowKey<'a> = (&'a str, &'a str, &'a str, i64);
/// (window end, definition version, count, other values as a JSON object).
type WindowRow<'a> = (i64, i64, i64, &'a str);
const WINDOWS: TableDefinition<WindowKey, WindowRow> = TableDefinition::new("window_aggregates");
/// The final windows of `WINDOWS` (a table of its own, so that files written before windows
/// carried the flag open unchanged).
const FINAL: TableDefinition<WindowKey, ()> = TableDefinition::new("final_windows");
/// (consumer group, topic, partition) -> (next offset, state).
const CHECKPOINTS: TableDefinition<(&str, &str, i32), (i64, &[u8])> =
    TableDefinition::new("aggregator_checkpoints");
/// (pipeline, hour, source, since, aggregation) -> counts as a JSON object.
const LEDGER: TableDefinition<(&str, i64, &str, i64, &str), &str> =
    TableDefinition::new("audit_ledger");

/// A store in one file on the local disk (redb: copy-on-write B-trees, every commit durable
/// before it returns). For a single-node deployment and for tests that kill the aggregator
/// process: unlike the embedded store, what it holds survives the process. One process opens
/// the file at a time.
pub struct LocalStore {
    db: Arc<Database>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// The windows of a key range whose start `keep` takes, at most `limit`.
fn read_windows(
    db: &Database,
    range: std::ops::Range<WindowKey<'_>>,
    keep: impl Fn(i64) -> bool,
    limit: usize,
) -> Result<Vec<WindowAggregate>, StoreError> {
    let txn = db.begin_read().map_err(unavailable)?;
    let table = txn.open_table(WINDOWS).map_err(unavailable)?;
    let finals = txn.open_table(FINAL).map_err(unavailable)?;
    let mut out = Vec::new();
    for entry in table.range(range).map_err(unavailable)? {
        if out.len() >= limit {
            break;
        }
        let (k, v) = entry.map_err(unavailable)?;
        let (pipeline, aggregation, group_key, window_start) = k.value();
        if !keep(window_start) {
            continue;
        }
        let (window_end, definition_version, count, values) = v.value();
        let is_final = finals
            .get((pipeline, aggregation, group_key, window_start))
            .map_err(unavailable)?
            .is_some();
        out.push(WindowAggregate {
            pipeline: pipeline.to_owned(),
            aggregation: aggregation.to_owned(),
            group_key: group_key.to_owned(),
            window_start,
            window_end,
            definition_version,
            count,
            values: serde_json::from_str(values).unwrap_or_default(),
            is_final,
        });
    }
    Ok(out)
}

impl LocalStore {
    pub fn open(path: &Path) -> Result<LocalStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Rejected(format!("creating {}: {e}", dir.display())))?;
        }
        let db = Database::create(path)
            .map_err(|e| StoreError::Rejected(format!("opening {}: {e}", path.display())))?;
        // Create both tables up front, so that reads of an empty store find them.
        let txn = db.begin_write().map_err(unavailable)?;
        txn.open_table(WINDOWS).map_err(unavailable)?;
        txn.open_table(FINAL).map_err(unavailable)?;
        txn.open_table(CHECKPOINTS).map_err(unavailable)?;
        txn.open_table(LEDGER).map_err(unavailable)?;
        txn.commit().map_err(unavailable)?;
        Ok(LocalStore { db: Arc::new(db) })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(unavailable)?
    }
}

#[async_trait]
impl AggregateStore for LocalStore {
    async fn upsert(&self, rows: &[WindowAggregate]) -> Result<(), StoreError> {
        let rows = rows.to_vec();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut table = txn.open_table(WINDOWS).map_err(unavailable)?;
                let mut finals = txn.open_table(FINAL).map_err(unavailable)?;
                for r in &rows {
                    let values = serde_json::Value::Object(r.values.clone()).to_string();
                    let key = (
                        r.pipeline.as_str(),
                        r.aggregation.as_str(),
                        r.group_key.as_str(),
                        r.window_start,
                    );
                    table
                        .insert(
                            key,
                            (r.window_end, r.definition_version, r.count, values.as_str()),
                        )
                        .map_err(unavailable)?;
                    if r.is_final {
                        finals.insert(key, ()).map_err(unavailable)?;
                    } else {
                        finals.remove(key).map_err(unavailable)?;
                    }
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn delete(&self, rows: &[WindowAggregate]) -> Result<(), StoreError> {
        let rows = rows.to_vec();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut table = txn.open_table(WINDOWS).map_err(unavailable)?;
                let mut finals = txn.open_table(FINAL).map_err(unavailable)?;
                for r in &rows {
                    let key = (
                        r.pipeline.as_str(),
                        r.aggregation.as_str(),
                        r.group_key.as_str(),
                        r.window_start,
                    );
                    table.remove(key).map_err(unavailable)?;
                    finals.remove(key).map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn query(&self, q: &AggregateQuery) -> Result<Vec<WindowAggregate>, StoreError> {
        if q.from >= q.to || q.limit == 0 {
            return Ok(Vec::new());
        }
        let q = q.clone();
        self.blocking(move |db| {
            let lo = (
                q.pipeline.as_str(),
                q.aggregation.as_str(),
                q.group_key.as_str(),
                q.from,
            );
            let hi = (
                q.pipeline.as_str(),
                q.aggregation.as_str(),
                q.group_key.as_str(),
                q.to,
            );
            read_windows(db, lo..hi, |_| true, q.limit)
        })
        .await
    }

    async fn windows_between(
        &self,
        pipeline: &str,
        aggregation: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<WindowAggregate>, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        let (pipeline, aggregation) = (pipeline.to_owned(), aggregation.to_owned());
        self.blocking(move |db| {
            // Every group of the aggregation: the keys from its first group on, up to the next
            // aggregation name (the same name with a NUL added sorts right after every group).
            let next = format!("{aggregation}\0");
            let lo = (pipeline.as_str(), aggregation.as_str(), "", i64::MIN);
            let hi = (pipeline.as_str(), next.as_str(), "", i64::MIN);
            read_windows(db, lo..hi, |start| (from..to).contains(&start), usize::MAX)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn save_checkpoints(&self, checkpoints: &[Checkpoint]) -> Result<(), StoreError> {
        let checkpoints = checkpoints.to_vec();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut table = txn.open_table(CHECKPOINTS).map_err(unavailable)?;
                for c in &checkpoints {
                    table
                        .insert(
                            (c.key.group.as_str(), c.key.topic.as_str(), c.key.partition),
                            (c.next_offset, c.state.as_slice()),
                        )
                        .map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn load_checkpoint(&self, key: &CheckpointKey) -> Result<Option<Checkpoint>, StoreError> {
        let key = key.clone();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(CHECKPOINTS).map_err(unavailable)?;
            let found = table
                .get((key.group.as_str(), key.topic.as_str(), key.partition))
                .map_err(unavailable)?;
            Ok(found.map(|v| {
                let (next_offset, state) = v.value();
                Checkpoint {
                    key: key.clone(),
                    next_offset,
                    state: state.to_vec(),
                }
            }))
        })
        .await
    }

    async fn save_ledger(&self, rows: &[LedgerRow]) -> Result<(), StoreError> {
        let rows = rows.to_vec();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut table = txn.open_table(LEDGER).map_err(unavailable)?;
                for r in &rows {
                    let counts = serde_json::to_string(&r.counts).map_err(unavailable)?;
                    let key = (
                        r.pipeline.as_str(),
                        r.hour,
                        r.source.as_str(),
                        r.since,
                        r.aggregation.as_str(),
                    );
                    table.insert(key, counts.as_str()).map_err(unavailable)?;
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn load_ledger(
        &self,
        pipeline: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<LedgerRow>, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        let pipeline = pipeline.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(LEDGER).map_err(unavailable)?;
            let lo = (pipeline.as_str(), from, "", i64::MIN, "");
            let hi = (pipeline.as_str(), to, "", i64::MIN, "");
            let mut out = Vec::new();
            for entry in table.range(lo..hi).map_err(unavailable)? {
                let (k, v) = entry.map_err(unavailable)?;
                let (_, hour, source, since, aggregation) = k.value();
                out.push(LedgerRow {
                    pipeline: pipeline.clone(),
                    hour,
                    source: source.to_owned(),
                    since,
                    aggregation: aggregation.to_owned(),
                    counts: serde_json::from_str(v.value()).map_err(unavailable)?,
                });
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_conformance_suite_and_keeps_data_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        {
            let store = LocalStore::open(&path).unwrap();
            crate::conformance::run(&store, "local").await;
        }
        // What a killed process wrote is there for the next one.
        let store = LocalStore::open(&path).unwrap();
        crate::conformance::run_after_reopen(&store, "local").await;
    }
}
