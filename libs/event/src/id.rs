//! Deterministic event ids, so that a retried request yields the same ids and the
//! aggregator's de-duplication can recognise the repeats (docs/guarantees.md). Every id is scoped by
//! the producer (the API key's `producer` name; empty for anonymous access and SQL sources),
//! so that two producers never make each other's events repeats.

use std::borrow::Cow;

use uuid::Uuid;
use xxhash_rust::xxh3::Xxh3;

fn hasher(kind: &[u8], parts: &[&[u8]]) -> Xxh3 {
    let mut h = Xxh3::new();
    for part in std::iter::once(kind).chain(parts.iter().copied()) {
        // Length-prefixed, so ("ab","c") and ("a","bc") stay apart.
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h
}

/// The id of the `index`-th event of a request sent with `Idempotency-Key: key`: a true
/// retry (same producer, key, position and event) repeats it; the same key reused with
/// another body never does.
pub fn idempotent_event_id(
    pipeline: &str,
    producer: &str,
    idempotency_key: &str,
    index: usize,
    event: &str,
) -> String {
    let canonical = canonical_json(event);
    let mut h = hasher(
        b"idem",
        &[
            pipeline.as_bytes(),
            producer.as_bytes(),
            idempotency_key.as_bytes(),
            canonical.as_bytes(),
        ],
    );
    h.update(&(index as u64).to_le_bytes());
    to_uuid(h.digest128())
}

/// The id of an event sent without an id or an Idempotency-Key: a hash of what identifies it.
pub fn content_event_id(
    pipeline: &str,
    producer: &str,
    key: &str,
    event_time: i64,
    payload: &str,
) -> String {
    let canonical = canonical_json(payload);
    let mut h = hasher(
        b"content",
        &[
            pipeline.as_bytes(),
            producer.as_bytes(),
            key.as_bytes(),
            canonical.as_bytes(),
        ],
    );
    h.update(&event_time.to_le_bytes());
    to_uuid(h.digest128())
}

/// What identifies an event to the de-duplication: its id within its producer's scope.
pub fn scoped_id_hash(producer: Option<&str>, event_id: &str) -> u128 {
    match producer {
        None | Some("") => xxhash_rust::xxh3::xxh3_128(event_id.as_bytes()),
        Some(producer) => {
            hasher(b"scoped", &[producer.as_bytes(), event_id.as_bytes()]).digest128()
        }
    }
}

/// JSON text without the whitespace outside strings: the same event sent pretty-printed or
/// compact is one event. (Key order and number spelling are the producer's and stay.)
pub fn canonical_json(text: &str) -> Cow<'_, str> {
    if !text.bytes().any(|b| b.is_ascii_whitespace()) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_ascii_whitespace() {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn to_uuid(hash: u128) -> String {
    // UUIDv8 is the "custom" version: our 122 hash bits with the version and variant set.
    Uuid::new_v8(hash.to_be_bytes()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        let event = r#"{"a":1}"#;
        assert_eq!(
            idempotent_event_id("p", "shop", "req-1", 3, event),
            idempotent_event_id("p", "shop", "req-1", 3, event)
        );
        assert_ne!(
            idempotent_event_id("p", "shop", "req-1", 3, event),
            idempotent_event_id("p", "shop", "req-1", 4, event)
        );
        assert_ne!(
            idempotent_event_id("p", "shop", "req-1", 3, event),
            idempotent_event_id("p", "crm", "req-1", 3, event),
            "another producer's key"
        );
        assert_ne!(
            idempotent_event_id("p", "shop", "req-1", 3, event),
            idempotent_event_id("p", "shop", "req-1", 3, r#"{"a":2}"#),
            "the key reused with another body"
        );
        assert_eq!(
            idempotent_event_id("p", "shop", "req-1", 3, event),
            idempotent_event_id("p", "shop", "req-1", 3, "{ \"a\" : 1 }\n"),
            "formatting is not a different event"
        );
        // Length-prefixing keeps ("ab","c") and ("a","bc") apart.
        assert_ne!(
            content_event_id("p", "", "ab", 1, "c"),
            content_event_id("p", "", "a", 1, "bc")
        );
        assert_ne!(
            content_event_id("p", "shop", "a", 1, "{}"),
            content_event_id("p", "crm", "a", 1, "{}")
        );
        assert_eq!(idempotent_event_id("p", "", "k", 0, "{}").len(), 36);
    }

    #[test]
    fn scoped_ids_keep_producers_apart_and_unscoped_ids_as_they_were() {
        assert_ne!(
            scoped_id_hash(Some("shop"), "e1"),
            scoped_id_hash(Some("crm"), "e1")
        );
        assert_eq!(
            scoped_id_hash(None, "e1"),
            xxhash_rust::xxh3::xxh3_128(b"e1"),
            "ids of events without a producer (written before producers were named) keep their hash"
        );
        assert_eq!(scoped_id_hash(Some(""), "e1"), scoped_id_hash(None, "e1"));
    }

    #[test]
    fn canonical_json_drops_whitespace_outside_strings_only() {
        assert_eq!(canonical_json("{ \"a b\" : [1, 2] }"), r#"{"a b":[1,2]}"#);
        assert_eq!(
            canonical_json(r#"{"q":"say \" hi"}"#),
            r#"{"q":"say \" hi"}"#
        );
        assert_eq!(
            canonical_json("{\"q\":\"a\\\\\" , \"r\" : 1}"),
            "{\"q\":\"a\\\\\",\"r\":1}"
        );
    }
}
