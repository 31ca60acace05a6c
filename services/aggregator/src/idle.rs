//! Windows of a stream that went quiet. A partition the aggregator has read to its end and
//! that brought nothing for its pipeline's `idle_timeout` moves its watermark on from its
//! newest event time by the time that passed (docs/pipelines.md), so the windows of a key
//! that stopped sending close and their final values are written, instead of waiting for an
//! event that may never come.
//!
//! "Read to its end" is judged for the whole way there: the partition itself (not paused,
//! its position at its end), and the stages before it — the enricher on the raw topic, and
//! for a repartition partition the aggregators forwarding from the enriched topic — so that
//! an upstream stage that is behind or restarting does not make its backlog late.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use instream_core::config::KafkaConfig;
use instream_kafka::Input;
use instream_pipeline::{topics, Catalog};

use crate::partitions::Partitions;
use crate::AggregatorError;

/// How long an answer about an upstream topic's lag is trusted.
const UPSTREAM_FRESH: Duration = Duration::from_secs(5);

/// Per partition of a topic, whether a group had handled every record of it.
type PartitionsRead = Vec<(i32, bool)>;

/// What is known of how far the stages before the aggregator have read.
pub(crate) struct Upstream {
    /// The enricher's consumer group, which reads the raw topics.
    enricher_group: String,
    /// (group, topic) -> when it was last looked at, and per partition whether the group
    /// had handled every record of it then (empty: unknown).
    checked: HashMap<(String, String), (Instant, PartitionsRead)>,
}

impl Upstream {
    pub(crate) fn new(enricher_group: String) -> Self {
        Self {
            enricher_group,
            checked: HashMap::new(),
        }
    }

    /// Whether `group` has handled every record of `topic` (of its partition `only`, when
    /// given: a quiet partition of a busy pipeline waits for its own upstream only). A topic
    /// written in transactions ends with a commit marker no reader receives, so one offset
    /// short of its end counts as read there (`markers`).
    async fn read_to_end(
        &mut self,
        kafka: &KafkaConfig,
        group: &str,
        topic: String,
        only: Option<i32>,
        markers: bool,
    ) -> bool {
        let key = (group.to_owned(), topic);
        let stale = self
            .checked
            .get(&key)
            .is_none_or(|(at, _)| at.elapsed() >= UPSTREAM_FRESH);
        if stale {
            let allowance = i64::from(markers);
            let read = match instream_kafka::ops::group_lag(kafka, group, &key.1).await {
                Ok(lags) => lags
                    .iter()
                    .map(|p| (p.partition, p.lag <= allowance))
                    .collect(),
                Err(error) => {
                    tracing::debug!(group, topic = %key.1, %error, "upstream lag unknown: not idle");
                    Vec::new()
                }
            };
            self.checked.insert(key.clone(), (Instant::now(), read));
        }
        let read = self
            .checked
            .get(&key)
            .map(|(_, r)| r.as_slice())
            .unwrap_or_default();
        match only {
            Some(partition) => read.iter().any(|(p, done)| *p == partition && *done),
            None => !read.is_empty() && read.iter().all(|(_, done)| *done),
        }
    }
}

/// What [`advance`] needs of the aggregator besides its partitions.
pub(crate) struct Inputs<'a> {
    pub(crate) input: Input<'a>,
    pub(crate) catalog: &'a Catalog,
    pub(crate) kafka: &'a KafkaConfig,
    /// The enriched partitions are paused (back-pressure): their fetched end is stale.
    pub(crate) enriched_paused: bool,
}

/// Moves on the watermark of every owned partition that is idle under its pipeline's
/// `idle_timeout` (pipelines without one wait for the next event).
pub(crate) async fn advance(
    partitions: &mut Partitions,
    upstream: &mut Upstream,
    inputs: Inputs<'_>,
) -> Result<(), AggregatorError> {
    let read = inputs.input.read_to_end();
    let now = instream_event::now_millis();
    let group = partitions.group.clone();
    let markers = partitions.enriched_in_transactions;
    for (source, state) in partitions.states.iter_mut() {
        let pipeline = topics::pipeline_of(&source.0);
        let Some(def) = inputs.catalog.get(pipeline) else {
            continue;
        };
        let Some(idle) = def.idle_timeout else {
            continue;
        };
        let repartition = topics::repartitioned_aggregation(&source.0).is_some();
        // A partition nothing was received from since it was assigned (restored at its end)
        // has no position: its state then says how far it was read.
        let allowance = i64::from(markers && !repartition);
        let read_to_end = (repartition || !inputs.enriched_paused)
            && (read.contains(source)
                || inputs
                    .input
                    .known_end(&source.0, source.1)
                    .is_some_and(|end| state.next_offset() + allowance >= end));
        // The stages before: the enricher on the raw partition this one is fed from (the
        // same number: both are partitioned by the key), or on every raw partition and the
        // forwarding aggregators on every enriched one for a repartition partition. Asked
        // only once the partition itself is quiet; an upstream that is behind holds the
        // advance back without restarting the quiet time.
        let mut upstream_read = true;
        if read_to_end && state.idle_due(now, idle) {
            let only = (!repartition).then_some(source.1);
            let enricher = upstream.enricher_group.clone();
            upstream_read = upstream
                .read_to_end(inputs.kafka, &enricher, topics::raw(pipeline), only, false)
                .await;
            if upstream_read && repartition {
                upstream_read = upstream
                    .read_to_end(
                        inputs.kafka,
                        &group,
                        topics::enriched(pipeline),
                        None,
                        markers,
                    )
                    .await;
            }
        }
        let was_idle = state.is_idle();
        let advanced =
            upstream_read && state.advance_idle(now, idle, read_to_end, def.max_out_of_orderness);
        if advanced && !was_idle {
            tracing::debug!(topic = %source.0, partition = source.1, "idle partition: its watermark moves on");
        }
    }
    let idle = partitions.states.values().filter(|s| s.is_idle()).count();
    metrics::gauge!("instream_aggregator_idle_partitions", "service" => crate::SERVICE.as_str())
        .set(idle as f64);
    Ok(())
}
