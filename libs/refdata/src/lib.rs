//! instream-refdata: the reference data the enricher looks events up in.
//!
//! [`RefStore::lookup_many`] answers a whole batch of lookups at once — one pipelined round
//! trip to Redis, never one per event. Two implementations, chosen by `refdata.backend`:
//! [`RedisRefStore`] and [`MemoryRefStore`] (standalone mode, loaded from a JSON-lines file).

mod cache;
mod link;
pub mod load;
mod memory;
mod redis_store;
pub mod versions;

use std::sync::Arc;

use async_trait::async_trait;
use instream_core::config::{RefDataBackend, RefDataConfig};
use instream_pipeline::RecordShape;
use serde_json::{Map, Value};

pub use cache::{CacheSettings, CachedRefStore};
pub use memory::MemoryRefStore;
pub use redis_store::RedisRefStore;

/// A reference record: field name -> value.
pub type RefRecord = Map<String, Value>;

/// The answer to one lookup.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    Record(RefRecord),
    Missing,
    /// The key holds something the rule cannot read (not a hash, not a JSON object): a data
    /// problem of that one key, for the dead-letter topic, not a reason to stop.
    Malformed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum RefDataError {
    /// The store could not be reached or answered too late: retry, never skip the event.
    #[error("reference data unavailable: {0}")]
    Unavailable(String),
    #[error("reference data file {path}: {reason}")]
    Seed { path: String, reason: String },
    /// A setting that cannot work (an unreadable CA file): not retried.
    #[error("reference data settings: {0}")]
    Settings(String),
}

#[async_trait]
pub trait RefStore: Send + Sync {
    /// One answer per lookup, in order. `Err` only when the store itself failed (retry).
    async fn lookup_many(
        &self,
        lookups: &[(String, RecordShape)],
    ) -> Result<Vec<Found>, RefDataError>;
    /// Succeeds when the store is reachable (readiness).
    async fn ping(&self) -> Result<(), RefDataError>;
    /// Follows the version pointers of these (pipeline, rule) pairs from now on (read at once,
    /// then kept current by announcements and a periodic check).
    async fn track(&self, _rules: &[(String, String)]) -> Result<(), RefDataError> {
        Ok(())
    }
    /// The current version of a rule's data loaded by `instream refdata load`; `None` when
    /// the rule's data is not versioned (looked up under its plain key).
    fn version(&self, _pipeline: &str, _rule: &str) -> Option<u64> {
        None
    }
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
