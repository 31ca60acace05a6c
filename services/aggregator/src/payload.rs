//! An event's payload as the aggregations read it: on first use its top-level fields are
//! listed, borrowed from the event's bytes, and a field is parsed only when asked for. A whole
//! `serde_json::Value` tree per event (maps, strings, their allocations) was most of the cost
//! of an aggregation that reads one number.
//!
//! Fields not read are only checked for their syntax: a payload with an out-of-range number
//! or a lone surrogate in a field no aggregation reads still yields its other fields, where
//! a whole parse made the payload unreadable. Ingest refuses such payloads at the edge; only
//! a producer writing to the topic directly can send one.

use serde::de::{Deserializer as _, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

pub struct Payload<'e> {
    text: &'e str,
    read: Option<Read<'e>>,
}

enum Read<'e> {
    /// Top-level names and their raw values, in document order.
    Fields(Vec<(&'e str, &'e RawValue)>),
    /// Not an object of plain names (a name with an escape cannot be borrowed): parsed whole,
    /// as before.
    Whole(Value),
}

struct TopLevel;

impl<'de> Visitor<'de> for TopLevel {
    type Value = Vec<(&'de str, &'de RawValue)>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
        while let Some(name) = map.next_key::<&'de str>()? {
            fields.push((name, map.next_value::<&'de RawValue>()?));
        }
        Ok(fields)
    }
}

impl<'e> Payload<'e> {
    pub fn new(text: &'e str) -> Self {
        Payload { text, read: None }
    }

    /// The text of the value at `path` as a group's part: a string as it is, a number
    /// canonical from its text in the payload (never through a float: the way keys are
    /// made), anything else as JSON text. `None` when it is absent or null.
    pub fn text(&mut self, path: &[String]) -> Option<String> {
        self.read();
        let (first, rest) = path.split_first()?;
        if let Some(Read::Fields(fields)) = &self.read {
            let (_, raw) = fields.iter().rev().find(|(name, _)| name == first)?;
            let raw: &RawValue = rest.iter().try_fold(*raw, |v, segment| {
                let fields: std::collections::BTreeMap<String, &RawValue> =
                    serde_json::from_str(v.get()).ok()?;
                fields.get(segment).copied()
            })?;
            return raw_text(raw);
        }
        value_text(&self.get(path)?)
    }

    fn read(&mut self) {
        let text = self.text;
        self.read.get_or_insert_with(|| {
            match serde_json::Deserializer::from_str(text).deserialize_map(TopLevel) {
                Ok(fields) => Read::Fields(fields),
                Err(_) => Read::Whole(serde_json::from_str(text).unwrap_or(Value::Null)),
            }
        });
    }

    /// The value at `path` below the payload (`["price"]` for `payload.price`); `None` when
    /// it is absent, or the payload is not an object.
    pub fn get(&mut self, path: &[String]) -> Option<Value> {
        let text = self.text;
        let read = self.read.get_or_insert_with(|| {
            match serde_json::Deserializer::from_str(text).deserialize_map(TopLevel) {
                Ok(fields) => Read::Fields(fields),
                Err(_) => Read::Whole(serde_json::from_str(text).unwrap_or(Value::Null)),
            }
        });
        let (first, rest) = path.split_first()?;
        match read {
            Read::Fields(fields) => {
                // The last of repeated names wins, as in a parsed `Value`.
                let (_, raw) = fields.iter().rev().find(|(name, _)| name == first)?;
                let value: Value = serde_json::from_str(raw.get()).ok()?;
                if rest.is_empty() {
                    return Some(value);
                }
                rest.iter()
                    .try_fold(&value, |v, s| v.as_object()?.get(s))
                    .cloned()
            }
            Read::Whole(doc) => path
                .iter()
                .try_fold(&*doc, |v, s| v.as_object()?.get(s))
                .cloned(),
        }
    }
}

/// A group part from raw JSON text (see [`Payload::text`]).
pub fn raw_text(raw: &RawValue) -> Option<String> {
    instream_event::group_part(raw)
}

/// A group part from a parsed value (see [`Payload::text`]).
pub fn value_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => instream_event::canonical_number(&n.to_string()),
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// A field path's segments (`a.b` → `["a", "b"]`).
    pub(crate) fn path(p: &str) -> Vec<String> {
        p.split('.').map(str::to_owned).collect()
    }

    #[test]
    fn reads_fields_at_any_depth_and_agrees_with_a_parsed_value() {
        let text = r#"{"price":12.5,"bidder":"b1","a":{"b":{"c":[1,2]}},"price":13,"n":null}"#;
        let mut payload = Payload::new(text);
        let whole: Value = serde_json::from_str(text).unwrap();
        for p in [
            "price",
            "bidder",
            "a",
            "a.b",
            "a.b.c",
            "n",
            "missing",
            "a.missing",
        ] {
            let expected = path(p)
                .iter()
                .try_fold(&whole, |v, s| v.as_object()?.get(s))
                .cloned();
            assert_eq!(payload.get(&path(p)), expected, "{p}");
        }
        assert_eq!(payload.get(&path("price")), Some(json!(13)));
    }

    #[test]
    fn escaped_names_and_non_objects_fall_back_to_a_whole_parse() {
        let mut escaped = Payload::new(r#"{"pri\u0063e":5,"x":1}"#);
        assert_eq!(escaped.get(&path("price")), Some(json!(5)));
        assert_eq!(escaped.get(&path("x")), Some(json!(1)));
        let mut array = Payload::new("[1,2]");
        assert_eq!(array.get(&path("price")), None);
        let mut broken = Payload::new("{\"price\":");
        assert_eq!(broken.get(&path("price")), None);
    }

    #[test]
    fn a_field_that_does_not_parse_spoils_only_itself() {
        let mut payload = Payload::new(r#"{"x":1e400,"price":5}"#);
        assert_eq!(payload.get(&path("price")), Some(json!(5)));
        assert_eq!(payload.get(&path("x")), None);
    }
}
