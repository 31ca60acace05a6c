//! Windows of a stream that went quiet. A partition the aggregator has read to its end and
//! that brought nothing for its pipeline's `idle_timeout` moves its watermark on from its
//! newest event time by the time that passed (docs/guarantees.md), so the windows of a key
//! that stopped sending close and their final values are written, instead of waiting for an
//! event that may never come.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use instream_core::config::KafkaConfig;
use instream_kafka::Input;
use instream_pipeline::{topics, Catalog};

use crate::partitions::Partitions;
use crate::AggregatorError;

/// How long an answer about the enriched topic's lag is trusted.
const UPSTREAM_FRESH: Duration = Duration::from_secs(5);

/// What is known of the enriched topics the repartition topics are fed from: a repartition
/// partition is quiet also when the aggregators forwarding into it are behind (restarting,
/// or with a backlog), and its windows must then wait for what they will forward.
#[derive(Default)]
pub(crate) struct Upstream {
    /// Pipeline -> when its enriched topic was last looked at, and whether it was read to its
    /// end then.
    checked: HashMap<String, (Instant, bool)>,
}

impl Upstream {
    /// Whether `group` has handled every record of the pipeline's enriched topic. A topic
    /// written in transactions ends with a commit marker no reader receives, so one offset
    /// short of its end counts as read there.
    async fn read_to_end(
        &mut self,
        kafka: &KafkaConfig,
        group: &str,
        pipeline: &str,
        markers: bool,
    ) -> bool {
        if let Some((at, read)) = self.checked.get(pipeline) {
            if at.elapsed() < UPSTREAM_FRESH {
                return *read;
            }
        }
        let allowance = i64::from(markers);
        let read = match instream_kafka::ops::group_lag(kafka, group, &topics::enriched(pipeline))
            .await
        {
            Ok(lags) => lags.iter().all(|p| p.lag <= allowance),
            Err(error) => {
                tracing::debug!(pipeline, %error, "the enriched topic's lag is unknown: not idle");
                false
            }
        };
        self.checked
            .insert(pipeline.to_owned(), (Instant::now(), read));
        read
    }
}

/// Moves on the watermark of every owned partition that is idle under its pipeline's
/// `idle_timeout` (pipelines without one wait for the next event).
pub(crate) async fn advance(
    partitions: &mut Partitions,
    input: Input<'_>,
    catalog: &Catalog,
    kafka: &KafkaConfig,
    upstream: &mut Upstream,
) -> Result<(), AggregatorError> {
    let read = input.read_to_end();
    let now = instream_event::now_millis();
    let group = partitions.group.clone();
    let markers = partitions.enriched_in_transactions;
    for (source, state) in partitions.states.iter_mut() {
        let pipeline = topics::pipeline_of(&source.0);
        let Some(idle) = catalog.get(pipeline).and_then(|d| d.idle_timeout) else {
            continue;
        };
        // A partition nothing was received from since it was assigned (restored at its end)
        // has no position: its state then says how far it was read.
        let mut read_to_end = read.contains(source)
            || input
                .known_end(&source.0, source.1)
                .is_some_and(|end| state.next_offset() >= end);
        if read_to_end
            && state.idle_due(now, idle)
            && topics::repartitioned_aggregation(&source.0).is_some()
        {
            read_to_end = upstream.read_to_end(kafka, &group, pipeline, markers).await;
        }
        let was_idle = state.is_idle();
        if state.advance_idle(now, idle, read_to_end) && !was_idle {
            tracing::debug!(topic = %source.0, partition = source.1, "idle partition: its watermark moves on");
        }
    }
    let idle = partitions.states.values().filter(|s| s.is_idle()).count();
    metrics::gauge!("instream_aggregator_idle_partitions", "service" => crate::SERVICE.as_str())
        .set(idle as f64);
    Ok(())
}
