//! instream-aggregator: `<pipeline>.enriched` in, windowed aggregates out to the
//! [`AggregateStore`] (ScyllaDB, a local file, or the embedded store).
//!
//! Per input partition it keeps a [`PartitionState`]: open windows, the watermark, and what it
//! needs to drop repeats (event ids within a horizon, origin offsets of re-emitted records).
//! Every `aggregator.flush_interval` it upserts the changed windows as whole values (a repeated
//! write replaces, never adds), then saves each changed partition's state as a checkpoint
//! together with the offset it reflects, and only then marks the records handled and commits.
//! After a crash, restart or rebalance, the new owner of a partition restores its checkpoint
//! and skips the records the checkpoint already reflects, so every window ends with the value
//! one clean pass gives: nothing lost, nothing counted twice (docs/guarantees.md). Aggregations group by
//! the partition key, or are repartitioned so that each window has exactly one owner (docs/guarantees.md): for an aggregation whose group-by is not led by `key`, the owner of an enriched
//! partition forwards each new event (repeats dropped first) to `<pipeline>.by-<name>`, keyed
//! by the group and carrying its enriched partition and offset as origin, and waits for the
//! broker's acknowledgement before the enriched records count as handled; the partitions of
//! that topic are then aggregated like any other input, their repeats after a crash dropped by
//! origin and event id.
//!
//! Windows are tumbling, hopping or session windows; functions are computed by accumulators
//! that are part of the checkpointed state. A window is written once the watermark passes its
//! end (and again for late events within the lateness), and while open every
//! `aggregator.early_results_every` unless that is zero.

mod event;
mod flush;
mod functions;
mod idle;
mod notify;
mod outcomes;
mod partitions;
mod payload;
mod repartition;
mod results;
mod state;
mod windows;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use instream_core::config::{AggregatorConfig, KafkaConfig};
use instream_core::{Readiness, Service};
use instream_kafka::{BatchOutputs, DeadLetterCode, DeadLetters, Input, Producer, Record};
use instream_pipeline::{topics, Catalog};
use instream_stage::ServiceContext;
use instream_stage::{Commit, Flow, Hooks, Processed, ResumeAt, Spec, Stage, Tick};
use instream_store::{AggregateStore, Checkpoint, CheckpointKey};
use partitions::Partitions;
use tokio_util::sync::CancellationToken;

pub use event::{EventFields, RecordEvent};
pub use state::{Outcome, PartitionState, ResultMark, Scope, WATERMARK_AHEAD_OF_INGEST_MILLIS};

const SERVICE: Service = Service::Aggregator;

#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    #[error(transparent)]
    Kafka(#[from] instream_kafka::KafkaError),
    #[error(transparent)]
    Store(#[from] instream_store::StoreError),
    #[error(transparent)]
    Stage(#[from] instream_stage::StageError),
    #[error(transparent)]
    Notify(#[from] notify::NotifyError),
    #[error("partition {topic}/{partition}: {source}")]
    Checkpoint {
        topic: String,
        partition: i32,
        source: state::SnapshotError,
    },
}

/// Runs with the store `config.store` names.
pub async fn run(ctx: ServiceContext) -> Result<(), AggregatorError> {
    let store = instream_store::build(&ctx.config.store).await?;
    run_with_store(ctx, store).await
}

/// Records received since the last flush, with their ingest time (for the latency to
/// "visible"): handled once the flush has made their effect durable.
type Pending = Vec<(Record, Option<i64>)>;

/// The aggregator's part of the stage loop: what it keeps between batches.
struct Aggregator {
    store: Arc<dyn AggregateStore>,
    store_ready: Readiness,
    config: AggregatorConfig,
    kafka: KafkaConfig,
    producer: Producer,
    dead: DeadLetters,
    /// The batch's dead letters and forwarded events.
    outputs: BatchOutputs,
    /// The batch's per-event counters.
    counts: outcomes::BatchCounts,
    partitions: Partitions,
    hold_back: repartition::HoldBack,
    notifier: notify::Notifier,
    pending: Pending,
    upstream: idle::Upstream,
    last_flush: Instant,
    last_early: Instant,
    shutdown: CancellationToken,
}

/// Runs with a given store (standalone mode and tests share one embedded store).
pub async fn run_with_store(
    ctx: ServiceContext,
    store: Arc<dyn AggregateStore>,
) -> Result<(), AggregatorError> {
    // Registered before the first await, so /readyz cannot pass without it.
    let store_ready = ctx.health.register("aggregator.store");
    let stage = Stage::start(SERVICE, &ctx).await?;
    let config = &ctx.config;
    store.ping().await?;
    store_ready.set_ready();
    // Forwarded events are de-duplicated by origin offset in the repartition partitions: none
    // may be lost behind a later one.
    let producer = instream_kafka::gapless_producer(&config.kafka, SERVICE.as_str())?;
    let dead = DeadLetters::new(producer.clone(), SERVICE);
    let notifier = notify::Notifier::start(&ctx, dead.clone())?;
    let mut aggregator = Aggregator {
        store,
        store_ready,
        config: config.aggregator.clone(),
        kafka: config.kafka.clone(),
        dead,
        producer,
        outputs: BatchOutputs::default(),
        counts: outcomes::BatchCounts::default(),
        partitions: Partitions {
            group: instream_stage::group_of(config, SERVICE.as_str()),
            horizon: config.aggregator.dedup_horizon,
            states: HashMap::new(),
            restored_generation: None,
            early: false,
            resumed: Vec::new(),
            enriched_in_transactions: config.enricher_transactional(),
            result_marks: Default::default(),
        },
        hold_back: repartition::HoldBack::default(),
        notifier,
        pending: Pending::new(),
        upstream: idle::Upstream::new(instream_stage::group_of(config, Service::Enricher.as_str())),
        last_flush: Instant::now(),
        last_early: Instant::now(),
        shutdown: ctx.shutdown.clone(),
    };
    // Enriched records written in transactions leave marker offsets no reader receives.
    let transactional = config.enricher_transactional();
    let spec = Spec {
        topics_of: repartition::input_topics,
        batch_size: config.aggregator.batch_size,
        commit: Commit::Offsets {
            interval: config.kafka.commit_interval,
        },
        in_transactions: Box::new(move |topic| {
            transactional && topics::repartitioned_aggregation(topic).is_none()
        }),
    };
    stage.drive(spec, &mut aggregator).await
}

#[async_trait::async_trait]
impl Hooks for Aggregator {
    type Error = AggregatorError;

    fn receive_wait(&self) -> Duration {
        let flush_interval = self.config.flush_interval;
        flush_interval
            .saturating_sub(self.last_flush.elapsed())
            .max(Duration::from_millis(1))
    }

    fn before_receive(&mut self, input: Input<'_>) -> Result<(), AggregatorError> {
        self.hold_back.follow(input, self.kafka.backlog.as_ref())
    }

    fn rebalanced(&mut self, _input: Input<'_>) {
        partitions::forget_assignment(&mut self.partitions, &mut self.pending);
    }

    async fn received(
        &mut self,
        input: Input<'_>,
        _batch: &[Record],
        resume: &mut Vec<ResumeAt>,
    ) -> Result<Flow, AggregatorError> {
        slowed_down_by_a_test().await;
        let restored = self
            .partitions
            .restore_assigned(
                input,
                &*self.store,
                &self.kafka,
                &self.store_ready,
                &self.shutdown,
            )
            .await?;
        if !restored {
            return Ok(Flow::Stop); // stopping while the store was away: nothing more to count
        }
        resume.extend(
            self.partitions
                .resumed
                .drain(..)
                .map(|((topic, partition), next)| ResumeAt {
                    topic,
                    partition,
                    next,
                }),
        );
        Ok(Flow::Continue)
    }

    async fn process(
        &mut self,
        _input: Input<'_>,
        catalog: &Arc<Catalog>,
        batch: &mut Vec<Record>,
    ) -> Result<Processed, AggregatorError> {
        let mut processed = Processed::Kept;
        let mut heard: Vec<(String, i32)> = Vec::new();
        for record in batch.iter() {
            if !heard
                .iter()
                .any(|(t, p)| *p == record.partition && *t == record.topic)
            {
                heard.push((record.topic.clone(), record.partition));
            }
        }
        for record in batch.drain(..) {
            let flow = self.aggregate(catalog, record).await;
            if flow.is_err() {
                // Counted as they were applied, as each event's count was before batching.
                self.counts.emit();
            }
            if let Flow::Stop = flow? {
                // Stopping while the store was away: the rest is read again after a restart.
                processed = Processed::Interrupted;
                break;
            }
        }
        self.counts.emit();
        let now = instream_event::now_millis();
        for source in &heard {
            if let Some(state) = self.partitions.states.get_mut(source) {
                state.heard_from(now);
            }
        }
        // The batch's dead letters and forwarded events are on the broker before its records
        // can be checkpointed and committed as handled: one wait for all of them.
        if !self
            .outputs
            .delivered_unless(&self.producer, &self.shutdown)
            .await?
        {
            // Stopping while the broker does not answer: what was counted since the last
            // checkpoint may not have been forwarded, so it is neither flushed nor committed;
            // a restart reads it again.
            return Ok(Processed::Unconfirmed);
        }
        Ok(processed)
    }

    async fn tick(
        &mut self,
        input: Input<'_>,
        catalog: &Arc<Catalog>,
    ) -> Result<Tick, AggregatorError> {
        if self.last_flush.elapsed() < self.config.flush_interval {
            return Ok(Tick::Nothing);
        }
        let early_every = self.config.early_results_every;
        self.partitions.early = !early_every.is_zero() && self.last_early.elapsed() >= early_every;
        if self.partitions.early {
            self.last_early = Instant::now();
        }
        idle::advance(
            &mut self.partitions,
            &mut self.upstream,
            idle::Inputs {
                input,
                catalog,
                kafka: &self.kafka,
                enriched_paused: self.hold_back.enriched_paused(),
            },
        )
        .await?;
        let stop = self.shutdown.clone();
        self.notifier.follow(catalog);
        let durable = self.flush(input, catalog, &stop).await?;
        self.last_flush = Instant::now();
        Ok(if durable {
            Tick::CommitNow
        } else {
            Tick::Nothing
        })
    }

    /// What was counted is written and checkpointed, then committed. With early results on,
    /// the last values of open windows are written too. Retries until the store takes
    /// everything; the supervisor's drain timeout bounds it (then nothing is committed and a
    /// restart reads the rest again).
    async fn drain(
        &mut self,
        input: Input<'_>,
        catalog: &Arc<Catalog>,
    ) -> Result<bool, AggregatorError> {
        self.partitions.early = !self.config.early_results_every.is_zero();
        self.notifier.follow(catalog);
        let durable = self
            .flush(input, catalog, &CancellationToken::new())
            .await?;
        tracing::info!(
            partitions = self.partitions.states.len(),
            "aggregator drained"
        );
        Ok(durable)
    }

    fn release(&mut self, input: Input<'_>) {
        self.hold_back.release(input);
    }
}

impl Aggregator {
    /// Counts one record into its partition's state (forwarding it first where its
    /// aggregations repartition), or dead-letters it. `Stop` when shutdown came while the
    /// store was unreachable.
    async fn aggregate(
        &mut self,
        catalog: &Catalog,
        record: Record,
    ) -> Result<Flow, AggregatorError> {
        let event = match RecordEvent::read(&record.payload) {
            Ok(event) => event,
            Err(e) => {
                self.dead_letter(record, DeadLetterCode::DecodeError, &e.to_string())
                    .await?;
                return Ok(Flow::Continue);
            }
        };
        let Some(def) = catalog.get(event.pipeline()) else {
            let reason = format!("no definition for pipeline `{}`", event.pipeline());
            self.dead_letter(record, DeadLetterCode::UnknownPipeline, &reason)
                .await?;
            return Ok(Flow::Continue);
        };
        let source = (record.topic.clone(), record.partition);
        let horizon = self.partitions.horizon;
        let state = self
            .partitions
            .state(
                &*self.store,
                &self.kafka,
                &self.store_ready,
                &source,
                &self.shutdown,
            )
            .await?;
        let Some(state) = state else {
            return Ok(Flow::Stop);
        };
        let origin = repartition::origin_of(&record);
        let scope = match topics::repartitioned_aggregation(&record.topic) {
            Some(name) => Scope::Repartitioned {
                aggregation: name,
                group: record
                    .key
                    .as_deref()
                    .and_then(|k| std::str::from_utf8(k).ok()),
                idle_timeout: self.config.repartition_idle_timeout,
            },
            None => Scope::Keyed,
        };
        let outcome = state.apply_in(scope, record.offset, &event, origin, def, horizon);
        self.counts.outcome(event.pipeline(), scope, &outcome);
        if outcome == Outcome::OutOfOrderOrigin {
            tracing::error!(
                topic = %record.topic,
                partition = record.partition,
                offset = record.offset,
                origin = ?origin,
                event_id = %event.event_id(),
                "an event below the highest origin offset counted, never seen before: written out \
                 of order upstream, dropped by the origin rule (InstreamOriginOutOfOrder)"
            );
        }
        let refused = refusal(&outcome, &event, def, state);
        if scope == Scope::Keyed && matches!(outcome, Outcome::Counted | Outcome::TooLate(_)) {
            let outputs = (&mut self.outputs, &mut self.counts);
            let verdicts =
                repartition::forward(&self.producer, &record, &event, def, outputs).await?;
            for (aggregation, verdict) in verdicts {
                state.tally(event.ingest_time(), record.offset, aggregation, verdict);
            }
        }
        if let Some((code, reason)) = refused {
            self.outputs
                .push(self.dead.publish_record(&record, code, &reason).await?);
        }
        let ingest_time = event.ingest_time();
        drop(event);
        self.pending.push((record, Some(ingest_time)));
        Ok(Flow::Continue)
    }

    /// Dead-letters a record; its offset is handled with the batch.
    async fn dead_letter(
        &mut self,
        record: Record,
        code: DeadLetterCode,
        reason: &str,
    ) -> Result<(), AggregatorError> {
        self.outputs
            .push(self.dead.publish_record(&record, code, reason).await?);
        self.pending.push((record, None));
        Ok(())
    }

    async fn flush(
        &mut self,
        input: Input<'_>,
        catalog: &Catalog,
        stop: &CancellationToken,
    ) -> Result<bool, AggregatorError> {
        let sinks = flush::Sinks {
            store: &*self.store,
            ready: &self.store_ready,
            producer: &self.producer,
            kafka: &self.kafka,
            catalog,
            stop,
        };
        flush::flush(
            &sinks,
            input,
            &mut self.partitions,
            &mut self.notifier,
            &mut self.pending,
        )
        .await
    }
}

/// A test's pause per batch (`FAILPOINTS=aggregator-batch=return(<ms>)`), to make the
/// aggregator the slow stage; inert unless built with the `failpoints` feature of `fail`.
async fn slowed_down_by_a_test() {
    let pause = (|| -> Option<u64> {
        fail::fail_point!("aggregator-batch", |ms: Option<String>| ms
            .and_then(|ms| ms.parse().ok()));
        None
    })();
    if let Some(ms) = pause {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// For a broker replaced by an empty one (a restarted standalone's embedded broker keeps
/// nothing): moves every checkpoint of `group` for the input partitions of `catalog` to offset 0
/// of the new topics, keeping the windows and watermarks they hold (what was counted before
/// the restart goes on counting), forgetting origin offsets and seen ids (they refer to the
/// old topics). Returns how many checkpoints moved.
pub async fn rebase_checkpoints(
    store: &dyn AggregateStore,
    group: &str,
    catalog: &Catalog,
) -> Result<usize, AggregatorError> {
    let mut moved = Vec::new();
    for def in catalog.iter() {
        for topic in repartition::input_topics_of(def) {
            for partition in 0..def.partitions {
                let key = CheckpointKey {
                    group: group.to_owned(),
                    topic: topic.clone(),
                    partition,
                };
                let Some(checkpoint) = store.load_checkpoint(&key).await? else {
                    continue;
                };
                let (mut state, _) =
                    PartitionState::restore(&checkpoint.state).map_err(|source| {
                        AggregatorError::Checkpoint {
                            topic: topic.clone(),
                            partition,
                            source,
                        }
                    })?;
                if state.has_legacy_group_keys() {
                    state.upgrade_group_keys(|p| catalog.get(p).map(|d| &**d));
                }
                state.rebase();
                if let Some((next_offset, bytes)) = state.snapshot() {
                    moved.push(Checkpoint {
                        key,
                        next_offset,
                        state: bytes,
                    });
                }
            }
        }
    }
    if !moved.is_empty() {
        store.save_checkpoints(&moved).await?;
    }
    Ok(moved.len())
}

/// Why an event that was read is dead-lettered instead of counted, if it is: its dead-letter
/// code and reason.
fn refusal(
    outcome: &Outcome,
    event: &impl EventFields,
    def: &instream_pipeline::PipelineDefinition,
    state: &PartitionState,
) -> Option<(DeadLetterCode, String)> {
    match outcome {
        Outcome::TooLate(aggregations) => Some((
            DeadLetterCode::TooLate,
            format!(
                "event time {} is beyond the allowed lateness of {} (watermark {})",
                instream_event::format_rfc3339_millis(event.event_time()),
                aggregations.join(", "),
                instream_event::format_rfc3339_millis(state.watermark_for(def)),
            ),
        )),
        Outcome::TooFarAhead => Some((
            DeadLetterCode::FutureTime,
            format!(
                "event time {} is more than {:?} after its ingest time {}",
                instream_event::format_rfc3339_millis(event.event_time()),
                def.max_time_ahead,
                instream_event::format_rfc3339_millis(event.ingest_time()),
            ),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
