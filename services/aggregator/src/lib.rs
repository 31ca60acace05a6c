//! instream-aggregator: `<pipeline>.enriched` in, windowed aggregates out to the
//! [`AggregateStore`] (ScyllaDB, or the embedded store).
//!
//! Each aggregation of a pipeline keeps per-group, per-window values in memory. Every
//! `aggregator.flush_interval` the changed windows are upserted as whole values (a repeated
//! write replaces, never adds), and only then are the offsets of the records they cover
//! committed. Aggregations group by the partition key first, so each window has exactly one
//! owner (DESIGN §7).
//!
//! Not yet here (the aggregator issue): watermarks and window closing, late events, hopping and
//! session windows, de-duplication of repeated event ids, and checkpoints of open-window
//! state — until then a restart mid-window restarts that window's count from the committed
//! offset.

mod windows;

use std::sync::Arc;
use std::time::{Duration, Instant};

use instream_core::{Readiness, ServiceContext};
use instream_event::Event;
use instream_kafka::client::{self, recv_batch, Consumer};
use instream_kafka::{DeadLetters, Record};
use instream_pipeline::{topics, Catalog, PipelineDefinition};
use instream_stage::{Stage, Subscription};
use instream_store::AggregateStore;
use tokio_util::sync::CancellationToken;

pub use windows::Windows;

const SERVICE: &str = "aggregator";

#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    #[error(transparent)]
    Kafka(#[from] instream_kafka::KafkaError),
    #[error(transparent)]
    Store(#[from] instream_store::StoreError),
    #[error(transparent)]
    Stage(#[from] instream_stage::StageError),
}

fn enriched_topics(catalog: &Catalog) -> Vec<String> {
    catalog
        .iter()
        .filter(|p| !p.aggregations.is_empty())
        .map(|p| topics::enriched(&p.name))
        .collect()
}

/// Runs with the store `config.store` names.
pub async fn run(ctx: ServiceContext) -> Result<(), AggregatorError> {
    let store = instream_store::build(&ctx.config.store).await?;
    run_with_store(ctx, store).await
}

/// What was counted since the last flush: the records (to mark handled after the write) and
/// their events (to take back after a rebalance).
#[derive(Default)]
struct Pending {
    records: Vec<Record>,
    events: Vec<(Arc<PipelineDefinition>, Event, (String, i32))>,
}

/// Runs with a given store (standalone mode and tests share one embedded store).
pub async fn run_with_store(
    ctx: ServiceContext,
    store: Arc<dyn AggregateStore>,
) -> Result<(), AggregatorError> {
    let ServiceContext {
        config,
        health,
        shutdown,
        admin_addr,
    } = ctx;
    // Registered before the first await, so /readyz cannot pass without it.
    let store_ready = health.register("aggregator.store");
    let stage = Stage::start(SERVICE, &config, &health, admin_addr, &shutdown).await?;
    let mut catalog = stage.catalog.clone();
    store.ping().await?;
    store_ready.set_ready();
    let dead = DeadLetters::from_config(&config.kafka, SERVICE)?;
    let mut subscription = Subscription::new(&config, SERVICE, &mut catalog, enriched_topics)?;

    let mut windows = Windows::default();
    let mut pending = Pending::default();
    let mut batch = Vec::with_capacity(config.aggregator.batch_size);
    let mut last_flush = Instant::now();
    let mut generation = 0;
    while !shutdown.is_cancelled() {
        subscription.follow(&mut catalog)?;
        let consumer = subscription.consumer();
        let wait = config
            .aggregator
            .flush_interval
            .saturating_sub(last_flush.elapsed())
            .max(Duration::from_millis(1));
        tokio::select! {
            _ = shutdown.cancelled() => break,
            received = recv_batch(consumer, config.aggregator.batch_size, wait, &mut batch) => received?,
        }
        follow_generation(consumer, &mut generation, &mut windows, &mut pending);
        let current = catalog.borrow().clone();
        for record in batch.drain(..) {
            match instream_event::decode(&record.payload) {
                Ok(event) => match current.get(&event.pipeline) {
                    Some(def) => {
                        windows.add(def, &event, (&record.topic, record.partition));
                        let source = (record.topic.clone(), record.partition);
                        pending.events.push((def.clone(), event, source));
                        pending.records.push(record);
                    }
                    None => {
                        let reason = format!("no definition for pipeline `{}`", event.pipeline);
                        dead_letter(&dead, consumer, record, "unknown_pipeline", &reason).await?;
                    }
                },
                Err(e) => {
                    dead_letter(&dead, consumer, record, "decode_error", &e.to_string()).await?
                }
            }
        }
        if last_flush.elapsed() >= config.aggregator.flush_interval {
            flush(
                &*store,
                &store_ready,
                consumer,
                &mut windows,
                &mut pending,
                &shutdown,
            )
            .await?;
            client::commit(consumer, false)?;
            last_flush = Instant::now();
        }
    }
    // Drain: what was counted is written, then committed; nothing is committed unwritten.
    let consumer = subscription.consumer();
    follow_generation(consumer, &mut generation, &mut windows, &mut pending);
    flush(
        &*store,
        &store_ready,
        consumer,
        &mut windows,
        &mut pending,
        &CancellationToken::new(),
    )
    .await?;
    client::commit(consumer, true)?;
    tracing::info!(windows = windows.len(), "aggregator drained and committed");
    Ok(())
}

/// After a rebalance, whatever was counted but not flushed will be read again from the
/// last commit (the revoke committed exactly the flushed prefix), and windows of partitions
/// this instance no longer owns belong to their new owner.
fn follow_generation(
    consumer: &Consumer,
    generation: &mut u64,
    windows: &mut Windows,
    pending: &mut Pending,
) {
    let now = client::generation(consumer);
    if now != *generation {
        windows.roll_back(&pending.events);
        pending.records.clear();
        pending.events.clear();
        windows.retain_sources(&client::assigned_partitions(consumer));
        *generation = now;
    }
}

async fn dead_letter(
    dead: &DeadLetters,
    consumer: &Consumer,
    record: Record,
    code: &'static str,
    reason: &str,
) -> Result<(), AggregatorError> {
    let delivery = dead.publish_record(&record, code, reason).await?;
    client::delivered(delivery).await?;
    client::complete(consumer, [&record]);
    Ok(())
}

/// Writes every changed window, retrying until the store takes them (or `stop` fires), then
/// marks the records they cover as handled.
async fn flush(
    store: &dyn AggregateStore,
    ready: &Readiness,
    consumer: &Consumer,
    windows: &mut Windows,
    pending: &mut Pending,
    stop: &CancellationToken,
) -> Result<(), AggregatorError> {
    let rows = windows.take_dirty();
    if !rows.is_empty() {
        let mut backoff = Duration::from_millis(50);
        loop {
            match store.upsert(&rows).await {
                Ok(()) => {
                    ready.set_ready();
                    break;
                }
                Err(error) => {
                    ready.set_not_ready(error.to_string());
                    tracing::warn!(%error, windows = rows.len(), "store write failed; retrying");
                    if stop
                        .run_until_cancelled(tokio::time::sleep(backoff))
                        .await
                        .is_none()
                    {
                        windows.mark_dirty(&rows);
                        return Ok(());
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        metrics::counter!("instream_window_writes_total", "service" => SERVICE)
            .increment(rows.len() as u64);
    }
    let now = instream_event::now_millis();
    for (_, event, _) in &pending.events {
        metrics::histogram!("instream_stage_latency_seconds", "stage" => "aggregator_visible")
            .record((now - event.ingest_time).max(0) as f64 / 1000.0);
    }
    metrics::counter!("instream_events_total", "service" => SERVICE, "outcome" => "aggregated")
        .increment(pending.records.len() as u64);
    client::complete(consumer, &pending.records);
    pending.records.clear();
    pending.events.clear();
    metrics::gauge!("instream_open_windows", "service" => SERVICE).set(windows.len() as f64);
    Ok(())
}
