//! The loop every consuming stage runs, written once: follow the definitions, receive a batch,
//! let the stage restore what its partitions need, check the batch for skipped offsets, hand
//! it to the stage, make its effect durable, and only then commit — by the consumer, or in the
//! batch's transaction. On shutdown the stage drains (makes everything durable) before the
//! last commit, and the consumer leaves its group.
//!
//! A stage supplies [`Hooks`]; what it must never get wrong (commit only what is durable, a
//! transaction per batch, a redo after an abort, a drain) is the driver's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use instream_core::{Backoff, Pauses, Readiness};
use instream_kafka::client::{self, recv_batch};
use instream_kafka::transactions::{ranges, Outcome, Transactions};
use instream_kafka::{Continuity, Input, KafkaError, Record};
use instream_pipeline::Catalog;
use tokio::sync::watch;

use crate::{Stage, Subscription};

/// The pause before a batch whose transaction was aborted is done again, doubled each time
/// in a row up to its maximum (reached after six aborts in a row: the stage is then not
/// ready until a batch commits).
const REDO_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// What a stage reads and how its progress is committed.
pub struct Spec {
    /// The topics to read under the current definitions (followed as they change).
    pub topics_of: fn(&Catalog) -> Vec<String>,
    /// Most records per batch.
    pub batch_size: usize,
    pub commit: Commit,
    /// Whether a topic is written in transactions: its markers leave gaps no reader receives,
    /// which are losses only once the log start has passed them.
    pub in_transactions: Box<dyn Fn(&str) -> bool + Send + Sync>,
}

/// How a stage's progress reaches the consumer group.
pub enum Commit {
    /// The consumer commits what the stage marked handled ([`Input::complete`]) every
    /// `interval`, and at once when the stage says [`Tick::CommitNow`].
    Offsets { interval: Duration },
    /// Each batch is one transaction holding the stage's outputs and the batch's offsets
    /// (KIP-447: a member deposed by a rebalance is fenced); the batch counts as handled
    /// when it commits. `readiness` is not ready while batches are aborted again and again.
    Transactions {
        transactions: Transactions,
        readiness: Readiness,
    },
}

/// Whether the loop goes on.
pub enum Flow {
    Continue,
    /// Stop receiving and drain (shutdown came while the stage waited for a backend).
    Stop,
}

/// What became of a batch handed to [`Hooks::process`].
pub enum Processed {
    /// Every record is handled: its outputs are acknowledged by the broker (or belong to the
    /// open transaction). The driver marks the batch handled.
    Handled,
    /// The stage keeps the records' effect and marks them handled itself once durable.
    Kept,
    /// Shutdown came in the middle of the batch: what is not handled is read again after a
    /// restart. The stage drains.
    Interrupted,
    /// Shutdown came while outputs were unacknowledged: nothing more may be made durable or
    /// committed by this process (no drain).
    Unconfirmed,
}

/// What a stage's periodic work ([`Hooks::tick`]) made durable.
pub enum Tick {
    /// Nothing new: no commit.
    Nothing,
    /// What is marked handled may be committed at the next commit interval.
    Durable,
    /// Commit now (a stage whose flush is its commit point).
    CommitNow,
}

/// Where a partition resumes when the stage has made records durable past the group's commit
/// (a checkpoint, archived files): the skipped offsets are then no loss.
pub struct ResumeAt {
    pub topic: String,
    pub partition: i32,
    pub next: i64,
}

/// A stage's part of the loop. Every method but [`Hooks::process`] has a default that does
/// nothing.
#[async_trait::async_trait]
pub trait Hooks: Send {
    type Error: From<KafkaError> + std::fmt::Display + Send;

    /// How long to wait for a batch's records.
    fn receive_wait(&self) -> Duration;

    /// Before each receive: back-pressure on the inputs.
    fn before_receive(&mut self, _input: Input<'_>) -> Result<(), Self::Error> {
        Ok(())
    }

    /// The assignment changed (a rebalance): drop what belongs to partitions that may be gone.
    fn rebalanced(&mut self, _input: Input<'_>) {}

    /// A batch arrived (maybe empty): restore what the stage keeps for newly assigned
    /// partitions, and tell where those resume past the group's commit.
    async fn received(
        &mut self,
        _input: Input<'_>,
        _batch: &[Record],
        _resume: &mut Vec<ResumeAt>,
    ) -> Result<Flow, Self::Error> {
        Ok(Flow::Continue)
    }

    /// The stage's work on a batch (maybe empty). In [`Commit::Transactions`] the batch must be
    /// left whole (the driver marks it handled when its transaction commits).
    async fn process(
        &mut self,
        input: Input<'_>,
        catalog: &Arc<Catalog>,
        batch: &mut Vec<Record>,
    ) -> Result<Processed, Self::Error>;

    /// After each batch: periodic work (flushes, rolling files).
    async fn tick(
        &mut self,
        _input: Input<'_>,
        _catalog: &Arc<Catalog>,
    ) -> Result<Tick, Self::Error> {
        Ok(Tick::Durable)
    }

    /// On shutdown: make everything kept durable. `false`: it could not be, commit nothing.
    async fn drain(
        &mut self,
        _input: Input<'_>,
        _catalog: &Arc<Catalog>,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }

    /// Before the consumer leaves its group, whatever ended the loop.
    fn release(&mut self, _input: Input<'_>) {}

    /// In [`Commit::Transactions`]: whether a batch that failed with `error` may be aborted and
    /// done again (its writes timed out) rather than stop the stage.
    fn may_redo(&self, _error: &Self::Error) -> bool {
        false
    }
}

/// How the receive loop ended.
enum End {
    Drain,
    /// Outputs unacknowledged: no drain, no commit.
    Unconfirmed,
}

/// The loop's own state.
struct Run<'s> {
    stage: &'s Stage,
    spec: Spec,
    continuity: Continuity,
    batch: Vec<Record>,
    generation: Option<u64>,
    last_commit: Instant,
    redo: Pauses,
    last_failure: String,
    /// Shutdown came while a transaction's end waited for the broker.
    left_open: bool,
}

impl Stage {
    /// Runs the stage's loop until shutdown (then drains) or an error.
    pub async fn drive<H: Hooks>(&self, spec: Spec, hooks: &mut H) -> Result<(), H::Error> {
        let mut catalog = self.catalog.clone();
        let service = self.service.as_str();
        let mut subscription =
            Subscription::new(&self.config, service, &mut catalog, spec.topics_of)?;
        let transactional = matches!(spec.commit, Commit::Transactions { .. });
        if transactional {
            client::commit_only_in_transactions(subscription.consumer());
        }
        subscription.announce_in(self.registration.clone());
        let mut spec = spec;
        let in_transactions = std::mem::replace(&mut spec.in_transactions, Box::new(|_| false));
        let mut run = Run {
            stage: self,
            continuity: Continuity::new(service, &self.config.kafka, in_transactions),
            batch: Vec::with_capacity(spec.batch_size),
            spec,
            generation: None,
            last_commit: Instant::now(),
            redo: REDO_BACKOFF.pauses(),
            last_failure: String::new(),
            left_open: false,
        };
        let ended = run.receive(&mut subscription, &mut catalog, hooks).await;
        let result = match ended {
            Ok(End::Drain) => run.drain(&subscription, &catalog, hooks).await,
            Ok(End::Unconfirmed) => {
                tracing::info!("stopped while sending a batch's outputs; nothing more committed");
                Ok(())
            }
            Err(error) => Err(error),
        };
        // On every path: a consumer closing with paused partitions has been seen to wait
        // for ever.
        hooks.release(Input::new(subscription.consumer()));
        // Within half the drain timeout, so that a consumer librdkafka never closes does not
        // outlast the supervisor's patience and fail a stop whose work is done.
        subscription
            .close(self.config.shutdown.drain_timeout / 2)
            .await;
        result
    }
}

impl Run<'_> {
    async fn receive<H: Hooks>(
        &mut self,
        subscription: &mut Subscription,
        catalog: &mut watch::Receiver<Arc<Catalog>>,
        hooks: &mut H,
    ) -> Result<End, H::Error> {
        let shutdown = self.stage.shutdown.clone();
        while !shutdown.is_cancelled() {
            subscription.follow(catalog)?;
            let input = Input::new(subscription.consumer());
            hooks.before_receive(input)?;
            let wait = hooks.receive_wait();
            let max = self.spec.batch_size;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                received = recv_batch(input.consumer(), max, wait, &mut self.batch) => received?,
            }
            self.follow_generation(input, hooks);
            let mut resume = Vec::new();
            if let Flow::Stop = hooks.received(input, &self.batch, &mut resume).await? {
                return Ok(End::Drain);
            }
            for at in resume {
                self.continuity
                    .expect_at_least(input.consumer(), &at.topic, at.partition, at.next);
            }
            self.continuity.check(input.consumer(), &self.batch).await?;
            let current = catalog.borrow().clone();
            let flow = match &self.spec.commit {
                Commit::Offsets { .. } => self.process(input, &current, hooks).await?,
                Commit::Transactions { .. } => {
                    self.process_in_transaction(input, &current, hooks).await?
                }
            };
            match flow {
                Some(End::Drain) => return Ok(End::Drain),
                Some(End::Unconfirmed) => return Ok(End::Unconfirmed),
                None => {}
            }
            self.follow_generation(input, hooks);
            let tick = hooks.tick(input, &current).await?;
            if let Commit::Offsets { interval } = self.spec.commit {
                let due = match tick {
                    Tick::Nothing => false,
                    Tick::Durable => self.last_commit.elapsed() >= interval,
                    Tick::CommitNow => true,
                };
                if due {
                    // Its latency, request to broker answer: instream_offset_commit_seconds.
                    client::commit(input.consumer(), false)?;
                    self.last_commit = Instant::now();
                }
            }
        }
        Ok(End::Drain)
    }

    fn follow_generation<H: Hooks>(&mut self, input: Input<'_>, hooks: &mut H) {
        let now = input.generation();
        if self.generation != Some(now) {
            if self.generation.is_some() {
                hooks.rebalanced(input);
            }
            self.generation = Some(now);
        }
    }

    /// A batch whose progress the consumer commits. `Some`: the loop ends.
    async fn process<H: Hooks>(
        &mut self,
        input: Input<'_>,
        catalog: &Arc<Catalog>,
        hooks: &mut H,
    ) -> Result<Option<End>, H::Error> {
        Ok(
            match hooks.process(input, catalog, &mut self.batch).await? {
                Processed::Handled => {
                    input.complete(&self.batch);
                    None
                }
                Processed::Kept => None,
                Processed::Interrupted => Some(End::Drain),
                Processed::Unconfirmed => Some(End::Unconfirmed),
            },
        )
    }

    /// A batch as one transaction. `Some`: the loop ends.
    async fn process_in_transaction<H: Hooks>(
        &mut self,
        input: Input<'_>,
        catalog: &Arc<Catalog>,
        hooks: &mut H,
    ) -> Result<Option<End>, H::Error> {
        let Commit::Transactions {
            transactions,
            readiness,
        } = &self.spec.commit
        else {
            return Ok(None);
        };
        if self.batch.is_empty() {
            return Ok(None);
        }
        let ranges = ranges(&self.batch);
        let open = transactions.begin(input.consumer())?;
        let outcome = match hooks.process(input, catalog, &mut self.batch).await {
            Ok(Processed::Handled) => transactions.commit(input.consumer(), open, &ranges).await?,
            Ok(Processed::Kept) => {
                let _ = transactions.abort().await;
                return Err(KafkaError::Transaction(
                    "a stage whose batches are transactions must handle each batch whole".into(),
                )
                .into());
            }
            Ok(Processed::Interrupted | Processed::Unconfirmed) => {
                // Stopping: nothing of the batch becomes visible, and it is read again after
                // a restart (the consumer is not moved past it: the loop ends here).
                if !transactions.abort().await? {
                    self.left_open = true;
                }
                return Ok(Some(End::Drain));
            }
            Err(error) => {
                let why = failed_batch(transactions, hooks, error).await?;
                tracing::warn!(error = %why, retry_in = ?self.redo.clone().next_pause(), "the batch's writes failed; aborting its transaction and doing it again");
                self.last_failure = why;
                transactions.redo(input.consumer(), &ranges).await?
            }
        };
        match outcome {
            Outcome::Committed => {
                // Committed in the transaction; the tracker only forgets them.
                input.complete(&self.batch);
                self.redo.reset();
                readiness.set_ready();
                Ok(None)
            }
            Outcome::Aborted => {
                if self.redo.at_max() {
                    // Not passing: say so where it is watched, and keep trying.
                    readiness.set_not_ready(format!(
                        "batches aborted again and again; last: {}",
                        self.last_failure
                    ));
                }
                // Not at once: whatever failed the batch may not have passed yet.
                let shutdown = self.stage.shutdown.clone();
                Ok((!self.redo.sleep(&shutdown).await).then_some(End::Drain))
            }
            Outcome::Interrupted => {
                self.left_open = true;
                Ok(Some(End::Drain))
            }
        }
    }

    async fn drain<H: Hooks>(
        &mut self,
        subscription: &Subscription,
        catalog: &watch::Receiver<Arc<Catalog>>,
        hooks: &mut H,
    ) -> Result<(), H::Error> {
        let input = Input::new(subscription.consumer());
        self.follow_generation(input, hooks);
        let current = catalog.borrow().clone();
        let durable = hooks.drain(input, &current).await?;
        if durable && matches!(self.spec.commit, Commit::Offsets { .. }) {
            client::commit(input.consumer(), true)?;
        }
        let service = self.stage.service;
        if self.left_open {
            tracing::warn!(
                %service,
                "stopped with a batch's transaction left to the broker: committed if its commit \
                 had reached the coordinator, otherwise aborted when this transactional.id starts \
                 again or after its transaction timeout; the batch's offsets are as the \
                 transaction leaves them (this consumer commits none of its own)"
            );
        } else {
            tracing::info!(%service, "{service} drained and committed");
        }
        Ok(())
    }
}

/// A batch's writes failed inside its transaction: why, when doing it again may mend it;
/// otherwise the transaction is aborted and the error returned (the stage stops). A refusal
/// no retry mends — the record's own, or the transaction's (a partition it may not write to)
/// — or a producer fenced for good stops the process.
async fn failed_batch<H: Hooks>(
    transactions: &Transactions,
    hooks: &H,
    error: H::Error,
) -> Result<String, H::Error> {
    let failed_for_good = transactions.failed_for_good();
    let cause = transactions.failure();
    if let Some(cause) = cause
        .as_ref()
        .filter(|c| instream_kafka::is_refusal(c.code()))
    {
        let _ = transactions.abort().await;
        return Err(KafkaError::Transaction(format!(
            "the broker refused the batch's transaction: {cause}"
        ))
        .into());
    }
    if failed_for_good || !hooks.may_redo(&error) {
        let _ = transactions.abort().await;
        return Err(error);
    }
    Ok(cause.map_or_else(|| error.to_string(), |c| c.to_string()))
}
