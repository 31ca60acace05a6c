//! Open windows and their values.

use std::collections::HashMap;

use instream_event::{Event, FieldPath};
use instream_pipeline::{Aggregation, PipelineDefinition};
use instream_store::WindowAggregate;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct WindowId {
    pipeline: String,
    aggregation: String,
    group_key: String,
    start: i64,
}

#[derive(Debug)]
struct WindowValue {
    end: i64,
    version: u64,
    count: i64,
    /// Changed since the last flush.
    dirty: bool,
}

/// Every window this instance owns, with whole-window values so that a store write replaces
/// (never adds to) what was written before.
#[derive(Default)]
pub struct Windows {
    windows: HashMap<WindowId, WindowValue>,
}

fn scalar_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "null".into(),
        Some(other) => other.to_string(),
    }
}

/// The group of `event` under `aggregation`: its group-by values joined with `|`.
pub fn group_key(aggregation: &Aggregation, event: &Event, payload: &mut Option<Value>) -> String {
    let mut parts = Vec::with_capacity(aggregation.group_by.len());
    for path in &aggregation.group_by {
        parts.push(resolve(path, event, payload));
    }
    parts.join("|")
}

fn resolve(path: &FieldPath, event: &Event, payload: &mut Option<Value>) -> String {
    let segments = path.segments();
    match segments[0].as_str() {
        "key" => event.key.clone(),
        "enrichment" => {
            let found = event
                .enrichment
                .as_ref()
                .and_then(|m| m.get(&segments[1]))
                .and_then(|v| {
                    segments[2..]
                        .iter()
                        .try_fold(v, |v, s| v.as_object()?.get(s))
                });
            scalar_text(found)
        }
        _ => {
            // `payload.…`: parsed once per event, only when some aggregation needs it.
            let doc = payload.get_or_insert_with(|| {
                serde_json::from_str(event.payload.get()).unwrap_or(Value::Null)
            });
            let found = segments[1..]
                .iter()
                .try_fold(&*doc, |v, s| v.as_object()?.get(s));
            scalar_text(found)
        }
    }
}

impl Windows {
    /// Counts `event` into its window of every aggregation of its pipeline.
    pub fn add(&mut self, def: &PipelineDefinition, event: &Event) {
        let mut payload = None;
        for aggregation in &def.aggregations {
            let start = aggregation.window.start_of(event.event_time);
            let id = WindowId {
                pipeline: def.name.clone(),
                aggregation: aggregation.name.clone(),
                group_key: group_key(aggregation, event, &mut payload),
                start,
            };
            let value = self.windows.entry(id).or_insert_with(|| WindowValue {
                end: start + aggregation.window.size_millis(),
                version: def.version,
                count: 0,
                dirty: false,
            });
            value.count += 1;
            value.dirty = true;
        }
    }

    /// The windows changed since the last call, as whole values to upsert.
    pub fn take_dirty(&mut self) -> Vec<WindowAggregate> {
        self.windows
            .iter_mut()
            .filter(|(_, v)| v.dirty)
            .map(|(id, v)| {
                v.dirty = false;
                WindowAggregate {
                    pipeline: id.pipeline.clone(),
                    aggregation: id.aggregation.clone(),
                    group_key: id.group_key.clone(),
                    window_start: id.start,
                    window_end: v.end,
                    definition_version: v.version as i64,
                    count: v.count,
                }
            })
            .collect()
    }

    /// Marks windows dirty again after a failed write, so the next flush retries them.
    pub fn mark_dirty(&mut self, rows: &[WindowAggregate]) {
        for row in rows {
            let id = WindowId {
                pipeline: row.pipeline.clone(),
                aggregation: row.aggregation.clone(),
                group_key: row.group_key.clone(),
                start: row.window_start,
            };
            if let Some(v) = self.windows.get_mut(&id) {
                v.dirty = true;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.windows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use instream_pipeline::parse_document;
    use serde_json::value::RawValue;

    fn def() -> PipelineDefinition {
        parse_document(
            r#"
[[pipelines]]
name = "p"
key_field = "k"
time_field = "t"
[[pipelines.aggregations]]
name = "per_minute"
window = { kind = "tumbling", size = "1m" }
[[pipelines.aggregations]]
name = "per_tier"
group_by = ["key", "enrichment.tier", "payload.kind"]
window = { kind = "tumbling", size = "1h" }
"#,
        )
        .unwrap()
        .pipelines
        .remove(0)
    }

    fn event(key: &str, t: i64, tier: &str) -> Event {
        let mut enrichment = serde_json::Map::new();
        enrichment.insert("tier".into(), Value::String(tier.into()));
        Event {
            event_id: format!("{key}-{t}"),
            pipeline: "p".into(),
            key: key.into(),
            event_time: t,
            ingest_time: t,
            headers: Default::default(),
            payload: RawValue::from_string(r#"{"kind":"bid"}"#.into()).unwrap(),
            enrichment: Some(enrichment),
        }
    }

    #[test]
    fn counts_per_key_and_window_and_flushes_only_changes() {
        let def = def();
        let mut w = Windows::default();
        for (k, t) in [("a", 0), ("a", 59_999), ("a", 60_000), ("b", 1)] {
            w.add(&def, &event(k, t, "gold"));
        }
        let mut rows = w.take_dirty();
        rows.sort_by(|x, y| {
            (&x.aggregation, &x.group_key, x.window_start).cmp(&(
                &y.aggregation,
                &y.group_key,
                y.window_start,
            ))
        });
        let summary: Vec<(&str, &str, i64, i64)> = rows
            .iter()
            .map(|r| {
                (
                    r.aggregation.as_str(),
                    r.group_key.as_str(),
                    r.window_start,
                    r.count,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("per_minute", "a", 0, 2),
                ("per_minute", "a", 60_000, 1),
                ("per_minute", "b", 0, 1),
                ("per_tier", "a|gold|bid", 0, 3),
                ("per_tier", "b|gold|bid", 0, 1),
            ]
        );
        assert!(w.take_dirty().is_empty());
        w.add(&def, &event("a", 1, "gold"));
        let again = w.take_dirty();
        assert_eq!(again.len(), 2, "only the touched windows");
        assert!(again
            .iter()
            .any(|r| r.aggregation == "per_minute" && r.count == 3));
    }
}
