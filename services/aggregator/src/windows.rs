//! Which group of an aggregation an event belongs to.

use instream_event::FieldPath;
use instream_pipeline::Aggregation;

use crate::event::EventFields;
use crate::payload::Payload;

/// The group of `event` under `aggregation`. Grouping by the key alone (the default) borrows
/// it: no allocation per event. One other field: its text (`null` when absent). Several: a
/// JSON array of their texts (`["c1","gold",null]`), so that no two groups share an encoding
/// (values joined by a separator did: (`a|b`, `c`) and (`a`, `b|c`)). Numbers are written
/// canonical from their text, as keys are.
pub fn group_key<'e>(
    aggregation: &Aggregation,
    event: &'e impl EventFields,
    payload: &mut Payload,
) -> std::borrow::Cow<'e, str> {
    match aggregation.group_by.as_slice() {
        [only] if only.as_str() == "key" => std::borrow::Cow::Borrowed(event.key()),
        [only] => {
            std::borrow::Cow::Owned(resolve(only, event, payload).unwrap_or_else(|| "null".into()))
        }
        paths => {
            let parts: Vec<Option<String>> =
                paths.iter().map(|p| resolve(p, event, payload)).collect();
            std::borrow::Cow::Owned(instream_event::group_key_of(&parts))
        }
    }
}

fn resolve(path: &FieldPath, event: &impl EventFields, payload: &mut Payload) -> Option<String> {
    let segments = path.segments();
    match segments[0].as_str() {
        "key" => Some(event.key().to_owned()),
        "enrichment" => event.enrichment_text(&segments[1..]),
        // `payload.…`: read once per event, only when some aggregation needs it.
        _ => payload.text(&segments[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use instream_event::Event;
    use instream_pipeline::parse_document;
    use serde_json::value::RawValue;
    use serde_json::Value;

    /// The one pipeline of a definitions document (aggregations on keys `k`, time `t`).
    fn pipeline(aggregations: &str) -> instream_pipeline::PipelineDefinition {
        let document = format!(
            "[[pipelines]]\nname = \"p\"\nkey_field = \"k\"\ntime_field = \"t\"\n{aggregations}"
        );
        parse_document(&document).unwrap().pipelines.remove(0)
    }

    fn event(
        key: &str,
        payload: &str,
        enrichment: Option<serde_json::Map<String, Value>>,
    ) -> Event {
        Event {
            event_id: "e".into(),
            pipeline: "p".into(),
            key: key.into(),
            event_time: 0,
            ingest_time: 0,
            headers: Default::default(),
            payload: RawValue::from_string(payload.into()).unwrap(),
            enrichment,
        }
    }

    #[test]
    fn groups_join_key_enrichment_and_payload_values() {
        let def = pipeline(
            r#"
[[pipelines.aggregations]]
name = "per_tier"
group_by = ["key", "enrichment.tier", "payload.kind", "payload.missing"]
window = { kind = "tumbling", size = "1h" }
"#,
        );
        let mut enrichment = serde_json::Map::new();
        enrichment.insert("tier".into(), Value::String("gold".into()));
        let event = event("a", r#"{"kind":"bid"}"#, Some(enrichment));
        let mut payload = Payload::new(event.payload.get());
        assert_eq!(
            group_key(&def.aggregations[0], &event, &mut payload),
            r#"["a","gold","bid",null]"#
        );
    }

    #[test]
    fn groups_are_encoded_without_ambiguity_and_numbers_canonical() {
        let def = pipeline(
            r#"
[[pipelines.aggregations]]
name = "pair"
group_by = ["payload.a", "payload.b"]
window = { kind = "tumbling", size = "1h" }
[[pipelines.aggregations]]
name = "one"
group_by = ["payload.n"]
window = { kind = "tumbling", size = "1h" }
"#,
        );
        let key = |aggregation: usize, payload: &str| {
            let event = event("k", payload, None);
            let mut p = Payload::new(event.payload.get());
            group_key(&def.aggregations[aggregation], &event, &mut p).into_owned()
        };
        assert_ne!(
            key(0, r#"{"a":"x|y","b":"z"}"#),
            key(0, r#"{"a":"x","b":"y|z"}"#)
        );
        assert_eq!(key(0, r#"{"a":"x|y","b":"z"}"#), r#"["x|y","z"]"#);
        assert_eq!(key(1, r#"{"n":1.0}"#), key(1, r#"{"n":"1"}"#));
        assert_eq!(
            key(1, r#"{"n":123456789012345678901234567890}"#),
            "123456789012345678901234567890"
        );
        assert_ne!(
            key(1, r#"{"n":123456789012345678901234567890}"#),
            key(1, r#"{"n":123456789012345678901234567891}"#)
        );
    }
}
