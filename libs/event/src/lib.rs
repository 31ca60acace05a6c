//! instream-event: the event envelope every topic carries, its JSON codec, event ids and
//! event-time parsing.
//!
//! Upstream: ingest and db-source build envelopes from producers' JSON. Downstream: every
//! stage decodes them. The envelope keeps the producer's payload as the raw bytes it arrived
//! in (`RawValue`), so stages that do not change it never re-serialise it, and the archive
//! keeps it as received.

mod codec;
mod field;
mod id;
mod key;
mod time;
mod view;

pub use codec::{decode, encode, encode_into, DecodeError};
pub use field::{FieldPath, FieldPathError};
pub use id::{canonical_json, content_event_id, idempotent_event_id, scoped_id_hash};
pub use key::{canonical_number, group_key_of, group_part, key_text, normalize_group_key};
pub use time::{format_rfc3339_millis, now_millis, parse_event_time, EventTimeError};
pub use view::{pick, scalars, view, with_enrichment, Envelope, EventView, Paths, Scalar};

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// One event as it travels between stages.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Unique per event, stable across client retries: given by the producer, or derived at
    /// ingest from the request's Idempotency-Key and index, else from the content.
    pub event_id: String,
    /// The pipeline the event belongs to.
    pub pipeline: String,
    /// The partition key, taken from the pipeline's key field: one key's events stay in order.
    pub key: String,
    /// When it happened, in milliseconds since the Unix epoch (UTC).
    pub event_time: i64,
    /// When ingest accepted it, in milliseconds since the Unix epoch (UTC).
    pub ingest_time: i64,
    /// Free-form metadata (trace ids, source names).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The producer's JSON object, byte for byte.
    pub payload: Box<RawValue>,
    /// Fields added by the enricher, by output name; absent before enrichment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrichment: Option<Map<String, Value>>,
}

/// Why an event is refused; `code` is a bounded label for metrics and dead-letter headers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Rejection {
    pub code: &'static str,
    pub message: String,
}

impl Rejection {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// A check an event must pass before it is accepted (schemas, data-quality rules).
pub trait EventValidator: Send + Sync {
    fn validate(&self, payload: &Value) -> Result<(), Rejection>;
}
