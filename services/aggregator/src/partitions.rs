//! The partition states an aggregator owns: restored from their checkpoints as partitions
//! are assigned, dropped when the assignment changes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use instream_core::{GaveUp, Readiness, Retry};
use instream_kafka::Input;
use instream_store::{AggregateStore, CheckpointKey};
use tokio_util::sync::CancellationToken;

use crate::state::{self, PartitionState};
use crate::{AggregatorError, Pending, SERVICE};

pub(crate) type Source = (String, i32);

/// The states of the partitions this instance owns, loaded from their checkpoints as soon as
/// they are assigned.
pub(crate) struct Partitions {
    pub(crate) group: String,
    pub(crate) horizon: Duration,
    pub(crate) states: HashMap<Source, PartitionState>,
    /// The assignment generation whose partitions are all restored.
    pub(crate) restored_generation: Option<u64>,
    /// Whether this flush also writes windows still open (an early-results round).
    pub(crate) early: bool,
    /// Partitions restored from a checkpoint since last asked, with the offset they resume
    /// at (the loss check expects their next record there).
    pub(crate) resumed: Vec<(Source, i64)>,
    /// Whether the enricher writes the enriched topics in transactions.
    pub(crate) enriched_in_transactions: bool,
    /// Where restores read final results back from (see `results.rs`).
    pub(crate) result_marks: crate::results::Marks,
}

impl Partitions {
    /// Restores every partition of the assignment in force that is not restored yet. Not
    /// only on its first record: a partition with nothing new to read (everything up to its
    /// end checkpointed before a crash) must still write the windows its checkpoint holds —
    /// when they close, as early results, on drain — instead of keeping them until a record
    /// arrives, which may be never. `false` when `stop` fired while the store was unreachable.
    pub(crate) async fn restore_assigned(
        &mut self,
        input: Input<'_>,
        store: &dyn AggregateStore,
        kafka: &instream_core::config::KafkaConfig,
        ready: &Readiness,
        stop: &CancellationToken,
    ) -> Result<bool, AggregatorError> {
        // Called for every batch: nothing to do while the assignment has not changed (an
        // atomic read, without copying the assignment).
        if self.restored_generation == Some(input.generation()) {
            return Ok(true);
        }
        // Between a revoke and the next assignment there is nothing to restore yet.
        let Some((generation, assigned)) = input.current_assignment() else {
            return Ok(true);
        };
        let mut missing: Vec<Source> = assigned
            .into_iter()
            .filter(|source| !self.states.contains_key(source))
            .collect();
        missing.sort();
        for source in &missing {
            if !self.restore_one(store, kafka, ready, source, stop).await? {
                return Ok(false);
            }
        }
        crate::results::read_back(kafka, &mut self.states, &missing).await;
        self.restored_generation = Some(generation);
        metrics::gauge!("instream_aggregator_partition_states", "service" => SERVICE.as_str())
            .set(self.states.len() as f64);
        Ok(true)
    }

    /// The state of `source`, restored from its checkpoint the first time it is asked for:
    /// windows and offsets from the store, seen event ids by reading the partition's recent
    /// records again. `None` when `stop` fired while the store was unreachable.
    pub(crate) async fn state(
        &mut self,
        store: &dyn AggregateStore,
        kafka: &instream_core::config::KafkaConfig,
        ready: &Readiness,
        source: &Source,
        stop: &CancellationToken,
    ) -> Result<Option<&mut PartitionState>, AggregatorError> {
        if !self.states.contains_key(source) {
            if !self.restore_one(store, kafka, ready, source, stop).await? {
                return Ok(None);
            }
            crate::results::read_back(kafka, &mut self.states, std::slice::from_ref(source)).await;
        }
        Ok(self.states.get_mut(source))
    }

    /// Restores `source` from its checkpoint (without reading results back); `false` when
    /// `stop` fired while the store was unreachable.
    async fn restore_one(
        &mut self,
        store: &dyn AggregateStore,
        kafka: &instream_core::config::KafkaConfig,
        ready: &Readiness,
        source: &Source,
        stop: &CancellationToken,
    ) -> Result<bool, AggregatorError> {
        {
            let key = CheckpointKey {
                group: self.group.clone(),
                topic: source.0.clone(),
                partition: source.1,
            };
            let started = Instant::now();
            // Enriched records written in transactions leave offsets no reader receives.
            let markers = self.enriched_in_transactions
                && instream_pipeline::topics::repartitioned_aggregation(&key.topic).is_none();
            let what = format!(
                "restoring the checkpoint of {}/{}",
                key.topic, key.partition
            );
            let restored = Retry::new(&what, stop)
                .reporting_to(ready)
                .run_while(
                    // A checkpoint this build cannot read: going on would lose or double
                    // count, so the service stops and says which partition.
                    |error| !matches!(error, AggregatorError::Checkpoint { .. }),
                    || restore(store, kafka, &key, self.horizon, markers),
                )
                .await;
            let (state, from_checkpoint) = match restored {
                Ok(restored) => restored,
                Err(GaveUp::Stopped) => return Ok(false),
                Err(GaveUp::Failed(error) | GaveUp::TimedOut { error, .. }) => return Err(error),
            };
            if from_checkpoint {
                self.resumed.push((source.clone(), state.next_offset()));
            }
            ready.set_ready();
            metrics::histogram!("instream_checkpoint_restore_seconds", "service" => SERVICE.as_str())
                .record(started.elapsed().as_secs_f64());
            tracing::info!(
                topic = %key.topic,
                partition = key.partition,
                next_offset = state.next_offset(),
                windows = state.window_count(),
                remembered_ids = state.remembered_ids(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "partition state restored"
            );
            self.states.insert(source.clone(), state);
        }
        Ok(true)
    }
}

/// Loads a partition's checkpoint (a fresh state when there is none: `false`) and rebuilds
/// its seen ids from the partition itself.
async fn restore(
    store: &dyn AggregateStore,
    kafka: &instream_core::config::KafkaConfig,
    key: &CheckpointKey,
    horizon: Duration,
    markers: bool,
) -> Result<(PartitionState, bool), AggregatorError> {
    let Some(checkpoint) = store.load_checkpoint(key).await? else {
        return Ok((PartitionState::default(), false));
    };
    let (state, seen_from) = PartitionState::restore(&checkpoint.state).map_err(|source| {
        AggregatorError::Checkpoint {
            topic: key.topic.clone(),
            partition: key.partition,
            source,
        }
    })?;
    let next = state.next_offset();
    let (low, high) = instream_kafka::ops::watermarks(kafka, &key.topic, key.partition).await?;
    if high < next {
        return Err(AggregatorError::Checkpoint {
            topic: key.topic.clone(),
            partition: key.partition,
            source: state::SnapshotError(format!(
                "it reflects offsets up to {next}, but the partition ends at {high}: was the \
                 topic recreated? Remove the aggregator's checkpoints for it (see the runbook)"
            )),
        });
    }
    // Records deleted past `next` before they were counted are found (and counted as lost)
    // by the loss check when the partition's first record arrives.
    if low > seen_from {
        tracing::warn!(topic = %key.topic, partition = key.partition, from = seen_from, to = low.min(next), "records of the de-duplication horizon were deleted by retention; repeats of them cannot be recognized");
    }
    let seen_from = seen_from.max(low);
    let (mut state, skipped) = instream_kafka::ops::scan_partition(
        kafka,
        &key.topic,
        key.partition,
        seen_from,
        next,
        markers,
        state,
        |state, offset, payload| state.rebuild_seen(offset, payload),
    )
    .await?;
    if let Some(lost) = skipped.into_iter().next() {
        // Ids of counted records that were not read again: their repeats would be counted
        // twice. Failing the restore (it is retried, the aggregator not ready meanwhile) is
        // the loud way.
        return Err(instream_kafka::KafkaError::Skipped(lost).into());
    }
    state.finish_rebuild(horizon);
    Ok((state, true))
}

/// After a rebalance every partition may have a new owner: states are restored again from
/// their checkpoints, and records received under the old assignment are read again from the
/// last commit (the revoke committed exactly what was checkpointed).
pub(crate) fn forget_assignment(partitions: &mut Partitions, pending: &mut Pending) {
    partitions.states.clear();
    partitions.restored_generation = None;
    metrics::gauge!("instream_aggregator_partition_states", "service" => SERVICE.as_str()).set(0.0);
    pending.clear();
}
