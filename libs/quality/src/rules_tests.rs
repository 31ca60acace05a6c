use serde_json::json;

use super::*;

fn rule_set(rules: &str) -> RuleSet {
    let doc = instream_pipeline::parse_document(&format!(
        r#"
[[pipelines]]
name = "flights"
key_field = "flight"
time_field = "ts"

[[pipelines.enrichments]]
name = "airport"
key_template = "airport:{{origin}}"
fields = {{ city = "origin_city" }}

{rules}
"#
    ))
    .unwrap();
    doc.pipelines[0].validate().unwrap();
    RuleSet::compile(&doc.pipelines[0]).unwrap()
}

fn judge(set: &RuleSet, payload: Value, enrichment: Value, found: bool) -> Vec<Violation> {
    let mut out = Vec::new();
    set.evaluate(
        &EventFacts {
            key: "LH400",
            payload: Some(&payload),
            enrichment: Some(&enrichment),
            event_time: 1_000_000,
            ingest_time: 1_000_500,
            found: &[found],
        },
        &mut out,
    );
    out
}

/// The names of the rules `payload` breaks.
fn broken(set: &RuleSet, payload: Value) -> Vec<&str> {
    judge(set, payload, json!({"origin_city": "Frankfurt"}), true)
        .iter()
        .map(|v| set.name(v.rule))
        .collect()
}

#[test]
fn each_kind_passes_good_events_and_names_what_bad_ones_broke() {
    let set = rule_set(
        r#"
[[pipelines.quality]]
name = "has-origin"
check = { kind = "required", field = "payload.origin" }
[[pipelines.quality]]
name = "seats-integer"
check = { kind = "type", field = "payload.seats", type = "integer" }
[[pipelines.quality]]
name = "seats-range"
check = { kind = "range", field = "payload.seats", min = 1, max = 850 }
[[pipelines.quality]]
name = "origin-iata"
check = { kind = "pattern", field = "payload.origin", regex = "^[A-Z]{3}$" }
[[pipelines.quality]]
name = "cabin"
check = { kind = "allowed", field = "payload.cabin", values = ["economy", "business", 1] }
[[pipelines.quality]]
name = "arrives-after-departing"
check = { kind = "compare", left = "payload.arrival", op = "gte", right = "payload.departure" }
[[pipelines.quality]]
name = "city-known"
check = { kind = "pattern", field = "enrichment.origin_city", regex = "^[A-Z]" }
"#,
    );
    let good = json!({"origin": "FRA", "seats": 300, "cabin": "economy",
        "departure": "2026-11-25T10:00:00Z", "arrival": "2026-11-25T11:30:00+01:00"});
    assert!(broken(&set, good.clone()).is_empty());
    // Absent optional fields pass every check but `required`.
    assert_eq!(broken(&set, json!({})), ["has-origin"]);
    assert_eq!(broken(&set, json!({"origin": null})), ["has-origin"]);
    assert_eq!(
        broken(&set, json!({"origin": "FRA", "seats": 2.5})),
        ["seats-integer"]
    );
    assert_eq!(
        broken(&set, json!({"origin": "FRA", "seats": 900})),
        ["seats-range"]
    );
    assert_eq!(
        broken(&set, json!({"origin": "FRA", "seats": "many"})),
        ["seats-integer", "seats-range"]
    );
    assert_eq!(broken(&set, json!({"origin": "fra"})), ["origin-iata"]);
    assert_eq!(broken(&set, json!({"origin": 7})), ["origin-iata"]);
    assert_eq!(
        broken(&set, json!({"origin": "FRA", "cabin": "first"})),
        ["cabin"]
    );
    assert!(broken(&set, json!({"origin": "FRA", "cabin": 1.0})).is_empty());
    // 11:30+01:00 is 10:30Z: before the departure at 11:00Z, though the text sorts after.
    assert_eq!(
        broken(
            &set,
            json!({"origin": "FRA", "departure": "2026-11-25T11:00:00Z", "arrival": "2026-11-25T11:30:00+01:00"})
        ),
        ["arrives-after-departing"]
    );
    let lower = judge(&set, good, json!({"origin_city": "frankfurt"}), true);
    assert_eq!(lower.len(), 1);
    assert_eq!(set.name(lower[0].rule), "city-known");
    assert_eq!(lower[0].value, Some(json!("frankfurt")));
}

#[test]
fn violations_carry_the_value_and_a_message() {
    let set = rule_set(
        r#"
[[pipelines.quality]]
name = "seats-range"
severity = "error"
action = "dead_letter"
check = { kind = "range", field = "payload.seats", max = 850 }
"#,
    );
    let v = judge(&set, json!({"seats": 900}), json!({}), true);
    assert_eq!(v[0].value, Some(json!(900)));
    assert_eq!(v[0].message, "900 is above max 850");
    assert_eq!(set.action(0), QualityAction::DeadLetter);
    assert_eq!(set.severity(0), Severity::Error);
}

#[test]
fn reference_and_freshness_read_the_lookup_and_the_times() {
    let set = rule_set(
        r#"
[[pipelines.quality]]
name = "airport-known"
check = { kind = "reference", enrichment = "airport" }
[[pipelines.quality]]
name = "fresh"
check = { kind = "freshness", max_age = "400ms", max_ahead = "1s" }
"#,
    );
    assert!(!set.needs_payload() && !set.needs_enrichment());
    let names = |v: Vec<Violation>| {
        v.iter()
            .map(|v| set.name(v.rule).to_owned())
            .collect::<Vec<_>>()
    };
    // Event time 500 ms before ingest: older than 400 ms.
    assert_eq!(names(judge(&set, json!({}), json!({}), true)), ["fresh"]);
    assert_eq!(
        names(judge(&set, json!({}), json!({}), false)),
        ["airport-known", "fresh"]
    );
    let mut out = Vec::new();
    let ahead = |event_time| EventFacts {
        key: "k",
        payload: None,
        enrichment: None,
        event_time,
        ingest_time: 1_000_000,
        found: &[true],
    };
    set.evaluate(&ahead(1_000_900), &mut out);
    assert!(out.is_empty(), "900 ms ahead is within 1 s");
    set.evaluate(&ahead(1_002_000), &mut out);
    assert_eq!(
        out[0].message,
        "event time is 2000 ms after ingest (max_ahead 1000 ms)"
    );
}

#[test]
fn numeric_strings_compare_as_numbers_and_long_allowed_lists_match_by_type() {
    let set = rule_set(
        r#"
[[pipelines.quality]]
name = "more-seats-than-booked"
check = { kind = "compare", left = "payload.seats", op = "gte", right = "payload.booked" }
[[pipelines.quality]]
name = "gate"
check = { kind = "allowed", field = "payload.gate", values = ["A1", "B2", 7, true] }
"#,
    );
    assert!(broken(&set, json!({"seats": "10", "booked": "9"})).is_empty());
    assert_eq!(
        broken(&set, json!({"seats": "9", "booked": 10})),
        ["more-seats-than-booked"]
    );
    for ok in [json!("A1"), json!(7), json!(7.0), json!(true)] {
        assert!(broken(&set, json!({ "gate": ok })).is_empty(), "{ok}");
    }
    for bad in [json!("7"), json!("a1"), json!(false), json!([7])] {
        assert_eq!(broken(&set, json!({ "gate": bad })), ["gate"], "{bad}");
    }
}
