//! The per-window accumulators of an aggregation's functions, and the field values they read.
//!
//! Accumulators are part of the checkpointed state, so they serialize (postcard) and behave
//! the same after a restore: no per-process random seeds.

use instream_event::FieldPath;
use instream_pipeline::{Filter, FilterOp, Function};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sketches_ddsketch::{Config as SketchConfig, DDSketch};

use crate::event::EventFields;
use crate::payload::Payload;

/// The value at `path` (`key`, `payload.…`, `enrichment.…`) of an event. `payload` is the
/// event's payload, read once across the lookups of one event.
pub fn field_value(
    path: &FieldPath,
    event: &impl EventFields,
    payload: &mut Payload,
) -> Option<Value> {
    let segments = path.segments();
    match segments[0].as_str() {
        "key" => Some(Value::String(event.key().to_owned())),
        "enrichment" => event.enrichment_value(&segments[1..]),
        _ => payload.get(&segments[1..]),
    }
}

/// A finite number, or a string holding one (`"NaN"` and `"inf"` are not numbers here: one
/// would spoil a window's sum for good).
fn number(value: &Value) -> Option<f64> {
    let x = match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }?;
    x.is_finite().then_some(x)
}

/// Whether the filter takes the event. Numbers compare as numbers, anything else by equality
/// of the JSON values (so `gt` on strings is false).
pub fn accepts(filter: &Filter, event: &impl EventFields, payload: &mut Payload) -> bool {
    let Some(found) = field_value(&filter.field, event, payload) else {
        return filter.op == FilterOp::Ne;
    };
    let ordering = match (number(&found), number(&filter.value)) {
        (Some(a), Some(b)) => a.partial_cmp(&b),
        _ => None,
    };
    match (filter.op, ordering) {
        (op, Some(ordering)) => op.holds(ordering),
        (FilterOp::Eq, None) => found == filter.value,
        (FilterOp::Ne, None) => found != filter.value,
        (_, None) => false,
    }
}

/// A HyperLogLog sketch: 2^precision one-byte registers over 64-bit xxh3 hashes (the classic
/// estimator with the small-range correction). Written here rather than taken from a crate
/// because the state must serialize and hash identically in every process: the crates seen
/// hash with a per-process random seed or fix the precision at compile time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hll {
    precision: u8,
    registers: Vec<u8>,
}

impl Hll {
    pub fn new(precision: u8) -> Hll {
        Hll {
            precision,
            registers: vec![0; 1 << precision],
        }
    }

    pub fn add(&mut self, value: &Value) {
        let hash = match value {
            Value::String(s) => xxhash_rust::xxh3::xxh3_64(s.as_bytes()),
            other => xxhash_rust::xxh3::xxh3_64(other.to_string().as_bytes()),
        };
        let p = u32::from(self.precision);
        let index = (hash >> (64 - p)) as usize;
        // The rank of the remaining bits; the sentinel bit bounds it at 64 - p + 1.
        let rest = (hash << p) | (1 << (p - 1));
        let rank = rest.leading_zeros() as u8 + 1;
        if let Some(r) = self.registers.get_mut(index) {
            *r = (*r).max(rank);
        }
    }

    pub fn estimate(&self) -> f64 {
        let m = self.registers.len() as f64;
        let alpha = match self.registers.len() {
            16 => 0.673,
            32 => 0.697,
            64 => 0.709,
            _ => 0.7213 / (1.0 + 1.079 / m),
        };
        let sum: f64 = self
            .registers
            .iter()
            .map(|&r| 2f64.powi(-i32::from(r)))
            .sum();
        let raw = alpha * m * m / sum;
        let zeros = self.registers.iter().filter(|&&r| r == 0).count();
        if raw <= 2.5 * m && zeros > 0 {
            m * (m / zeros as f64).ln()
        } else {
            raw
        }
    }
}

/// One function's running value within one window.
#[derive(Clone, Serialize, Deserialize)]
pub enum Acc {
    Count,
    Sum(f64),
    Min(Option<f64>),
    Max(Option<f64>),
    Avg {
        sum: f64,
        n: u64,
    },
    /// (event time, the value as JSON text).
    First(Option<(i64, String)>),
    Last(Option<(i64, String)>),
    Distinct(Hll),
    Quantiles(Box<DDSketch>),
    /// `count` with a field: events in which the field is present and not null. Last, so
    /// that checkpoints written before it keep their variant numbers.
    Present(u64),
}

// By hand: the sketch type has no Debug.
impl std::fmt::Debug for Acc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Acc::Quantiles(sketch) => write!(f, "Quantiles({} values)", sketch.count()),
            Acc::Distinct(hll) => write!(f, "Distinct(~{:.0})", hll.estimate()),
            Acc::Count => write!(f, "Count"),
            Acc::Present(n) => write!(f, "Present({n})"),
            Acc::Sum(x) => write!(f, "Sum({x})"),
            Acc::Min(x) => write!(f, "Min({x:?})"),
            Acc::Max(x) => write!(f, "Max({x:?})"),
            Acc::Avg { sum, n } => write!(f, "Avg({sum}/{n})"),
            Acc::First(x) => write!(f, "First({x:?})"),
            Acc::Last(x) => write!(f, "Last({x:?})"),
        }
    }
}

impl Acc {
    pub fn new(function: &Function) -> Acc {
        match function {
            Function::Count { field: None } => Acc::Count,
            Function::Count { field: Some(_) } => Acc::Present(0),
            Function::Sum { .. } => Acc::Sum(0.0),
            Function::Min { .. } => Acc::Min(None),
            Function::Max { .. } => Acc::Max(None),
            Function::Avg { .. } => Acc::Avg { sum: 0.0, n: 0 },
            Function::First { .. } => Acc::First(None),
            Function::Last { .. } => Acc::Last(None),
            Function::CountDistinct { precision, .. } => Acc::Distinct(Hll::new(*precision)),
            Function::Quantiles {
                relative_accuracy, ..
            } => Acc::Quantiles(Box::new(DDSketch::new(SketchConfig::new(
                *relative_accuracy,
                2048,
                1.0e-9,
            )))),
        }
    }

    /// Takes one event's value (`None`: the event lacks the field, which only `first`/`last`
    /// cannot ignore either: they skip it too).
    pub fn add(&mut self, value: Option<&Value>, event_time: i64) {
        let Some(value) = value else { return };
        match self {
            Acc::Count => {}
            Acc::Present(n) => {
                if !value.is_null() {
                    *n += 1;
                }
            }
            Acc::Sum(sum) => {
                if let Some(x) = number(value) {
                    *sum += x;
                }
            }
            Acc::Min(min) => {
                if let Some(x) = number(value) {
                    *min = Some(min.map_or(x, |m| m.min(x)));
                }
            }
            Acc::Max(max) => {
                if let Some(x) = number(value) {
                    *max = Some(max.map_or(x, |m| m.max(x)));
                }
            }
            Acc::Avg { sum, n } => {
                if let Some(x) = number(value) {
                    *sum += x;
                    *n += 1;
                }
            }
            Acc::First(first) => {
                if first.as_ref().is_none_or(|(t, _)| event_time < *t) {
                    *first = Some((event_time, value.to_string()));
                }
            }
            Acc::Last(last) => {
                if last.as_ref().is_none_or(|(t, _)| event_time >= *t) {
                    *last = Some((event_time, value.to_string()));
                }
            }
            Acc::Distinct(hll) => hll.add(value),
            Acc::Quantiles(sketch) => {
                if let Some(x) = number(value) {
                    sketch.add(x);
                }
            }
        }
    }

    /// Folds in the accumulator of another window of the same function (session windows that
    /// merge). On equal event times, `first` keeps its own value and `last` takes the other's.
    pub fn merge(&mut self, other: Acc) {
        let keep = |a: Option<f64>, b: Option<f64>, pick: fn(f64, f64) -> f64| match (a, b) {
            (Some(x), Some(y)) => Some(pick(x, y)),
            (x, y) => x.or(y),
        };
        match (self, other) {
            (Acc::Sum(a), Acc::Sum(b)) => *a += b,
            (Acc::Present(a), Acc::Present(b)) => *a += b,
            (Acc::Min(a), Acc::Min(b)) => *a = keep(*a, b, f64::min),
            (Acc::Max(a), Acc::Max(b)) => *a = keep(*a, b, f64::max),
            (Acc::Avg { sum, n }, Acc::Avg { sum: s2, n: n2 }) => {
                *sum += s2;
                *n += n2;
            }
            (Acc::First(a), Acc::First(Some(b))) if a.as_ref().is_none_or(|(t, _)| b.0 < *t) => {
                *a = Some(b);
            }
            (Acc::Last(a), Acc::Last(Some(b))) if a.as_ref().is_none_or(|(t, _)| b.0 >= *t) => {
                *a = Some(b);
            }
            (Acc::Distinct(a), Acc::Distinct(b)) => {
                for (x, y) in a.registers.iter_mut().zip(b.registers) {
                    *x = (*x).max(y);
                }
            }
            (Acc::Quantiles(a), Acc::Quantiles(b)) => {
                if let Err(e) = a.merge(&b) {
                    // Only sketches of different settings refuse; one definition makes both.
                    tracing::warn!(error = %e, "quantile sketches did not merge");
                }
            }
            _ => {}
        }
    }

    /// The value written to the store.
    pub fn output(&self, function: &Function) -> Value {
        let float = |x: f64| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
        match self {
            Acc::Count => Value::Null,
            Acc::Present(n) => Value::from(*n),
            Acc::Sum(sum) => float(*sum),
            Acc::Min(x) | Acc::Max(x) => x.map_or(Value::Null, float),
            Acc::Avg { sum, n } => {
                if *n == 0 {
                    Value::Null
                } else {
                    float(sum / *n as f64)
                }
            }
            Acc::First(v) | Acc::Last(v) => v
                .as_ref()
                .and_then(|(_, text)| serde_json::from_str(text).ok())
                .unwrap_or(Value::Null),
            Acc::Distinct(hll) => Value::from(hll.estimate().round() as u64),
            Acc::Quantiles(sketch) => {
                let Function::Quantiles { q, .. } = function else {
                    return Value::Null;
                };
                let mut out = Map::new();
                for &quantile in q {
                    let value = sketch.quantile(quantile).ok().flatten();
                    out.insert(quantile_name(quantile), value.map_or(Value::Null, float));
                }
                Value::Object(out)
            }
        }
    }
}

/// `p50`, `p99`, `p99.9`.
pub fn quantile_name(q: f64) -> String {
    let percent = (q * 1000.0).round() / 10.0;
    if percent.fract() == 0.0 {
        format!("p{}", percent as i64)
    } else {
        format!("p{percent}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use instream_event::Event;
    use serde_json::json;

    #[test]
    fn hll_estimates_within_its_error_and_survives_serialization() {
        let mut hll = Hll::new(12);
        for i in 0..100_000 {
            hll.add(&json!(format!("user-{i}")));
            hll.add(&json!(format!("user-{}", i / 2))); // repeats change nothing
        }
        let estimate = hll.estimate();
        assert!(
            (estimate - 100_000.0).abs() / 100_000.0 < 0.05,
            "estimate {estimate}"
        );
        let bytes = postcard::to_allocvec(&hll).unwrap();
        let back: Hll = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, hll);
        let mut small = Hll::new(12);
        for i in 0..10 {
            small.add(&json!(i));
        }
        assert_eq!(
            small.estimate().round(),
            10.0,
            "small counts are exact enough"
        );
    }

    #[test]
    fn accumulators_compute_their_functions() {
        let sum: Function =
            serde_json::from_value(json!({"fn": "sum", "field": "payload.x"})).unwrap();
        let first: Function =
            serde_json::from_value(json!({"fn": "first", "field": "payload.x"})).unwrap();
        let q: Function = serde_json::from_value(
            json!({"fn": "quantiles", "field": "payload.x", "q": [0.5, 0.99, 0.999]}),
        )
        .unwrap();
        let (mut s, mut f, mut qs) = (Acc::new(&sum), Acc::new(&first), Acc::new(&q));
        for (t, x) in [(5, json!(3)), (1, json!("4.5")), (9, json!("n/a"))] {
            for acc in [&mut s, &mut f, &mut qs] {
                acc.add(Some(&x), t);
            }
        }
        assert_eq!(s.output(&sum), json!(7.5));
        assert_eq!(
            f.output(&first),
            json!("4.5"),
            "the earliest event time wins"
        );
        let out = qs.output(&q);
        let p50 = out["p50"].as_f64().unwrap();
        assert!((p50 - 3.0).abs() <= 0.03 * 3.0 + 1e-9, "{out}");
        assert!(out.get("p99.9").is_some(), "{out}");
        let bytes = postcard::to_allocvec(&qs).unwrap();
        let back: Acc = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.output(&q), out);
    }

    #[test]
    fn count_of_a_field_counts_the_events_where_it_is_present_and_not_null() {
        let count: Function =
            serde_json::from_value(json!({"fn": "count", "field": "payload.dep_delay"})).unwrap();
        let mut acc = Acc::new(&count);
        for value in [
            Some(json!(3)),
            None,
            Some(Value::Null),
            Some(json!("x")),
            Some(json!(0)),
        ] {
            acc.add(value.as_ref(), 0);
        }
        assert_eq!(acc.output(&count), json!(3));
        let mut other = Acc::new(&count);
        other.add(Some(&json!(false)), 1);
        acc.merge(other);
        assert_eq!(
            acc.output(&count),
            json!(4),
            "sessions that merge add their counts"
        );
        let bytes = postcard::to_allocvec(&acc).unwrap();
        let back: Acc = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.output(&count), json!(4));
        // Checkpoints written before the variant existed keep their numbering.
        let plain = postcard::to_allocvec(&Acc::Sum(2.5)).unwrap();
        assert_eq!(plain[0], 1, "Sum is still variant 1");
    }

    #[test]
    fn filters_compare_numbers_as_numbers() {
        let event = Event {
            event_id: "e".into(),
            pipeline: "p".into(),
            key: "k".into(),
            event_time: 0,
            ingest_time: 0,
            headers: Default::default(),
            payload: serde_json::value::RawValue::from_string(
                r#"{"price":"120","kind":"bid"}"#.into(),
            )
            .unwrap(),
            enrichment: None,
        };
        let f = |field: &str, op: &str, value: Value| -> bool {
            let filter: Filter =
                serde_json::from_value(json!({"field": field, "op": op, "value": value})).unwrap();
            accepts(&filter, &event, &mut Payload::new(event.payload.get()))
        };
        assert!(f("payload.price", "gte", json!(100)));
        assert!(!f("payload.price", "lt", json!(100)));
        assert!(f("payload.kind", "eq", json!("bid")));
        assert!(f("payload.missing", "ne", json!(1)));
        assert!(!f("payload.missing", "eq", json!(1)));
    }
}
