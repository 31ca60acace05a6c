//! instream-quality: a pipeline's data-quality rules at work — compiled once per definition
//! version ([`RuleSet`]), judged on each event after enrichment ([`RuleSet::evaluate`]),
//! recorded one record per violation on `<pipeline>.quality` ([`ViolationRecord`], with
//! bounded samples), and counted back into a report ([`Report`]).
//!
//! The rules themselves (their model and validation) live in `instream_pipeline::quality`,
//! with the rest of the definition.

mod record;
mod report;
mod rules;

pub use record::{bounded_value, Sampler, ViolationRecord, MAX_SAMPLE_BYTES};
pub use report::{Report, ReportBuilder, ReportRow};
pub use rules::{EventFacts, RuleSet, RuleSetCache, Violation};

/// The header listing the rules a tagged event broke, comma-separated.
pub const TAG_HEADER: &str = "instream.quality";

/// The member of an event's `enrichment` listing the rules it broke (tag action).
pub const TAG_FIELD: &str = "_quality";

#[derive(Debug, thiserror::Error)]
pub enum QualityError {
    #[error("pipeline `{pipeline}`, quality rule `{rule}`: {reason}")]
    InvalidRule {
        pipeline: String,
        rule: String,
        reason: String,
    },
}
