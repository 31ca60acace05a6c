//! Open windows and their values.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

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
    /// The input partition the window's events come from (one, as groups start with the key).
    source: (String, i32),
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
    /// Counts `event`, read from `source` (topic, partition), into its window of every
    /// aggregation of its pipeline.
    pub fn add(&mut self, def: &PipelineDefinition, event: &Event, source: (&str, i32)) {
        self.apply(def, event, source, 1);
    }

    /// Takes back what [`Self::add`] counted for records that were not flushed, after a
    /// rebalance: they will be read again from the last commit. Afterwards every window holds
    /// its last flushed value again, so nothing is dirty.
    pub fn roll_back(&mut self, unflushed: &[(Arc<PipelineDefinition>, Event, (String, i32))]) {
        for (def, event, source) in unflushed {
            self.apply(def, event, (&source.0, source.1), -1);
        }
        self.windows.retain(|_, v| v.count > 0);
        for v in self.windows.values_mut() {
            v.dirty = false;
        }
    }

    /// Forgets the windows of partitions this instance no longer owns; their new owner
    /// continues them.
    pub fn retain_sources(&mut self, owned: &HashSet<(String, i32)>) {
        self.windows.retain(|_, v| owned.contains(&v.source));
    }

    fn apply(&mut self, def: &PipelineDefinition, event: &Event, source: (&str, i32), delta: i64) {
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
                source: (source.0.to_owned(), source.1),
                end: start + aggregation.window.size_millis(),
                version: def.version,
                count: 0,
                dirty: false,
            });
            value.count += delta;
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
            w.add(&def, &event(k, t, "gold"), ("t", 0));
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
        w.add(&def, &event("a", 1, "gold"), ("t", 0));
        let again = w.take_dirty();
        assert_eq!(again.len(), 2, "only the touched windows");
        assert!(again
            .iter()
            .any(|r| r.aggregation == "per_minute" && r.count == 3));
    }

    #[test]
    fn a_rebalance_takes_back_unflushed_counts_and_lost_partitions() {
        let def = Arc::new(def());
        let mut w = Windows::default();
        w.add(&def, &event("a", 0, "gold"), ("t", 0));
        w.add(&def, &event("b", 0, "gold"), ("t", 1));
        w.take_dirty(); // flushed
        let unflushed = vec![
            (def.clone(), event("a", 1, "gold"), ("t".to_owned(), 0)),
            (def.clone(), event("c", 1, "gold"), ("t".to_owned(), 0)),
        ];
        for (d, e, s) in &unflushed {
            w.add(d, e, (&s.0, s.1));
        }
        w.roll_back(&unflushed);
        assert!(w.take_dirty().is_empty(), "back to the flushed values");
        w.retain_sources(&[("t".to_owned(), 0)].into_iter().collect());
        // Re-reading the unflushed records gives the counts of one clean pass.
        for (d, e, s) in &unflushed {
            w.add(d, e, (&s.0, s.1));
        }
        let rows = w.take_dirty();
        let a = rows
            .iter()
            .find(|r| r.aggregation == "per_minute" && r.group_key == "a")
            .unwrap();
        assert_eq!(a.count, 2);
        assert!(
            rows.iter().all(|r| r.group_key != "b"),
            "b's partition was lost"
        );
        assert_eq!(w.len(), 4, "a and c, two aggregations each");
    }
}
