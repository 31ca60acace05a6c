//! Data-quality rules of a pipeline: checks every event is held to after enrichment, each
//! with a name, a severity and an action. Declared in the definition, so they are versioned
//! and hot-reloaded with it; checked here (without I/O) when a definition is applied.

use std::collections::BTreeSet;
use std::time::Duration;

use instream_event::FieldPath;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{FilterOp, PipelineDefinition};

/// Most rules one pipeline may declare: each costs CPU on every event.
pub const MAX_QUALITY_RULES: usize = 64;

/// Longest freshness limit: ten years, far inside the milliseconds an i64 holds.
const MAX_FRESHNESS: Duration = Duration::from_secs(3650 * 24 * 3600);

/// Longest regex source accepted (the compiled automaton is bounded by the regex crate too).
const MAX_PATTERN_LEN: usize = 1024;

/// One rule: what is checked, how bad a violation is, and what happens to the event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualityRule {
    /// `[a-z0-9_-]`, unique in the pipeline: it names metrics, headers and report rows.
    pub name: String,
    #[serde(default)]
    pub severity: Severity,
    #[serde(default)]
    pub action: QualityAction,
    pub check: Check,
}

/// How bad a violation is: carried into records and the report, never changes the action.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    #[default]
    Warning,
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// What a violation does to the event. Every violation is also counted and recorded.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum QualityAction {
    /// The event goes on, carrying the names of the rules it broke (header
    /// `instream.quality` and `enrichment._quality`).
    #[default]
    Tag,
    /// The event goes to `<pipeline>.dlq` (code `quality`) with the rule and the value.
    DeadLetter,
    /// The event goes on untouched; the violation is only counted and recorded.
    Count,
}

impl QualityAction {
    pub fn as_str(self) -> &'static str {
        match self {
            QualityAction::Tag => "tag",
            QualityAction::DeadLetter => "dead_letter",
            QualityAction::Count => "count",
        }
    }
}

/// What a rule checks. Fields are `key`, `payload.<path>` or `enrichment.<field>`, as in
/// aggregations. A check of a field's value passes when the field is absent (that is what
/// `required` is for), except `required` itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Check {
    /// The field is present and not null.
    Required { field: FieldPath },
    /// The field's value has this JSON type (`integer`: a number without a fraction).
    Type {
        field: FieldPath,
        #[serde(rename = "type")]
        kind: ValueType,
    },
    /// A number (or a string holding one) within `min..=max` (either may be left out).
    Range {
        field: FieldPath,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<f64>,
    },
    /// A string the regular expression matches (unanchored: write `^…$` for a whole match).
    Pattern { field: FieldPath, regex: String },
    /// One of the listed values (numbers compare as numbers).
    Allowed {
        field: FieldPath,
        values: Vec<Value>,
    },
    /// `left op right` between two fields of one event, e.g. `arrival >= departure`: numbers
    /// compare as numbers, RFC 3339 times as instants, other strings as text. Passes when
    /// either field is absent.
    Compare {
        left: FieldPath,
        op: FilterOp,
        right: FieldPath,
    },
    /// The reference record looked up by the named enrichment rule exists (the lookup that
    /// enriched the event, from the same cache: no second lookup).
    Reference { enrichment: String },
    /// The event time is at most `max_age` before the time ingest accepted the event, and
    /// at most `max_ahead` after it. Judged against the ingest time, not the clock, so a
    /// replay gives the same verdicts.
    Freshness {
        #[serde(
            default,
            with = "humantime_serde::option",
            skip_serializing_if = "Option::is_none"
        )]
        max_age: Option<Duration>,
        #[serde(
            default,
            with = "humantime_serde::option",
            skip_serializing_if = "Option::is_none"
        )]
        max_ahead: Option<Duration>,
    },
}

impl Check {
    /// The event fields the check reads.
    pub fn fields(&self) -> Vec<&FieldPath> {
        match self {
            Check::Required { field }
            | Check::Type { field, .. }
            | Check::Range { field, .. }
            | Check::Pattern { field, .. }
            | Check::Allowed { field, .. } => vec![field],
            Check::Compare { left, right, .. } => vec![left, right],
            Check::Reference { .. } | Check::Freshness { .. } => Vec::new(),
        }
    }
}

/// A JSON type a `type` check asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    String,
    Number,
    Integer,
    Boolean,
    Object,
    Array,
}

impl ValueType {
    pub fn holds(self, value: &Value) -> bool {
        match self {
            ValueType::String => value.is_string(),
            ValueType::Number => value.is_number(),
            ValueType::Integer => {
                value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|x| x.fract() == 0.0)
            }
            ValueType::Boolean => value.is_boolean(),
            ValueType::Object => value.is_object(),
            ValueType::Array => value.is_array(),
        }
    }
}

/// Checks the definition's quality rules; each problem goes to `problem(field, reason)`.
pub(crate) fn validate_rules(def: &PipelineDefinition, problem: &mut dyn FnMut(String, String)) {
    if def.quality.len() > MAX_QUALITY_RULES {
        problem(
            "quality".into(),
            format!("{} rules; at most {MAX_QUALITY_RULES}", def.quality.len()),
        );
    }
    let mut names = BTreeSet::new();
    for (i, rule) in def.quality.iter().enumerate() {
        let at = |what: &str| format!("quality[{i}] `{}`{what}", rule.name);
        let name_ok = !rule.name.is_empty()
            && rule.name.len() <= 64
            && rule
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if !name_ok {
            problem(at(".name"), "must be 1-64 of [a-z0-9_-]".into());
        } else if !names.insert(rule.name.as_str()) {
            problem(at(".name"), "is used twice".into());
        }
        for field in rule.check.fields() {
            if let Err(reason) = known_field(def, field) {
                problem(at(".check"), format!("field `{field}`: {reason}"));
            }
        }
        match &rule.check {
            Check::Range { min, max, .. } => match (min, max) {
                (None, None) => problem(at(".check"), "a range needs `min` or `max`".into()),
                (Some(lo), Some(hi)) if lo > hi => {
                    problem(at(".check"), format!("min {lo} is greater than max {hi}"))
                }
                _ if min.is_some_and(|x| !x.is_finite()) || max.is_some_and(|x| !x.is_finite()) => {
                    problem(at(".check"), "min and max must be finite".into())
                }
                _ => {}
            },
            Check::Pattern { regex, .. } => {
                if regex.len() > MAX_PATTERN_LEN {
                    problem(
                        at(".check.regex"),
                        format!("longer than {MAX_PATTERN_LEN} characters"),
                    );
                } else if let Err(e) = regex::Regex::new(regex) {
                    problem(at(".check.regex"), format!("does not compile: {e}"));
                }
            }
            Check::Allowed { values, .. } if values.is_empty() => {
                problem(at(".check.values"), "lists no value".into())
            }
            Check::Reference { enrichment }
                if !def.enrichments.iter().any(|r| &r.name == enrichment) =>
            {
                problem(
                    at(".check.enrichment"),
                    format!("the pipeline has no enrichment rule `{enrichment}`"),
                )
            }
            Check::Freshness { max_age, max_ahead } => {
                if max_age.is_none() && max_ahead.is_none() {
                    problem(
                        at(".check"),
                        "freshness needs `max_age` or `max_ahead`".into(),
                    )
                }
                if max_age.iter().chain(max_ahead).any(|d| *d > MAX_FRESHNESS) {
                    problem(at(".check"), "limits must be at most 3650 days".into())
                }
            }
            _ => {}
        }
    }
}

/// Whether a rule's field can exist: `key`; `enrichment.<f>` written by an enrichment rule;
/// `payload.<path>` declared by the pipeline's schema, when it declares properties there
/// (without a schema a payload path cannot be judged and is taken as it is).
fn known_field(def: &PipelineDefinition, path: &FieldPath) -> Result<(), String> {
    let segments = path.segments();
    match segments[0].as_str() {
        "key" if segments.len() == 1 => Ok(()),
        "enrichment" if segments.len() > 1 => {
            let name = &segments[1];
            let written = def.enrichments.iter().any(|rule| {
                // A rule without `fields` copies every field of its record: any name.
                rule.fields.is_empty()
                    || rule.fields.values().any(|to| to == name)
                    || rule.defaults.contains_key(name)
            });
            if written {
                Ok(())
            } else {
                Err(format!("no enrichment rule writes `{name}`"))
            }
        }
        "payload" if segments.len() > 1 => {
            let Some(mut schema) = def.schema.as_ref() else {
                return Ok(());
            };
            for segment in &segments[1..] {
                let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
                    return Ok(());
                };
                match properties.get(segment) {
                    Some(next) => schema = next,
                    None => {
                        return Err(format!(
                            "the pipeline's schema declares no property `{segment}` there"
                        ))
                    }
                }
            }
            Ok(())
        }
        _ => Err("must be `key`, `payload.<field>` or `enrichment.<field>`".into()),
    }
}
