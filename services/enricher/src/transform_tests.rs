use std::collections::BTreeMap;

use instream_refdata::RefRecord;
use serde_json::json;

use super::*;

fn catalog() -> Catalog {
    let doc = instream_pipeline::parse_document(
        r#"
[[pipelines]]
name = "orders"
key_field = "customer_id"
time_field = "ts"

[[pipelines.enrichments]]
name = "customer"
key_template = "customer:{customer_id}"
fields = { tier = "tier", name = "customer_name" }
defaults = { tier = "unknown" }

[[pipelines.enrichments]]
name = "country"
key_template = "country:{address.country}"
shape = "json"
fields = { name = "country_name", tier = "tier" }
on_miss = "dead_letter"

[[pipelines]]
name = "strict"
key_field = "customer_id"
time_field = "ts"

[[pipelines.enrichments]]
name = "customer"
key_template = "customer:{customer_id}"
on_miss = "retry"
retry_attempts = 2
"#,
    )
    .unwrap();
    Catalog::new(doc.pipelines)
}

fn record(pipeline: &str, offset: i64, payload: serde_json::Value) -> Record {
    let event = instream_event::Event {
        event_id: format!("e{offset}"),
        pipeline: pipeline.into(),
        key: "k1".into(),
        event_time: 1,
        ingest_time: 2,
        headers: BTreeMap::new(),
        payload: serde_json::value::RawValue::from_string(payload.to_string()).unwrap(),
        enrichment: None,
    };
    Record {
        topic: format!("{pipeline}.raw"),
        partition: 0,
        offset,
        key: Some(b"k1".to_vec()),
        payload: instream_event::encode(&event).to_vec(),
        headers: Vec::new(),
        generation: 0,
    }
}

fn found(fields: serde_json::Value) -> Arc<Found> {
    let serde_json::Value::Object(map) = fields else {
        panic!()
    };
    Arc::new(Found::Record(RefRecord::from_iter(map)))
}

fn enrichment(output: &Output, arena: &[u8]) -> serde_json::Value {
    match output {
        Output::Enriched { bytes, .. } => serde_json::to_value(
            instream_event::decode(&arena[bytes.clone()])
                .unwrap()
                .enrichment,
        )
        .unwrap(),
        Output::Dead { code, reason } => panic!("dead: {code}: {reason}"),
    }
}

fn dead(output: &Output) -> (&'static str, &str) {
    match output {
        Output::Dead { code, reason } => (code.as_str(), reason.as_str()),
        Output::Enriched { .. } => panic!("enriched"),
    }
}

#[test]
fn lookups_are_planned_once_per_distinct_key_under_the_current_version() {
    let catalog = catalog();
    let batch = vec![
        record(
            "orders",
            0,
            json!({"customer_id": "c1", "address": {"country": "NL"}}),
        ),
        record(
            "orders",
            1,
            json!({"customer_id": "c1", "address": {"country": "DE"}}),
        ),
        record(
            "orders",
            2,
            json!({"customer_id": 7, "address": {"country": "NL"}}),
        ),
    ];
    let version = |p: &str, r: &str| (p == "orders" && r == "customer").then_some(3);
    let plans = plan(&catalog, &version, &batch);
    let keys: Vec<&str> = plans.lookups.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "instream:refdata:orders:customer:v3:customer:c1",
            "country:NL",
            "country:DE",
            "instream:refdata:orders:customer:v3:customer:7",
        ]
    );
    assert_eq!(plans.lookups[1].1, RecordShape::Json);
}

#[test]
fn found_fields_are_renamed_defaults_fill_gaps_and_the_payload_is_untouched() {
    let catalog = catalog();
    let payload = json!({"customer_id": "c1", "address": {"country": "NL"}, "amount": 5});
    let batch = vec![
        record("orders", 0, payload.clone()),
        // The customer is unknown: passed on, marked, with the default tier.
        record(
            "orders",
            1,
            json!({"customer_id": "c9", "address": {"country": "NL"}}),
        ),
    ];
    let plans = plan(&catalog, &|_, _| None, &batch);
    let answers = vec![
        found(json!({"tier": "gold", "name": "Ann", "other": 1})),
        found(json!({"name": "Netherlands", "tier": "ignored: customer wrote it first"})),
        Arc::new(Found::Missing),
    ];
    let mut outcomes = Outcomes::default();
    let mut arena = Vec::new();
    let outputs = render(
        plans,
        &batch,
        &answers,
        &mut outcomes,
        &mut Quality::new(0),
        &mut arena,
    );
    assert_eq!(
        enrichment(&outputs[0], &arena),
        json!({"tier": "gold", "customer_name": "Ann", "country_name": "Netherlands"})
    );
    let Output::Enriched { bytes, key, .. } = &outputs[0] else {
        panic!()
    };
    assert_eq!(&arena[key.clone()], b"k1");
    let event = instream_event::decode(&arena[bytes.clone()]).unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(event.payload.get()).unwrap(),
        payload
    );
    assert_eq!(
        enrichment(&outputs[1], &arena),
        json!({"tier": "unknown", "country_name": "Netherlands", "_missed": ["customer"]})
    );
    assert_eq!(outcomes.get("orders", "customer", "miss"), 1);
    assert_eq!(outcomes.get("orders", "customer", "hit"), 1);
}

#[test]
fn misses_under_dead_letter_and_retry_rules_and_bad_records_are_dead_lettered() {
    let catalog = catalog();
    let batch = vec![
        record(
            "orders",
            0,
            json!({"customer_id": "c1", "address": {"country": "XX"}}),
        ),
        record("orders", 1, json!({"customer_id": "c1"})),
        record("strict", 2, json!({"customer_id": "c2"})),
        record(
            "orders",
            3,
            json!({"customer_id": "c1", "address": {"country": "BAD"}}),
        ),
        record("nope", 4, json!({})),
        Record {
            payload: b"not json".to_vec(),
            ..record("orders", 5, json!({}))
        },
    ];
    let plans = plan(&catalog, &|_, _| None, &batch);
    let keys: Vec<&str> = plans.lookups.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        ["customer:c1", "country:XX", "customer:c2", "country:BAD"]
    );
    assert_eq!(
        plans.retries[2],
        Some((2, std::time::Duration::from_millis(200)))
    );
    assert_eq!(plans.retries[0], None);
    let answers = vec![
        found(json!({"tier": "gold"})),
        Arc::new(Found::Missing),
        Arc::new(Found::Missing),
        Arc::new(Found::Malformed("holds no JSON".into())),
    ];
    let outputs = render(
        plans,
        &batch,
        &answers,
        &mut Outcomes::default(),
        &mut Quality::new(0),
        &mut Vec::new(),
    );
    assert_eq!(
        dead(&outputs[0]),
        ("enrich_miss", "rule `country`: no reference record")
    );
    assert_eq!(
        dead(&outputs[1]),
        (
            "enrich_miss",
            "rule `country`: the event lacks a field of its key template"
        )
    );
    assert_eq!(
        dead(&outputs[2]),
        (
            "enrich_miss",
            "rule `customer`: no reference record after 2 retries"
        )
    );
    assert_eq!(dead(&outputs[3]).0, "refdata_malformed");
    assert_eq!(dead(&outputs[4]).0, "unknown_pipeline");
    assert_eq!(dead(&outputs[5]).0, "decode_error");
}

#[test]
fn quality_rules_tag_dead_letter_or_count_and_every_violation_is_recorded() {
    let doc = instream_pipeline::parse_document(
        r#"
[[pipelines]]
name = "orders"
key_field = "customer_id"
time_field = "ts"

[[pipelines.enrichments]]
name = "customer"
key_template = "customer:{customer_id}"
fields = { tier = "tier" }

[[pipelines.quality]]
name = "amount-positive"
severity = "error"
action = "dead_letter"
check = { kind = "range", field = "payload.amount", min = 0 }

[[pipelines.quality]]
name = "known-customer"
check = { kind = "reference", enrichment = "customer" }

[[pipelines.quality]]
name = "gold-only"
action = "count"
check = { kind = "allowed", field = "enrichment.tier", values = ["gold"] }
"#,
    )
    .unwrap();
    let catalog = Catalog::new(doc.pipelines);
    let batch = vec![
        record("orders", 0, json!({"customer_id": "c1", "amount": 5})),
        record("orders", 1, json!({"customer_id": "c2", "amount": -3})),
        record("orders", 2, json!({"customer_id": "c9", "amount": 1})),
        record("orders", 3, json!({"customer_id": "c3", "amount": 2})),
    ];
    let plans = plan(&catalog, &|_, _| None, &batch);
    let answers = vec![
        found(json!({"tier": "gold"})),
        found(json!({"tier": "gold"})),
        Arc::new(Found::Missing),
        found(json!({"tier": "silver"})),
    ];
    let mut quality = Quality::new(1);
    let mut arena = Vec::new();
    let outputs = render(
        plans,
        &batch,
        &answers,
        &mut Outcomes::default(),
        &mut quality,
        &mut arena,
    );
    // Clean: untouched, no header.
    assert_eq!(enrichment(&outputs[0], &arena), json!({"tier": "gold"}));
    assert!(matches!(&outputs[0], Output::Enriched { tags: None, .. }));
    // A dead_letter rule broken: to the DLQ with the rule, its severity and the value.
    assert_eq!(
        dead(&outputs[1]),
        (
            "quality",
            "quality rule `amount-positive` (error): -3 is below min 0 (value -3)"
        )
    );
    // A tag rule broken: goes on, named in the enrichment and the header.
    assert_eq!(
        enrichment(&outputs[2], &arena),
        json!({"_missed": ["customer"], "_quality": ["known-customer"]})
    );
    assert!(matches!(&outputs[2], Output::Enriched { tags: Some(t), .. } if t == "known-customer"));
    // A count rule broken: goes on untouched.
    assert_eq!(enrichment(&outputs[3], &arena), json!({"tier": "silver"}));
    assert!(matches!(&outputs[3], Output::Enriched { tags: None, .. }));
    // Each violation recorded once, whatever its action; one sample per rule this minute.
    let recorded: Vec<(&str, &str, i64)> = quality
        .records
        .iter()
        .map(|r| (r.rule.as_str(), r.event_id.as_str(), r.raw_offset))
        .collect();
    assert_eq!(
        recorded,
        [
            ("amount-positive", "e1", 1),
            ("known-customer", "e2", 2),
            ("gold-only", "e3", 3)
        ]
    );
    assert!(quality.records.iter().all(|r| r.sample.is_some()));
    assert_eq!(quality.records[2].value, Some(json!("silver")));
    assert_eq!(quality.checked[0].1, 4);
}
