//! instream-store: where windowed aggregates live.
//!
//! The aggregator writes whole-window values with [`AggregateStore::upsert`] (idempotent: the
//! same window written twice holds the last value, never a sum), and query-api reads them; the
//! aggregator's checkpoints live beside them. Three implementations behind one trait, chosen
//! by `store.backend`: [`ScyllaStore`] (ScyllaDB or Cassandra, on the `scylla` crate),
//! [`LocalStore`] (a file, for a single machine) and [`EmbeddedStore`] (in-process, for
//! standalone mode and tests). [`conformance`] is the one suite all of them pass.

pub mod conformance;
mod embedded;
mod local;
mod scylla_store;
mod tls;

use std::sync::Arc;

use async_trait::async_trait;
use instream_config::{StoreBackend, StoreConfig};
use serde::Serialize;

pub use embedded::EmbeddedStore;
pub use local::LocalStore;
pub use scylla_store::ScyllaStore;

/// The value of one window of one group of one aggregation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WindowAggregate {
    pub pipeline: String,
    pub aggregation: String,
    pub group_key: String,
    /// Inclusive start, epoch milliseconds.
    pub window_start: i64,
    /// Exclusive end, epoch milliseconds.
    pub window_end: i64,
    /// The definition version the window was computed under.
    pub definition_version: i64,
    pub count: i64,
    /// The aggregation's other functions, by output name (`sum_price`, `quantiles_price`, …).
    pub values: serde_json::Map<String, serde_json::Value>,
    /// The watermark has passed the window's end plus its allowed lateness: this value will
    /// not change again. Rows written before windows carried it read as `false`.
    #[serde(rename = "final")]
    pub is_final: bool,
}

/// Windows of one group whose start lies in `[from, to)`, oldest first, at most `limit`.
#[derive(Debug, Clone)]
pub struct AggregateQuery {
    pub pipeline: String,
    pub aggregation: String,
    pub group_key: String,
    pub from: i64,
    pub to: i64,
    pub limit: usize,
}

/// Which consumer's state of which input partition a checkpoint holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CheckpointKey {
    pub group: String,
    pub topic: String,
    pub partition: i32,
}

/// The aggregator's state of one input partition (open windows and what it needs to drop
/// repeats), saved together with the offset it reflects so that both are restored together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub key: CheckpointKey,
    /// The first offset the state does not reflect: consumption resumes here.
    pub next_offset: i64,
    /// The state, encoded by its owner.
    pub state: Vec<u8>,
}

/// One line of the aggregator's audit ledger (docs/guarantees.md, "Auditing what happened"):
/// what one input partition made of the records of one hour of ingest time, counted with the
/// state it checkpoints and written whole (a row written again replaces, never adds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct LedgerRow {
    pub pipeline: String,
    /// The hour's start, epoch milliseconds.
    pub hour: i64,
    /// `<topic>:<partition>`: the input partition counting.
    pub source: String,
    /// The offset from which this row counts: the same hour counted again after its line was
    /// let go (a record far behind the others) is another row, added to this one.
    pub since: i64,
    /// The aggregation; empty for the partition's own line (`records`: every record
    /// applied).
    pub aggregation: String,
    /// Records by outcome (`counted`, `too_late`, `repeated_event`, …).
    pub counts: std::collections::BTreeMap<String, i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or timed out: retry.
    #[error("aggregate store unavailable: {0}")]
    Unavailable(String),
    /// The store refused the request (schema, permissions): retrying will not help.
    #[error("aggregate store refused the request: {0}")]
    Rejected(String),
}

#[async_trait]
pub trait AggregateStore: Send + Sync {
    /// Writes whole-window values; a window written again is replaced.
    async fn upsert(&self, rows: &[WindowAggregate]) -> Result<(), StoreError>;
    /// Removes windows (by pipeline, aggregation, group and start): a session window that
    /// merged into another one under a new start.
    async fn delete(&self, rows: &[WindowAggregate]) -> Result<(), StoreError>;
    async fn query(&self, query: &AggregateQuery) -> Result<Vec<WindowAggregate>, StoreError>;
    /// Every window of every group of one aggregation whose start lies in `[from, to)`
    /// (`archive recompute`: what a rewrite replaces). On Scylla a scan of the table: for
    /// batch work, not for requests.
    async fn windows_between(
        &self,
        pipeline: &str,
        aggregation: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<WindowAggregate>, StoreError>;
    /// Succeeds when the store is reachable (readiness).
    async fn ping(&self) -> Result<(), StoreError>;
    /// Replaces the checkpoints of the given partitions. Each one is written whole or not at
    /// all.
    async fn save_checkpoints(&self, checkpoints: &[Checkpoint]) -> Result<(), StoreError>;
    /// The last checkpoint saved for a partition, if any.
    async fn load_checkpoint(&self, key: &CheckpointKey) -> Result<Option<Checkpoint>, StoreError>;
    /// Writes ledger rows; a row (pipeline, hour, source, since, aggregation) written again is
    /// replaced.
    async fn save_ledger(&self, rows: &[LedgerRow]) -> Result<(), StoreError>;
    /// The ledger rows of `pipeline` whose hour starts in `[from, to)`.
    async fn load_ledger(
        &self,
        pipeline: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<LedgerRow>, StoreError>;
}

/// The hours (epoch milliseconds of their start) in `[from, to)`.
pub fn hours_in(from: i64, to: i64) -> impl Iterator<Item = i64> {
    const HOUR: i64 = 3_600_000;
    let first = from.div_euclid(HOUR) * HOUR + if from.rem_euclid(HOUR) == 0 { 0 } else { HOUR };
    (0..)
        .map(move |i| first + i * HOUR)
        .take_while(move |h| *h < to)
}

/// Builds the store `config` names. Scylla: connects and applies the schema.
pub async fn build(config: &StoreConfig) -> Result<Arc<dyn AggregateStore>, StoreError> {
    match config.backend {
        StoreBackend::Embedded => Ok(Arc::new(EmbeddedStore::default())),
        StoreBackend::Local => {
            let path = config.path.as_deref().ok_or_else(|| {
                StoreError::Rejected("store.path is required for the local backend".into())
            })?;
            Ok(Arc::new(LocalStore::open(path)?))
        }
        StoreBackend::Scylla => Ok(Arc::new(ScyllaStore::connect(config).await?)),
    }
}
