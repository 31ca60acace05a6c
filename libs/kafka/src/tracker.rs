use std::collections::{HashMap, VecDeque};

/// Tracks, per partition, which consumed offsets are durably handled, and so which offset may
/// be committed: the one after the longest handled prefix. Records may finish out of order
/// (a batch's dead letters before its produces); the commit never passes an unfinished one.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<(String, i32), PartitionProgress>,
}

#[derive(Debug, Default)]
struct PartitionProgress {
    /// Consumed offsets not yet part of the committable prefix, in consume order, with done flags.
    pending: VecDeque<(i64, bool)>,
    /// The next offset to commit (one past the handled prefix), once anything was handled.
    committable: Option<i64>,
    /// What was last handed out for commit.
    committed: Option<i64>,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `offset` was consumed. Offsets of one partition arrive increasing.
    pub fn track(&mut self, topic: &str, partition: i32, offset: i64) {
        let progress = self
            .partitions
            .entry((topic.to_owned(), partition))
            .or_default();
        let behind_pending = progress
            .pending
            .back()
            .is_some_and(|(last, _)| *last >= offset);
        let behind_commit = progress.committable.is_some_and(|next| offset < next);
        if behind_pending || behind_commit {
            // A re-delivery after a seek or rebalance: start over from here, and never offer
            // a commit past what is now being handled again.
            progress.pending.clear();
            progress.committable = None;
        }
        progress.pending.push_back((offset, false));
    }

    /// Records that `offset` is durably handled. Unknown offsets (a partition revoked since)
    /// are ignored.
    pub fn complete(&mut self, topic: &str, partition: i32, offset: i64) {
        let Some(progress) = self.partitions.get_mut(&(topic.to_owned(), partition)) else {
            return;
        };
        if let Ok(i) = progress.pending.binary_search_by_key(&offset, |(o, _)| *o) {
            progress.pending[i].1 = true;
        }
        while let Some(&(o, true)) = progress.pending.front() {
            progress.pending.pop_front();
            progress.committable = Some(o + 1);
        }
    }

    /// Offsets that advanced since the last call (`all`: every committable offset, advanced
    /// or not — the final commit re-sends them in case an earlier asynchronous commit failed):
    /// `(topic, partition, next offset)`. On a failed commit the records are delivered again.
    pub fn take_committable(&mut self, all: bool) -> Vec<(String, i32, i64)> {
        let mut out = Vec::new();
        for ((topic, partition), progress) in &mut self.partitions {
            if let Some(next) = progress.committable {
                if all || progress.committed != Some(next) {
                    progress.committed = Some(next);
                    out.push((topic.clone(), *partition, next));
                }
            }
        }
        out.sort();
        out
    }

    /// Every committable offset of the given partitions, whether handed out before or not (a
    /// revoke re-sends them: an earlier asynchronous commit may have failed, and the next
    /// reader must start exactly after what was handled).
    pub fn take_committable_of(&mut self, partitions: &[(String, i32)]) -> Vec<(String, i32, i64)> {
        let mut out = Vec::new();
        for key in partitions {
            if let Some(progress) = self.partitions.get_mut(key) {
                if let Some(next) = progress.committable {
                    progress.committed = Some(next);
                    out.push((key.0.clone(), key.1, next));
                }
            }
        }
        out
    }

    /// Forgets a partition: after a revoke its offsets must never be committed by us again.
    pub fn forget(&mut self, topic: &str, partition: i32) {
        self.partitions.remove(&(topic.to_owned(), partition));
    }

    /// Records consumed but not yet handled, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.partitions
            .values()
            .map(|p| p.pending.iter().filter(|(_, done)| !done).count())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_the_handled_prefix() {
        let mut t = OffsetTracker::new();
        for o in [10, 11, 12, 14] {
            t.track("a", 0, o);
        }
        t.complete("a", 0, 11);
        t.complete("a", 0, 14);
        assert!(
            t.take_committable(false).is_empty(),
            "10 is still in flight"
        );
        t.complete("a", 0, 10);
        assert_eq!(t.take_committable(false), vec![("a".into(), 0, 12)]);
        assert!(t.take_committable(false).is_empty(), "nothing new");
        t.complete("a", 0, 12);
        assert_eq!(t.take_committable(false), vec![("a".into(), 0, 15)]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn partitions_are_independent_and_forgettable() {
        let mut t = OffsetTracker::new();
        t.track("a", 0, 0);
        t.track("a", 1, 5);
        t.complete("a", 1, 5);
        assert_eq!(t.take_committable(false), vec![("a".into(), 1, 6)]);
        t.forget("a", 0);
        t.complete("a", 0, 0);
        assert!(t.take_committable(false).is_empty());
    }

    #[test]
    fn a_redelivery_behind_the_commit_point_withdraws_it() {
        let mut t = OffsetTracker::new();
        t.track("a", 0, 5);
        t.complete("a", 0, 5);
        assert_eq!(t.take_committable(false), vec![("a".into(), 0, 6)]);
        t.track("a", 0, 3);
        assert!(
            t.take_committable(true).is_empty(),
            "6 must not be offered while 3 is redone"
        );
        t.complete("a", 0, 3);
        assert_eq!(t.take_committable(true), vec![("a".into(), 0, 4)]);
        assert_eq!(
            t.take_committable(true),
            vec![("a".into(), 0, 4)],
            "all: offered again"
        );
    }

    #[test]
    fn a_redelivery_restarts_the_partition() {
        let mut t = OffsetTracker::new();
        t.track("a", 0, 7);
        t.track("a", 0, 8);
        t.track("a", 0, 7);
        t.complete("a", 0, 7);
        assert_eq!(t.take_committable(false), vec![("a".into(), 0, 8)]);
    }
}
