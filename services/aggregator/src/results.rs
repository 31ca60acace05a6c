//! Results that leave the store: each window value the aggregator writes for an aggregation
//! with a Kafka output also goes, as JSON, to `<pipeline>.results.<aggregation>`, keyed by
//! its group, so downstream services consume results without polling the store.
//!
//! They are on the broker before the checkpoint that could drop their window is saved (the
//! flush waits for them as it waits for the store), so a crash loses none; a crash before
//! that checkpoint makes the restarted aggregator write the same windows again, so a value
//! may repeat, with the same key, window and content (docs/guarantees.md).

use instream_kafka::client::{self, Producer};
use instream_kafka::{BatchOutputs, Outgoing};
use instream_pipeline::{topics, Catalog};
use instream_store::WindowAggregate;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::AggregatorError;

/// One result record, as downstream services read it.
#[derive(Serialize)]
struct ResultRecord<'a> {
    pipeline: &'a str,
    aggregation: &'a str,
    group: &'a str,
    window_start: String,
    window_end: String,
    count: i64,
    values: &'a serde_json::Map<String, serde_json::Value>,
    #[serde(rename = "final")]
    is_final: bool,
    definition_version: i64,
    /// A session merged into another (stored under another start): gone from the store.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    deleted: bool,
}

/// What the rows published are.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Window values written.
    Value,
    /// Session windows deleted from the store (merged into another session).
    Deleted,
}

/// Sends the rows of aggregations with a Kafka output and waits until the broker has all of
/// them. `Ok(false)` when `stop` came first: none may count as delivered.
pub(crate) async fn publish(
    producer: &Producer,
    catalog: &Catalog,
    rows: &[WindowAggregate],
    kind: Kind,
    stop: &CancellationToken,
) -> Result<bool, AggregatorError> {
    if catalog.iter().all(|def| def.outputs.is_empty()) {
        return Ok(true);
    }
    let mut outputs = BatchOutputs::default();
    for row in rows {
        // Under the current version or the one that made the window (an output removed by
        // a change still gets the windows made before it).
        let wanted = catalog.get(&row.pipeline).is_some_and(|def| {
            def.kafka_output(&row.aggregation)
                || u64::try_from(row.definition_version)
                    .ok()
                    .and_then(|v| def.version_def(v))
                    .is_some_and(|made_by| made_by.kafka_output(&row.aggregation))
        });
        if !wanted {
            continue;
        }
        let record = ResultRecord {
            pipeline: &row.pipeline,
            aggregation: &row.aggregation,
            group: &row.group_key,
            window_start: instream_event::format_rfc3339_millis(row.window_start),
            window_end: instream_event::format_rfc3339_millis(row.window_end),
            count: row.count,
            values: &row.values,
            is_final: row.is_final && kind == Kind::Value,
            definition_version: row.definition_version,
            deleted: kind == Kind::Deleted,
        };
        // A struct of strings, numbers and a JSON map: serializing it cannot fail.
        let payload = serde_json::to_vec(&record).unwrap_or_default();
        let topic = topics::results(&row.pipeline, &row.aggregation);
        let out = Outgoing::to(&topic)
            .key(row.group_key.as_bytes())
            .payload(&payload);
        outputs.push(client::send(producer, out).await?);
        metrics::counter!("instream_results_published_total", "pipeline" => row.pipeline.clone(), "aggregation" => row.aggregation.clone())
            .increment(1);
    }
    if outputs.is_empty() {
        return Ok(true);
    }
    Ok(outputs.delivered_unless(producer, stop).await?)
}
