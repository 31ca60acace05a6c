//! Results that leave the store: each window value the aggregator writes for an aggregation
//! with a Kafka output also goes, as JSON, to `<pipeline>.results.<aggregation>`, keyed by
//! its group, so downstream services consume results without polling the store.
//!
//! They are on the broker before the checkpoint that could drop their window is saved (the
//! flush waits for them as it waits for the store), so a crash loses none; a crash before
//! that checkpoint makes the restarted aggregator write the same windows again, so a value
//! may repeat, with the same key, window and content (docs/guarantees.md) — except the final
//! results of `emit = "final"` aggregations: a restore reads back what was published after
//! its checkpoint ([`Marks`], `state/published.rs`) and does not publish those again.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use instream_core::config::KafkaConfig;
use instream_kafka::client::{self, Producer};
use instream_kafka::Outgoing;
use instream_pipeline::{topics, Catalog, Emit, Output, PipelineDefinition};
use instream_store::WindowAggregate;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::partitions::Source;
use crate::state::ReadBack;
use crate::AggregatorError;

/// One result record, as downstream services read it.
#[derive(Serialize)]
struct ResultRecord<'a> {
    /// Deterministic: the same value of the same window (after a crash, a replay writes it
    /// again) has the same id, for a consumer that drops repeats.
    id: String,
    pipeline: &'a str,
    aggregation: &'a str,
    group: &'a str,
    window_start: String,
    window_end: String,
    count: i64,
    values: &'a serde_json::Map<String, serde_json::Value>,
    #[serde(rename = "final")]
    is_final: bool,
    definition_version: i64,
    /// A session merged into another (stored under another start): gone from the store.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    deleted: bool,
}

/// What the rows published are.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Window values written.
    Value,
    /// Session windows deleted from the store (merged into another session).
    Deleted,
}

/// Sends the rows of aggregations with a Kafka output (but those `skip` says are on their
/// topic already; it also gives the partition that wrote each) and waits until the broker
/// has all of them; then moves `marks` past the final-only results among them. `Ok(false)`
/// when `stop` came first: none may count as delivered.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn publish<'s>(
    producer: &Producer,
    catalog: &Catalog,
    rows: &[WindowAggregate],
    kind: Kind,
    skip: impl Fn(usize) -> (bool, Option<&'s str>),
    marks: &mut Marks,
    stop: &CancellationToken,
) -> Result<bool, AggregatorError> {
    if catalog.iter().all(|def| def.outputs.is_empty()) {
        return Ok(true);
    }
    let mut deliveries = Vec::new();
    // The results topic of each delivery that a restore reads back.
    let mut marked: Vec<Option<String>> = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let (on_topic, source) = skip(i);
        if on_topic {
            continue;
        }
        // Under the current version or the one that made the window (an output removed by
        // a change still gets the windows made before it).
        let wanted = catalog.get(&row.pipeline).is_some_and(|def| {
            def.kafka_output(&row.aggregation)
                || u64::try_from(row.definition_version)
                    .ok()
                    .and_then(|v| def.version_def(v))
                    .is_some_and(|made_by| made_by.kafka_output(&row.aggregation))
        });
        if !wanted {
            continue;
        }
        let is_final = row.is_final && kind == Kind::Value;
        let deleted = kind == Kind::Deleted;
        let record = ResultRecord {
            id: result_id(row, is_final, deleted),
            pipeline: &row.pipeline,
            aggregation: &row.aggregation,
            group: &row.group_key,
            window_start: instream_event::format_rfc3339_millis(row.window_start),
            window_end: instream_event::format_rfc3339_millis(row.window_end),
            count: row.count,
            values: &row.values,
            is_final,
            definition_version: row.definition_version,
            deleted,
        };
        // A struct of strings, numbers and a JSON map: serializing it cannot fail.
        let payload = serde_json::to_vec(&record).unwrap_or_default();
        let topic = topics::results(&row.pipeline, &row.aggregation);
        let mut out = Outgoing::to(&topic)
            .key(row.group_key.as_bytes())
            .payload(&payload);
        let read_back = kind == Kind::Value && row.is_final && final_only(catalog, row);
        if let (true, Some(source)) = (read_back, source) {
            out = out.header(instream_kafka::headers::RESULT_SOURCE, source);
        }
        deliveries.push(client::send(producer, out).await?);
        marked.push(read_back.then_some(topic));
        metrics::counter!("instream_results_published_total", "pipeline" => row.pipeline.clone(), "aggregation" => row.aggregation.clone())
            .increment(1);
    }
    if deliveries.is_empty() {
        return Ok(true);
    }
    let Some(positions) = client::all_delivered_at(producer, deliveries, stop).await? else {
        return Ok(false);
    };
    for (topic, (partition, offset)) in marked.into_iter().zip(positions) {
        if let Some(topic) = topic {
            marks.passed(topic, partition, offset);
        }
    }
    Ok(true)
}

/// What a flush publishes of its rows' results: final results a restore found on their topic
/// (with the same value) are not published again; those of a partition whose saved
/// checkpoint has no marks for their topic yet wait one flush (their windows stay), so that a
/// restore knows where to read them back from; each carries the partition that wrote it.
pub(crate) struct Plan {
    skip: Vec<bool>,
    /// Rows whose windows stay for the next flush, with their partition.
    waiting: Vec<(Source, usize)>,
    /// The `instream.result.source` header of each partition that wrote rows, and each row's.
    headers: Vec<String>,
    owner: Vec<usize>,
    final_only_sent: bool,
}

impl Plan {
    pub(crate) fn of(
        rows: &[WindowAggregate],
        written_by: &[(Source, std::ops::Range<usize>)],
        partitions: &mut crate::partitions::Partitions,
        catalog: &Catalog,
    ) -> Self {
        let mut plan = Plan {
            skip: vec![false; rows.len()],
            waiting: Vec::new(),
            headers: Vec::with_capacity(written_by.len()),
            owner: vec![0; rows.len()],
            final_only_sent: false,
        };
        let marks = &partitions.result_marks;
        for (k, (source, range)) in written_by.iter().enumerate() {
            plan.headers
                .push(crate::state::source_header(&source.0, source.1));
            let Some(state) = partitions.states.get_mut(source) else {
                continue;
            };
            let current = catalog.get(topics::pipeline_of(&source.0));
            for i in range.clone() {
                plan.owner[i] = k;
                let row = &rows[i];
                if !row.is_final || !final_only(catalog, row) {
                    continue;
                }
                if state.published_already(row) {
                    plan.skip[i] = true;
                    continue;
                }
                let topic = topics::results(&row.pipeline, &row.aggregation);
                if current.is_some_and(|def| marks.kept_for(def, &topic))
                    && state.result_waits_for_marks(&topic)
                {
                    plan.skip[i] = true;
                    plan.waiting.push((source.clone(), i));
                    continue;
                }
                plan.final_only_sent |=
                    current.is_some_and(|def| def.kafka_output(&row.aggregation));
            }
        }
        plan
    }

    /// Whether row `i` is left out, and the partition that wrote it.
    pub(crate) fn skip(&self, i: usize) -> (bool, Option<&str>) {
        let source = self.headers.get(self.owner[i]).map(String::as_str);
        (self.skip[i], source)
    }

    /// Whether final results of final-only aggregations are published.
    pub(crate) fn sends_final_only(&self) -> bool {
        self.final_only_sent
    }

    /// Keeps the windows of the rows that wait for marks until the next flush.
    pub(crate) fn hold_waiting(
        &self,
        partitions: &mut crate::partitions::Partitions,
        rows: &[WindowAggregate],
    ) {
        for (source, i) in &self.waiting {
            if let Some(state) = partitions.states.get_mut(source) {
                state.mark_dirty(std::slice::from_ref(&rows[*i]));
            }
        }
    }
}

/// A result's id: a UUID of its window, version, value and kind.
fn result_id(row: &WindowAggregate, is_final: bool, deleted: bool) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for part in [
        row.pipeline.as_str(),
        row.aggregation.as_str(),
        row.group_key.as_str(),
    ] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(&row.window_start.to_le_bytes());
    h.update(&row.definition_version.to_le_bytes());
    h.update(&row.count.to_le_bytes());
    // A JSON map serializes in key order: equal values, equal bytes.
    h.update(&serde_json::to_vec(&row.values).unwrap_or_default());
    h.update(&[u8::from(is_final), u8::from(deleted)]);
    uuid::Uuid::new_v8(h.digest128().to_be_bytes()).to_string()
}

/// Whether `row` is of an aggregation whose results topic holds final values only (under the
/// version that made its window).
pub(crate) fn final_only(catalog: &Catalog, row: &WindowAggregate) -> bool {
    catalog
        .get(&row.pipeline)
        .map(|def| {
            u64::try_from(row.definition_version)
                .ok()
                .and_then(|v| def.version_def(v))
                .unwrap_or(def)
        })
        .and_then(|def| def.aggregations.iter().find(|a| a.name == row.aggregation))
        .is_some_and(|a| a.emit == Emit::Final)
}

/// The results topics a restore of one of `def`'s partitions reads back: those of its
/// aggregations with a Kafka output and `emit = "final"`.
fn final_only_topics(def: &PipelineDefinition) -> impl Iterator<Item = String> + '_ {
    def.outputs.iter().filter_map(move |output| match output {
        Output::Kafka { aggregation }
            if def
                .aggregations
                .iter()
                .any(|a| a.name == *aggregation && a.emit == Emit::Final) =>
        {
            Some(topics::results(&def.name, aggregation))
        }
        _ => None,
    })
}

/// For each partition of the final-only results topics, the offset after the last result
/// this process has seen delivered there — at first, the partition's end when the process
/// first needed it. Every checkpoint carries its pipeline's marks: whatever is published
/// after it lands at or after them.
#[derive(Default)]
pub(crate) struct Marks {
    next: BTreeMap<(String, i32), i64>,
    /// Topics whose partitions' ends were read.
    started: BTreeSet<String>,
}

impl Marks {
    /// Whether the ends of `topic` were read (its results can be read back).
    pub(crate) fn started(&self, topic: &str) -> bool {
        self.started.contains(topic)
    }

    /// A final result landed at `offset`. Marks of a topic whose ends were never read stay
    /// unset: partial marks would pass for complete ones.
    fn passed(&mut self, topic: String, partition: i32, offset: i64) {
        if !self.started.contains(&topic) {
            return;
        }
        let next = self.next.entry((topic, partition)).or_insert(offset + 1);
        *next = (*next).max(offset + 1);
    }

    /// Whether `def`'s final results on `topic` are read back by a restore (its ends were
    /// read and the current version has it as a final-only results topic): then they wait
    /// until a saved checkpoint carries its marks.
    pub(crate) fn kept_for(&self, def: &PipelineDefinition, topic: &str) -> bool {
        self.started(topic) && final_only_topics(def).any(|t| t == topic)
    }

    /// Reads the ends of the final-only results topics of `pipelines` not read yet. A topic
    /// whose ends cannot be read gets no marks (its results may repeat after a crash) and is
    /// tried again at the next flush.
    pub(crate) async fn start<'a>(
        &mut self,
        kafka: &KafkaConfig,
        defs: impl Iterator<Item = &'a PipelineDefinition>,
    ) {
        for def in defs {
            for topic in final_only_topics(def) {
                if self.started.contains(&topic) {
                    continue;
                }
                let mut ends = Vec::new();
                for partition in 0..def.partitions {
                    match instream_kafka::ops::watermarks(kafka, &topic, partition).await {
                        Ok((_, high)) => ends.push((partition, high)),
                        Err(e) => {
                            tracing::warn!(%topic, partition, error = %e, "could not read the end of a results partition; trying again at the next flush");
                            ends.clear();
                            break;
                        }
                    }
                }
                if ends.is_empty() {
                    continue;
                }
                for (partition, high) in ends {
                    let next = self.next.entry((topic.clone(), partition)).or_insert(high);
                    *next = (*next).max(high);
                }
                self.started.insert(topic);
            }
        }
    }

    /// The marks of `def`'s final-only results topics.
    pub(crate) fn of(&self, def: &PipelineDefinition) -> Vec<crate::ResultMark> {
        final_only_topics(def)
            .flat_map(|topic| {
                self.next
                    .range((topic.clone(), i32::MIN)..=(topic.clone(), i32::MAX))
                    .map(|((t, p), next)| (t.clone(), *p, *next))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// Reads back, from the marks of the `restored` states' checkpoints to the ends of those
/// partitions, the final results published after those checkpoints, so that a replay does
/// not publish them again. Each results partition is read once for all of them, from the
/// lowest mark. A partition that cannot be read is skipped with a warning (those results
/// may repeat).
pub(crate) async fn read_back(
    kafka: &KafkaConfig,
    states: &mut HashMap<Source, crate::PartitionState>,
    restored: &[Source],
) {
    let mut from: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for source in restored {
        let Some(state) = states.get(source) else {
            continue;
        };
        for (topic, partition, mark) in state.result_marks() {
            let lowest = from.entry((topic.clone(), *partition)).or_insert(*mark);
            *lowest = (*lowest).min(*mark);
        }
    }
    if from.is_empty() {
        return;
    }
    let sources = || restored.iter().map(|(t, p)| (t.as_str(), *p));
    let mut found: HashMap<Source, Vec<_>> = HashMap::new();
    for ((topic, partition), start) in from {
        let high = match instream_kafka::ops::watermarks(kafka, &topic, partition).await {
            Ok((_, high)) => high,
            Err(e) => {
                tracing::warn!(%topic, partition, error = %e, "results not read back: final results published after the checkpoint may repeat");
                continue;
            }
        };
        if high <= start {
            continue;
        }
        let scanned = instream_kafka::ops::scan_partition_with_header(
            kafka,
            &topic,
            partition,
            start,
            high,
            instream_kafka::headers::RESULT_SOURCE,
            ReadBack::new(&topic, partition, sources()),
            |read, offset, source, payload| read.note(offset, source, payload),
        )
        .await;
        let mut read = match scanned {
            Ok((read, lost)) => {
                if let Some(lost) = lost.first() {
                    tracing::warn!(%topic, partition, ?lost, "results deleted before they were read back: those final results may repeat");
                }
                read
            }
            Err(e) => {
                tracing::warn!(%topic, partition, error = %e, "results not read back: final results published after the checkpoint may repeat");
                continue;
            }
        };
        for source in restored {
            found
                .entry(source.clone())
                .or_default()
                .extend(read.take(&source.0, source.1));
        }
    }
    for (source, found) in found {
        if found.is_empty() {
            continue;
        }
        tracing::info!(topic = %source.0, partition = source.1, found = found.len(), "final results published after the checkpoint read back");
        if let Some(state) = states.get_mut(&source) {
            state.read_back_done(found);
        }
    }
}
