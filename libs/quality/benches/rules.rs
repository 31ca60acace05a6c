//! Ten data-quality rules of every kind but `reference` (one of them, a lookup outcome, is as
//! cheap as a slice index) on realistic ~350-byte Nexmark-shaped bid events, most of which
//! pass, as in the enricher: read the event's envelope and payload, then judge. Among them an
//! `allowed` list of 201 codes and a `compare` of two RFC 3339 times.
//!
//! `cargo bench -p instream-quality --bench rules`; divide the per-event time by 10 for the
//! per-rule figure (the issue's budget: 0.3 µs of CPU per rule per event).

use std::collections::BTreeMap;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use instream_quality::{EventFacts, RuleSet, Violation};

const EVENTS: usize = 2_000;

fn rules() -> RuleSet {
    // A long list, as a country or currency code list is: 200 codes and the one used.
    let currencies: Vec<String> = (0..200)
        .map(|i| format!("\"C{i:03}\""))
        .chain(["\"USD\"".to_owned()])
        .collect();
    let doc = instream_pipeline::parse_document(
        &r#"
[[pipelines]]
name = "bids"
key_field = "auction"
time_field = "date_time"

[[pipelines.quality]]
name = "has-bidder"
check = { kind = "required", field = "payload.bidder" }
[[pipelines.quality]]
name = "has-price"
check = { kind = "required", field = "payload.price" }
[[pipelines.quality]]
name = "price-is-integer"
check = { kind = "type", field = "payload.price", type = "integer" }
[[pipelines.quality]]
name = "price-range"
severity = "error"
action = "dead_letter"
check = { kind = "range", field = "payload.price", min = 1, max = 9000 }
[[pipelines.quality]]
name = "channel-known"
check = { kind = "pattern", field = "payload.channel", regex = "^channel-[0-9]+$" }
[[pipelines.quality]]
name = "url-https"
action = "count"
check = { kind = "pattern", field = "payload.url", regex = "^https://" }
[[pipelines.quality]]
name = "currency-allowed"
check = { kind = "allowed", field = "payload.currency", values = [CURRENCIES] }
[[pipelines.quality]]
name = "created-before-bid"
check = { kind = "compare", left = "payload.created", op = "lte", right = "payload.date_time" }
[[pipelines.quality]]
name = "fresh"
check = { kind = "freshness", max_age = "1h", max_ahead = "5m" }
[[pipelines.quality]]
name = "key-numeric"
check = { kind = "pattern", field = "key", regex = "^[0-9]+$" }
"#
        .replace("CURRENCIES", &currencies.join(", ")),
    )
    .unwrap();
    RuleSet::compile(&doc.pipelines[0]).unwrap()
}

fn events() -> Vec<Vec<u8>> {
    (0..EVENTS)
        .map(|n| {
            // One event in a hundred breaks the price range.
            let price = if n % 100 == 0 { 20_000 } else { 100 + n % 8000 };
            let payload = format!(
                r#"{{"auction":{a},"bidder":{b},"price":{price},"currency":"USD","created":"2026-11-25T09:{m:02}:{s:02}.000+00:00","channel":"channel-{c}","url":"https://www.nexmark.com/{a}/item.htm?query=1&channel_id={c}","date_time":"2026-11-25T10:{m:02}:{s:02}.000Z","extra":"{x}"}}"#,
                a = 1000 + n % 977,
                b = (n * 7919) % 10_000,
                c = n % 50,
                m = (n / 60) % 60,
                s = n % 60,
                x = "x".repeat(30),
            );
            let event = instream_event::Event {
                event_id: format!("bid-{n}"),
                pipeline: "bids".into(),
                key: format!("{}", 1000 + n % 977),
                event_time: 1_795_600_800_000 + n as i64,
                ingest_time: 1_795_600_800_000 + n as i64 + 50,
                headers: BTreeMap::new(),
                payload: serde_json::value::RawValue::from_string(payload).unwrap(),
                enrichment: None,
            };
            let mut buf = Vec::new();
            instream_event::encode_into(&event, &mut buf);
            buf
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let rules = rules();
    assert_eq!(rules.len(), 10);
    let events = events();
    let mut group = c.benchmark_group("quality");
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.bench_function("10_rules_read_and_judge", |b| {
        let mut violations: Vec<Violation> = Vec::new();
        b.iter(|| {
            violations.clear();
            for bytes in &events {
                let view = instream_event::view(bytes).unwrap();
                let payload: serde_json::Value = serde_json::from_str(view.payload.get()).unwrap();
                rules.evaluate(
                    &EventFacts {
                        key: &view.key,
                        payload: Some(&payload),
                        enrichment: None,
                        event_time: view.event_time,
                        ingest_time: view.ingest_time,
                        found: &[],
                    },
                    &mut violations,
                );
            }
            assert_eq!(violations.len(), EVENTS / 100);
        })
    });
    let parsed: Vec<(String, serde_json::Value, i64, i64)> = events
        .iter()
        .map(|bytes| {
            let view = instream_event::view(bytes).unwrap();
            (
                view.key.to_string(),
                serde_json::from_str(view.payload.get()).unwrap(),
                view.event_time,
                view.ingest_time,
            )
        })
        .collect();
    group.bench_function("10_rules_judge_only", |b| {
        let mut violations: Vec<Violation> = Vec::new();
        b.iter(|| {
            violations.clear();
            for (key, payload, event_time, ingest_time) in &parsed {
                rules.evaluate(
                    &EventFacts {
                        key,
                        payload: Some(payload),
                        enrichment: None,
                        event_time: *event_time,
                        ingest_time: *ingest_time,
                        found: &[],
                    },
                    &mut violations,
                );
            }
            assert_eq!(violations.len(), EVENTS / 100);
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
