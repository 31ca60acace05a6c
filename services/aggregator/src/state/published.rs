//! Final results of `emit = "final"` aggregations already on their results topic: a window
//! made final again by a replay after a crash (its checkpoint was not saved after its result
//! was published) is not published twice with the same value.
//!
//! Each checkpoint carries marks: for each results partition of its pipeline's final-only
//! aggregations, the offset after the last result this aggregator had seen delivered when
//! it was saved. Whatever the partition publishes after that checkpoint lands at or after the
//! marks, so a restore reads the results topics from there to their end and remembers which
//! of its own windows already have their final result on the topic, and with which value.

use std::collections::{BTreeSet, HashMap};

use instream_store::WindowAggregate;
use serde::Deserialize;

use super::{window_hash, PartitionState};

/// (results topic, partition, first offset to read back).
pub type ResultMark = (String, i32, i64);

/// A partition whose checkpoint is not rewritten for other reasons gets newer marks saved
/// this often, so that a restore does not read back from long ago.
const MARKS_REFRESH_MILLIS: i64 = 5 * 60 * 1000;

/// A found window not made final again this far (event time) behind the partition's progress
/// never will be: its events would be beyond any allowed lateness and out-of-orderness.
const FOUND_KEPT_MILLIS: i64 = 8 * 24 * 3600 * 1000;

/// What a read-back needs of a result record.
#[derive(Deserialize)]
struct Published {
    pipeline: String,
    aggregation: String,
    group: String,
    window_start: serde_json::Value,
    window_end: serde_json::Value,
    count: i64,
    #[serde(default)]
    values: serde_json::Map<String, serde_json::Value>,
    #[serde(rename = "final")]
    is_final: bool,
    #[serde(default)]
    deleted: bool,
}

/// A final result found on a results topic.
#[derive(Debug, Clone)]
pub struct Found {
    topic: String,
    partition: i32,
    offset: i64,
    window_end: i64,
    digest: u64,
}

/// A digest of a window's value, so that a replay that computes another final value (it can,
/// where a wall-clock timeout decided what was late) publishes it.
fn digest(count: i64, values: &serde_json::Map<String, serde_json::Value>) -> u64 {
    let mut bytes = count.to_le_bytes().to_vec();
    // A JSON map serializes in key order: equal values, equal bytes.
    bytes.extend(serde_json::to_vec(values).unwrap_or_default());
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

/// What a read-back of one results partition found for the partitions restored (owned: the
/// read runs on a blocking thread).
pub struct ReadBack {
    /// The results partition read.
    topic: String,
    partition: i32,
    /// `instream.result.source` header -> (window hash, what was found).
    found: HashMap<String, Vec<(u128, Found)>>,
}

impl ReadBack {
    /// A read-back of `topic`/`partition` for these input partitions.
    pub fn new<'a>(
        topic: &str,
        partition: i32,
        sources: impl Iterator<Item = (&'a str, i32)>,
    ) -> Self {
        Self {
            topic: topic.to_owned(),
            partition,
            found: sources
                .map(|(topic, partition)| (source_header(topic, partition), Vec::new()))
                .collect(),
        }
    }

    /// Notes a record read back, if it is a final result of one of the partitions' windows
    /// (its `instream.result.source` header names the partition).
    pub fn note(&mut self, offset: i64, source: Option<&[u8]>, payload: &[u8]) {
        let Some(found) = source
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| self.found.get_mut(s))
        else {
            return;
        };
        let Ok(p) = serde_json::from_slice::<Published>(payload) else {
            return;
        };
        let (Ok(start), Ok(end)) = (
            instream_event::parse_event_time(&p.window_start),
            instream_event::parse_event_time(&p.window_end),
        ) else {
            return;
        };
        if p.is_final && !p.deleted {
            let hash = window_hash(&p.pipeline, &p.aggregation, &p.group, start);
            found.push((
                hash,
                Found {
                    topic: self.topic.clone(),
                    partition: self.partition,
                    offset,
                    window_end: end,
                    digest: digest(p.count, &p.values),
                },
            ));
        }
    }

    /// What was found for one input partition.
    pub fn take(&mut self, topic: &str, partition: i32) -> Vec<(u128, Found)> {
        self.found
            .remove(&source_header(topic, partition))
            .unwrap_or_default()
    }
}

/// The `instream.result.source` header of the results of a partition's windows.
pub fn source_header(topic: &str, partition: i32) -> String {
    format!("{topic}:{partition}")
}

#[derive(Debug, Default)]
pub(super) struct PublishedFinal {
    /// Marks the next checkpoint carries (checkpointed).
    pub(super) marks: Vec<ResultMark>,
    /// The topics the last saved checkpoint has marks for: a final result is published only
    /// once there are (before, a restore would not know where to read back from).
    pub(super) saved_topics: BTreeSet<String>,
    /// When (wall clock, ms) marks were last saved.
    pub(super) saved_at: i64,
    /// Window hash -> (window end, value digest) of final results on the topic, read back at
    /// the restore (not checkpointed): the replay may make those windows final again (they
    /// may not even be open yet).
    pub(super) windows: HashMap<u128, (i64, u64)>,
}

impl PartitionState {
    /// The marks the next checkpoint carries. Newer marks alone do not make the state
    /// changed (older ones only make a read-back longer), unless the saved ones are older
    /// than a few minutes; marks of a topic the saved checkpoint has none for do, since its
    /// final results wait for them.
    pub fn set_result_marks(&mut self, marks: Vec<ResultMark>) {
        let new_topic = marks
            .iter()
            .any(|(topic, ..)| !self.published.saved_topics.contains(topic));
        let stale = instream_event::now_millis() - self.published.saved_at > MARKS_REFRESH_MILLIS
            && marks != self.published.marks;
        if new_topic || stale {
            self.changed = true;
        }
        self.published.marks = marks;
    }

    /// The checkpoint taken last (its marks) is saved.
    pub fn result_marks_saved(&mut self) {
        self.published.saved_topics = self
            .published
            .marks
            .iter()
            .map(|(topic, ..)| topic.clone())
            .collect();
        self.published.saved_at = instream_event::now_millis();
    }

    /// Where a restore reads the results topics back from.
    pub fn result_marks(&self) -> &[ResultMark] {
        &self.published.marks
    }

    /// Whether a final result for `topic` must wait: the saved checkpoint has no marks for it.
    pub fn result_waits_for_marks(&self, topic: &str) -> bool {
        !self.published.saved_topics.contains(topic)
    }

    /// Final results a read-back found for this partition's windows: those at or after its
    /// own marks (published after its checkpoint) are not published again with that value.
    pub fn read_back_done(&mut self, found: Vec<(u128, Found)>) {
        for (hash, f) in found {
            let after_checkpoint = self
                .published
                .marks
                .iter()
                .any(|(t, p, mark)| *t == f.topic && *p == f.partition && f.offset >= *mark);
            if after_checkpoint {
                self.published
                    .windows
                    .insert(hash, (f.window_end, f.digest));
            }
        }
    }

    /// Whether `row`'s final result is on its results topic already, with this value (then
    /// it is forgotten: a window is final once).
    pub fn published_already(&mut self, row: &WindowAggregate) -> bool {
        if !row.is_final || self.published.windows.is_empty() {
            return false;
        }
        let hash = window_hash(
            &row.pipeline,
            &row.aggregation,
            &row.group_key,
            row.window_start,
        );
        self.published
            .windows
            .remove(&hash)
            .is_some_and(|(_, found)| found == digest(row.count, &row.values))
    }

    /// Forgets found windows too far behind to be made final again.
    pub fn prune_published(&mut self) {
        if self.published.windows.is_empty() {
            return;
        }
        let horizon = self.max_event_time.saturating_sub(FOUND_KEPT_MILLIS);
        self.published.windows.retain(|_, (end, _)| *end >= horizon);
    }
}
