use std::collections::HashMap;
use std::path::Path;
use std::sync::RwLock;

use async_trait::async_trait;
use instream_pipeline::RecordShape;
use serde::Deserialize;

use crate::{Found, RefDataError, RefRecord, RefStore};

/// Reference data in a map, for standalone mode.
#[derive(Default)]
pub struct MemoryRefStore {
    records: RwLock<HashMap<String, RefRecord>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedLine {
    key: String,
    fields: RefRecord,
}

impl MemoryRefStore {
    /// Loads JSON lines `{"key": "customer:1", "fields": {"tier": "gold"}}`.
    pub fn from_file(path: &Path) -> Result<Self, RefDataError> {
        let seed_err = |reason: String| RefDataError::Seed {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| seed_err(e.to_string()))?;
        let store = MemoryRefStore::default();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let parsed: SeedLine =
                serde_json::from_str(line).map_err(|e| seed_err(format!("line {}: {e}", n + 1)))?;
            store.insert(parsed.key, parsed.fields);
        }
        Ok(store)
    }

    pub fn insert(&self, key: String, record: RefRecord) {
        self.records
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, record);
    }
}

#[async_trait]
impl RefStore for MemoryRefStore {
    async fn lookup_many(
        &self,
        lookups: &[(String, RecordShape)],
    ) -> Result<Vec<Found>, RefDataError> {
        let records = self.records.read().unwrap_or_else(|p| p.into_inner());
        Ok(lookups
            .iter()
            .map(|(key, _)| match records.get(key) {
                Some(r) => Found::Record(r.clone()),
                None => Found::Missing,
            })
            .collect())
    }

    async fn ping(&self) -> Result<(), RefDataError> {
        Ok(())
    }
}
