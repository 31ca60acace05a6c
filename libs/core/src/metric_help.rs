//! The `# HELP` text of every metric instream exports, in one table: a dashboard author
//! reads what a series means on `/metrics` itself. A test checks that every metric the code
//! records is described here.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

enum Kind {
    Counter,
    Gauge,
    Histogram(Unit),
}

use Kind::{Counter, Gauge, Histogram};

const SECONDS: Kind = Histogram(Unit::Seconds);

/// `(name, kind, help)` of every metric.
const METRICS: &[(&str, Kind, &str)] = &[
    ("instream_build_info", Gauge, "Always 1; the version label says which build runs."),
    ("instream_events_total", Counter, "Events handled per service, pipeline and outcome (accepted, enriched, aggregated, already_applied, too_late, …)."),
    ("instream_events_rejected_total", Counter, "Events refused at the edge, per service, pipeline and code (schema, missing_key, event_too_large, …)."),
    ("instream_dead_letters_total", Counter, "Records sent to a dead-letter topic, per service, pipeline and code."),
    ("instream_records_lost_total", Counter, "Offsets a consumer found skipped (retention, truncation, a reset), per service, topic and partition: never expected to rise."),
    ("instream_stage_latency_seconds", SECONDS, "From an event's ingest time to a stage's output (aggregator_visible: to the store)."),
    ("instream_batch_size", Histogram(Unit::Count), "Records per batch a stage handled."),
    ("instream_component_ready", Gauge, "1 when a readiness component (a dependency of a service) is ready, 0 otherwise."),
    ("instream_assigned_partitions", Gauge, "Partitions assigned to a consumer now."),
    ("instream_consumer_lag", Gauge, "Records between a consumer group's position and the partition's end."),
    ("instream_offset_commits_total", Counter, "Offset commits by outcome."),
    ("instream_offset_commit_seconds", SECONDS, "Time from an offset commit's request to the broker's answer."),
    ("instream_produce_latency_seconds", SECONDS, "Time from a record's send to the broker's acknowledgement."),
    ("instream_kafka_client_errors_total", Counter, "Errors librdkafka reported (most are retried by itself)."),
    ("instream_kafka_consume_errors_total", Counter, "Transient consume errors a consumer went on after."),
    ("instream_definition_version", Gauge, "The version of each pipeline definition this process runs."),
    ("instream_definition_invalid", Gauge, "1 while a stored definition is invalid (the last valid one stays in force)."),
    ("instream_definition_rejected_total", Counter, "Definition changes refused by validation."),
    ("instream_leader", Gauge, "1 while this process leads a duty (an election in ZooKeeper)."),
    ("instream_zookeeper_sessions_lost_total", Counter, "ZooKeeper sessions that expired or closed, per role."),
    ("instream_http_connections", Gauge, "Open HTTP connections per server."),
    ("instream_http_idle_closed_total", Counter, "HTTP connections closed for silence or idleness, per server."),
    ("instream_http_requests_total", Counter, "HTTP requests per server, route and status."),
    ("instream_ingest_in_flight_bytes", Gauge, "Request bytes ingest holds in memory now."),
    ("instream_ingest_requests_in_flight", Gauge, "Requests ingest is handling now."),
    ("instream_ingest_rate_limited_total", Counter, "Requests answered 429 for a key's rate."),
    ("instream_ingest_refused_total", Counter, "Whole requests refused (503, 408, 413, …), per reason."),
    ("instream_query_latency_seconds", SECONDS, "query-api answer times."),
    ("instream_query_refused_total", Counter, "query-api requests refused, per error."),
    ("instream_enrich_lookups_total", Counter, "Reference-data lookups per pipeline, rule and outcome (found, missing, …)."),
    ("instream_enrich_lookup_failures_total", Counter, "Reference-data lookups that failed (Redis away) and were retried."),
    ("instream_enrich_retries_total", Counter, "Lookups asked again under a `retry` rule."),
    ("instream_enrich_transactions_total", Counter, "Enricher batch transactions by outcome (committed, aborted)."),
    ("instream_refdata_lookups_total", Counter, "Reference-data lookups by where they were answered (cache, redis)."),
    ("instream_refdata_lookup_seconds", SECONDS, "Time of a batch's reference-data round trip."),
    ("instream_refdata_single_flight_waits_total", Counter, "Lookups that waited for the same key's lookup in flight."),
    ("instream_refdata_version", Gauge, "The reference-data version each rule reads."),
    ("instream_quality_checked_total", Counter, "Events checked by each data-quality rule."),
    ("instream_quality_violations_total", Counter, "Data-quality violations per pipeline, rule and action."),
    ("instream_open_windows", Gauge, "Windows open in the aggregator's state."),
    ("instream_window_writes_total", Counter, "Window values written to the store."),
    ("instream_window_close_delay_seconds", SECONDS, "From a window's close (the watermark passing its end) to its value in the store."),
    ("instream_checkpoint_restore_seconds", SECONDS, "Time to restore a partition's state from its checkpoint."),
    ("instream_aggregator_partition_states", Gauge, "Partition states the aggregator holds."),
    ("instream_aggregator_repartitioned_total", Counter, "Events forwarded to a repartition topic, per aggregation."),
    ("instream_aggregator_repartition_events_total", Counter, "Forwarded events handled in repartition partitions, per aggregation and outcome."),
    ("instream_task_panics_total", Counter, "Background tasks of libraries (ZooKeeper sessions, elections, definition watches, reference-data version followers) that panicked, per task."),
    ("instream_results_published_total", Counter, "Window values sent to a results topic (a kafka output), per pipeline and aggregation."),
    ("instream_notifications_sent_total", Counter, "Webhook notifications their receiver took (2xx), per pipeline and webhook output."),
    ("instream_notifications_failed_total", Counter, "Webhook notifications dead-lettered (refused, retries spent, no signing secret, too many waiting), per pipeline and webhook output."),
    ("instream_notification_attempt_failures_total", Counter, "Failed webhook attempts, per pipeline, output and reason (status, timeout, connect); most are retried."),
    ("instream_notification_latency_seconds", SECONDS, "Time a webhook receiver took to take a notification (the successful attempt)."),
    ("instream_notifications_pending", Gauge, "Webhook notifications waiting for their receiver or in flight in this aggregator (at most aggregator.webhook_max_pending)."),
    ("instream_aggregator_idle_partitions", Gauge, "Owned input partitions read to their end and quiet for their pipeline's idle_timeout, whose watermark moves on with the time that passes."),
    ("instream_archive_files_total", Counter, "Archive files written, per pipeline and roll reason."),
    ("instream_archive_records_total", Counter, "Records archived."),
    ("instream_archive_bytes_total", Counter, "Bytes of archive files written."),
    ("instream_archive_write_seconds", SECONDS, "Time to write one archive file whole."),
    ("instream_archive_open_files", Gauge, "Archive files being filled."),
    ("instream_archive_skipped_total", Counter, "Records not archived again because a file already holds their offset."),
    ("instream_archive_column_mismatch_total", Counter, "Parquet rows whose value did not fit its column's type (written as null)."),
    ("instream_archive_retention_deleted_files_total", Counter, "Archive files deleted by retention."),
    ("instream_audit_unbalanced_records", Gauge, "Records that do not balance in query-api's last periodic audit, per pipeline and stage (enricher, archiver, aggregator): never expected above 0."),
    ("instream_audit_checked_timestamp_seconds", Gauge, "When query-api's periodic audit last checked a pipeline (Unix seconds)."),
    ("instream_audit_check_failures_total", Counter, "Periodic audits of a pipeline that could not be made (a topic, the archive or the store unreadable)."),
    ("instream_archive_retention_deleted_bytes_total", Counter, "Bytes deleted by archive retention."),
    ("instream_db_source_rows_total", Counter, "Rows read from SQL tables."),
    ("instream_db_source_query_seconds", SECONDS, "Time of a SQL source's poll query."),
    ("instream_db_source_leader", Gauge, "1 while this instance polls the table (leads its election)."),
];

/// The histograms that count things (records per batch) rather than time them: they get
/// [`COUNT_BUCKETS`], not the latency buckets every other histogram has.
pub(crate) fn count_histograms() -> impl Iterator<Item = &'static str> {
    METRICS
        .iter()
        .filter(|(_, kind, _)| matches!(kind, Histogram(Unit::Count)))
        .map(|(name, ..)| *name)
}

/// Buckets of a count (a batch holds 1 to `batch_size` records, 5,000 by default).
pub(crate) const COUNT_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0, 50000.0,
];

/// Gives every metric its help text, and sets `instream_build_info`.
pub(crate) fn describe_all() {
    for (name, kind, help) in METRICS {
        match kind {
            Counter => describe_counter!(*name, *help),
            Gauge => describe_gauge!(*name, *help),
            Histogram(unit) => describe_histogram!(*name, *unit, *help),
        }
    }
    metrics::gauge!("instream_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

#[cfg(test)]
mod tests {
    use super::METRICS;

    /// Every `"instream_…"` metric name the code of the workspace records, read from its
    /// sources.
    fn names_in_sources() -> std::collections::BTreeSet<String> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut names = std::collections::BTreeSet::new();
        let mut dirs = vec![root.join("libs"), root.join("services")];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() && !path.ends_with("tests") {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    for macro_call in ["counter!(", "gauge!(", "histogram!("] {
                        for (at, _) in text.match_indices(macro_call) {
                            let rest = text[at + macro_call.len()..].trim_start();
                            if let Some(name) = rest
                                .strip_prefix("\"instream_")
                                .and_then(|r| r.split('"').next())
                            {
                                names.insert(format!("instream_{name}"));
                            }
                        }
                    }
                }
            }
        }
        names
    }

    #[test]
    fn every_recorded_metric_has_help_text() {
        let described: Vec<&str> = METRICS.iter().map(|(name, ..)| *name).collect();
        let recorded = names_in_sources();
        assert!(recorded.len() > 40, "read the sources: {recorded:?}");
        let missing: Vec<&String> = recorded
            .iter()
            .filter(|name| {
                !described.contains(&name.as_str()) && !name.starts_with("instream_test_")
            })
            .collect();
        assert!(missing.is_empty(), "no help text for {missing:?}");
    }
}
