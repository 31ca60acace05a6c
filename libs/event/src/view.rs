//! Reading an encoded event without copying it, for stages that pass most of it through: the
//! envelope's strings borrow from the record (unless escaped), the payload stays raw, and
//! [`scalars`] picks a few fields out of the payload without building a tree of it.

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::{DecodeError, FieldPath};

/// An encoded [`crate::Event`], borrowed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventView<'a> {
    #[serde(borrow)]
    pub event_id: Cow<'a, str>,
    #[serde(borrow)]
    pub pipeline: Cow<'a, str>,
    #[serde(borrow)]
    pub key: Cow<'a, str>,
    pub event_time: i64,
    pub ingest_time: i64,
    /// As written when present, `null` included (`Some("null")`), so that a reader can refuse
    /// what decoding an [`crate::Event`] refuses.
    #[serde(default, borrow, deserialize_with = "present")]
    pub headers: Option<&'a RawValue>,
    #[serde(borrow)]
    pub payload: &'a RawValue,
    /// As written when present, `null` included (as `headers`).
    #[serde(default, borrow, deserialize_with = "present")]
    pub enrichment: Option<&'a RawValue>,
}

/// A field's raw value whenever the field is there: `Option<&RawValue>` alone reads `null` as
/// absent.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Reads the envelope of an encoded event, borrowing from `bytes`.
pub fn view(bytes: &[u8]) -> Result<EventView<'_>, DecodeError> {
    Ok(serde_json::from_slice(bytes)?)
}

/// Appends to `out` `encoded` (an event without `enrichment`) with `enrichment` (a JSON
/// object's text) added, without re-encoding the rest: the event's closing brace is replaced
/// by the new member. `None` (and nothing appended) when `encoded` does not end in `}`.
pub fn with_enrichment(encoded: &[u8], enrichment: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let end = encoded.iter().rposition(|b| !b.is_ascii_whitespace())?;
    if encoded[end] != b'}' {
        return None;
    }
    out.reserve(end + enrichment.len() + 16);
    out.extend_from_slice(&encoded[..end]);
    out.extend_from_slice(b",\"enrichment\":");
    out.extend_from_slice(enrichment);
    out.push(b'}');
    Some(())
}

/// A scalar found in a payload, as key text: strings as they are, numbers and booleans as
/// written. `None` for a missing field, null, an object or an array.
pub type Scalar<'a> = Option<Cow<'a, str>>;

/// The scalar at each of `paths` in `payload` (a JSON object), in one pass that builds no
/// tree: fields no path names are skipped unparsed.
pub fn scalars<'a>(
    payload: &'a RawValue,
    paths: &[&FieldPath],
    out: &mut Vec<Scalar<'a>>,
) -> Result<(), serde_json::Error> {
    let paths = Paths::new(paths);
    out.clear();
    out.resize(paths.len, None);
    let mut de = serde_json::Deserializer::from_str(payload.get());
    Picker {
        wanted: &paths.wanted,
        depth: 0,
        out,
    }
    .deserialize(&mut de)
}

/// Field paths prepared for picking (once per pipeline, not per event).
#[derive(Debug, Clone, Default)]
pub struct Paths<'p> {
    wanted: Vec<(&'p [String], usize)>,
    len: usize,
}

impl<'p> Paths<'p> {
    pub fn new(paths: &[&'p FieldPath]) -> Self {
        Self {
            wanted: paths
                .iter()
                .enumerate()
                .map(|(i, p)| (p.segments(), i))
                .collect(),
            len: paths.len(),
        }
    }
}

/// The envelope fields a pass-through stage needs.
#[derive(Debug)]
pub struct Envelope<'a> {
    pub pipeline: Cow<'a, str>,
    pub key: Cow<'a, str>,
    pub ingest_time: i64,
    /// The event already carries an `enrichment`.
    pub enriched: bool,
}

/// Reads an encoded event's envelope and picks the payload fields `paths_for(pipeline)`
/// names, in one pass over the bytes (the payload is not parsed twice, nor copied). Checks
/// the envelope as strictly as [`crate::decode`]: every field present, no unknown one.
pub fn pick<'a, 'p>(
    bytes: &'a [u8],
    paths_for: &dyn Fn(&str) -> Option<&'p Paths<'p>>,
    out: &mut Vec<Scalar<'a>>,
) -> Result<Envelope<'a>, DecodeError> {
    out.clear();
    // One UTF-8 check of the whole record, instead of one per string.
    let text = std::str::from_utf8(bytes).map_err(|e| {
        DecodeError::from(<serde_json::Error as serde::de::Error>::custom(format!(
            "not UTF-8: {e}"
        )))
    })?;
    let mut de = serde_json::Deserializer::from_str(text);
    let envelope = EnvelopePicker { paths_for, out }.deserialize(&mut de)?;
    de.end()?;
    Ok(envelope)
}

struct EnvelopePicker<'f, 'o, 'a, 'p> {
    paths_for: &'f dyn Fn(&str) -> Option<&'p Paths<'p>>,
    out: &'o mut Vec<Scalar<'a>>,
}

impl<'de: 'a, 'a, 'p> DeserializeSeed<'de> for EnvelopePicker<'_, '_, 'a, 'p> {
    type Value = Envelope<'a>;
    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Envelope<'a>, D::Error> {
        de.deserialize_map(self)
    }
}

impl<'de: 'a, 'a, 'p> Visitor<'de> for EnvelopePicker<'_, '_, 'a, 'p> {
    type Value = Envelope<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an instream event")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope<'a>, A::Error> {
        use serde::de::Error as _;
        let (mut event_id, mut event_time) = (false, false);
        let mut pipeline: Option<Cow<'a, str>> = None;
        let mut key: Option<Cow<'a, str>> = None;
        let mut ingest_time: Option<i64> = None;
        let mut payload_done = false;
        let mut deferred: Option<&'de RawValue> = None;
        let mut enriched = false;
        let mut seen: u8 = 0;
        const FIELDS: [&str; 8] = [
            "event_id",
            "pipeline",
            "key",
            "event_time",
            "ingest_time",
            "headers",
            "payload",
            "enrichment",
        ];
        while let Some(Str(name)) = map.next_key::<Str<'de>>()? {
            // A field twice is refused, as the strict decoder refuses it: a second `pipeline`
            // after the payload would otherwise change what was picked for.
            if let Some(i) = FIELDS.iter().position(|f| *f == &*name) {
                if seen & (1 << i) != 0 {
                    return Err(A::Error::duplicate_field(FIELDS[i]));
                }
                seen |= 1 << i;
            }
            match &*name {
                "event_id" => {
                    map.next_value::<Str<'de>>()?;
                    event_id = true;
                }
                "pipeline" => pipeline = Some(map.next_value::<Str<'de>>()?.0),
                "key" => key = Some(map.next_value::<Str<'de>>()?.0),
                "event_time" => {
                    map.next_value::<i64>()?;
                    event_time = true;
                }
                "ingest_time" => ingest_time = Some(map.next_value()?),
                "headers" => {
                    map.next_value::<BTreeMapOfStrings>()?;
                }
                "enrichment" => {
                    // Present at all (null too): the record is re-encoded rather than spliced,
                    // which would write the member twice.
                    map.next_value::<IgnoredAny>()?;
                    enriched = true;
                }
                "payload" => match pipeline.as_deref() {
                    // The usual order (ingest writes the pipeline first): pick on the way.
                    Some(p) => {
                        match (self.paths_for)(p) {
                            Some(paths) => {
                                self.out.resize(paths.len, None);
                                map.next_value_seed(Picker {
                                    wanted: &paths.wanted,
                                    depth: 0,
                                    out: &mut *self.out,
                                })?;
                            }
                            None => {
                                map.next_value::<IgnoredAny>()?;
                            }
                        }
                        payload_done = true;
                    }
                    None => deferred = Some(map.next_value()?),
                },
                other => return Err(A::Error::unknown_field(other, &FIELDS)),
            }
        }
        let missing = |field: &'static str| A::Error::missing_field(field);
        let pipeline = pipeline.ok_or_else(|| missing("pipeline"))?;
        if let Some(raw) = deferred {
            if let Some(paths) = (self.paths_for)(&pipeline) {
                self.out.resize(paths.len, None);
                let mut de = serde_json::Deserializer::from_str(raw.get());
                Picker {
                    wanted: &paths.wanted,
                    depth: 0,
                    out: &mut *self.out,
                }
                .deserialize(&mut de)
                .map_err(A::Error::custom)?;
            }
            payload_done = true;
        }
        if !payload_done {
            return Err(missing("payload"));
        }
        if !event_id {
            return Err(missing("event_id"));
        }
        if !event_time {
            return Err(missing("event_time"));
        }
        Ok(Envelope {
            pipeline,
            key: key.ok_or_else(|| missing("key"))?,
            ingest_time: ingest_time.ok_or_else(|| missing("ingest_time"))?,
            enriched,
        })
    }
}

/// A string borrowed from the input when it has no escapes (serde's own `Cow<str>` always
/// copies).
struct Str<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
        }
        de.deserialize_str(V)
    }
}

/// `headers`: checked to be an object of strings, not kept.
struct BTreeMapOfStrings;

impl<'de> Deserialize<'de> for BTreeMapOfStrings {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BTreeMapOfStrings;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                while m.next_entry::<Str<'de>, Str<'de>>()?.is_some() {}
                Ok(BTreeMapOfStrings)
            }
        }
        de.deserialize_map(V)
    }
}

/// Walks one object, filling `out` for the paths whose segments up to `depth` matched.
struct Picker<'p, 'o, 'a> {
    wanted: &'p [(&'p [String], usize)],
    depth: usize,
    out: &'o mut Vec<Scalar<'a>>,
}

impl<'de: 'a, 'a> DeserializeSeed<'de> for Picker<'_, '_, 'a> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for Picker<'_, '_, 'a> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    // Anything that is not an object has no fields to pick.
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut matching: Vec<(&[String], usize)> = Vec::new();
        while let Some(Str(name)) = map.next_key::<Str<'de>>()? {
            matching.clear();
            matching.extend(
                self.wanted
                    .iter()
                    .filter(|(segments, _)| segments[self.depth] == *name)
                    .copied(),
            );
            if matching.is_empty() {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let (leaves, deeper): (Vec<_>, Vec<_>) = matching
                .iter()
                .partition(|(segments, _)| segments.len() == self.depth + 1);
            if deeper.is_empty() {
                let value = map.next_value::<ScalarText<'de>>()?.0;
                for (_, i) in leaves {
                    self.out[i] = value.clone();
                }
            } else if leaves.is_empty() {
                map.next_value_seed(Picker {
                    wanted: &deeper,
                    depth: self.depth + 1,
                    out: &mut *self.out,
                })?;
            } else {
                // `a.b` and `a.b.c` both asked for: read the value once, look at it twice.
                use serde::de::Error as _;
                let raw: &'de RawValue = map.next_value()?;
                let text: &'de str = raw.get();
                let value = serde_json::from_str::<ScalarText<'de>>(text)
                    .map_err(A::Error::custom)?
                    .0;
                for (_, i) in leaves {
                    self.out[i] = value.clone();
                }
                let mut de = serde_json::Deserializer::from_str(text);
                Picker {
                    wanted: &deeper,
                    depth: self.depth + 1,
                    out: &mut *self.out,
                }
                .deserialize(&mut de)
                .map_err(A::Error::custom)?;
            }
        }
        Ok(())
    }
}

/// A scalar's key text, or `None` for anything else: read as the raw JSON text, so that a
/// number's text is canonical from its digits (see [`crate::key_text`]), not from a float.
struct ScalarText<'a>(Scalar<'a>);

impl<'de: 'a, 'a> Deserialize<'de> for ScalarText<'a> {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let raw = <&'de RawValue>::deserialize(de)?;
        let text = raw.get();
        Ok(ScalarText(match text.as_bytes().first() {
            // A string without escapes is borrowed as it is.
            Some(b'"') if !text.contains('\\') => Some(Cow::Borrowed(&text[1..text.len() - 1])),
            Some(b'"') => serde_json::from_str::<String>(text).ok().map(Cow::Owned),
            Some(b't') => Some(Cow::Borrowed("true")),
            Some(b'f') => Some(Cow::Borrowed("false")),
            Some(b'-' | b'0'..=b'9') => crate::canonical_number(text).map(Cow::Owned),
            _ => None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(p: &[&str]) -> Vec<FieldPath> {
        p.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn picks_scalars_at_paths_and_nothing_else() {
        let payload = RawValue::from_string(
            r#"{"a":"x","skip":{"deep":[1,2,{"a":1}]},"n":12.5,"b":{"c":"y\n","d":true},"z":null,"o":{"p":1}}"#
                .into(),
        )
        .unwrap();
        let ps = paths(&["a", "b.c", "n", "b.d", "missing", "z", "o", "b.c.x", "a"]);
        let refs: Vec<&FieldPath> = ps.iter().collect();
        let mut out = Vec::new();
        scalars(&payload, &refs, &mut out).unwrap();
        let got: Vec<Option<&str>> = out.iter().map(|s| s.as_deref()).collect();
        assert_eq!(
            got,
            [
                Some("x"),
                Some("y\n"),
                Some("12.5"),
                Some("true"),
                None,
                None,
                None,
                None,
                Some("x")
            ]
        );
    }

    #[test]
    fn agrees_with_a_tree_lookup_on_numbers() {
        // The key text of a number is what the key template renders from a parsed tree.
        let text = r#"{"i":-7,"u":18446744073709551615,"f":1e3}"#;
        let payload = RawValue::from_string(text.into()).unwrap();
        let ps = paths(&["i", "u", "f"]);
        let refs: Vec<&FieldPath> = ps.iter().collect();
        let mut out = Vec::new();
        scalars(&payload, &refs, &mut out).unwrap();
        let tree: serde_json::Value = serde_json::from_str(text).unwrap();
        for (p, got) in ps.iter().zip(&out) {
            let want = match p.lookup(&tree).unwrap() {
                serde_json::Value::Number(n) => crate::canonical_number(&n.to_string()).unwrap(),
                other => panic!("{other}"),
            };
            assert_eq!(got.as_deref(), Some(want.as_str()), "{}", p.as_str());
        }
        // Canonical from the digits, as keys are: `1.0` is `1`, big numbers exact.
        let text = r#"{"a":1.0,"b":123456789012345678901234567890}"#;
        let payload = RawValue::from_string(text.into()).unwrap();
        let ps = paths(&["a", "b"]);
        let refs: Vec<&FieldPath> = ps.iter().collect();
        scalars(&payload, &refs, &mut out).unwrap();
        assert_eq!(out[0].as_deref(), Some("1"));
        assert_eq!(out[1].as_deref(), Some("123456789012345678901234567890"));
    }

    #[test]
    fn picks_the_envelope_and_payload_fields_in_one_pass_in_either_order() {
        let paths_owned = paths(&["customer.id", "n"]);
        let refs: Vec<&FieldPath> = paths_owned.iter().collect();
        let prepared = Paths::new(&refs);
        let paths_for = |p: &str| (p == "orders").then_some(&prepared);
        let mut out = Vec::new();
        for text in [
            r#"{"event_id":"e","pipeline":"orders","key":"k\"1","event_time":1,"ingest_time":2,"payload":{"n":3,"customer":{"id":"c1"}}}"#,
            r#"{"payload":{"n":3,"customer":{"id":"c1"}},"event_id":"e","key":"k\"1","event_time":1,"ingest_time":2,"headers":{"a":"b"},"pipeline":"orders"}"#,
        ] {
            let envelope = pick(text.as_bytes(), &paths_for, &mut out).unwrap();
            assert_eq!(
                (
                    &*envelope.pipeline,
                    &*envelope.key,
                    envelope.ingest_time,
                    envelope.enriched
                ),
                ("orders", "k\"1", 2, false)
            );
            let got: Vec<Option<&str>> = out.iter().map(|s| s.as_deref()).collect();
            assert_eq!(got, [Some("c1"), Some("3")]);
        }
        let enriched = r#"{"event_id":"e","pipeline":"x","key":"k","event_time":1,"ingest_time":2,"payload":{},"enrichment":{"a":1}}"#;
        assert!(
            pick(enriched.as_bytes(), &paths_for, &mut out)
                .unwrap()
                .enriched
        );
        let null_enrichment = r#"{"event_id":"e","pipeline":"x","key":"k","event_time":1,"ingest_time":2,"payload":{},"enrichment":null}"#;
        assert!(
            pick(null_enrichment.as_bytes(), &paths_for, &mut out)
                .unwrap()
                .enriched
        );
        for bad in [
            r#"{"event_id":"e","pipeline":"x","key":"k","event_time":1,"ingest_time":2,"payload":{"customer":{"id":"c1"}},"pipeline":"orders"}"#,
            r#"{"event_id":"e","event_id":"f","pipeline":"x","key":"k","event_time":1,"ingest_time":2,"payload":{}}"#,
            r#"{"pipeline":"orders","key":"k","event_time":1,"ingest_time":2,"payload":{}}"#,
            r#"{"event_id":"e","pipeline":"orders","key":"k","event_time":1,"ingest_time":2,"payload":{},"extra":1}"#,
            r#"{"event_id":"e","pipeline":"orders","key":"k","event_time":1,"ingest_time":2}"#,
            r#"{"event_id":"e","pipeline":"orders","key":"k","event_time":1,"ingest_time":2,"payload":{}} trailing"#,
            "not json",
        ] {
            assert!(pick(bad.as_bytes(), &paths_for, &mut out).is_err(), "{bad}");
            assert!(
                crate::decode(bad.as_bytes()).is_err(),
                "decode agrees: {bad}"
            );
        }
    }

    #[test]
    fn splices_the_enrichment_in() {
        let event = crate::Event {
            event_id: "e".into(),
            pipeline: "p".into(),
            key: "k".into(),
            event_time: 1,
            ingest_time: 2,
            headers: Default::default(),
            payload: RawValue::from_string(r#"{"a":1}"#.into()).unwrap(),
            enrichment: None,
        };
        let encoded = crate::encode(&event);
        let seen = view(&encoded).unwrap();
        assert_eq!(seen.key, "k");
        assert!(seen.enrichment.is_none());
        let mut out = Vec::new();
        with_enrichment(&encoded, br#"{"tier":"gold"}"#, &mut out).unwrap();
        let back = crate::decode(&out).unwrap();
        assert_eq!(back.enrichment.unwrap()["tier"], "gold");
        assert_eq!(back.payload.get(), r#"{"a":1}"#);
        assert!(with_enrichment(b"[1]", b"{}", &mut out).is_none());
    }
}
