//! Repartitioning (docs/guarantees.md): which topics the aggregator reads, and how an event of an
//! aggregation not grouped by the key leaves for `<pipeline>.by-<aggregation>` carrying its
//! enriched position as origin.

use instream_kafka::client::{self, Producer};
use instream_kafka::{headers, BatchOutputs, Input, Outgoing, Record};
use instream_pipeline::{topics, Catalog, PipelineDefinition};

use crate::event::EventFields;
use crate::outcomes::BatchCounts;
use crate::state::Tally;
use crate::{functions, payload, windows, AggregatorError};

/// The enriched topic of every pipeline with aggregations, and the repartition topic of each
/// aggregation not grouped by the key.
pub(crate) fn input_topics(catalog: &Catalog) -> Vec<String> {
    catalog.iter().flat_map(|p| input_topics_of(p)).collect()
}

/// The topics [`input_topics`] holds for one pipeline: those of the versions it keeps too,
/// whose windows may still be open.
pub(crate) fn input_topics_of(p: &PipelineDefinition) -> Vec<String> {
    let versions = || p.versions().map(|(v, ..)| v);
    if versions().all(|v| v.aggregations.is_empty()) {
        return Vec::new();
    }
    // An aggregation in several versions has one repartition topic.
    let repartitioned: std::collections::BTreeSet<String> = versions()
        .flat_map(|v| v.aggregations.iter().filter(|a| a.repartitioned()))
        .map(|a| topics::repartition(&p.name, &a.name))
        .collect();
    std::iter::once(topics::enriched(&p.name))
        .chain(repartitioned)
        .collect()
}

/// Sends `event` (the enriched `record` as it came) to the repartition topic of each of its
/// pipeline's aggregations not grouped by the key that takes it, keyed by its group there.
/// Its origin becomes the enriched partition and offset: one forwarder per enriched
/// partition writes them in order, so a copy written again after a crash is recognised.
/// Returns, for the audit ledger, what became of the event for each such aggregation.
pub(crate) async fn forward<'d>(
    producer: &Producer,
    record: &Record,
    event: &impl EventFields,
    def: &'d PipelineDefinition,
    (outputs, counts): (&mut BatchOutputs, &mut BatchCounts),
) -> Result<Vec<(&'d str, Tally)>, AggregatorError> {
    let mut verdicts: Vec<(&'d str, Tally)> = Vec::new();
    for (version, ..) in def.versions() {
        for a in version.aggregations.iter().filter(|a| a.repartitioned()) {
            if !verdicts.iter().any(|(name, _)| *name == a.name) {
                verdicts.push((&a.name, Tally::OutsideWindows));
            }
        }
    }
    let mut verdict = |name: &str, tally: Tally| {
        if let Some((_, kept)) = verdicts.iter_mut().find(|(n, _)| *n == name) {
            if tally == Tally::Forwarded || *kept == Tally::OutsideWindows {
                *kept = tally;
            }
        }
    };
    let mut payload = payload::Payload::new(event.payload());
    // Once per aggregation, under the versions whose windows the event is in: a repartitioned
    // aggregation keeps its group_by across versions (checked at apply), so one copy serves
    // them all, and the repartition partition picks each window's version again.
    let mut forwarded: Vec<&str> = Vec::new();
    let t = event.event_time();
    let mut candidates: Vec<&instream_pipeline::Aggregation> = Vec::new();
    for (version, from, until) in def.versions() {
        candidates.extend(
            version
                .aggregations
                .iter()
                .filter(|a| a.repartitioned() && a.window.makes_window_of(t, &(from..until))),
        );
    }
    for aggregation in candidates {
        if forwarded.contains(&aggregation.name.as_str()) {
            continue;
        }
        if let Some(filter) = &aggregation.filter {
            if !functions::accepts(filter, event, &mut payload) {
                verdict(&aggregation.name, Tally::FilteredOut);
                continue;
            }
        }
        verdict(&aggregation.name, Tally::Forwarded);
        forwarded.push(&aggregation.name);
        let group = windows::group_key(aggregation, event, &mut payload);
        let topic = topics::repartition(&def.name, &aggregation.name);
        let (partition, offset) = (record.partition.to_string(), record.offset.to_string());
        let out = Outgoing::to(&topic)
            .key(group.as_bytes())
            .payload(record.payload.as_slice())
            .header(headers::ORIGIN_PARTITION, partition)
            .header(headers::ORIGIN_OFFSET, offset);
        outputs.push(client::send(producer, out).await?);
        counts.forwarded(&def.name, &aggregation.name);
    }
    Ok(verdicts)
}

/// The origin partition and offset a record carries (the enricher's input position).
pub(crate) fn origin_of(record: &Record) -> Option<(i32, i64)> {
    let number = |name| {
        record
            .header(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<i64>().ok())
    };
    let partition = i32::try_from(number(headers::ORIGIN_PARTITION)?).ok()?;
    Some((partition, number(headers::ORIGIN_OFFSET)?))
}

/// Standalone: the aggregator reads its repartition topics itself, so it cannot wait for room
/// in them before forwarding (it would wait for its own reading). Instead, while one of them
/// holds half of what the account allows unread, it pauses its enriched partitions (no new
/// forwards) and goes on reading the repartition topics until they have room. Half, because
/// the batch being handled when that is seen still forwards all of its records (at most what
/// the enriched topic held unread).
#[derive(Default)]
pub(crate) struct HoldBack {
    /// The assignment generation whose enriched partitions are paused.
    paused: Option<u64>,
}

impl HoldBack {
    pub(crate) fn follow(
        &mut self,
        input: Input<'_>,
        backlog: Option<&instream_core::backlog::Backlog>,
    ) -> Result<(), AggregatorError> {
        let Some(backlog) = backlog else {
            return Ok(());
        };
        let Some((generation, assigned)) = input.current_assignment() else {
            return Ok(());
        };
        if self.paused.is_some_and(|g| g != generation) {
            // A new assignment starts unpaused.
            self.paused = None;
        }
        let full = assigned.iter().any(|(topic, _)| {
            topics::repartitioned_aggregation(topic).is_some()
                && backlog.unread(topic) >= backlog.budget() / 2
        });
        if full == self.paused.is_some() {
            return Ok(());
        }
        let enriched: Vec<(String, i32)> = assigned
            .into_iter()
            .filter(|(topic, _)| topics::repartitioned_aggregation(topic).is_none())
            .collect();
        let outcome = if full {
            tracing::info!("a repartition topic is half full: holding the enriched input back");
            self.paused = Some(generation);
            input.pause(&enriched)
        } else {
            tracing::info!("the repartition topics have room: reading the enriched input again");
            self.paused = None;
            input.resume(&enriched)
        };
        Ok(outcome?)
    }

    /// Whether the enriched partitions are held back now.
    pub(crate) fn enriched_paused(&self) -> bool {
        self.paused.is_some()
    }

    /// Resumes what is paused (before the consumer closes: a close with paused partitions
    /// has been seen to wait for ever).
    pub(crate) fn release(&mut self, input: Input<'_>) {
        if self.paused.take().is_none() {
            return;
        }
        if let Some((_, assigned)) = input.current_assignment() {
            let all: Vec<(String, i32)> = assigned.into_iter().collect();
            if let Err(error) = input.resume(&all) {
                tracing::warn!(%error, "resuming the enriched input before closing failed");
            }
        }
    }
}
