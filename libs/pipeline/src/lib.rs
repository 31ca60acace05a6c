//! instream-pipeline: what a pipeline is — its key and time fields, enrichment rules,
//! aggregations and archive policy — and the one validation every stage and the CLI share.
//!
//! Definitions come from a [`DefinitionSource`]: a file ([`FileSource`]) or ZooKeeper
//! (`instream-coord`). Every stage reads the same [`Catalog`] through a `watch` channel, so a
//! stored change reaches running services without a restart.

mod envelope;
mod model;
pub mod quality;
mod source;
mod template;
mod validate;

pub use envelope::{envelope, IdSource, SchemaCache};
pub use model::*;
pub use source::{parse_definition, parse_document, DefinitionError, DefinitionSource, FileSource};
pub use template::{KeyTemplate, TemplateError};
pub use validate::RAW_COLUMNS;

/// Topic names of a pipeline. One place, so no stage spells them differently.
pub mod topics {
    /// Accepted events as ingest produced them, keyed by the partition key.
    pub fn raw(pipeline: &str) -> String {
        format!("{pipeline}.raw")
    }

    /// Events after enrichment.
    pub fn enriched(pipeline: &str) -> String {
        format!("{pipeline}.enriched")
    }

    /// Records no stage could process, with the reason in headers.
    pub fn dead_letter(pipeline: &str) -> String {
        format!("{pipeline}.dlq")
    }

    /// One record per data-quality violation, for `instream quality report`.
    pub fn quality(pipeline: &str) -> String {
        format!("{pipeline}.quality")
    }

    /// The pipeline a stage topic belongs to: `orders.raw` -> `orders`.
    pub fn pipeline_of(topic: &str) -> &str {
        topic.rsplit_once('.').map_or(topic, |(p, _)| p)
    }
}
