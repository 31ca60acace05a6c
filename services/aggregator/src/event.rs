//! What the aggregations read of an event, whether it was decoded whole ([`Event`]: archive
//! replays, tests) or is read in place from its record ([`RecordEvent`]: the live stage).
//!
//! The live stage reads the envelope borrowed: its strings are not copied, and the headers and
//! the enrichment are parsed only when an aggregation asks for them. Decoding each record
//! into an [`Event`] (owned strings, the enrichment a tree of maps) was ~18% of the stage's
//! CPU (issue 28's profile).

use std::collections::BTreeMap;
use std::sync::Mutex;

use instream_event::{DecodeError, Event, EventView};
use serde_json::Value;

use crate::payload::{self, Payload};

/// An event as the aggregations read it.
pub trait EventFields {
    fn event_id(&self) -> &str;
    fn pipeline(&self) -> &str;
    fn key(&self) -> &str;
    fn event_time(&self) -> i64;
    fn ingest_time(&self) -> i64;
    /// The producer's JSON payload, as received.
    fn payload(&self) -> &str;
    /// The producer named in the envelope's headers (API keys bound to a producer).
    fn producer(&self) -> Option<&str>;
    /// The value at `path` below the enrichment (`["tier"]` for `enrichment.tier`).
    fn enrichment_value(&self, path: &[String]) -> Option<Value>;
    /// That value as a group's part (see [`Payload::text`]).
    fn enrichment_text(&self, path: &[String]) -> Option<String> {
        payload::value_text(&self.enrichment_value(path)?)
    }
}

impl EventFields for Event {
    fn event_id(&self) -> &str {
        &self.event_id
    }

    fn pipeline(&self) -> &str {
        &self.pipeline
    }

    fn key(&self) -> &str {
        &self.key
    }

    fn event_time(&self) -> i64 {
        self.event_time
    }

    fn ingest_time(&self) -> i64 {
        self.ingest_time
    }

    fn payload(&self) -> &str {
        self.payload.get()
    }

    fn producer(&self) -> Option<&str> {
        self.headers
            .get(instream_pipeline::PRODUCER_HEADER)
            .map(String::as_str)
    }

    fn enrichment_value(&self, path: &[String]) -> Option<Value> {
        let (first, rest) = path.split_first()?;
        let first = self.enrichment.as_ref()?.get(first)?;
        rest.iter()
            .try_fold(first, |v, s| v.as_object()?.get(s))
            .cloned()
    }
}

/// Any JSON value, checked as parsing it into a [`Value`] checks it (numbers in range, string
/// escapes, depth) but kept nowhere. `IgnoredAny` skips values without those checks.
struct Checked;

impl<'de> serde::Deserialize<'de> for Checked {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> serde::de::Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_key::<Checked>()?.is_some() {
            map.next_value::<Checked>()?;
        }
        Ok(Checked)
    }
}

/// An event read in place from an enriched record.
pub struct RecordEvent<'a> {
    view: EventView<'a>,
    producer: Option<String>,
    /// The enrichment's top-level fields, listed on first use. A mutex because the event is
    /// held across awaits: never contended.
    enrichment: Option<Mutex<Payload<'a>>>,
}

impl<'a> RecordEvent<'a> {
    /// Reads the envelope of `bytes`. Refuses what decoding it into an [`Event`] refuses:
    /// headers that are not a map of strings, and an enrichment that is not an object or holds
    /// what a parsed value refuses (a number out of range, a lone surrogate, nesting too deep).
    /// The payload is checked for its syntax only, as an [`Event`]'s raw payload is.
    pub fn read(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        let view = instream_event::view(bytes)?;
        let producer = match view.headers {
            Some(raw) => {
                let mut headers: BTreeMap<String, String> = serde_json::from_str(raw.get())?;
                headers.remove(instream_pipeline::PRODUCER_HEADER)
            }
            None => None,
        };
        let enrichment = match view.enrichment {
            // `null` is no enrichment, as for an `Option` field.
            Some(raw) if raw.get() == "null" => None,
            Some(raw) if raw.get().starts_with('{') => {
                serde_json::from_str::<Checked>(raw.get())?;
                Some(Mutex::new(Payload::new(raw.get())))
            }
            Some(raw) => {
                // The error decoding an `Event` gives.
                serde_json::from_str::<serde_json::Map<String, Value>>(raw.get())?;
                None
            }
            None => None,
        };
        Ok(Self {
            view,
            producer,
            enrichment,
        })
    }
}

impl EventFields for RecordEvent<'_> {
    fn event_id(&self) -> &str {
        &self.view.event_id
    }

    fn pipeline(&self) -> &str {
        &self.view.pipeline
    }

    fn key(&self) -> &str {
        &self.view.key
    }

    fn event_time(&self) -> i64 {
        self.view.event_time
    }

    fn ingest_time(&self) -> i64 {
        self.view.ingest_time
    }

    fn payload(&self) -> &str {
        self.view.payload.get()
    }

    fn producer(&self) -> Option<&str> {
        self.producer.as_deref()
    }

    fn enrichment_value(&self, path: &[String]) -> Option<Value> {
        // Through a parsed value, as for a decoded event (an object's members sorted, a
        // number through its parsed form): a group's key must not depend on how the event
        // was read.
        let enrichment = self.enrichment.as_ref()?.lock();
        enrichment.unwrap_or_else(|p| p.into_inner()).get(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::tests::path;
    use serde_json::json;

    /// Both readings of the same record answer the same.
    #[test]
    fn reads_a_record_as_a_decoded_event_does() {
        let text = r#"{"event_id":"e1","pipeline":"p","key":"k","event_time":5,"ingest_time":6,
            "headers":{"producer":"shop","trace":"t"},"payload":{"price":1},
            "enrichment":{"tier":"gold","n":1.0,"big":123456789012345678901234567890,
            "o":{"b":1,"a":[2]},"tier":"silver"}}"#;
        let whole = instream_event::decode(text.as_bytes()).unwrap();
        let read = RecordEvent::read(text.as_bytes()).unwrap();
        assert_eq!(read.event_id(), whole.event_id());
        assert_eq!(read.pipeline(), whole.pipeline());
        assert_eq!(read.key(), whole.key());
        assert_eq!(read.event_time(), whole.event_time());
        assert_eq!(read.ingest_time(), whole.ingest_time());
        assert_eq!(read.payload(), whole.payload());
        assert_eq!(read.producer(), Some("shop"));
        assert_eq!(whole.producer(), Some("shop"));
        for p in ["tier", "n", "big", "o", "o.a", "o.b", "missing", "tier.x"] {
            assert_eq!(
                read.enrichment_value(&path(p)),
                whole.enrichment_value(&path(p)),
                "{p}"
            );
            assert_eq!(
                read.enrichment_text(&path(p)),
                whole.enrichment_text(&path(p)),
                "{p}"
            );
        }
        assert_eq!(read.enrichment_value(&path("tier")), Some(json!("silver")));
    }

    #[test]
    fn refuses_what_decoding_refuses() {
        let with = |extra: &str| {
            format!(
                r#"{{"event_id":"e","pipeline":"p","key":"k","event_time":1,"ingest_time":1,"payload":{{}}{extra}}}"#
            )
        };
        for extra in [
            r#","headers":{"producer":1}"#,
            r#","headers":[]"#,
            r#","headers":null"#,
            r#","enrichment":[1]"#,
            r#","enrichment":"x""#,
            r#","enrichment":{"n":1e400}"#,
            r#","enrichment":{"s":"\ud800"}"#,
            r#","enrichment":{"a":{"b":[1,{"c":-1e999}]}}"#,
            r#","unknown":1"#,
            &format!(
                r#","enrichment":{{"deep":{}{}}}"#,
                "[".repeat(200),
                "]".repeat(200)
            ),
        ] {
            let text = with(extra);
            assert!(instream_event::decode(text.as_bytes()).is_err(), "{extra}");
            assert!(RecordEvent::read(text.as_bytes()).is_err(), "{extra}");
        }
        for extra in ["", r#","enrichment":null"#, r#","headers":{}"#] {
            let text = with(extra);
            assert!(instream_event::decode(text.as_bytes()).is_ok(), "{extra}");
            let read = RecordEvent::read(text.as_bytes()).unwrap();
            assert_eq!(read.enrichment_value(&path("tier")), None);
            assert_eq!(read.producer(), None);
        }
    }
}
