//! A partition that goes quiet (the pipeline's `idle_timeout`, docs/pipelines.md): how long
//! it has brought nothing, and how its progress moves on once it is idle, saved before the
//! windows it closes are written.

use std::time::Duration;

use super::{PartitionState, WindowValue};

impl PartitionState {
    /// Records of this partition arrived at wall-clock `now`: it is not quiet.
    pub fn heard_from(&mut self, now: i64) {
        self.quiet = Some((now, self.newest_event_time()));
        self.idle = false;
    }

    /// Whether the watermark moved on because the partition is idle, and nothing came since.
    pub fn is_idle(&self) -> bool {
        self.idle
    }

    /// The newest event time read: a repartition partition's watermark may be held back
    /// below it by a slower origin.
    fn newest_event_time(&self) -> i64 {
        self.origin_times
            .values()
            .map(|(t, _)| *t)
            .fold(self.max_event_time, i64::max)
    }

    /// The progress windows are judged final by: an idle advance counts once it is saved.
    pub(super) fn finality_time(&self) -> i64 {
        if self.idle_unsaved {
            self.saved_max_event_time
        } else {
            self.max_event_time
        }
    }

    /// Whether the partition has been quiet for `idle` (read to its end or not).
    pub fn idle_due(&self, now: i64, idle: Duration) -> bool {
        self.quiet.is_some_and(|(since, from)| {
            from != i64::MIN && now.saturating_sub(since) >= idle.as_millis() as i64
        })
    }

    /// A partition that is read to its end (`read_to_end`) and brought nothing for `idle` is
    /// idle: its event-time progress moves on from where it was when it went quiet by the
    /// time that passed since — never past `now`, the ingest time any new event would get,
    /// and never to the wall clock from a replay of old events. Then its windows close as if
    /// the stream had gone on. The move is made only when it closes a window (the watermark
    /// being `out_of_orderness` behind): a quiet partition's checkpoint is not rewritten on
    /// every tick for nothing. Returns whether the watermark moved.
    pub fn advance_idle(
        &mut self,
        now: i64,
        idle: Duration,
        read_to_end: bool,
        out_of_orderness: Duration,
    ) -> bool {
        let Some((since, from)) = self.quiet.filter(|_| read_to_end) else {
            // Not read to its end (a backlog, a paused fetch): not quiet, whatever the time
            // since its last record says.
            self.quiet = Some((now, self.newest_event_time()));
            return false;
        };
        let quiet_ms = now.saturating_sub(since);
        if from == i64::MIN || quiet_ms < idle.as_millis() as i64 {
            return false;
        }
        let target = from.saturating_add(quiet_ms).min(now);
        if target <= self.max_event_time {
            return false;
        }
        // Only to close a window not closed yet: once moved, the partition waits until the
        // windows that closed are written, or until the next one would close.
        let ooo = out_of_orderness.as_millis() as i64;
        let (now_at, moved_to) = (
            self.max_event_time.saturating_sub(ooo),
            target.saturating_sub(ooo),
        );
        let closes = |v: &WindowValue| now_at < v.closes_at && v.closes_at <= moved_to;
        if !self.windows.values().any(|(_, v)| closes(v)) {
            self.idle = true;
            return false;
        }
        self.max_event_time = target;
        self.changed = true;
        self.idle = true;
        self.idle_unsaved = true;
        self.clock.advanced(target, now);
        true
    }
}
