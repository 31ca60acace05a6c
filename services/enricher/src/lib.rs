//! instream-enricher: `<pipeline>.raw` in, `<pipeline>.enriched` out. Each event is looked up
//! in reference data by its pipeline's rules (`customer:{customer_id}`), the found fields are
//! added under `enrichment`, and the event is produced keyed as it came.
//!
//! A batch's lookups are one pipelined round trip. Reference data down means retry with
//! back-off and `/readyz` false — an event is never skipped. Records that cannot be processed
//! (undecodable, unknown pipeline, a miss under a `dead_letter` rule) go to `<pipeline>.dlq`.
//! Offsets are committed only once a record's output (or dead letter) is acknowledged;
//! outputs carry their origin partition and offset in headers so that a downstream stage can
//! drop re-emits after a crash (at-least-once here; transactions are a later step).

mod enrich;
mod transaction;
pub mod transform;

use std::sync::Arc;
use std::time::{Duration, Instant};

use instream_core::ServiceContext;
use instream_kafka::client::{self, recv_batch};
use instream_kafka::{DeadLetters, KafkaError};
use instream_pipeline::Catalog;
use instream_stage::{Stage, Subscription};
use rdkafka::consumer::Consumer as _;
use transaction::Outcome;

const SERVICE: &str = "enricher";
/// The pause before a batch whose transaction was aborted is done again, doubled each time
/// in a row up to [`MAX_REDO_PAUSE`] (reached after six aborts in a row: the enricher is then
/// not ready until a batch commits).
const FIRST_REDO_PAUSE: Duration = Duration::from_millis(100);
const MAX_REDO_PAUSE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum EnricherError {
    #[error(transparent)]
    Kafka(#[from] instream_kafka::KafkaError),
    #[error(transparent)]
    RefData(#[from] instream_refdata::RefDataError),
    #[error(transparent)]
    Stage(#[from] instream_stage::StageError),
    #[error("transaction: {0}")]
    Transaction(String),
}

pub async fn run(ctx: ServiceContext) -> Result<(), EnricherError> {
    let ServiceContext {
        config,
        health,
        shutdown,
        admin_addr,
    } = ctx;
    // Registered before the first await, so /readyz cannot pass without them.
    let refdata_ready = health.register("enricher.refdata");
    // Transactional delivery: the transactional id registered, and batches not failing
    // again and again.
    let delivery_ready = health.register("enricher.delivery");
    let stage = Stage::start(SERVICE, &config, &health, admin_addr, &shutdown).await?;
    let mut catalog = stage.catalog.clone();
    // Redis away at start is waited for (not ready meanwhile), as it is later on.
    let mut backoff = std::time::Duration::from_millis(100);
    let refstore = loop {
        match instream_refdata::build(&config.refdata).await {
            Ok(store) => break store,
            Err(error @ instream_refdata::RefDataError::Unavailable(_)) => {
                refdata_ready.set_not_ready(error.to_string());
                tracing::warn!(%error, retry_in = ?backoff, "reference data unreachable at start; retrying");
                if shutdown
                    .run_until_cancelled(tokio::time::sleep(backoff))
                    .await
                    .is_none()
                {
                    return Ok(());
                }
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
            }
            Err(error) => return Err(error.into()),
        }
    };
    let refdata = Arc::new(instream_refdata::CachedRefStore::new(
        refstore,
        &instream_refdata::CacheSettings {
            max_bytes: config.refdata.cache_max_bytes,
            ttl: config.refdata.cache_ttl,
            negative_ttl: config.refdata.cache_negative_ttl,
        },
    ));
    refdata_ready.set_ready();
    // An idle enricher still reports whether Redis answers.
    tokio::spawn({
        let (refdata, readiness, shutdown) =
            (refdata.clone(), refdata_ready.clone(), shutdown.clone());
        async move {
            let mut ticks = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = ticks.tick() => match refdata.store().ping().await {
                        Ok(()) => readiness.set_ready(),
                        Err(error) => readiness.set_not_ready(error.to_string()),
                    },
                }
            }
        }
    });
    let transactional = config.enricher_transactional();
    let producer = if transactional {
        let id = config.enricher.transactional_id.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
            // The pid is 1 in a container, so a pod keeps its id; two processes on one
            // machine do not fence each other.
            format!(
                "{}-enricher-{host}-{}",
                config.kafka.group_prefix,
                std::process::id()
            )
        });
        instream_kafka::client::transactional_producer(
            &config.kafka,
            SERVICE,
            &id,
            config.enricher.transaction_timeout,
        )?
    } else {
        // At-least-once outputs are de-duplicated by origin offset downstream: none may be
        // lost behind a later one.
        instream_kafka::gapless_producer(&config.kafka, SERVICE)?
    };
    let transactions = if transactional {
        delivery_ready.set_not_ready("registering the transactional id with the broker");
        let started = transaction::Transactions::start(
            producer.clone(),
            config.enricher.transaction_timeout,
            shutdown.clone(),
        )
        .await?;
        let Some(started) = started else {
            return Ok(());
        };
        Some(started)
    } else {
        None
    };
    delivery_ready.set_ready();
    // Dead letters go through the same producer: in transactional delivery they are part of
    // the batch's transaction.
    let dead = DeadLetters::new(producer.clone(), SERVICE);
    let mut subscription = Subscription::new(&config, SERVICE, &mut catalog, Catalog::raw_topics)?;
    if transactions.is_some() {
        client::commit_only_in_transactions(subscription.consumer());
    }
    subscription.announce_in(stage.registration.clone());
    let enricher = enrich::Enricher {
        refdata,
        readiness: refdata_ready,
        producer,
        dead,
        shutdown: shutdown.clone(),
        arena: Default::default(),
        quality: std::sync::Mutex::new(transform::Quality::new(
            config.enricher.quality_samples_per_minute,
        )),
    };

    let mut tracked: Arc<Catalog> = catalog.borrow().clone();
    if !enricher.track_rules(&tracked).await {
        return Ok(());
    }
    let mut batch = Vec::with_capacity(config.enricher.batch_size);
    // Raw topics are never written in transactions: every gap is records skipped.
    let mut continuity = instream_kafka::Continuity::new(SERVICE, &config.kafka, |_| false);
    let mut last_commit = Instant::now();
    let mut redo_pause = FIRST_REDO_PAUSE;
    let mut last_failure = String::new();
    // Shutdown came while a transaction's end waited for the broker.
    let mut left_open = false;
    while !shutdown.is_cancelled() {
        subscription.follow(&mut catalog)?;
        let consumer = subscription.consumer();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            received = recv_batch(consumer, config.enricher.batch_size, config.enricher.batch_timeout, &mut batch) => received?,
        }
        continuity.check(consumer, &batch).await?;
        if !batch.is_empty() {
            let current: Arc<Catalog> = catalog.borrow().clone();
            if !Arc::ptr_eq(&current, &tracked) {
                if !enricher.track_rules(&current).await {
                    break;
                }
                tracked = current.clone();
            }
            // The group generation the batch was consumed under: a member deposed since (a
            // rebalance, or a poll interval missed while Redis was down) is then fenced by the
            // broker instead of committing over the partitions' new owner.
            let group = match &transactions {
                Some(tx) => {
                    let Some(group) = consumer.group_metadata() else {
                        return Err(EnricherError::Transaction(
                            "the consumer has no group metadata".into(),
                        ));
                    };
                    tx.begin()?;
                    Some(group)
                }
                None => None,
            };
            // `false`: shutdown came during a retry; the batch stays uncommitted and is
            // re-read by whoever owns the partitions next.
            let outcome = match enricher.process(&current, &batch).await {
                Ok(done) => match (&transactions, done, group) {
                    (None, true, _) => {
                        client::complete(consumer, &batch);
                        None
                    }
                    (None, false, _) => None,
                    (Some(tx), true, Some(group)) => {
                        Some(tx.commit(consumer, group, &batch).await?)
                    }
                    (Some(tx), _, _) => Some(if tx.abort().await? {
                        Outcome::Aborted
                    } else {
                        Outcome::Interrupted
                    }),
                },
                Err(error) => {
                    let Some(tx) = &transactions else {
                        return Err(error);
                    };
                    // A write that timed out (a broker away past the transaction timeout) or
                    // was caught up in a failing transaction: the whole batch is aborted, so
                    // doing it again leaves no gap. A refusal no retry mends — the record's
                    // own, or the transaction's (a partition it may not write to) — or a
                    // producer failed for good (fenced) stops the process.
                    let failed_for_good = enricher.producer.fatal_error().is_some();
                    let cause = tx.failure();
                    if let Some(cause) = cause
                        .as_ref()
                        .filter(|c| instream_kafka::is_refusal(c.code()))
                    {
                        let _ = tx.abort().await;
                        return Err(EnricherError::Transaction(format!(
                            "the broker refused the batch's transaction: {cause}"
                        )));
                    }
                    if failed_for_good
                        || !matches!(&error, EnricherError::Kafka(e @ KafkaError::Produce(_)) if !e.is_refused_write())
                    {
                        let _ = tx.abort().await;
                        return Err(error);
                    }
                    let why = cause.map_or_else(|| error.to_string(), |c| c.to_string());
                    tracing::warn!(error = %why, retry_in = ?redo_pause, "the batch's writes failed; aborting its transaction and doing it again");
                    last_failure = why;
                    Some(tx.redo(consumer, &batch).await?)
                }
            };
            match outcome {
                Some(Outcome::Committed) => {
                    // Committed in the transaction; the tracker only forgets them.
                    client::complete(consumer, &batch);
                    redo_pause = FIRST_REDO_PAUSE;
                    delivery_ready.set_ready();
                }
                Some(Outcome::Aborted) => {
                    if redo_pause >= MAX_REDO_PAUSE {
                        // Not passing: say so where it is watched, and keep trying.
                        delivery_ready.set_not_ready(format!(
                            "batches aborted again and again; last: {last_failure}"
                        ));
                    }
                    // Not at once: whatever failed the batch may not have passed yet.
                    if shutdown
                        .run_until_cancelled(tokio::time::sleep(redo_pause))
                        .await
                        .is_none()
                    {
                        break;
                    }
                    redo_pause = (redo_pause * 2).min(MAX_REDO_PAUSE);
                }
                Some(Outcome::Interrupted) => {
                    left_open = true;
                    break;
                }
                None => {}
            }
        }
        if transactions.is_none() && last_commit.elapsed() >= config.kafka.commit_interval {
            client::commit(consumer, false)?;
            last_commit = Instant::now();
        }
    }
    if transactions.is_none() {
        client::commit(subscription.consumer(), true)?;
    }
    if left_open {
        tracing::warn!(
            "stopped with a batch's transaction left to the broker: committed if its commit \
             had reached the coordinator, otherwise aborted when this transactional.id starts \
             again or after enricher.transaction_timeout; the batch's offsets are as the \
             transaction leaves them (this consumer commits none of its own)"
        );
    } else {
        tracing::info!("enricher drained and committed");
    }
    subscription.close().await;
    Ok(())
}
