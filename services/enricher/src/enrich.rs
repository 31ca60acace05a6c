//! One batch: plan, look everything up at once (local cache, then Redis), retry misses of
//! `retry` rules, write the outputs, produce them, and wait for every acknowledgement.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use instream_core::{Readiness, Retry};
use instream_kafka::client::{self, Producer};
use instream_kafka::{headers, DeadLetterCode, DeadLetters, Delivery, Outgoing, Record};
use instream_pipeline::{topics, Catalog, PipelineDefinition};
use instream_refdata::{CachedRefStore, Found};
use tokio_util::sync::CancellationToken;

use crate::transform::{self, Lookup, Outcomes, Output, Quality};
use crate::{EnricherError, SERVICE};

/// What the enriched record's headers (origin, quality tags) and framing may take, at most.
const HEADER_ROOM: usize = 4096;

pub(crate) struct Enricher {
    pub refdata: Arc<CachedRefStore>,
    pub readiness: Readiness,
    pub producer: Producer,
    pub dead: DeadLetters,
    pub shutdown: CancellationToken,
    /// The enriched records of the batch in flight, kept from batch to batch so that its
    /// pages are not faulted in again each time.
    pub arena: std::sync::Mutex<Vec<u8>>,
    /// Compiled quality rules and the sampler, from batch to batch.
    pub quality: std::sync::Mutex<Quality>,
    /// How long a batch waits for records.
    pub batch_timeout: Duration,
    /// The definitions whose reference-data versions are followed.
    pub tracked: Arc<Catalog>,
}

impl Enricher {
    /// Follows the reference-data versions of every rule in `catalog`, reading each pointer
    /// once before any of its lookups: a pointer not read yet must not pass for "no versioned
    /// data", which would send lookups to the plain key and miss. Retries until it works;
    /// `false` when shutdown came first.
    pub async fn track_rules(&self, catalog: &Catalog) -> bool {
        let rules: Vec<(String, String)> = catalog
            .iter()
            .flat_map(|def| {
                def.enrichments
                    .iter()
                    .map(|rule| (def.name.clone(), rule.name.clone()))
            })
            .collect();
        Retry::new("reading reference data versions", &self.shutdown)
            .reporting_to(&self.readiness)
            .run(|| self.refdata.store().track(&rules))
            .await
            .is_some()
    }

    /// Looks up until it works; `None` when shutdown comes first.
    async fn lookup(&self, lookups: &[Lookup]) -> Option<Vec<Arc<Found>>> {
        Retry::new("reference data lookup", &self.shutdown)
            .reporting_to(&self.readiness)
            .run(|| async {
                let answers = self.refdata.lookup_many(lookups).await;
                if answers.is_err() {
                    metrics::counter!("instream_enrich_lookup_failures_total").increment(1);
                }
                answers
            })
            .await
    }

    /// Asks again for the keys still missing under `retry` rules, with a doubling pause,
    /// until found or out of attempts. `false` when shutdown interrupted it.
    async fn retry_misses(
        &self,
        lookups: &[Lookup],
        retries: &[Option<(u32, Duration)>],
        answers: &mut [Arc<Found>],
    ) -> bool {
        let mut round = 0u32;
        loop {
            let pending: Vec<usize> = (0..lookups.len())
                .filter(|&i| {
                    matches!(*answers[i], Found::Missing)
                        && retries[i].is_some_and(|(attempts, _)| attempts > round)
                })
                .collect();
            let Some(base) = pending
                .iter()
                .filter_map(|&i| retries[i].map(|r| r.1))
                .max()
            else {
                return true;
            };
            let wait = base
                .saturating_mul(1 << round.min(16))
                .min(Duration::from_secs(5));
            if self
                .shutdown
                .run_until_cancelled(tokio::time::sleep(wait))
                .await
                .is_none()
            {
                return false;
            }
            let keys: Vec<Lookup> = pending.iter().map(|&i| lookups[i].clone()).collect();
            // The negative cache must not answer a retry.
            self.refdata.invalidate(&keys);
            let Some(fresh) = self.lookup(&keys).await else {
                return false;
            };
            metrics::counter!("instream_enrich_retries_total").increment(keys.len() as u64);
            for (j, &i) in pending.iter().enumerate() {
                answers[i] = fresh[j].clone();
            }
            round += 1;
        }
    }

    /// Processes a batch. `Ok(true)`: every record's output is acknowledged. `Ok(false)`:
    /// shutdown interrupted it; nothing may be committed.
    pub async fn enrich(&self, catalog: &Catalog, batch: &[Record]) -> Result<bool, EnricherError> {
        let store = self.refdata.store().clone();
        let plans = transform::plan(catalog, &|p, r| store.version(p, r), batch);
        let Some(answers) = self.answers(&plans).await else {
            return Ok(false);
        };
        metrics::histogram!("instream_batch_size", "service" => SERVICE.as_str())
            .record(batch.len() as f64);
        let mut outcomes = Outcomes::default();
        let mut arena = std::mem::take(&mut *self.arena.lock().unwrap_or_else(|p| p.into_inner()));
        // A block, so the guard is gone before the first await below.
        let (outputs, quality_records) = {
            let mut quality = self.quality.lock().unwrap_or_else(|p| p.into_inner());
            let outputs = transform::render(
                plans,
                batch,
                &answers,
                &mut outcomes,
                &mut quality,
                &mut arena,
            );
            for (def, n) in quality.checked.drain(..) {
                for rule in &def.quality {
                    metrics::counter!("instream_quality_checked_total", "pipeline" => def.name.clone(), "rule" => rule.name.clone())
                        .increment(n);
                }
            }
            (outputs, std::mem::take(&mut quality.records))
        };
        for (pipeline, rule, outcome, n) in outcomes.iter() {
            metrics::counter!("instream_enrich_lookups_total", "pipeline" => pipeline.to_owned(), "rule" => rule.to_owned(), "outcome" => outcome)
                .increment(n);
        }

        let (mut deliveries, enriched) = self.send_outputs(batch, outputs, &arena).await?;
        let violations = self
            .send_violations(&quality_records, &mut deliveries)
            .await?;
        // librdkafka copied every record: the arena serves the next batch.
        *self.arena.lock().unwrap_or_else(|p| p.into_inner()) = arena;
        // Shutdown while the broker does not answer: the batch stays uncommitted.
        if !client::all_delivered_unless(&self.producer, deliveries, &self.shutdown).await? {
            return Ok(false);
        }
        // Counted once on the broker (a transaction may still abort: then counted again when
        // the batch is redone).
        for ((pipeline, rule, action), n) in violations {
            metrics::counter!("instream_quality_violations_total", "pipeline" => pipeline, "rule" => rule, "action" => action)
                .increment(n);
        }
        count_enriched(enriched);
        Ok(true)
    }

    /// Sends each record's output: the enriched event (with its origin headers) to its
    /// pipeline's enriched topic, or a dead letter. Returns the deliveries and, per pipeline,
    /// its enriched topic and the ingest times of its records.
    async fn send_outputs(
        &self,
        batch: &[Record],
        outputs: Vec<Output>,
        arena: &[u8],
    ) -> Result<(Vec<Delivery>, Vec<Enriched>), EnricherError> {
        let mut deliveries: Vec<Delivery> = Vec::with_capacity(batch.len());
        // Per pipeline of the batch (usually one): its enriched topic and the ingest times of
        // its records, found by pointer rather than by name on the per-record path.
        let mut enriched: Vec<Enriched> = Vec::new();
        let (mut partition_text, mut offset_text) = (itoa::Buffer::new(), itoa::Buffer::new());
        for (record, output) in batch.iter().zip(outputs) {
            match output {
                Output::Dead { code, reason } => {
                    deliveries.push(self.dead.publish_record(record, code, &reason).await?);
                }
                // Enrichment made it larger than the brokers take: kept as a dead letter (the
                // record as it came), never a write that would stop the enricher.
                Output::Enriched { key, bytes, .. }
                    if key.len() + bytes.len() + HEADER_ROOM > self.producer.max_record_bytes() =>
                {
                    let reason = format!(
                        "enriched, the event takes {} bytes; the brokers take at most {} \
                             (kafka.max_record_bytes)",
                        key.len() + bytes.len(),
                        self.producer.max_record_bytes()
                    );
                    deliveries.push(
                        self.dead
                            .publish_record(record, DeadLetterCode::TooLarge, &reason)
                            .await?,
                    );
                }
                Output::Enriched {
                    pipeline,
                    key,
                    bytes,
                    ingest_time,
                    tags,
                } => {
                    let at = match enriched
                        .iter()
                        .position(|(def, ..)| Arc::ptr_eq(def, &pipeline))
                    {
                        Some(at) => at,
                        None => {
                            let topic = topics::enriched(&pipeline.name);
                            enriched.push((pipeline, topic, Vec::with_capacity(batch.len())));
                            enriched.len() - 1
                        }
                    };
                    let (_, topic, times) = &mut enriched[at];
                    let mut out = Outgoing::to(topic)
                        .key(&arena[key])
                        .payload(&arena[bytes])
                        .header(
                            headers::ORIGIN_PARTITION,
                            partition_text.format(record.partition),
                        )
                        .header(headers::ORIGIN_OFFSET, offset_text.format(record.offset));
                    if let Some(tags) = &tags {
                        out = out.header(instream_quality::TAG_HEADER, tags);
                    }
                    deliveries.push(client::send(&self.producer, out).await?);
                    times.push(ingest_time);
                }
            }
        }
        Ok((deliveries, enriched))
    }

    /// The reference data of the batch's lookups, misses retried as their rules allow;
    /// `None` when shutdown interrupted.
    async fn answers(&self, plans: &transform::Plans<'_>) -> Option<Vec<Arc<Found>>> {
        let mut answers = if plans.lookups.is_empty() {
            Vec::new()
        } else {
            self.lookup(&plans.lookups).await?
        };
        self.retry_misses(&plans.lookups, &plans.retries, &mut answers)
            .await
            .then_some(answers)
    }

    /// Sends every violation, whatever its action, to its pipeline's quality topic for the
    /// report (in the batch's transaction in transactional delivery), keyed by event id;
    /// returns how many per pipeline, rule and action.
    async fn send_violations(
        &self,
        records: &[instream_quality::ViolationRecord],
        deliveries: &mut Vec<Delivery>,
    ) -> Result<HashMap<(String, String, &'static str), u64>, EnricherError> {
        let mut violations: HashMap<(String, String, &'static str), u64> = HashMap::new();
        for violation in records {
            let topic = topics::quality(&violation.pipeline);
            let value = serde_json::to_vec(violation).unwrap_or_default();
            let out = Outgoing::to(&topic)
                .key(violation.event_id.as_bytes())
                .payload(value.as_slice());
            deliveries.push(client::send(&self.producer, out).await?);
            *violations
                .entry((
                    violation.pipeline.clone(),
                    violation.rule.clone(),
                    violation.action.as_str(),
                ))
                .or_default() += 1;
        }
        Ok(violations)
    }
}

/// A pipeline of a batch (usually one): its definition, its enriched topic, and the ingest
/// times of its records sent there.
type Enriched = (Arc<PipelineDefinition>, String, Vec<i64>);

/// Counts the enriched events of a delivered batch, per pipeline, and their latency from
/// ingest.
fn count_enriched(enriched: Vec<Enriched>) {
    let now = instream_event::now_millis();
    let latency = instream_core::events::stage_latency(SERVICE.as_str());
    for (pipeline, _, times) in enriched {
        for ingest_time in &times {
            latency.record((now - ingest_time).max(0) as f64 / 1000.0);
        }
        instream_core::events::events_handled(
            SERVICE,
            pipeline.name.clone(),
            "enriched",
            times.len() as u64,
        );
    }
}
