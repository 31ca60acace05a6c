//! Logs and metrics set-up, once per process.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, TelemetryConfig};

/// Latency buckets (seconds) for every `*_seconds` histogram: 0.5 ms to 2 min, so that the
/// blueprint's 1–60 s end-to-end promise and sub-millisecond stage work both resolve.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
];

/// Installs the `tracing` subscriber. `RUST_LOG` wins over `telemetry.log_level`. Calling it
/// again (several services in one process, tests) keeps the first subscriber.
pub fn init_tracing(config: &TelemetryConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _already_set = match config.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}

/// The process's Prometheus recorder, installed on first use. Every service in the process
/// records into it; `/metrics` renders it.
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let mut builder = PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
            .expect("latency buckets are a non-empty constant");
        for name in crate::metric_help::count_histograms() {
            builder = builder
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(name.to_owned()),
                    crate::metric_help::COUNT_BUCKETS,
                )
                .expect("count buckets are a non-empty constant");
        }
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            // Only a host program embedding instream could have got there first.
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        }
        crate::metric_help::describe_all();
        handle
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn batch_sizes_land_in_count_buckets_not_past_the_latency_ones() {
        let handle = super::metrics_handle();
        metrics::histogram!("instream_batch_size", "service" => "bucket-test").record(700.0);
        let text = handle.render();
        let line = text
            .lines()
            .find(|l| {
                l.starts_with("instream_batch_size_bucket")
                    && l.contains("bucket-test")
                    && l.contains("le=\"1000\"")
            })
            .unwrap_or_else(|| panic!("no le=1000 bucket: {text}"));
        assert!(line.ends_with(" 1"), "{line}");
    }
}
