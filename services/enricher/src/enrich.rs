//! One batch: decode, plan the lookups, look them all up at once, produce.

use std::sync::Arc;
use std::time::Duration;

use instream_core::Readiness;
use instream_event::Event;
use instream_kafka::client::{self, Producer};
use instream_kafka::{headers, DeadLetters, Record};
use instream_pipeline::{topics, Catalog, EnrichmentRule, MissPolicy, PipelineDefinition};
use instream_refdata::{Found, RefRecord, RefStore};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureRecord};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::{EnricherError, SERVICE};

pub(crate) struct Enricher {
    pub refstore: Arc<dyn RefStore>,
    pub readiness: Readiness,
    pub producer: Producer,
    pub dead: DeadLetters,
    pub shutdown: CancellationToken,
}

/// What happens to one consumed record.
enum Plan {
    Dead {
        code: &'static str,
        reason: String,
    },
    Enrich {
        event: Event,
        def: Arc<PipelineDefinition>,
        /// Per rule: the index of its lookup, or the template field the event lacks.
        lookups: Vec<Result<usize, String>>,
    },
}

fn plan(
    catalog: &Catalog,
    refstore: &dyn RefStore,
    record: &Record,
    lookups: &mut Vec<(String, instream_pipeline::RecordShape)>,
) -> Plan {
    let event = match instream_event::decode(&record.payload) {
        Ok(e) => e,
        Err(e) => {
            return Plan::Dead {
                code: "decode_error",
                reason: e.to_string(),
            }
        }
    };
    let Some(def) = catalog.get(&event.pipeline).cloned() else {
        return Plan::Dead {
            code: "unknown_pipeline",
            reason: format!("no definition for pipeline `{}`", event.pipeline),
        };
    };
    let mut rule_lookups = Vec::with_capacity(def.enrichments.len());
    if !def.enrichments.is_empty() {
        let payload: Value = match serde_json::from_str(event.payload.get()) {
            Ok(v) => v,
            Err(e) => {
                return Plan::Dead {
                    code: "decode_error",
                    reason: format!("payload: {e}"),
                }
            }
        };
        let mut key = String::new();
        for rule in &def.enrichments {
            match rule.key_template.render(&payload, &mut key) {
                Ok(()) => {
                    rule_lookups.push(Ok(lookups.len()));
                    // Data loaded by `instream refdata load` lives under its version's prefix.
                    let full = match refstore.version(&def.name, &rule.name) {
                        Some(v) => format!(
                            "{}{key}",
                            instream_refdata::versions::version_prefix(&def.name, &rule.name, v)
                        ),
                        None => key.clone(),
                    };
                    lookups.push((full, rule.shape));
                }
                Err(field) => rule_lookups.push(Err(field.to_string())),
            }
        }
    }
    Plan::Enrich {
        event,
        def,
        lookups: rule_lookups,
    }
}

/// Copies a found record into the enrichment, renamed as the rule says.
fn apply(rule: &EnrichmentRule, found: &RefRecord, out: &mut Map<String, Value>) {
    if rule.fields.is_empty() {
        for (k, v) in found {
            out.insert(k.clone(), v.clone());
        }
    } else {
        for (from, to) in &rule.fields {
            if let Some(v) = found.get(from) {
                out.insert(to.clone(), v.clone());
            }
        }
    }
}

impl Enricher {
    /// Follows the reference-data versions of every rule in `catalog`.
    pub async fn track_rules(&self, catalog: &Catalog) {
        let rules: Vec<(String, String)> = catalog
            .iter()
            .flat_map(|def| {
                def.enrichments
                    .iter()
                    .map(|rule| (def.name.clone(), rule.name.clone()))
            })
            .collect();
        if let Err(error) = self.refstore.track(&rules).await {
            // The background check reads them again shortly.
            tracing::warn!(%error, "reading reference data versions failed");
        }
    }

    /// Looks up until it works; `None` when shutdown comes first.
    async fn lookup(
        &self,
        lookups: &[(String, instream_pipeline::RecordShape)],
    ) -> Option<Vec<Found>> {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.refstore.lookup_many(lookups).await {
                Ok(answers) => {
                    self.readiness.set_ready();
                    return Some(answers);
                }
                Err(error) => {
                    self.readiness.set_not_ready(error.to_string());
                    metrics::counter!("instream_enrich_lookup_failures_total").increment(1);
                    tracing::warn!(%error, retry_in = ?backoff, "reference data lookup failed; retrying");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Processes a batch. `Ok(true)`: every record's output is acknowledged. `Ok(false)`:
    /// shutdown interrupted it; nothing may be committed.
    pub async fn process(
        &self,
        catalog: &Catalog,
        batch: &[Record],
    ) -> Result<bool, EnricherError> {
        let mut lookups = Vec::new();
        let plans: Vec<Plan> = batch
            .iter()
            .map(|r| plan(catalog, self.refstore.as_ref(), r, &mut lookups))
            .collect();
        let answers = if lookups.is_empty() {
            Vec::new()
        } else {
            match self.lookup(&lookups).await {
                Some(a) => a,
                None => return Ok(false),
            }
        };
        metrics::histogram!("instream_batch_size", "service" => SERVICE).record(batch.len() as f64);

        let mut deliveries: Vec<DeliveryFuture> = Vec::with_capacity(batch.len());
        let mut ingest_times = Vec::with_capacity(batch.len());
        let mut buf = Vec::with_capacity(1024);
        for (record, plan) in batch.iter().zip(plans) {
            let (mut event, def, rule_lookups) = match plan {
                Plan::Dead { code, reason } => {
                    deliveries.push(self.dead.publish_record(record, code, &reason).await?);
                    continue;
                }
                Plan::Enrich {
                    event,
                    def,
                    lookups,
                } => (event, def, lookups),
            };
            let mut enrichment = Map::new();
            let mut missed = Vec::new();
            let mut dead: Option<(&'static str, String)> = None;
            for (rule, lookup) in def.enrichments.iter().zip(rule_lookups) {
                let found = match lookup {
                    Ok(i) => answers.get(i).unwrap_or(&Found::Missing),
                    Err(_) => &Found::Missing,
                };
                let outcome = match found {
                    Found::Record(_) => "hit",
                    Found::Missing => "miss",
                    Found::Malformed(_) => "malformed",
                };
                metrics::counter!("instream_enrich_lookups_total", "pipeline" => def.name.clone(), "rule" => rule.name.clone(), "outcome" => outcome)
                    .increment(1);
                match (found, rule.on_miss) {
                    (Found::Record(found), _) => apply(rule, found, &mut enrichment),
                    (Found::Malformed(why), _) => {
                        dead.get_or_insert_with(|| {
                            (
                                "refdata_malformed",
                                format!("rule `{}`: the reference record {why}", rule.name),
                            )
                        });
                    }
                    (Found::Missing, MissPolicy::Pass) => {
                        missed.push(Value::String(rule.name.clone()))
                    }
                    (Found::Missing, MissPolicy::DeadLetter) => {
                        dead.get_or_insert_with(|| {
                            (
                                "enrich_miss",
                                format!("rule `{}` found no reference record", rule.name),
                            )
                        });
                    }
                }
            }
            if let Some((code, reason)) = dead {
                deliveries.push(self.dead.publish_record(record, code, &reason).await?);
                continue;
            }
            if !missed.is_empty() {
                enrichment.insert("_missed".into(), Value::Array(missed));
            }
            event.enrichment = Some(enrichment);
            instream_event::encode_into(&event, &mut buf);
            let partition = record.partition.to_string();
            let offset = record.offset.to_string();
            let hs = OwnedHeaders::new()
                .insert(Header {
                    key: headers::ORIGIN_PARTITION,
                    value: Some(&partition),
                })
                .insert(Header {
                    key: headers::ORIGIN_OFFSET,
                    value: Some(&offset),
                });
            let topic = topics::enriched(&def.name);
            let out = FutureRecord::to(&topic)
                .key(event.key.as_bytes())
                .payload(buf.as_slice())
                .headers(hs);
            deliveries.push(client::send(&self.producer, out).await?);
            ingest_times.push((def.name.clone(), event.ingest_time));
        }
        for delivery in deliveries {
            client::delivered(delivery).await?;
        }
        let now = instream_event::now_millis();
        for (pipeline, ingest_time) in &ingest_times {
            metrics::histogram!("instream_stage_latency_seconds", "stage" => SERVICE)
                .record((now - ingest_time).max(0) as f64 / 1000.0);
            metrics::counter!("instream_events_total", "service" => SERVICE, "pipeline" => pipeline.clone(), "outcome" => "enriched")
                .increment(1);
        }
        Ok(true)
    }
}
