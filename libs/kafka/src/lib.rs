//! instream-kafka: Kafka clients with instream's guarantees built in.
//!
//! - [`client`]: producers with `acks=all` and idempotence; consumers with manual commits only,
//!   `read_committed`, and a context that logs rebalances and exports lag and assignment.
//! - [`OffsetTracker`]: an offset is committed only when that record and every record before
//!   it in its partition are durably handled, whatever order the work finishes in.
//! - [`DeadLetters`]: publishing to `<pipeline>.dlq` with the reason and origin in headers.
//! - [`admin`]: topic creation with explicit configs.
//! - [`EmbeddedBroker`]: librdkafka's in-process Kafka-protocol broker for standalone mode and
//!   tests (real wire protocol over loopback TCP; keeps nothing across a restart).

pub mod admin;
pub mod client;
mod context;
mod continuity;
mod dead_letter;
mod embedded;
mod error;
mod input;
pub mod ops;
mod tracker;
pub mod transactions;

pub use client::{
    consumer, gapless_producer, producer, BatchOutputs, Consumer, Delivery, Outgoing, Producer,
    Record,
};
pub use context::InstreamContext;
pub use continuity::{report_lost, Continuity, Lost};
pub use dead_letter::{DeadLetter, DeadLetterCode, DeadLetters, Origin};
pub use embedded::EmbeddedBroker;
pub use error::{is_refusal, KafkaError};
pub use input::Input;
pub use tracker::OffsetTracker;
pub use transactions::Transactions;

/// Header names instream sets on records.
pub mod headers {
    pub const DLQ_REASON: &str = "instream.dlq.reason";
    pub const DLQ_CODE: &str = "instream.dlq.code";
    pub const DLQ_SERVICE: &str = "instream.dlq.service";
    /// On a dead letter whose payload was cut short to fit: the payload's original length.
    pub const DLQ_CUT_FROM: &str = "instream.dlq.cut_from";
    pub const ORIGIN_TOPIC: &str = "instream.origin.topic";
    pub const ORIGIN_PARTITION: &str = "instream.origin.partition";
    pub const ORIGIN_OFFSET: &str = "instream.origin.offset";
    /// On a record written back from a dead-letter topic: `<dlq topic>:<partition>:<offset>`.
    pub const REDRIVEN_FROM: &str = "instream.redriven.from";
    /// On a record re-produced from the archive (`instream archive replay`):
    /// `<raw topic>:<partition>:<offset>` it was archived from.
    pub const REPLAYED_FROM: &str = "instream.replayed.from";
    /// On a final result of an `emit = "final"` aggregation: `<input topic>:<partition>`, the
    /// aggregator partition that owns its window (a restore reads its own back).
    pub const RESULT_SOURCE: &str = "instream.result.source";
}
