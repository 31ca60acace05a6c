use std::collections::BTreeMap;
use std::sync::RwLock;

use async_trait::async_trait;

use crate::{
    AggregateQuery, AggregateStore, Checkpoint, CheckpointKey, LedgerRow, StoreError,
    WindowAggregate,
};

/// (pipeline, hour, source, since, aggregation).
type LedgerKey = (String, i64, String, i64, String);

type Key = (String, String, String, i64);

/// An in-process store: a sorted map. For standalone mode and tests; it is not shared between
/// processes and keeps nothing across a restart.
#[derive(Default)]
pub struct EmbeddedStore {
    rows: RwLock<BTreeMap<Key, WindowAggregate>>,
    checkpoints: RwLock<BTreeMap<CheckpointKey, Checkpoint>>,
    ledger: RwLock<BTreeMap<LedgerKey, LedgerRow>>,
}

impl EmbeddedStore {
    /// Every stored window (tests, the demo's summary).
    pub fn all(&self) -> Vec<WindowAggregate> {
        self.rows
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Visits every stored window without copying the store (the demo's live view).
    pub fn for_each(&self, mut visit: impl FnMut(&WindowAggregate)) {
        for row in self.rows.read().unwrap_or_else(|p| p.into_inner()).values() {
            visit(row);
        }
    }
}

#[async_trait]
impl AggregateStore for EmbeddedStore {
    async fn upsert(&self, rows: &[WindowAggregate]) -> Result<(), StoreError> {
        let mut map = self.rows.write().unwrap_or_else(|p| p.into_inner());
        for row in rows {
            let key = (
                row.pipeline.clone(),
                row.aggregation.clone(),
                row.group_key.clone(),
                row.window_start,
            );
            map.insert(key, row.clone());
        }
        Ok(())
    }

    async fn delete(&self, rows: &[WindowAggregate]) -> Result<(), StoreError> {
        let mut map = self.rows.write().unwrap_or_else(|p| p.into_inner());
        for row in rows {
            map.remove(&(
                row.pipeline.clone(),
                row.aggregation.clone(),
                row.group_key.clone(),
                row.window_start,
            ));
        }
        Ok(())
    }

    async fn query(&self, q: &AggregateQuery) -> Result<Vec<WindowAggregate>, StoreError> {
        let map = self.rows.read().unwrap_or_else(|p| p.into_inner());
        let lo = (
            q.pipeline.clone(),
            q.aggregation.clone(),
            q.group_key.clone(),
            q.from,
        );
        let hi = (
            q.pipeline.clone(),
            q.aggregation.clone(),
            q.group_key.clone(),
            q.to,
        );
        if q.from >= q.to {
            return Ok(Vec::new());
        }
        Ok(map
            .range(lo..hi)
            .take(q.limit)
            .map(|(_, v)| v.clone())
            .collect())
    }

    async fn windows_between(
        &self,
        pipeline: &str,
        aggregation: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<WindowAggregate>, StoreError> {
        let map = self.rows.read().unwrap_or_else(|p| p.into_inner());
        let lo = (
            pipeline.to_owned(),
            aggregation.to_owned(),
            String::new(),
            i64::MIN,
        );
        Ok(map
            .range(lo..)
            .take_while(|((p, a, ..), _)| p == pipeline && a == aggregation)
            .filter(|((.., start), _)| (from..to).contains(start))
            .map(|(_, v)| v.clone())
            .collect())
    }

    async fn save_checkpoints(&self, checkpoints: &[Checkpoint]) -> Result<(), StoreError> {
        let mut map = self.checkpoints.write().unwrap_or_else(|p| p.into_inner());
        for c in checkpoints {
            map.insert(c.key.clone(), c.clone());
        }
        Ok(())
    }

    async fn load_checkpoint(&self, key: &CheckpointKey) -> Result<Option<Checkpoint>, StoreError> {
        let map = self.checkpoints.read().unwrap_or_else(|p| p.into_inner());
        Ok(map.get(key).cloned())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn save_ledger(&self, rows: &[LedgerRow]) -> Result<(), StoreError> {
        let mut map = self.ledger.write().unwrap_or_else(|p| p.into_inner());
        for r in rows {
            let key = (
                r.pipeline.clone(),
                r.hour,
                r.source.clone(),
                r.since,
                r.aggregation.clone(),
            );
            map.insert(key, r.clone());
        }
        Ok(())
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
        let map = self.ledger.read().unwrap_or_else(|p| p.into_inner());
        let lo = (
            pipeline.to_owned(),
            from,
            String::new(),
            i64::MIN,
            String::new(),
        );
        let hi = (
            pipeline.to_owned(),
            to,
            String::new(),
            i64::MIN,
            String::new(),
        );
        Ok(map.range(lo..hi).map(|(_, r)| r.clone()).collect())
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn passes_the_conformance_suite() {
        crate::conformance::run(&super::EmbeddedStore::default(), "embedded").await;
    }
}
