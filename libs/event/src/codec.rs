use crate::Event;

#[derive(Debug, thiserror::Error)]
#[error("not an instream event envelope: {0}")]
pub struct DecodeError(#[from] serde_json::Error);

/// Serialises an event as one JSON object.
pub fn encode(event: &Event) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256 + event.payload.get().len());
    encode_into(event, &mut buf);
    buf
}

/// Serialises into a reused buffer (hot paths keep one per batch).
pub fn encode_into(event: &Event, buf: &mut Vec<u8>) {
    buf.clear();
    // Writing to a Vec cannot fail, and every field of Event serialises.
    serde_json::to_writer(&mut *buf, event).expect("an Event always serialises");
}

pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    Ok(serde_json::from_slice(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    #[test]
    fn round_trip_keeps_payload_bytes() {
        let payload = r#"{"b":1,  "a":[true,null]}"#;
        let event = Event {
            event_id: "e1".into(),
            pipeline: "orders".into(),
            key: "acct-1".into(),
            event_time: 1_700_000_000_123,
            ingest_time: 1_700_000_000_456,
            headers: Default::default(),
            payload: RawValue::from_string(payload.into()).unwrap(),
            enrichment: None,
        };
        let bytes = encode(&event);
        let back = decode(&bytes).unwrap();
        assert_eq!(back.payload.get(), payload);
        assert_eq!(back.event_time, event.event_time);
        assert!(!String::from_utf8(bytes).unwrap().contains("enrichment"));
    }

    #[test]
    fn garbage_is_a_decode_error() {
        assert!(decode(b"{\"event_id\":1}").is_err());
        assert!(decode(b"\xff").is_err());
    }
}
