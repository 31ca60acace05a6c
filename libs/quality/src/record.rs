//! What the enricher records of each violation on `<pipeline>.quality`, and the bounded
//! sampling of offending events.

use std::collections::HashMap;

use instream_pipeline::quality::{QualityAction, Severity};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

/// Longest offending value kept in a record (its JSON text); a longer one is cut.
const MAX_VALUE_TEXT: usize = 256;

/// Largest payload kept as a sample; a larger event is recorded without one.
pub const MAX_SAMPLE_BYTES: usize = 16 * 1024;

/// One violation of one rule by one event. Keyed by event id on the topic, so the copies a
/// crash may produce land together; the report counts `(event_id, rule)` once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ViolationRecord {
    pub pipeline: String,
    /// The definition version whose rules judged the event.
    pub version: u64,
    pub rule: String,
    pub severity: Severity,
    pub action: QualityAction,
    pub event_id: String,
    pub key: String,
    pub event_time: i64,
    pub ingest_time: i64,
    /// The offending value (cut to a few hundred characters of JSON text as a string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    pub message: String,
    /// Where the event is on `<pipeline>.raw`.
    pub raw_partition: i32,
    pub raw_offset: i64,
    /// The event's payload, for the first few violations of a rule each minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<Box<RawValue>>,
}

/// The value as kept in a record: itself when short, else the start of its JSON text.
pub fn bounded_value(value: Option<Value>) -> Option<Value> {
    let value = value?;
    let text = value.to_string();
    if text.len() <= MAX_VALUE_TEXT {
        return Some(value);
    }
    let mut end = MAX_VALUE_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Some(Value::String(format!("{}…", &text[..end])))
}

/// Lets through at most `per_minute` samples per (pipeline, rule) each wall-clock minute,
/// so a rule that every event breaks does not copy the stream.
pub struct Sampler {
    per_minute: u32,
    minute: i64,
    /// Samples taken this minute, by pipeline then rule.
    taken: HashMap<String, HashMap<String, u32>>,
}

impl Sampler {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            minute: 0,
            taken: HashMap::new(),
        }
    }

    /// Whether a sample of this rule may be kept now (`now` in epoch milliseconds).
    pub fn take(&mut self, pipeline: &str, rule: &str, now: i64) -> bool {
        let minute = now.div_euclid(60_000);
        if minute != self.minute {
            self.minute = minute;
            self.taken.clear();
        }
        if self.per_minute == 0 {
            return false;
        }
        let rules = match self.taken.get_mut(pipeline) {
            Some(rules) => rules,
            None => self.taken.entry(pipeline.to_owned()).or_default(),
        };
        match rules.get_mut(rule) {
            Some(n) if *n >= self.per_minute => false,
            Some(n) => {
                *n += 1;
                true
            }
            None => {
                rules.insert(rule.to_owned(), 1);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_bounded_per_rule_and_minute() {
        let mut sampler = Sampler::new(2);
        let taken = |s: &mut Sampler, rule, now| s.take("p", rule, now);
        assert!(taken(&mut sampler, "a", 1_000));
        assert!(taken(&mut sampler, "a", 2_000));
        assert!(!taken(&mut sampler, "a", 3_000));
        assert!(taken(&mut sampler, "b", 3_000));
        assert!(taken(&mut sampler, "a", 61_000), "a new minute");
        assert!(!Sampler::new(0).take("p", "a", 0));
    }

    #[test]
    fn long_values_are_cut() {
        let long = Value::String("x".repeat(1000));
        let kept = bounded_value(Some(long)).unwrap();
        assert!(kept.as_str().unwrap().len() < 300);
        assert_eq!(bounded_value(Some(Value::from(5))), Some(Value::from(5)));
    }
}
