//! Session windows: a group's events less than the gap apart share a window; an event that
//! bridges two sessions merges them (accumulators merged, the row stored under the later
//! start deleted at the next flush).

use crate::event::EventFields;
use instream_pipeline::PipelineDefinition;
use instream_store::WindowAggregate;

use super::{session_group, PartitionState, WindowId, WindowValue};
use crate::functions::Acc;

impl PartitionState {
    /// Puts the event into its group's session: a new one, or the sessions its
    /// `[time, time + gap)` overlaps, merged into one.
    pub(super) fn add_to_session(
        &mut self,
        def: &PipelineDefinition,
        aggregation: &instream_pipeline::Aggregation,
        group: &str,
        gap: i64,
        event: &impl EventFields,
        values: &[Option<serde_json::Value>],
    ) {
        let t = event.event_time();
        let group_hash = session_group(&def.name, &aggregation.name, group, def.version);
        let lateness = aggregation.allowed_lateness.as_millis() as i64;
        let mut start = t;
        let mut end = t.saturating_add(gap);
        let mut version = def.version;
        let mut absorbed: Vec<(WindowId, WindowValue)> = Vec::new();
        let open = self.sessions.entry(group_hash).or_default();
        open.retain(|hash| {
            let Some((id, v)) = self.windows.get(hash) else {
                return false;
            };
            if id.start < t.saturating_add(gap) && t < v.end {
                if let Some(taken) = self.windows.remove(hash) {
                    start = start.min(taken.0.start);
                    end = end.max(taken.1.end);
                    absorbed.push(taken);
                }
                false
            } else {
                true
            }
        });
        absorbed.sort_by_key(|(id, _)| id.start);
        if let Some((_, oldest)) = absorbed.first() {
            // The window opened under the version of its oldest part (docs/guarantees.md).
            version = oldest.version;
        }
        let mut merged = WindowValue {
            end,
            closes_at: end.saturating_add(lateness),
            version,
            count: 1,
            accs: aggregation.functions.iter().map(Acc::new).collect(),
            gap: Some(gap),
            dirty: true,
        };
        for (acc, v) in merged.accs.iter_mut().zip(values) {
            acc.add(v.as_ref(), t);
        }
        for (id, part) in absorbed {
            merged.count += part.count;
            for (acc, other) in merged.accs.iter_mut().zip(part.accs) {
                acc.merge(other);
            }
            if id.start != start {
                self.deletes.push(WindowAggregate {
                    pipeline: id.pipeline,
                    aggregation: id.aggregation,
                    group_key: id.group_key,
                    window_start: id.start,
                    window_end: part.end,
                    definition_version: part.version as i64,
                    count: 0,
                    values: Default::default(),
                    is_final: false,
                });
            }
        }
        let id = WindowId {
            pipeline: def.name.clone(),
            aggregation: aggregation.name.clone(),
            group_key: group.to_owned(),
            start,
        };
        let hash = id.hash();
        self.windows.insert(hash, (id, merged));
        if let Some(open) = self.sessions.get_mut(&group_hash) {
            open.push(hash);
        }
    }

    /// Store rows to delete (sessions merged under another start); they stay listed until
    /// [`Self::deletes_done`].
    pub fn deletes(&self) -> &[WindowAggregate] {
        &self.deletes
    }

    /// The rows [`Self::deletes`] listed are deleted.
    pub fn deletes_done(&mut self) {
        self.deletes.clear();
    }
}
