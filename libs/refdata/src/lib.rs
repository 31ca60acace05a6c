//! instream-refdata: the reference data the enricher looks events up in.
//!
//! [`RefStore::lookup_many`] answers a whole batch of lookups at once — one pipelined round
//! trip to Redis, never one per event. Two implementations, chosen by `refdata.backend`:
//! [`RedisRefStore`] and [`MemoryRefStore`] (standalone mode, loaded from a JSON-lines file).

mod memory;
mod redis_store;

use std::sync::Arc;

use async_trait::async_trait;
use instream_core::config::{RefDataBackend, RefDataConfig};
use instream_pipeline::RecordShape;
use serde_json::{Map, Value};

pub use memory::MemoryRefStore;
pub use redis_store::RedisRefStore;

/// A reference record: field name -> value.
pub type RefRecord = Map<String, Value>;

#[derive(Debug, thiserror::Error)]
pub enum RefDataError {
    /// The store could not be reached or answered too late: retry, never skip the event.
    #[error("reference data unavailable: {0}")]
    Unavailable(String),
    /// A stored record is not in the shape its rule expects.
    #[error("reference record `{key}` is malformed: {reason}")]
    Malformed { key: String, reason: String },
    #[error("reference data file {path}: {reason}")]
    Seed { path: String, reason: String },
}

#[async_trait]
pub trait RefStore: Send + Sync {
    /// One answer per lookup, in order; `None` where the key does not exist.
    async fn lookup_many(
        &self,
        lookups: &[(String, RecordShape)],
    ) -> Result<Vec<Option<RefRecord>>, RefDataError>;
    /// Succeeds when the store is reachable (readiness).
    async fn ping(&self) -> Result<(), RefDataError>;
}

/// Builds the store `config` names; Redis connects lazily and reconnects by itself.
pub async fn build(config: &RefDataConfig) -> Result<Arc<dyn RefStore>, RefDataError> {
    match config.backend {
        RefDataBackend::Redis => Ok(Arc::new(RedisRefStore::connect(config).await?)),
        RefDataBackend::Memory => {
            let store = match &config.seed_file {
                Some(path) => MemoryRefStore::from_file(path)?,
                None => MemoryRefStore::default(),
            };
            Ok(Arc::new(store))
        }
    }
}
