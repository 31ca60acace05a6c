use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventTimeError {
    #[error("`{0}` is not an RFC 3339 timestamp")]
    NotRfc3339(String),
    #[error("{0} is not a whole number of epoch milliseconds")]
    NotMillis(String),
    #[error("must be an RFC 3339 string or epoch milliseconds, found {0}")]
    WrongType(&'static str),
}

/// Reads an event time given as an RFC 3339 string or as epoch milliseconds.
pub fn parse_event_time(value: &Value) -> Result<i64, EventTimeError> {
    match value {
        Value::String(s) => OffsetDateTime::parse(s, &Rfc3339)
            .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
            .map_err(|_| EventTimeError::NotRfc3339(s.clone())),
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| EventTimeError::NotMillis(n.to_string())),
        Value::Null => Err(EventTimeError::WrongType("null")),
        Value::Bool(_) => Err(EventTimeError::WrongType("a boolean")),
        Value::Array(_) => Err(EventTimeError::WrongType("an array")),
        Value::Object(_) => Err(EventTimeError::WrongType("an object")),
    }
}

/// The wall clock in milliseconds since the Unix epoch (ingest time, latency measurements).
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `2024-05-01T12:00:00.123Z`, or the millisecond count itself when out of range.
pub fn format_rfc3339_millis(millis: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(millis as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| millis.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_both_forms() {
        assert_eq!(
            parse_event_time(&json!("2024-05-01T12:00:00.5Z")),
            Ok(1_714_564_800_500)
        );
        assert_eq!(
            parse_event_time(&json!("2024-05-01T14:00:00+02:00")),
            Ok(1_714_564_800_000)
        );
        assert_eq!(
            parse_event_time(&json!(1_714_564_800_500i64)),
            Ok(1_714_564_800_500)
        );
        assert!(parse_event_time(&json!("yesterday")).is_err());
        assert!(parse_event_time(&json!(1.5)).is_err());
        assert_eq!(
            parse_event_time(&json!(true)),
            Err(EventTimeError::WrongType("a boolean"))
        );
    }
}
