//! Final results of `emit = "final"` aggregations already on their results topic: a window
//! made final again by a replay after a crash (its checkpoint was not saved after its result
//! was published) is not published twice.
//!
//! Each checkpoint carries marks: for each results partition of its pipeline's final-only
//! aggregations, the offset after the last result this aggregator had seen delivered when
//! it was saved. Whatever is published after that checkpoint lands at or after the marks, so
//! a restore reads the results topics from there to their end and remembers which of its own
//! windows already have their final result.

use std::collections::{BTreeSet, HashMap};

use instream_store::WindowAggregate;
use serde::Deserialize;

use super::{window_hash, PartitionState};

/// (results topic, partition, first offset to read back).
pub type ResultMark = (String, i32, i64);

/// What a read-back needs of a result record.
#[derive(Deserialize)]
struct Published {
    pipeline: String,
    aggregation: String,
    group: String,
    window_start: serde_json::Value,
    window_end: serde_json::Value,
    #[serde(rename = "final")]
    is_final: bool,
    #[serde(default)]
    deleted: bool,
}

/// What a read-back of the results topics has found for the partitions restored (owned:
/// the read runs on a blocking thread).
pub struct ReadBack {
    /// `instream.result.source` header -> (window hash, window end) of each final result.
    found: HashMap<String, Vec<(u128, i64)>>,
}

impl ReadBack {
    /// A read-back for these input partitions.
    pub fn new<'a>(sources: impl Iterator<Item = (&'a str, i32)>) -> Self {
        Self {
            found: sources
                .map(|(topic, partition)| (source_header(topic, partition), Vec::new()))
                .collect(),
        }
    }

    /// Notes a record read back from a results topic, if it is a final result of one of the
    /// partitions' windows (its `instream.result.source` header names the partition).
    pub fn note(&mut self, source: Option<&[u8]>, payload: &[u8]) {
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
            found.push((hash, end));
        }
    }

    /// What was found for one partition.
    pub fn take(&mut self, topic: &str, partition: i32) -> Vec<(u128, i64)> {
        self.found
            .remove(&source_header(topic, partition))
            .unwrap_or_default()
    }
}

/// The `instream.result.source` header of the results of a partition's windows.
pub fn source_header(topic: &str, partition: i32) -> String {
    format!("{topic}:{partition}")
}

/// A found window not made final again this far (event time) behind the partition's progress
/// never will be: its events would be beyond any allowed lateness and out-of-orderness.
const FOUND_KEPT_MILLIS: i64 = 8 * 24 * 3600 * 1000;

#[derive(Debug, Default)]
pub(super) struct PublishedFinal {
    /// Marks the next checkpoint carries (checkpointed).
    pub(super) marks: Vec<ResultMark>,
    /// The topics the last saved checkpoint has marks for: a final result is published only
    /// once there are (before, a restore would not know where to read back from).
    pub(super) saved_topics: BTreeSet<String>,
    /// Windows whose final result is on the topic, read back at the restore (not
    /// checkpointed), with their end: the replay may make them final again (their window
    /// may not even be open yet), and such a final result is not published twice.
    pub(super) windows: HashMap<u128, i64>,
}

impl PartitionState {
    /// The marks the next checkpoint carries. Newer marks alone do not make the state
    /// changed (older ones only make a read-back longer); marks of a topic the saved
    /// checkpoint has none for do, since its final results wait for them.
    pub fn set_result_marks(&mut self, marks: Vec<ResultMark>) {
        if marks
            .iter()
            .any(|(topic, ..)| !self.published.saved_topics.contains(topic))
        {
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
    }

    /// Whether a final result for `topic` must wait: the saved checkpoint has no marks for it.
    pub fn result_waits_for_marks(&self, topic: &str) -> bool {
        !self.published.saved_topics.contains(topic)
    }

    /// Where a restore reads the results topics back from.
    pub fn result_marks(&self) -> &[ResultMark] {
        &self.published.marks
    }

    /// Windows a read-back found with their final result published: not published again.
    pub fn read_back_done(&mut self, found: Vec<(u128, i64)>) {
        self.published.windows.extend(found);
    }

    /// Whether `row`'s final result is on its results topic already (then it is forgotten:
    /// a window is final once).
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
        let found = self.published.windows.remove(&hash).is_some();
        let horizon = self.max_event_time.saturating_sub(FOUND_KEPT_MILLIS);
        self.published.windows.retain(|_, end| *end >= horizon);
        found
    }
}
