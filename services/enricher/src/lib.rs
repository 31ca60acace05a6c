//! instream-enricher: `<pipeline>.raw` in, `<pipeline>.enriched` out. Each event is looked up
//! in reference data by its pipeline's rules (`customer:{customer_id}`), the found fields are
//! added under `enrichment`, and the event is produced keyed as it came.
//!
//! A batch's lookups are one pipelined round trip. Reference data down means retry with
//! back-off and `/readyz` false — an event is never skipped. Records that cannot be processed
//! (undecodable, unknown pipeline, a miss under a `dead_letter` rule) go to `<pipeline>.dlq`.
//! Offsets are committed only once a record's output (or dead letter) is acknowledged — by the
//! consumer, or with `enricher.delivery = "transactional"` inside the batch's transaction
//! (the stage driver's [`Commit`] modes). Outputs carry their origin partition and offset in
//! headers so that the aggregator drops re-emits after a crash.

mod enrich;
pub mod transform;

use std::sync::Arc;
use std::time::Duration;

use instream_core::config::Config;
use instream_core::{GaveUp, Readiness, Retry, Service};
use instream_kafka::{DeadLetters, Input, KafkaError, Producer, Record, Transactions};
use instream_pipeline::Catalog;
use instream_refdata::{CachedRefStore, RefDataError};
use instream_stage::ServiceContext;
use instream_stage::{Commit, Hooks, Processed, Spec, Stage};

const SERVICE: Service = Service::Enricher;

/// How often an idle enricher checks that reference data answers.
const REFDATA_PROBE_INTERVAL: Duration = Duration::from_secs(5);

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
    // Registered before the first await, so /readyz cannot pass without them.
    let refdata_ready = ctx.health.register("enricher.refdata");
    // Transactional delivery: the transactional id registered, and batches not failing
    // again and again.
    let delivery_ready = ctx.health.register("enricher.delivery");
    let stage = Stage::start(SERVICE, &ctx).await?;
    let config = &ctx.config;
    let Some(refdata) = connect_refdata(&ctx, &refdata_ready).await? else {
        return Ok(());
    };
    let producer = output_producer(config)?;
    let Some(commit) = delivery(&ctx, &producer, delivery_ready).await? else {
        return Ok(());
    };
    let mut enricher = enrich::Enricher {
        refdata,
        readiness: refdata_ready,
        // Dead letters go through the same producer: in transactional delivery they are part
        // of the batch's transaction.
        dead: DeadLetters::new(producer.clone(), SERVICE),
        producer,
        shutdown: ctx.shutdown.clone(),
        arena: Default::default(),
        quality: std::sync::Mutex::new(transform::Quality::new(
            config.enricher.quality_samples_per_minute,
        )),
        batch_timeout: config.enricher.batch_timeout,
        tracked: stage.catalog.borrow().clone(),
    };
    if !enricher.track_rules(&enricher.tracked.clone()).await {
        return Ok(());
    }
    let spec = Spec {
        topics_of: Catalog::raw_topics,
        batch_size: config.enricher.batch_size,
        commit,
        // Raw topics are never written in transactions: every gap is records skipped.
        in_transactions: Box::new(|_| false),
    };
    stage.drive(spec, &mut enricher).await
}

/// Reference data behind its local cache, waited for while unreachable at start (not ready
/// meanwhile, as later on), and probed from then on so that an idle enricher still reports
/// whether Redis answers. `None`: shutdown came first.
async fn connect_refdata(
    ctx: &ServiceContext,
    readiness: &Readiness,
) -> Result<Option<Arc<CachedRefStore>>, EnricherError> {
    let config = &ctx.config.refdata;
    let connected = Retry::new("connecting to reference data", &ctx.shutdown)
        .reporting_to(readiness)
        .run_while(
            |error| matches!(error, RefDataError::Unavailable(_)),
            || instream_refdata::build(config),
        )
        .await;
    let store = match connected {
        Ok(store) => store,
        Err(GaveUp::Stopped) => return Ok(None),
        Err(GaveUp::Failed(error) | GaveUp::TimedOut { error, .. }) => return Err(error.into()),
    };
    let refdata = Arc::new(CachedRefStore::new(
        store,
        &instream_refdata::CacheSettings {
            max_bytes: config.cache_max_bytes,
            ttl: config.cache_ttl,
            negative_ttl: config.cache_negative_ttl,
        },
    ));
    let probed = refdata.clone();
    ctx.tasks.spawn(
        "reference data probe",
        readiness
            .clone()
            .probe(REFDATA_PROBE_INTERVAL, ctx.shutdown.clone(), move || {
                let refdata = probed.clone();
                async move { refdata.store().ping().await }
            }),
    );
    Ok(Some(refdata))
}

/// How batches are committed: in transactions once the producer's transactional id is
/// registered (`None`: shutdown came first), or by the consumer.
async fn delivery(
    ctx: &ServiceContext,
    producer: &Producer,
    readiness: Readiness,
) -> Result<Option<Commit>, EnricherError> {
    let config = &ctx.config;
    if !config.enricher_transactional() {
        readiness.set_ready();
        return Ok(Some(Commit::Offsets {
            interval: config.kafka.commit_interval,
        }));
    }
    readiness.set_not_ready("registering the transactional id with the broker");
    let started = Transactions::start(
        producer.clone(),
        config.enricher.transaction_timeout,
        ctx.shutdown.clone(),
    )
    .await?;
    Ok(started.map(|transactions| {
        readiness.set_ready();
        Commit::Transactions {
            transactions,
            readiness,
        }
    }))
}

/// The producer of enriched records: transactional, or one whose records are never lost
/// behind a later one (at-least-once outputs are de-duplicated by origin offset downstream).
fn output_producer(config: &Config) -> Result<Producer, KafkaError> {
    if !config.enricher_transactional() {
        return instream_kafka::gapless_producer(&config.kafka, SERVICE.as_str());
    }
    let id = config.enricher.transactional_id.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        // The pid is 1 in a container, so a pod keeps its id; two processes on one machine
        // do not fence each other.
        format!(
            "{}-enricher-{host}-{}",
            config.kafka.group_prefix,
            std::process::id()
        )
    });
    instream_kafka::client::transactional_producer(
        &config.kafka,
        SERVICE.as_str(),
        &id,
        config.enricher.transaction_timeout,
    )
}

#[async_trait::async_trait]
impl Hooks for enrich::Enricher {
    type Error = EnricherError;

    fn receive_wait(&self) -> Duration {
        self.batch_timeout
    }

    async fn process(
        &mut self,
        _input: Input<'_>,
        catalog: &Arc<Catalog>,
        batch: &mut Vec<Record>,
    ) -> Result<Processed, EnricherError> {
        if batch.is_empty() {
            return Ok(Processed::Handled);
        }
        if !Arc::ptr_eq(catalog, &self.tracked) {
            if !self.track_rules(catalog).await {
                return Ok(Processed::Interrupted);
            }
            self.tracked = catalog.clone();
        }
        // `false`: shutdown came during a retry; the batch stays uncommitted and is re-read
        // by whoever owns the partitions next.
        Ok(if self.enrich(catalog, batch).await? {
            Processed::Handled
        } else {
            Processed::Interrupted
        })
    }

    /// A write that timed out (a broker away past the transaction timeout) or was caught up
    /// in a failing transaction: the whole batch is aborted, so doing it again leaves no gap.
    fn may_redo(&self, error: &EnricherError) -> bool {
        matches!(error, EnricherError::Kafka(e @ KafkaError::Produce(_)) if !e.is_refused_write())
    }
}
