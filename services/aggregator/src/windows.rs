//! Which group of an aggregation an event belongs to.

use instream_event::{Event, FieldPath};
use instream_pipeline::Aggregation;
use serde_json::Value;

use crate::payload::Payload;

fn scalar_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "null".into(),
        Some(other) => other.to_string(),
    }
}

/// The group of `event` under `aggregation`: its group-by values joined with `|`. Grouping by
/// the key alone (the default) borrows it: no allocation per event.
pub fn group_key<'e>(
    aggregation: &Aggregation,
    event: &'e Event,
    payload: &mut Payload,
) -> std::borrow::Cow<'e, str> {
    if let [only] = aggregation.group_by.as_slice() {
        if only.as_str() == "key" {
            return std::borrow::Cow::Borrowed(&event.key);
        }
    }
    let mut parts = Vec::with_capacity(aggregation.group_by.len());
    for path in &aggregation.group_by {
        parts.push(resolve(path, event, payload));
    }
    std::borrow::Cow::Owned(parts.join("|"))
}

fn resolve(path: &FieldPath, event: &Event, payload: &mut Payload) -> String {
    let segments = path.segments();
    match segments[0].as_str() {
        "key" => event.key.clone(),
        "enrichment" => {
            let found = event
                .enrichment
                .as_ref()
                .and_then(|m| m.get(&segments[1]))
                .and_then(|v| {
                    segments[2..]
                        .iter()
                        .try_fold(v, |v, s| v.as_object()?.get(s))
                });
            scalar_text(found)
        }
        // `payload.…`: read once per event, only when some aggregation needs it.
        _ => scalar_text(payload.get(&segments[1..]).as_ref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use instream_pipeline::parse_document;
    use serde_json::value::RawValue;

    #[test]
    fn groups_join_key_enrichment_and_payload_values() {
        let def = parse_document(
            r#"
[[pipelines]]
name = "p"
key_field = "k"
time_field = "t"
[[pipelines.aggregations]]
name = "per_tier"
group_by = ["key", "enrichment.tier", "payload.kind", "payload.missing"]
window = { kind = "tumbling", size = "1h" }
"#,
        )
        .unwrap()
        .pipelines
        .remove(0);
        let mut enrichment = serde_json::Map::new();
        enrichment.insert("tier".into(), Value::String("gold".into()));
        let event = Event {
            event_id: "e".into(),
            pipeline: "p".into(),
            key: "a".into(),
            event_time: 0,
            ingest_time: 0,
            headers: Default::default(),
            payload: RawValue::from_string(r#"{"kind":"bid"}"#.into()).unwrap(),
            enrichment: Some(enrichment),
        };
        let mut payload = Payload::new(event.payload.get());
        assert_eq!(
            group_key(&def.aggregations[0], &event, &mut payload),
            "a|gold|bid|null"
        );
    }
}
