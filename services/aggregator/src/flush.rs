//! The flush: every changed window is written (to the store, and to the results topics of
//! aggregations with a Kafka output), the notifications its value owes are made, merged
//! sessions are deleted, then every changed partition's checkpoint is saved — each step
//! retried until the store takes it — and only then are the records they cover handled.
//! A flush cut short by `stop` makes nothing new durable, so nothing may be committed (what
//! was taken is put back for the next attempt).

use instream_core::config::KafkaConfig;
use instream_core::{Readiness, Retry};
use instream_kafka::{Input, Producer};
use instream_pipeline::{topics, Catalog, PipelineDefinition};
use instream_store::{AggregateStore, Checkpoint, CheckpointKey, WindowAggregate};
use tokio_util::sync::CancellationToken;

use crate::partitions::{Partitions, Source};
use crate::{notify, results, AggregatorError, Pending, SERVICE};

/// What a flush writes to and reads its definitions from.
pub(crate) struct Sinks<'a> {
    pub(crate) store: &'a dyn AggregateStore,
    pub(crate) ready: &'a Readiness,
    pub(crate) producer: &'a Producer,
    pub(crate) kafka: &'a KafkaConfig,
    pub(crate) catalog: &'a Catalog,
    pub(crate) stop: &'a CancellationToken,
}

impl<'a> Sinks<'a> {
    fn def_of(&self, pipeline: &str) -> Option<&'a PipelineDefinition> {
        self.catalog.get(pipeline).map(|d| &**d)
    }

    /// Retries `write` with back-off until it succeeds; false when `stop` fired first.
    async fn until_written<F, Fut>(&self, what: &str, write: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), instream_store::StoreError>>,
    {
        Retry::new(what, self.stop)
            .reporting_to(self.ready)
            .run(write)
            .await
            .is_some()
    }
}

/// See the module documentation. `Ok(false)`: cut short, nothing may be committed.
pub(crate) async fn flush(
    sinks: &Sinks<'_>,
    input: Input<'_>,
    partitions: &mut Partitions,
    notifier: &mut notify::Notifier,
    pending: &mut Pending,
) -> Result<bool, AggregatorError> {
    notify::before_flush(notifier, partitions);
    // Before any final result is published: where a restore would read them back from.
    let mut owned: Vec<&PipelineDefinition> = partitions
        .states
        .keys()
        .filter_map(|(topic, _)| sinks.def_of(topics::pipeline_of(topic)))
        .collect();
    owned.sort_by(|a, b| a.name.cmp(&b.name));
    owned.dedup_by(|a, b| a.name == b.name);
    partitions
        .result_marks
        .start(sinks.kafka, owned.into_iter())
        .await;
    if !write_windows(sinks, partitions, notifier).await?
        || !delete_merged(sinks, partitions).await?
        || !write_ledger(sinks, partitions).await
    {
        return Ok(false);
    }
    let visible = instream_event::now_millis();
    let Some(open) = save_checkpoints(sinks, partitions).await else {
        // Not durable: the records stay unhandled and are read again after a restart.
        return Ok(false);
    };
    for ingest_time in pending.iter().filter_map(|(_, t)| *t) {
        instream_core::events::stage_latency("aggregator_visible")
            .record((visible - ingest_time).max(0) as f64 / 1000.0);
    }
    input.complete(pending.iter().map(|(record, _)| record));
    pending.clear();
    metrics::gauge!("instream_open_windows", "service" => SERVICE.as_str()).set(open as f64);
    Ok(true)
}

/// Writes the windows due, publishes their results and makes their notifications.
async fn write_windows(
    sinks: &Sinks<'_>,
    partitions: &mut Partitions,
    notifier: &mut notify::Notifier,
) -> Result<bool, AggregatorError> {
    let mut rows: Vec<WindowAggregate> = Vec::new();
    // Which partition wrote which rows: their notifications and results are its own.
    let mut written_by: Vec<(Source, std::ops::Range<usize>)> = Vec::new();
    for (source, state) in partitions.states.iter_mut() {
        let from = rows.len();
        state.take_dirty(|p| sinks.def_of(p), partitions.early, &mut rows);
        if rows.len() > from {
            written_by.push((source.clone(), from..rows.len()));
        }
    }
    if rows.is_empty() {
        return Ok(true);
    }
    let plan = results::Plan::of(&rows, &written_by, partitions, sinks.catalog);
    // Results on the broker before the checkpoint that may drop their windows.
    let written = sinks
        .until_written("windows", || sinks.store.upsert(&rows))
        .await
        && results::publish(
            sinks.producer,
            sinks.catalog,
            &rows,
            results::Kind::Value,
            |i| plan.skip(i),
            &mut partitions.result_marks,
            sinks.stop,
        )
        .await?;
    // A crash here (a test's `FAILPOINTS=aggregator-results-published=return`): results on
    // the topic, their windows not checkpointed.
    fail::fail_point!(
        "aggregator-results-published",
        written && plan.sends_final_only(),
        |_| std::process::abort()
    );
    if !written {
        for state in partitions.states.values_mut() {
            state.mark_dirty(&rows);
        }
        return Ok(false);
    }
    plan.hold_waiting(partitions, &rows);
    metrics::counter!("instream_window_writes_total", "service" => SERVICE.as_str())
        .increment(rows.len() as u64);
    // Notifications without room are dead-lettered before the checkpoint that holds them as
    // notified.
    let refused =
        notify::after_write(notifier, partitions, &rows, written_by, |p| sinks.def_of(p)).await?;
    if !instream_kafka::client::all_delivered_unless(sinks.producer, refused, sinks.stop).await? {
        return Ok(false);
    }
    let now = instream_event::now_millis();
    let delay =
        metrics::histogram!("instream_window_close_delay_seconds", "service" => SERVICE.as_str());
    for state in partitions.states.values_mut() {
        for closed_at in state.take_written_closes() {
            let ms = closed_at.map_or(0, |t| (now - t).max(0));
            delay.record(ms as f64 / 1000.0);
        }
    }
    Ok(true)
}

/// Deletes the rows of sessions merged into another (and says so on the results topics).
async fn delete_merged(
    sinks: &Sinks<'_>,
    partitions: &mut Partitions,
) -> Result<bool, AggregatorError> {
    let deletes: Vec<WindowAggregate> = partitions
        .states
        .values()
        .flat_map(|state| state.deletes().iter().cloned())
        .collect();
    if deletes.is_empty() {
        return Ok(true);
    }
    let deleted = sinks
        .until_written("merged sessions", || sinks.store.delete(&deletes))
        .await
        && results::publish(
            sinks.producer,
            sinks.catalog,
            &deletes,
            results::Kind::Deleted,
            |_| (false, None),
            &mut partitions.result_marks,
            sinks.stop,
        )
        .await?;
    if deleted {
        for state in partitions.states.values_mut() {
            state.deletes_done();
        }
    }
    Ok(deleted)
}

/// Writes the audit ledger's changed rows: before the checkpoints that hold their counts, so
/// that a line a checkpoint lets go of is in the store.
async fn write_ledger(sinks: &Sinks<'_>, partitions: &mut Partitions) -> bool {
    let mut rows = Vec::new();
    for ((topic, partition), state) in partitions.states.iter() {
        let source = format!("{topic}:{partition}");
        rows.extend(state.ledger_rows(topics::pipeline_of(topic), &source));
    }
    if rows.is_empty() {
        return true;
    }
    if !sinks
        .until_written("audit ledger", || sinks.store.save_ledger(&rows))
        .await
    {
        return false;
    }
    for state in partitions.states.values_mut() {
        state.ledger_written();
    }
    true
}

/// Drops the windows now final and saves every changed partition's checkpoint: the windows
/// still open, or `None` when `stop` fired first.
async fn save_checkpoints(sinks: &Sinks<'_>, partitions: &mut Partitions) -> Option<usize> {
    let mut checkpoints = Vec::new();
    let mut snapshotted = Vec::new();
    let mut open = 0;
    for (source, state) in partitions.states.iter_mut() {
        if let Some(def) = sinks.def_of(topics::pipeline_of(&source.0)) {
            state.set_result_marks(partitions.result_marks.of(def));
        }
        state.prune_published();
        state.close_windows(|pipeline| sinks.def_of(pipeline).map(|d| d.max_out_of_orderness));
        open += state.window_count();
        if let Some((next_offset, bytes)) = state.snapshot() {
            snapshotted.push(source.clone());
            checkpoints.push(Checkpoint {
                key: CheckpointKey {
                    group: partitions.group.clone(),
                    topic: source.0.clone(),
                    partition: source.1,
                },
                next_offset,
                state: bytes,
            });
        }
    }
    if !checkpoints.is_empty()
        && !sinks
            .until_written("checkpoints", || sinks.store.save_checkpoints(&checkpoints))
            .await
    {
        return None;
    }
    for state in partitions.states.values_mut() {
        state.mark_saved();
    }
    for source in snapshotted {
        if let Some(state) = partitions.states.get_mut(&source) {
            state.result_marks_saved();
        }
    }
    Some(open)
}
