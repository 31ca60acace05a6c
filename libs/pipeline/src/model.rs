use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::outputs::Output;
use instream_event::FieldPath;
use serde::{Deserialize, Serialize};

use crate::template::KeyTemplate;

/// One pipeline. Versioned: a stored change must carry a higher version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineDefinition {
    /// `[a-z0-9_-]`, at most 64 characters; names the topics (`<name>.raw`, …).
    pub name: String,
    /// Raised on every change; results carry the version they were computed under.
    #[serde(default = "one")]
    pub version: u64,
    /// Partitions of the pipeline's topics.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Field of the producer's event holding the partition key: one key's events stay ordered.
    pub key_field: FieldPath,
    /// Field holding the event time, RFC 3339 or epoch milliseconds.
    pub time_field: FieldPath,
    /// How far behind the newest event time of a partition an event may be and still count
    /// as in order: the partition's watermark is its newest event time minus this.
    #[serde(default = "default_out_of_orderness", with = "humantime_serde")]
    pub max_out_of_orderness: Duration,
    /// How far an event's time may lie after the time ingest accepted it. One further ahead
    /// (a clock gone wrong, microseconds sent as milliseconds) would move its partition's
    /// watermark and make every later event too late, so the aggregator dead-letters it as
    /// `future_time` instead.
    #[serde(default = "default_time_ahead", with = "humantime_serde")]
    pub max_time_ahead: Duration,
    /// A partition the aggregator has read to its end and that brought nothing new for this
    /// long is idle: its watermark moves on from its newest event time by the time that
    /// passed since (never past the wall clock), so the windows of a stream that went quiet
    /// close and their final values are written. Absent: a quiet partition's windows wait
    /// for its next event.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    pub idle_timeout: Option<Duration>,
    /// Fields every event must have (besides the key and time fields).
    #[serde(default)]
    pub required_fields: Vec<FieldPath>,
    /// A JSON Schema (draft 2020-12 unless `$schema` says otherwise) every event's payload
    /// must satisfy at ingest: JSON text, or a TOML table. Refused when it does not compile,
    /// and when it refers to other documents (`$ref` to a URL).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "json_text")]
    pub schema: Option<serde_json::Value>,
    #[serde(default)]
    pub enrichments: Vec<EnrichmentRule>,
    #[serde(default)]
    pub aggregations: Vec<Aggregation>,
    #[serde(default)]
    pub archive: ArchivePolicy,
    /// Data-quality rules, checked by the enricher after enrichment and before produce.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quality: Vec<crate::quality::QualityRule>,
    /// Where aggregations' results go besides the store.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<Output>,
    /// The event time (RFC 3339, or epoch milliseconds) from which this version's
    /// aggregations make the windows: a window starting before it is made whole by the
    /// version before (in `previous`), one starting at or after it by this one — in every
    /// partition and every replay, whenever the new version reached them. `pipeline apply`
    /// stamps it (by default the next window boundary after the apply). Absent: from the start.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "event_time_text"
    )]
    pub effective_from: Option<i64>,
    /// The versions before this one, newest first, for the windows that started before
    /// `effective_from` (`pipeline apply` keeps the last five).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous: Vec<PipelineDefinition>,
}

/// Previous versions `pipeline apply` keeps under a new one: a window of a version no longer
/// kept is finished under the oldest one kept.
pub const KEPT_VERSIONS: usize = 5;

impl PipelineDefinition {
    /// This definition and the versions before it, newest first, each with the window starts
    /// it makes: `[from, until)`. The oldest makes every window before the others'.
    pub fn versions(&self) -> impl Iterator<Item = (&PipelineDefinition, i64, i64)> {
        let count = 1 + self.previous.len();
        let mut until = i64::MAX;
        std::iter::once(self)
            .chain(self.previous.iter())
            .enumerate()
            .map(move |(i, v)| {
                let from = if i + 1 == count {
                    i64::MIN
                } else {
                    v.effective_from.unwrap_or(i64::MIN)
                };
                let range = (v, from, until);
                until = from;
                range
            })
    }

    /// The definition of `version`, if this one is it or keeps it.
    pub fn version_def(&self, version: u64) -> Option<&PipelineDefinition> {
        std::iter::once(self)
            .chain(self.previous.iter())
            .find(|v| v.version == version)
    }

    /// Whether two definitions say the same, apart from what `pipeline apply` stamps
    /// (`effective_from`, `previous`).
    /// An `effective_from` `other` gives itself must be the same too.
    pub fn same_content(&self, other: &PipelineDefinition) -> bool {
        self.unstamped() == other.unstamped()
            && other
                .effective_from
                .is_none_or(|t| Some(t) == self.effective_from)
    }

    /// This definition without what `pipeline apply` stamps.
    pub fn unstamped(&self) -> PipelineDefinition {
        PipelineDefinition {
            effective_from: None,
            previous: Vec::new(),
            ..self.clone()
        }
    }

    /// This definition as the successor of `stored`: stamped with the event time from which
    /// it makes windows (its own `effective_from`, or the next window boundary after `now`)
    /// and keeping `stored` (and the versions it kept) for the windows before.
    pub fn succeeding(&self, stored: &PipelineDefinition, now: i64) -> PipelineDefinition {
        let mut next = self.clone();
        // Not before the stored version takes over: applied again before then, the stored
        // version makes no window at all.
        let after = now.max(stored.effective_from.unwrap_or(i64::MIN).saturating_sub(1));
        let boundary = next_boundary(self, after);
        next.effective_from = Some(self.effective_from.unwrap_or(boundary));
        let mut kept = stored.clone();
        kept.previous = Vec::new();
        next.previous = std::iter::once(kept)
            .chain(stored.previous.iter().cloned())
            .take(KEPT_VERSIONS)
            .collect();
        next
    }
}

/// The first time after `now` that is a window boundary of every aggregation of `new` (on
/// the minute at least).
fn next_boundary(new: &PipelineDefinition, now: i64) -> i64 {
    let step = new.boundary_step().unwrap_or(MAX_BOUNDARY_STEP);
    // At least a minute apart: a multiple of the step.
    let step = step.saturating_mul((60_000 + step - 1) / step);
    now.div_euclid(step).saturating_add(1).saturating_mul(step)
}

/// Longest time between two boundaries every aggregation shares that a new version's
/// `effective_from` is put on by default (30 days).
const MAX_BOUNDARY_STEP: i64 = 30 * 24 * 3600 * 1000;

impl PipelineDefinition {
    /// The time between two event times at which a window of every tumbling or hopping
    /// aggregation starts (`None`: beyond 30 days).
    pub fn boundary_step(&self) -> Option<i64> {
        self.aggregations
            .iter()
            .filter_map(|a| match a.window {
                Window::Tumbling { size } => Some(size),
                Window::Hopping { slide, .. } => Some(slide),
                Window::Session { .. } => None,
            })
            .map(|d| d.as_millis().max(1) as i64)
            .try_fold(1i64, |acc, step| {
                Some(lcm(acc, step)).filter(|l| *l <= MAX_BOUNDARY_STEP)
            })
    }
}

fn lcm(a: i64, b: i64) -> i64 {
    fn gcd(a: i64, b: i64) -> i64 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    (a / gcd(a, b)).saturating_mul(b)
}

/// An event time as RFC 3339 text (milliseconds, UTC); read from that or epoch milliseconds.
mod event_time_text {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(t) => s.serialize_str(&instream_event::format_rfc3339_millis(*t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        let value = Option::<serde_json::Value>::deserialize(d)?;
        value
            .map(|v| instream_event::parse_event_time(&v).map_err(D::Error::custom))
            .transpose()
    }
}

fn one() -> u64 {
    1
}

fn default_partitions() -> i32 {
    4
}

fn default_out_of_orderness() -> Duration {
    Duration::from_secs(5)
}

fn default_time_ahead() -> Duration {
    Duration::from_secs(3600)
}

fn default_allowed_lateness() -> Duration {
    Duration::from_secs(60)
}

/// A lookup of reference data for each event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichmentRule {
    pub name: String,
    /// The reference-data key, built from event fields: `customer:{customer_id}`.
    pub key_template: KeyTemplate,
    /// How the record is stored in Redis.
    #[serde(default)]
    pub shape: RecordShape,
    /// Reference field -> output field in the event's `enrichment`. Empty copies every field
    /// under its own name.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// What happens when the key is not found.
    #[serde(default)]
    pub on_miss: MissPolicy,
    /// Output field -> value, written when the record is not found or lacks the field.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub defaults: BTreeMap<String, serde_json::Value>,
    /// `on_miss = "retry"`: how many more lookups before the event is dead-lettered.
    #[serde(default = "default_retry_attempts")]
    pub retry_attempts: u32,
    /// `on_miss = "retry"`: the pause before the first retry; it doubles each time (at most
    /// 5 s). The batch waits: a key's events stay in order.
    #[serde(default = "default_retry_backoff", with = "humantime_serde")]
    pub retry_backoff: Duration,
}

fn default_retry_attempts() -> u32 {
    3
}

fn default_retry_backoff() -> Duration {
    Duration::from_millis(200)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordShape {
    /// A Redis hash (HGETALL).
    #[default]
    Hash,
    /// A Redis string holding a JSON object (GET).
    Json,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissPolicy {
    /// The event goes on, listed under `enrichment._missed`.
    #[default]
    Pass,
    /// The event goes to the dead-letter topic with reason `enrich_miss`.
    DeadLetter,
    /// The lookup is repeated (`retry_attempts`, `retry_backoff`) in case the record is being
    /// loaded; still missing after that, the event is dead-lettered as `enrich_miss`.
    Retry,
}

/// A windowed aggregation of the enriched stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Aggregation {
    pub name: String,
    /// What a group is: `key` (the partition key), `payload.<path>` or `enrichment.<field>`.
    /// Led by `key`, a group's events are already in one partition; otherwise they are
    /// repartitioned by the group first (see [`Aggregation::repartitioned`]).
    #[serde(default = "default_group_by")]
    pub group_by: Vec<FieldPath>,
    pub window: Window,
    /// How long after the watermark passed a window's end a late event still updates it; the
    /// window is closed (dropped from memory) then, and later events for it go to the
    /// dead-letter topic as `too_late`.
    #[serde(default = "default_allowed_lateness", with = "humantime_serde")]
    pub allowed_lateness: Duration,
    /// Values computed per window besides the count (which every window has).
    #[serde(default)]
    pub functions: Vec<Function>,
    /// Only events this filter accepts are aggregated (all when absent).
    #[serde(default)]
    pub filter: Option<Filter>,
    /// Which values of a window are written: `early` (values while it is open, then the
    /// final one) or `final` (only the final one, once the watermark passed its end plus the
    /// allowed lateness).
    #[serde(default)]
    pub emit: Emit,
}

/// When an aggregation's windows are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Emit {
    /// While open (every `aggregator.early_results_every`), when the watermark passes the
    /// window's end, for each late event, and once more when it is final.
    #[default]
    Early,
    /// Once, when final: the watermark passed its end plus the allowed lateness.
    Final,
}

impl Aggregation {
    /// Whether the aggregation's groups cut across the partition key, so its events go
    /// through `<pipeline>.by-<name>`, keyed by the group, to give each window one owner
    /// (docs/guarantees.md).
    pub fn repartitioned(&self) -> bool {
        self.group_by.first().is_none_or(|f| f.as_str() != "key")
    }
}

fn default_group_by() -> Vec<FieldPath> {
    vec!["key".parse().expect("`key` is a valid path")]
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Window {
    /// Fixed, non-overlapping windows aligned to the epoch.
    Tumbling {
        #[serde(with = "humantime_serde")]
        size: Duration,
    },
    /// Windows of `size` starting every `slide` (aligned to the epoch): an event is in
    /// `size / slide` of them.
    Hopping {
        #[serde(with = "humantime_serde")]
        size: Duration,
        #[serde(with = "humantime_serde")]
        slide: Duration,
    },
    /// One window per burst of activity of a group: events less than `gap` apart (in event
    /// time) share a session, which ends `gap` after its last event.
    Session {
        #[serde(with = "humantime_serde")]
        gap: Duration,
    },
}

impl Window {
    /// The length of a fixed window; for a session, its gap (the shortest session).
    pub fn size_millis(&self) -> i64 {
        match self {
            Window::Tumbling { size } | Window::Hopping { size, .. } => size.as_millis() as i64,
            Window::Session { gap } => gap.as_millis() as i64,
        }
    }

    /// The session gap in milliseconds, for session windows.
    pub fn session_gap_millis(&self) -> Option<i64> {
        match self {
            Window::Session { gap } => Some(gap.as_millis() as i64),
            _ => None,
        }
    }

    fn slide_millis(&self) -> i64 {
        match self {
            Window::Tumbling { size } | Window::Session { gap: size } => size.as_millis() as i64,
            Window::Hopping { slide, .. } => slide.as_millis() as i64,
        }
    }

    /// When a window starting at `start` closes: its end plus the allowed lateness, in
    /// watermark time (milliseconds).
    pub fn closes_at(&self, start: i64, allowed_lateness: Duration) -> i64 {
        start
            .saturating_add(self.size_millis())
            .saturating_add(allowed_lateness.as_millis() as i64)
    }

    /// Start of the newest window holding `event_time` (milliseconds, epoch-aligned; floor
    /// division so times before 1970 land in the right window too).
    pub fn start_of(&self, event_time: i64) -> i64 {
        let slide = self.slide_millis();
        event_time.div_euclid(slide).saturating_mul(slide)
    }

    /// Starts of every fixed window holding `event_time`, newest first (not for sessions,
    /// whose start depends on the other events).
    pub fn starts_of(&self, event_time: i64) -> impl Iterator<Item = i64> {
        let size = self.size_millis();
        let slide = self.slide_millis();
        let newest = self.start_of(event_time);
        (0..)
            .map(move |i: i64| newest.saturating_sub(i.saturating_mul(slide)))
            .take_while(move |start| event_time < start.saturating_add(size))
            .take(100)
    }

    /// Whether a definition version whose windows start within `starts` makes a window
    /// holding `event_time`: a fixed window by its start, a session by the event's own time.
    pub fn makes_window_of(&self, event_time: i64, starts: &std::ops::Range<i64>) -> bool {
        match self.session_gap_millis() {
            Some(_) => starts.contains(&event_time),
            None => self.starts_of(event_time).any(|s| starts.contains(&s)),
        }
    }
}

/// A value computed per window besides the count (which every window has).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "fn", rename_all = "snake_case", deny_unknown_fields)]
pub enum Function {
    /// Without `field`: events in the window (always computed; listing it changes nothing).
    /// With `field`: events in which that field is present and not null, as SQL's
    /// `COUNT(field)`, output as `count_<field>`.
    Count {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        field: Option<FieldPath>,
    },
    /// Sum of a numeric field (numbers, or strings holding one; others are skipped).
    Sum {
        field: FieldPath,
    },
    Min {
        field: FieldPath,
    },
    Max {
        field: FieldPath,
    },
    Avg {
        field: FieldPath,
    },
    /// The field's value of the event with the earliest event time (the first read wins ties).
    First {
        field: FieldPath,
    },
    /// The field's value of the event with the latest event time (the last read wins ties).
    Last {
        field: FieldPath,
    },
    /// Approximate distinct values (HyperLogLog, 2^precision registers; relative error about
    /// 1.04 / sqrt(2^precision)).
    CountDistinct {
        field: FieldPath,
        #[serde(default = "default_precision")]
        precision: u8,
    },
    /// Approximate quantiles (DDSketch: each answer within `relative_accuracy` of the true
    /// value).
    Quantiles {
        field: FieldPath,
        #[serde(default = "default_quantiles")]
        q: Vec<f64>,
        #[serde(default = "default_relative_accuracy")]
        relative_accuracy: f64,
    },
}

fn default_precision() -> u8 {
    12
}

fn default_quantiles() -> Vec<f64> {
    vec![0.5, 0.9, 0.99]
}

fn default_relative_accuracy() -> f64 {
    0.01
}

impl Function {
    /// The field the function reads, if any.
    pub fn field(&self) -> Option<&FieldPath> {
        match self {
            Function::Count { field } => field.as_ref(),
            Function::Sum { field }
            | Function::Min { field }
            | Function::Max { field }
            | Function::Avg { field }
            | Function::First { field }
            | Function::Last { field }
            | Function::CountDistinct { field, .. }
            | Function::Quantiles { field, .. } => Some(field),
        }
    }

    /// The name of the function's value in a window's `values`: `sum_price`, `p99_price`, …
    /// (the last segment of the field).
    pub fn output_name(&self) -> String {
        let field = self
            .field()
            .and_then(|f| f.segments().last())
            .map(String::as_str)
            .unwrap_or_default();
        let kind = match self {
            Function::Count { field: None } => return "count".into(),
            Function::Count { field: Some(_) } => "count",
            Function::Sum { .. } => "sum",
            Function::Min { .. } => "min",
            Function::Max { .. } => "max",
            Function::Avg { .. } => "avg",
            Function::First { .. } => "first",
            Function::Last { .. } => "last",
            Function::CountDistinct { .. } => "count_distinct",
            Function::Quantiles { .. } => "quantiles",
        };
        format!("{kind}_{field}")
    }
}

/// Which events an aggregation takes: those whose field compares true with the value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    pub field: FieldPath,
    pub op: FilterOp,
    pub value: serde_json::Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterOp {
    Eq,
    Ne,
    Gt,
    Gte,
    Lt,
    Lte,
}

impl FilterOp {
    /// Whether a value ordered so against the operand passes.
    pub fn holds(self, ordering: std::cmp::Ordering) -> bool {
        match self {
            FilterOp::Eq => ordering.is_eq(),
            FilterOp::Ne => ordering.is_ne(),
            FilterOp::Gt => ordering.is_gt(),
            FilterOp::Gte => ordering.is_ge(),
            FilterOp::Lt => ordering.is_lt(),
            FilterOp::Lte => ordering.is_le(),
        }
    }

    /// `>=` and the like, for messages.
    pub fn symbol(self) -> &'static str {
        match self {
            FilterOp::Eq => "==",
            FilterOp::Ne => "!=",
            FilterOp::Gt => ">",
            FilterOp::Gte => ">=",
            FilterOp::Lt => "<",
            FilterOp::Lte => "<=",
        }
    }
}

/// How the archiver lays out a pipeline's files.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchivePolicy {
    #[serde(default)]
    pub partition_by: ArchiveTime,
    #[serde(default)]
    pub format: ArchiveFormat,
    /// Parquet only: typed columns read from the payload, besides the raw columns (offset,
    /// event id, key, times, headers and the payload as JSON, which is always kept whole).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<ArchiveColumn>,
}

/// The archive's file format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArchiveFormat {
    /// One event per line, the file compressed with zstd (`.jsonl.zst`).
    #[default]
    JsonLines,
    /// Apache Parquet, zstd-compressed columns (`.parquet`).
    Parquet,
}

/// One typed Parquet column taken from the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveColumn {
    pub name: String,
    /// Path in the payload, e.g. `price.amount`.
    pub path: FieldPath,
    #[serde(rename = "type")]
    pub kind: ColumnType,
}

/// A Parquet column's type. A payload value of another type (or none) is stored as null.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    String,
    Int64,
    Float64,
    Boolean,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArchiveTime {
    /// Folders by the time ingest accepted the events.
    #[default]
    IngestTime,
    /// Folders by the events' own time.
    EventTime,
}

/// The pipeline's own checks of an event's payload, beyond its key and time (which ingest
/// reads to build the envelope): the required fields now; schemas and data-quality rules
/// plug in here too.
impl instream_event::EventValidator for PipelineDefinition {
    fn validate(&self, payload: &serde_json::Value) -> Result<(), instream_event::Rejection> {
        for field in &self.required_fields {
            if matches!(field.lookup(payload), None | Some(serde_json::Value::Null)) {
                return Err(instream_event::Rejection::new(
                    "missing_field",
                    format!("the required field `{field}` is missing"),
                ));
            }
        }
        Ok(())
    }
}

/// Every pipeline known to a process, by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Catalog {
    pipelines: BTreeMap<String, Arc<PipelineDefinition>>,
}

/// The form of a definitions file: `[[pipelines]]` tables in TOML, or `{"pipelines": [...]}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefinitionsDocument {
    #[serde(default)]
    pub pipelines: Vec<PipelineDefinition>,
}

impl Catalog {
    pub fn new(pipelines: impl IntoIterator<Item = PipelineDefinition>) -> Self {
        Self {
            pipelines: pipelines
                .into_iter()
                .map(|p| (p.name.clone(), Arc::new(p)))
                .collect(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<PipelineDefinition>> {
        self.pipelines.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<PipelineDefinition>> {
        self.pipelines.values()
    }

    pub fn len(&self) -> usize {
        self.pipelines.len()
    }

    /// The raw topic of every pipeline (what the enricher and the archiver consume).
    pub fn raw_topics(&self) -> Vec<String> {
        self.iter().map(|p| crate::topics::raw(&p.name)).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.pipelines.is_empty()
    }
}

/// A JSON value kept in a definition as JSON text, so that any schema round-trips through
/// TOML (which has no null); a TOML table is read too.
mod json_text {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_json::Value;

    pub fn serialize<S: Serializer>(value: &Option<Value>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => s.serialize_str(&v.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Text(String),
            Table(Value),
        }
        match Form::deserialize(d)? {
            Form::Text(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| D::Error::custom(format!("schema is not JSON: {e}"))),
            Form::Table(v) => Ok(Some(v)),
        }
    }
}
