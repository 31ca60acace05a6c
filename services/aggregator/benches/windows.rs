//! In-process window updates (no broker, no JSON decoding of the envelope): events applied to
//! one partition's state, 100,000 keys, one-minute tumbling windows.
//!   cargo bench -p instream-aggregator --bench windows
//! Goals (issue): count/sum at least 2,000,000 events/s per core; with HyperLogLog and
//! quantiles at least 500,000.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use instream_aggregator::PartitionState;
use instream_event::Event;
use instream_pipeline::{parse_document, PipelineDefinition};

// As in the service binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EVENTS: usize = 200_000;
const KEYS: usize = 100_000;

fn definition(functions: &str) -> PipelineDefinition {
    parse_document(&format!(
        r#"
[[pipelines]]
name = "bench"
key_field = "k"
time_field = "t"
[[pipelines.aggregations]]
name = "per_minute"
window = {{ kind = "tumbling", size = "1m" }}
functions = [{functions}]
"#
    ))
    .expect("valid")
    .pipelines
    .remove(0)
}

fn events() -> Vec<Event> {
    (0..EVENTS)
        .map(|i| Event {
            event_id: format!("e{i}"),
            pipeline: "bench".into(),
            key: format!("k{}", (i * 7_919) % KEYS),
            event_time: 1_700_000_000_000 + (i as i64 * 300) % 60_000,
            ingest_time: 1_700_000_000_000 + i as i64,
            headers: Default::default(),
            payload: serde_json::value::RawValue::from_string(format!(
                r#"{{"price":{},"bidder":"b{}"}}"#,
                i % 1_000,
                i % 5_000
            ))
            .expect("json"),
            enrichment: None,
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let events = events();
    let mut group = c.benchmark_group("window_updates");
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for (name, functions) in [
        ("count", ""),
        ("count_sum", r#"{ fn = "sum", field = "payload.price" }"#),
        (
            "hll_quantiles",
            r#"{ fn = "count_distinct", field = "payload.bidder" }, { fn = "quantiles", field = "payload.price" }"#,
        ),
    ] {
        let def = definition(functions);
        group.bench_function(name, |b| {
            b.iter_batched(
                PartitionState::default,
                |mut state| {
                    for (offset, event) in events.iter().enumerate() {
                        state.apply(offset as i64, event, None, &def, Duration::from_secs(600));
                    }
                    state
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
