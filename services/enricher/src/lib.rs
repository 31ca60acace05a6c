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
pub mod transform;

use std::sync::Arc;
use std::time::Instant;

use instream_core::ServiceContext;
use instream_kafka::client::{self, recv_batch};
use instream_kafka::DeadLetters;
use instream_pipeline::Catalog;
use instream_stage::{Stage, Subscription};

const SERVICE: &str = "enricher";

#[derive(Debug, thiserror::Error)]
pub enum EnricherError {
    #[error(transparent)]
    Kafka(#[from] instream_kafka::KafkaError),
    #[error(transparent)]
    RefData(#[from] instream_refdata::RefDataError),
    #[error(transparent)]
    Stage(#[from] instream_stage::StageError),
}

pub async fn run(ctx: ServiceContext) -> Result<(), EnricherError> {
    let ServiceContext {
        config,
        health,
        shutdown,
        admin_addr,
    } = ctx;
    // Registered before the first await, so /readyz cannot pass without it.
    let refdata_ready = health.register("enricher.refdata");
    let stage = Stage::start(SERVICE, &config, &health, admin_addr, &shutdown).await?;
    let mut catalog = stage.catalog.clone();
    let refstore = instream_refdata::build(&config.refdata).await?;
    let refdata = Arc::new(instream_refdata::CachedRefStore::new(
        refstore,
        &instream_refdata::CacheSettings {
            max_bytes: config.refdata.cache_max_bytes,
            ttl: config.refdata.cache_ttl,
            negative_ttl: config.refdata.cache_negative_ttl,
        },
    ));
    refdata_ready.set_ready();
    let producer = instream_kafka::producer(&config.kafka, SERVICE)?;
    let dead = DeadLetters::new(producer.clone(), SERVICE);
    let mut subscription = Subscription::new(&config, SERVICE, &mut catalog, Catalog::raw_topics)?;
    subscription.announce_in(stage.registration.clone());
    let enricher = enrich::Enricher {
        refdata,
        readiness: refdata_ready,
        producer,
        dead,
        shutdown: shutdown.clone(),
        arena: Default::default(),
    };

    let mut tracked: Arc<Catalog> = catalog.borrow().clone();
    enricher.track_rules(&tracked).await;
    let mut batch = Vec::with_capacity(config.enricher.batch_size);
    let mut last_commit = Instant::now();
    while !shutdown.is_cancelled() {
        subscription.follow(&mut catalog)?;
        let consumer = subscription.consumer();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            received = recv_batch(consumer, config.enricher.batch_size, config.enricher.batch_timeout, &mut batch) => received?,
        }
        if !batch.is_empty() {
            let current: Arc<Catalog> = catalog.borrow().clone();
            if !Arc::ptr_eq(&current, &tracked) {
                enricher.track_rules(&current).await;
                tracked = current.clone();
            }
            // `false`: shutdown came during a retry; the batch stays uncommitted and is
            // re-read by whoever owns the partitions next.
            if enricher.process(&current, &batch).await? {
                client::complete(consumer, &batch);
            }
        }
        if last_commit.elapsed() >= config.kafka.commit_interval {
            client::commit(consumer, false)?;
            last_commit = Instant::now();
        }
    }
    client::commit(subscription.consumer(), true)?;
    tracing::info!("enricher drained and committed");
    Ok(())
}
