//! instream-pipeline: what a pipeline is — its key and time fields, enrichment rules,
//! aggregations and archive policy — and the one validation every stage and the CLI share.
//!
//! Definitions come from a [`DefinitionSource`]: a file ([`FileSource`]) or ZooKeeper
//! (`instream-coord`). Every stage reads the same [`Catalog`] through a `watch` channel, so a
//! stored change reaches running services without a restart.

mod envelope;
mod model;
mod outputs;
pub mod quality;
mod source;
mod template;
mod validate;

pub use envelope::{envelope, IdSource, SchemaCache, PRODUCER_HEADER};
pub use model::*;
pub use outputs::{Condition, NotifyOn, Output, WebhookOutput};
pub use source::{parse_definition, parse_document, DefinitionError, DefinitionSource, FileSource};
pub use template::{KeyTemplate, TemplateError};
pub use validate::{valid_name, RAW_COLUMNS};

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

    /// The internal topic of an aggregation whose group-by is not led by the key: the
    /// aggregator writes its events there keyed by the group, and reads them back.
    pub fn repartition(pipeline: &str, aggregation: &str) -> String {
        format!("{pipeline}.by-{aggregation}")
    }

    /// An aggregation's results, for consumers outside instream (a `kafka` output).
    pub fn results(pipeline: &str, aggregation: &str) -> String {
        format!("{pipeline}.results.{aggregation}")
    }

    /// The aggregation a repartition topic belongs to: `orders.by-region` -> `region`.
    pub fn repartitioned_aggregation(topic: &str) -> Option<&str> {
        topic.rsplit_once('.')?.1.strip_prefix("by-")
    }

    /// Every topic of a pipeline: raw, enriched, dead letters, quality records (always, so a
    /// hot reload adding the first rule meets no missing topic), the repartition topic of
    /// each aggregation not grouped by the key, and the results topic of each Kafka output.
    pub fn of_pipeline(def: &crate::PipelineDefinition) -> Vec<String> {
        [
            raw(&def.name),
            enriched(&def.name),
            dead_letter(&def.name),
            quality(&def.name),
        ]
        .into_iter()
        .chain(
            def.aggregations
                .iter()
                .filter(|a| a.repartitioned())
                .map(|a| repartition(&def.name, &a.name)),
        )
        .chain(def.outputs.iter().filter_map(|o| match o {
            crate::Output::Kafka { aggregation } => Some(results(&def.name, aggregation)),
            crate::Output::Webhook(_) => None,
        }))
        .collect()
    }

    /// The pipeline a stage topic belongs to: `orders.raw` -> `orders`.
    pub fn pipeline_of(topic: &str) -> &str {
        topic.rsplit_once('.').map_or(topic, |(p, _)| p)
    }
}
