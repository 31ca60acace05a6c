//! Deterministic event ids, so that a retried request yields the same ids and the
//! aggregator's de-duplication can recognise the repeats (DESIGN §3).

use uuid::Uuid;
use xxhash_rust::xxh3::Xxh3;

/// The id of the `index`-th event of a request sent with `Idempotency-Key: key`.
pub fn idempotent_event_id(pipeline: &str, idempotency_key: &str, index: usize) -> String {
    let mut h = Xxh3::new();
    for part in [
        b"idem".as_slice(),
        pipeline.as_bytes(),
        idempotency_key.as_bytes(),
    ] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.update(&(index as u64).to_le_bytes());
    to_uuid(h.digest128())
}

/// The id of an event sent without an id or an Idempotency-Key: a hash of what identifies it.
pub fn content_event_id(pipeline: &str, key: &str, event_time: i64, payload: &[u8]) -> String {
    let mut h = Xxh3::new();
    for part in [
        b"content".as_slice(),
        pipeline.as_bytes(),
        key.as_bytes(),
        payload,
    ] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.update(&event_time.to_le_bytes());
    to_uuid(h.digest128())
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
        assert_eq!(
            idempotent_event_id("p", "req-1", 3),
            idempotent_event_id("p", "req-1", 3)
        );
        assert_ne!(
            idempotent_event_id("p", "req-1", 3),
            idempotent_event_id("p", "req-1", 4)
        );
        // Length-prefixing keeps ("ab","c") and ("a","bc") apart.
        assert_ne!(
            content_event_id("p", "ab", 1, b"c"),
            content_event_id("p", "a", 1, b"bc")
        );
        assert_eq!(idempotent_event_id("p", "k", 0).len(), 36);
    }
}
