//! A pipeline's quality rules compiled for evaluation (regexes built, paths split, reference
//! rules resolved to enrichment indexes), and their evaluation on one event.

use std::cmp::Ordering;
use std::sync::Arc;

use instream_event::FieldPath;
use instream_pipeline::quality::{Check, QualityAction, QualityRule, Severity, ValueType};
use instream_pipeline::{FilterOp, PipelineDefinition};
use serde_json::Value;

use crate::QualityError;

/// What a rule reads of an event.
#[derive(Debug, Clone)]
enum Path {
    Key,
    Payload(Vec<String>),
    Enrichment(Vec<String>),
}

impl Path {
    fn new(path: &FieldPath) -> Path {
        let segments = path.segments();
        match segments[0].as_str() {
            "key" => Path::Key,
            "enrichment" => Path::Enrichment(segments[1..].to_vec()),
            _ => Path::Payload(segments[1..].to_vec()),
        }
    }

    fn get<'v>(&self, event: &'v EventFacts<'v>) -> Option<Lookup<'v>> {
        let (root, segments) = match self {
            Path::Key => return Some(Lookup::Key(event.key)),
            Path::Payload(s) => (event.payload?, s),
            Path::Enrichment(s) => (event.enrichment?, s),
        };
        segments
            .iter()
            .try_fold(root, |v, s| v.as_object()?.get(s))
            .map(Lookup::Value)
    }

    /// The value at the path, a null counting as absent: checks of a value leave a missing
    /// or null field to `required`.
    fn value<'v>(&self, event: &'v EventFacts<'v>) -> Option<Lookup<'v>> {
        self.get(event).filter(|v| !v.is_null())
    }
}

/// A value found at a path: the key is a string outside any document.
#[derive(Clone, Copy)]
enum Lookup<'v> {
    Key(&'v str),
    Value(&'v Value),
}

impl<'v> Lookup<'v> {
    fn to_value(self) -> Value {
        match self {
            Lookup::Key(k) => Value::String(k.to_owned()),
            Lookup::Value(v) => v.clone(),
        }
    }

    fn as_str(self) -> Option<&'v str> {
        match self {
            Lookup::Key(k) => Some(k),
            Lookup::Value(v) => v.as_str(),
        }
    }

    fn is_null(self) -> bool {
        matches!(self, Lookup::Value(Value::Null))
    }

    fn number(self) -> Option<f64> {
        let x = match self {
            Lookup::Key(k) => k.trim().parse().ok(),
            Lookup::Value(Value::Number(n)) => n.as_f64(),
            Lookup::Value(Value::String(s)) => s.trim().parse().ok(),
            Lookup::Value(_) => None,
        }?;
        x.is_finite().then_some(x)
    }
}

#[derive(Debug)]
enum Test {
    Required(Path),
    Type(Path, ValueType),
    Range(Path, Option<f64>, Option<f64>),
    Pattern(Path, regex::Regex),
    Allowed(Path, AllowedValues),
    Compare(Path, FilterOp, Path),
    /// Index of the enrichment rule whose lookup must have found a record.
    Reference(usize),
    Freshness {
        max_age: Option<i64>,
        max_ahead: Option<i64>,
    },
}

/// An `allowed` list sorted for lookup once, not compared value by value per event.
#[derive(Debug, Default)]
struct AllowedValues {
    /// Listed strings (a numeric string too matches only as that text).
    texts: std::collections::HashSet<String>,
    /// Listed numbers, as bit patterns of their f64 value (0.0 and -0.0 both as 0.0).
    numbers: std::collections::HashSet<u64>,
    /// Anything else listed (booleans, null, objects, arrays): compared as JSON.
    others: Vec<Value>,
}

impl AllowedValues {
    fn new(values: &[Value]) -> Self {
        let mut set = AllowedValues::default();
        for v in values {
            match v {
                Value::String(s) => {
                    set.texts.insert(s.clone());
                }
                Value::Number(n) => match n.as_f64() {
                    Some(x) => {
                        set.numbers.insert(number_bits(x));
                    }
                    None => set.others.push(v.clone()),
                },
                other => set.others.push(other.clone()),
            }
        }
        set
    }

    fn contains(&self, v: Lookup<'_>) -> bool {
        match v {
            Lookup::Key(k) => self.texts.contains(k),
            Lookup::Value(Value::String(s)) => self.texts.contains(s.as_str()),
            Lookup::Value(Value::Number(n)) => n
                .as_f64()
                .is_some_and(|x| self.numbers.contains(&number_bits(x))),
            Lookup::Value(other) => self.others.contains(other),
        }
    }
}

fn number_bits(x: f64) -> u64 {
    if x == 0.0 {
        0.0f64.to_bits()
    } else {
        x.to_bits()
    }
}

#[derive(Debug)]
struct Compiled {
    test: Test,
    /// The rule's name, severity and action, as declared.
    rule: QualityRule,
}

/// What the rules of one event are judged on.
pub struct EventFacts<'a> {
    pub key: &'a str,
    /// The parsed payload, when [`RuleSet::needs_payload`] (else `None`).
    pub payload: Option<&'a Value>,
    /// The event's `enrichment` object, when [`RuleSet::needs_enrichment`].
    pub enrichment: Option<&'a Value>,
    pub event_time: i64,
    pub ingest_time: i64,
    /// Per enrichment rule of the pipeline: whether its lookup found a record.
    pub found: &'a [bool],
}

/// One rule an event broke.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    /// Index of the rule in [`RuleSet`] (and in the definition's `quality`).
    pub rule: usize,
    /// The offending value (`None` when the field is absent, or for reference and
    /// freshness rules: the event time is in `message`).
    pub value: Option<Value>,
    /// Why, in words: "12000 is above max 10000".
    pub message: String,
}

/// The quality rules of one version of a pipeline, ready to evaluate.
#[derive(Debug)]
pub struct RuleSet {
    pub pipeline: String,
    pub version: u64,
    rules: Vec<Compiled>,
    needs_payload: bool,
    needs_enrichment: bool,
}

impl RuleSet {
    /// Compiles `def.quality`. A definition that passed validation always compiles.
    pub fn compile(def: &PipelineDefinition) -> Result<RuleSet, QualityError> {
        let mut rules = Vec::with_capacity(def.quality.len());
        for rule in &def.quality {
            let invalid = |reason: String| QualityError::InvalidRule {
                pipeline: def.name.clone(),
                rule: rule.name.clone(),
                reason,
            };
            let test = match &rule.check {
                Check::Required { field } => Test::Required(Path::new(field)),
                Check::Type { field, kind } => Test::Type(Path::new(field), *kind),
                Check::Range { field, min, max } => Test::Range(Path::new(field), *min, *max),
                Check::Pattern { field, regex } => Test::Pattern(
                    Path::new(field),
                    regex::Regex::new(regex).map_err(|e| invalid(e.to_string()))?,
                ),
                Check::Allowed { field, values } => {
                    Test::Allowed(Path::new(field), AllowedValues::new(values))
                }
                Check::Compare { left, op, right } => {
                    Test::Compare(Path::new(left), *op, Path::new(right))
                }
                Check::Reference { enrichment } => Test::Reference(
                    def.enrichments
                        .iter()
                        .position(|r| &r.name == enrichment)
                        .ok_or_else(|| invalid(format!("no enrichment rule `{enrichment}`")))?,
                ),
                Check::Freshness { max_age, max_ahead } => Test::Freshness {
                    max_age: max_age.map(|d| d.as_millis() as i64),
                    max_ahead: max_ahead.map(|d| d.as_millis() as i64),
                },
            };
            rules.push(Compiled {
                test,
                rule: rule.clone(),
            });
        }
        let reads = |root: &str| {
            def.quality
                .iter()
                .flat_map(|r| r.check.fields())
                .any(|f| f.segments()[0] == root)
        };
        Ok(RuleSet {
            pipeline: def.name.clone(),
            version: def.version,
            needs_payload: reads("payload"),
            needs_enrichment: reads("enrichment"),
            rules,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether some rule reads the payload (else the caller need not parse it).
    pub fn needs_payload(&self) -> bool {
        self.needs_payload
    }

    /// Whether some rule reads `enrichment.*`.
    pub fn needs_enrichment(&self) -> bool {
        self.needs_enrichment
    }

    pub fn name(&self, rule: usize) -> &str {
        &self.rules[rule].rule.name
    }

    pub fn action(&self, rule: usize) -> QualityAction {
        self.rules[rule].rule.action
    }

    pub fn severity(&self, rule: usize) -> Severity {
        self.rules[rule].rule.severity
    }

    /// Appends to `out` every rule `event` breaks, in declaration order. Allocates only for
    /// violations.
    pub fn evaluate(&self, event: &EventFacts<'_>, out: &mut Vec<Violation>) {
        for (i, compiled) in self.rules.iter().enumerate() {
            if let Some((value, message)) = judge(&compiled.test, event) {
                out.push(Violation {
                    rule: i,
                    value,
                    message,
                });
            }
        }
    }
}

/// `None` when the event passes; else the offending value and why.
fn judge(test: &Test, event: &EventFacts<'_>) -> Option<(Option<Value>, String)> {
    match test {
        Test::Required(path) => match path.get(event) {
            Some(v) if !v.is_null() => None,
            Some(_) => Some((Some(Value::Null), "is null".into())),
            None => Some((None, "is missing".into())),
        },
        Test::Type(path, kind) => {
            let v = path.value(event)?;
            let holds = match v {
                Lookup::Key(_) => *kind == ValueType::String,
                Lookup::Value(v) => kind.holds(v),
            };
            (!holds).then(|| {
                (
                    Some(v.to_value()),
                    format!("is not of type {kind:?}").to_lowercase(),
                )
            })
        }
        Test::Range(path, min, max) => {
            let v = path.value(event)?;
            let Some(x) = v.number() else {
                return Some((Some(v.to_value()), "is not a number".into()));
            };
            if let Some(lo) = min.filter(|lo| x < *lo) {
                return Some((Some(v.to_value()), format!("{x} is below min {lo}")));
            }
            if let Some(hi) = max.filter(|hi| x > *hi) {
                return Some((Some(v.to_value()), format!("{x} is above max {hi}")));
            }
            None
        }
        Test::Pattern(path, regex) => {
            let v = path.value(event)?;
            match v.as_str() {
                Some(s) if regex.is_match(s) => None,
                Some(_) => Some((
                    Some(v.to_value()),
                    format!("does not match /{}/", regex.as_str()),
                )),
                None => Some((Some(v.to_value()), "is not a string".into())),
            }
        }
        Test::Allowed(path, values) => {
            let v = path.value(event)?;
            (!values.contains(v)).then(|| {
                (
                    Some(v.to_value()),
                    "is not one of the allowed values".into(),
                )
            })
        }
        Test::Compare(left, op, right) => {
            let (l, r) = (left.value(event)?, right.value(event)?);
            let holds = match compare(l, r) {
                Some(ordering) => op.holds(ordering),
                // Values that do not compare (an object and a number) break the rule, except
                // under `ne`.
                None => *op == FilterOp::Ne,
            };
            (!holds).then(|| {
                (
                    Some(serde_json::json!([l.to_value(), r.to_value()])),
                    format!(
                        "{} {} {} does not hold",
                        l.to_value(),
                        op.symbol(),
                        r.to_value()
                    ),
                )
            })
        }
        Test::Reference(index) => match event.found.get(*index) {
            Some(true) => None,
            _ => Some((None, "the reference record was not found".into())),
        },
        Test::Freshness { max_age, max_ahead } => {
            let behind = event.ingest_time.saturating_sub(event.event_time);
            if let Some(age) = max_age.filter(|age| behind > *age) {
                return Some((
                    Some(Value::from(event.event_time)),
                    format!("event time is {behind} ms before ingest (max_age {age} ms)"),
                ));
            }
            let ahead = -behind;
            if let Some(limit) = max_ahead.filter(|limit| ahead > *limit) {
                return Some((
                    Some(Value::from(event.event_time)),
                    format!("event time is {ahead} ms after ingest (max_ahead {limit} ms)"),
                ));
            }
            None
        }
    }
}

/// Numbers (or numeric strings) as numbers, two RFC 3339 times as instants, other strings as
/// text; anything else does not compare. Allocates nothing.
fn compare(l: Lookup<'_>, r: Lookup<'_>) -> Option<Ordering> {
    if let (Some(a), Some(b)) = (l.number(), r.number()) {
        return a.partial_cmp(&b);
    }
    if let (Some(a), Some(b)) = (l.as_str(), r.as_str()) {
        let time = |s: &str| {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
        };
        return match (time(a), time(b)) {
            (Some(x), Some(y)) => Some(x.cmp(&y)),
            _ => Some(a.cmp(b)),
        };
    }
    match (l, r) {
        (Lookup::Value(a), Lookup::Value(b)) if a == b => Some(Ordering::Equal),
        _ => None,
    }
}

/// Compiled rule sets by pipeline, rebuilt whenever the pipeline's definition is another
/// one (a reload makes a new `Arc`), so a rewritten definition is never judged by the rules
/// compiled for an earlier one, whatever its version says.
#[derive(Default)]
pub struct RuleSetCache {
    sets: std::collections::HashMap<String, (Arc<PipelineDefinition>, Arc<RuleSet>)>,
}

impl RuleSetCache {
    /// The rule set of `def`; `None` when it has no rules. A definition that does not compile
    /// (it cannot have passed validation) keeps the rules last compiled for the pipeline.
    pub fn get(&mut self, def: &Arc<PipelineDefinition>) -> Option<Arc<RuleSet>> {
        if def.quality.is_empty() {
            self.sets.remove(&def.name);
            return None;
        }
        if let Some((compiled_for, set)) = self.sets.get(&def.name) {
            if Arc::ptr_eq(compiled_for, def) {
                return Some(set.clone());
            }
        }
        match RuleSet::compile(def) {
            Ok(set) => {
                let set = Arc::new(set);
                self.sets
                    .insert(def.name.clone(), (def.clone(), set.clone()));
                Some(set)
            }
            Err(error) => {
                tracing::error!(%error, "quality rules do not compile; keeping the last ones");
                self.sets.get(&def.name).map(|(_, set)| set.clone())
            }
        }
    }
}

#[cfg(test)]
#[path = "rules_tests.rs"]
mod tests;
