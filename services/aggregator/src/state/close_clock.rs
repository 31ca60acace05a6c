//! When windows closed, in wall-clock time, for `instream_window_close_delay_seconds`: the
//! time from the moment a partition's watermark passed a window's end to the moment its value
//! was durable in the store (the "flushed within 1 s of its close"). Not checkpointed:
//! a window that closed before a restart is not measured.

use std::collections::{HashSet, VecDeque};

/// Marks kept: at one per 10 ms, the last ~100 s of watermark progress.
const MAX_MARKS: usize = 10_000;
/// Marks closer together than this are merged.
const MARK_MS: i64 = 10;

#[derive(Debug, Default)]
pub struct CloseClock {
    /// (max event time, wall-clock ms when it was reached), both increasing.
    marks: VecDeque<(i64, i64)>,
    /// Windows whose close was taken already: a late event's rewrite is not a close.
    measured: HashSet<u128>,
    /// Wall-clock close times of windows taken for writing, recorded once written; `None`
    /// for a window whose final value was written before it closed (early results).
    pending: Vec<Option<i64>>,
}

impl CloseClock {
    /// The partition's max event time rose to `max_event_time` at wall time `now`.
    pub fn advanced(&mut self, max_event_time: i64, now: i64) {
        match self.marks.back_mut() {
            Some((t, w)) if now - *w < MARK_MS => *t = (*t).max(max_event_time),
            _ => self.marks.push_back((max_event_time, now)),
        }
        if self.marks.len() > MAX_MARKS {
            self.marks.pop_front();
        }
    }

    /// The wall time at which the max event time first reached `at_least`, when the marks
    /// show it (not when it happened before the oldest mark).
    fn reached(&self, at_least: i64) -> Option<i64> {
        let i = self.marks.partition_point(|(t, _)| *t < at_least);
        (i > 0)
            .then(|| self.marks.get(i).map(|(_, w)| *w))
            .flatten()
    }

    /// A window (`hash`) ending at `end` is taken for writing after its close, which came when
    /// the max event time reached `end + out_of_orderness_ms`.
    pub fn closed(&mut self, hash: u128, end: i64, out_of_orderness_ms: i64) {
        if !self.measured.insert(hash) {
            return;
        }
        if let Some(wall) = self.reached(end.saturating_add(out_of_orderness_ms)) {
            self.pending.push(Some(wall));
        }
    }

    /// A closed window with nothing new to write: its final value was already written while
    /// it was open (an early result), so it was in the store when it closed.
    pub fn closed_already_written(&mut self, hash: u128) {
        if self.measured.insert(hash) {
            self.pending.push(None);
        }
    }

    /// Whether the window's close was taken already (or will not be).
    pub fn is_timed(&self, hash: &u128) -> bool {
        self.measured.contains(hash)
    }

    /// Windows whose close is not timed (restored from a checkpoint: when they closed, or
    /// will, relative to marks not kept is unknown).
    pub fn untimed(&mut self, hashes: impl IntoIterator<Item = u128>) {
        self.measured.extend(hashes);
    }

    /// The close times of the windows written since the last call (`None`: written before
    /// the close).
    pub fn take_written(&mut self) -> Vec<Option<i64>> {
        std::mem::take(&mut self.pending)
    }

    /// Forgets windows no longer open (`open` says which still are).
    pub fn retain(&mut self, open: impl Fn(&u128) -> bool) {
        self.measured.retain(open);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_is_timed_from_when_the_watermark_passed_the_end() {
        let mut clock = CloseClock::default();
        clock.advanced(1_000, 50_000);
        clock.advanced(2_000, 50_005); // merged into the mark at 50 000
        clock.advanced(5_000, 50_100);
        clock.advanced(9_000, 50_300);
        // End 4 000 with 1 000 of out-of-orderness: closed when 5 000 was reached.
        clock.closed(7, 4_000, 1_000);
        clock.closed(7, 4_000, 1_000); // a late rewrite: not a second close
                                       // Closed before the first mark: unknown, not measured.
        clock.closed(8, 0, 500);
        assert_eq!(clock.take_written(), [Some(50_100)]);
        assert!(clock.take_written().is_empty());
        clock.retain(|_| false);
        clock.closed(7, 4_000, 1_000);
        clock.closed_already_written(9);
        clock.closed_already_written(9);
        assert_eq!(clock.take_written(), [Some(50_100), None]);
    }
}
