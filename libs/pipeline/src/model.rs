use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

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
    /// Fields every event must have (besides the key and time fields).
    #[serde(default)]
    pub required_fields: Vec<FieldPath>,
    #[serde(default)]
    pub enrichments: Vec<EnrichmentRule>,
    #[serde(default)]
    pub aggregations: Vec<Aggregation>,
    #[serde(default)]
    pub archive: ArchivePolicy,
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
}

/// A windowed aggregation of the enriched stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Aggregation {
    pub name: String,
    /// What a group is: `key` (the partition key), `payload.<path>` or `enrichment.<field>`.
    /// Must start with `key` so each window has one owner (until repartitioning exists).
    #[serde(default = "default_group_by")]
    pub group_by: Vec<FieldPath>,
    pub window: Window,
    /// How long after the watermark passed a window's end a late event still updates it; the
    /// window is closed (dropped from memory) then, and later events for it go to the
    /// dead-letter topic as `too_late`.
    #[serde(default = "default_allowed_lateness", with = "humantime_serde")]
    pub allowed_lateness: Duration,
    /// Functions computed per window; `count` is always included.
    #[serde(default)]
    pub functions: Vec<Function>,
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
}

impl Window {
    pub fn size_millis(&self) -> i64 {
        match self {
            Window::Tumbling { size } => size.as_millis() as i64,
        }
    }

    /// When a window starting at `start` closes: its end plus the allowed lateness, in
    /// watermark time (milliseconds).
    pub fn closes_at(&self, start: i64, allowed_lateness: Duration) -> i64 {
        start
            .saturating_add(self.size_millis())
            .saturating_add(allowed_lateness.as_millis() as i64)
    }

    /// Start of the window holding `event_time` (milliseconds, epoch-aligned; floor division so
    /// times before 1970 land in the right window too).
    pub fn start_of(&self, event_time: i64) -> i64 {
        let size = self.size_millis();
        event_time.div_euclid(size) * size
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Function {
    Count,
}

/// How the archiver lays out a pipeline's files.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchivePolicy {
    #[serde(default)]
    pub partition_by: ArchiveTime,
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
