//! Turning a producer's JSON object (an HTTP request's event, a SQL row) into an envelope,
//! refusing a bad one with a precise reason. Ingest and db-source share it, so an event is
//! judged the same way whichever door it came through.

use crate::PipelineDefinition;
use instream_event::{
    content_event_id, idempotent_event_id, parse_event_time, Event, EventTimeError, EventValidator,
    Rejection,
};
use serde_json::value::RawValue;
use serde_json::Value;

/// Longest producer-given `event_id`, and longest partition key.
const MAX_ID_LEN: usize = 128;
const MAX_KEY_LEN: usize = 1024;

/// Where events get their ids from when they carry none: a request's Idempotency-Key (or a
/// source row's position), index and content, else the content; and whose they are.
pub struct IdSource<'a> {
    pub pipeline: &'a str,
    /// The producer's name (the API key's `producer`); empty when anonymous. Ids are scoped
    /// by it: a given `event_id` is the producer's own (kept in the envelope's `producer`
    /// header), derived ids hash it.
    pub producer: &'a str,
    pub idempotency_key: Option<&'a str>,
    /// Whether an id from the `idempotency_key` also hashes the event: an HTTP request's key
    /// reused with another body must not repeat ids. A SQL source's position names one row
    /// version by itself (its content re-read after an update must keep the id).
    pub key_binds_content: bool,
}

/// The envelope header naming the producer of an event that came with its own `event_id`.
pub const PRODUCER_HEADER: &str = "producer";

/// A key from a field: a non-empty string as it is; a number canonical, from its text in the
/// payload (see [`instream_event::key_text`]).
fn scalar_key(v: &Value, path: &instream_event::FieldPath, raw: &RawValue) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(_) => path.lookup_raw(raw).and_then(instream_event::key_text),
        _ => None,
    }
}

/// Builds the envelope of the `index`-th event, or says why it is refused.
pub fn envelope(
    def: &PipelineDefinition,
    schema: Option<&jsonschema::Validator>,
    raw: &RawValue,
    index: usize,
    ids: &IdSource<'_>,
    ingest_time: i64,
) -> Result<Event, Rejection> {
    let payload: Value = serde_json::from_str(raw.get())
        .map_err(|e| Rejection::new("malformed_json", e.to_string()))?;
    if !payload.is_object() {
        return Err(Rejection::new(
            "not_an_object",
            "an event must be a JSON object",
        ));
    }
    let key = match def.key_field.lookup(&payload) {
        None | Some(Value::Null) => {
            return Err(Rejection::new(
                "missing_key",
                format!("the partition key field `{}` is missing", def.key_field),
            ))
        }
        Some(v) => scalar_key(v, &def.key_field, raw).ok_or_else(|| {
            Rejection::new(
                "bad_key",
                format!(
                    "the partition key field `{}` must be a non-empty string or a number",
                    def.key_field
                ),
            )
        })?,
    };
    if key.len() > MAX_KEY_LEN {
        return Err(Rejection::new(
            "bad_key",
            format!("the partition key is longer than {MAX_KEY_LEN} bytes"),
        ));
    }
    let event_time = match def.time_field.lookup(&payload) {
        None | Some(Value::Null) => {
            return Err(Rejection::new(
                "missing_time",
                format!("the event time field `{}` is missing", def.time_field),
            ))
        }
        Some(v) => parse_event_time(v).map_err(|e: EventTimeError| {
            Rejection::new("bad_time", format!("`{}`: {e}", def.time_field))
        })?,
    };
    EventValidator::validate(def, &payload)?;
    if let Some(schema) = schema {
        if let Err(e) = schema.validate(&payload) {
            let at = e.instance_path().as_str();
            let at = if at.is_empty() { "/" } else { at };
            return Err(Rejection::new("schema", format!("at `{at}`: {e}")));
        }
    }
    let mut headers = std::collections::BTreeMap::new();
    // Every id of a named producer is in its scope, derived ones too: an anonymous client
    // giving an `event_id` equal to a keyed producer's derived id does not make it a repeat.
    if !ids.producer.is_empty() {
        headers.insert(PRODUCER_HEADER.to_owned(), ids.producer.to_owned());
    }
    let event_id = match payload.get("event_id") {
        Some(Value::String(id)) if !id.is_empty() && id.len() <= MAX_ID_LEN => id.clone(),
        Some(_) => {
            return Err(Rejection::new(
                "bad_event_id",
                format!("`event_id` must be a non-empty string of at most {MAX_ID_LEN} bytes"),
            ))
        }
        None => match ids.idempotency_key {
            Some(k) => {
                let content = if ids.key_binds_content { raw.get() } else { "" };
                idempotent_event_id(ids.pipeline, ids.producer, k, index, content)
            }
            None => content_event_id(ids.pipeline, ids.producer, &key, event_time, raw.get()),
        },
    };
    Ok(Event {
        event_id,
        pipeline: def.name.clone(),
        key,
        event_time,
        ingest_time,
        headers,
        payload: raw.to_owned(),
        enrichment: None,
    })
}

/// Pipelines' compiled JSON Schemas, each compiled once per definition version (ingest and
/// db-source check every event against them).
#[derive(Default)]
pub struct SchemaCache(std::collections::HashMap<String, CompiledSchema>);

/// A pipeline's compiled schema (if it has one) and the definition version it came from.
type CompiledSchema = (u64, Option<std::sync::Arc<jsonschema::Validator>>);

impl SchemaCache {
    /// The definition's compiled schema, compiled on first use of its version.
    pub fn get(
        &mut self,
        def: &PipelineDefinition,
    ) -> Option<std::sync::Arc<jsonschema::Validator>> {
        if let Some((version, compiled)) = self.0.get(&def.name) {
            if *version == def.version {
                return compiled.clone();
            }
        }
        // Definitions are validated (their schema compiled) before they get here.
        let compiled = def
            .schema
            .as_ref()
            .and_then(|s| jsonschema::validator_for(s).ok())
            .map(std::sync::Arc::new);
        self.0
            .insert(def.name.clone(), (def.version, compiled.clone()));
        compiled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_document;

    fn def() -> PipelineDefinition {
        parse_document(
            "[[pipelines]]\nname = \"orders\"\nkey_field = \"account.id\"\ntime_field = \"ts\"\nrequired_fields = [\"amount\"]\n",
        )
        .unwrap()
        .pipelines
        .remove(0)
    }

    fn one(json: &str, ids: &IdSource<'_>) -> Result<Event, Rejection> {
        let raw: Box<RawValue> = serde_json::from_str(json).unwrap();
        envelope(&def(), None, &raw, 0, ids, 5)
    }

    const NO_KEY: IdSource<'static> = IdSource {
        pipeline: "orders",
        producer: "",
        idempotency_key: None,
        key_binds_content: true,
    };

    #[test]
    fn builds_the_envelope() {
        let e = one(
            r#"{"account":{"id":7},"ts":"2024-05-01T12:00:00Z","amount":3}"#,
            &NO_KEY,
        )
        .unwrap();
        assert_eq!(e.key, "7");
        assert_eq!(e.event_time, 1_714_564_800_000);
        assert_eq!(e.ingest_time, 5);
        assert_eq!(e.event_id.len(), 36);
    }

    #[test]
    fn ids_follow_the_idempotency_key_or_the_content() {
        let body = r#"{"account":{"id":"a"},"ts":1,"amount":3}"#;
        let with = IdSource {
            pipeline: "orders",
            producer: "shop",
            idempotency_key: Some("req-1"),
            key_binds_content: true,
        };
        assert_eq!(
            one(body, &with).unwrap().event_id,
            one(body, &with).unwrap().event_id
        );
        assert_ne!(
            one(body, &with).unwrap().event_id,
            one(body, &NO_KEY).unwrap().event_id
        );
        let given = r#"{"account":{"id":"a"},"ts":1,"amount":3,"event_id":"mine"}"#;
        let mine = one(given, &with).unwrap();
        assert_eq!(mine.event_id, "mine");
        assert_eq!(
            mine.headers[PRODUCER_HEADER], "shop",
            "a given id is the producer's"
        );
        assert!(one(given, &NO_KEY).unwrap().headers.is_empty());
        // The Idempotency-Key reused with another body: other ids.
        let other = r#"{"account":{"id":"a"},"ts":1,"amount":4}"#;
        assert_ne!(
            one(body, &with).unwrap().event_id,
            one(other, &with).unwrap().event_id
        );
    }

    #[test]
    fn numeric_keys_are_canonical_from_their_text() {
        let key = |json: &str| one(json, &NO_KEY).unwrap().key;
        assert_eq!(
            key(r#"{"account":{"id":123456789012345678901234567890},"ts":1,"amount":1}"#),
            "123456789012345678901234567890"
        );
        assert_ne!(
            key(r#"{"account":{"id":123456789012345678901234567890},"ts":1,"amount":1}"#),
            key(r#"{"account":{"id":123456789012345678901234567891},"ts":1,"amount":1}"#)
        );
        for same in ["1", "1.0", "1e0", "\"1\""] {
            assert_eq!(
                key(&format!(
                    r#"{{"account":{{"id":{same}}},"ts":1,"amount":1}}"#
                )),
                "1",
                "{same}"
            );
        }
        assert_eq!(key(r#"{"account":{"id":-0},"ts":1,"amount":1}"#), "0");
    }

    #[test]
    fn refusals_are_precise() {
        let code = |json: &str| one(json, &NO_KEY).unwrap_err().code;
        assert_eq!(code(r#"[1]"#), "not_an_object");
        assert_eq!(code(r#"{"ts":1,"amount":1}"#), "missing_key");
        assert_eq!(
            code(r#"{"account":{"id":[1]},"ts":1,"amount":1}"#),
            "bad_key"
        );
        assert_eq!(code(r#"{"account":{"id":1},"amount":1}"#), "missing_time");
        assert_eq!(
            code(r#"{"account":{"id":1},"ts":"noon","amount":1}"#),
            "bad_time"
        );
        assert_eq!(code(r#"{"account":{"id":1},"ts":1}"#), "missing_field");
        assert_eq!(
            code(r#"{"account":{"id":1},"ts":1,"amount":1,"event_id":5}"#),
            "bad_event_id"
        );
    }

    #[test]
    fn the_schema_refuses_with_the_path() {
        let schema = jsonschema::validator_for(&serde_json::json!({
            "type": "object",
            "properties": {"amount": {"type": "number", "minimum": 0}}
        }))
        .unwrap();
        let check = |json: &str| {
            let raw: Box<RawValue> = serde_json::from_str(json).unwrap();
            envelope(&def(), Some(&schema), &raw, 0, &NO_KEY, 5)
        };
        check(r#"{"account":{"id":1},"ts":1,"amount":3}"#).expect("valid");
        let refused = check(r#"{"account":{"id":1},"ts":1,"amount":-3}"#).unwrap_err();
        assert_eq!(refused.code, "schema");
        assert!(refused.message.contains("/amount"), "{}", refused.message);
        let refused = check(r#"{"account":{"id":1},"ts":1,"amount":"3"}"#).unwrap_err();
        assert!(refused.message.contains("number"), "{}", refused.message);
    }
}
