//! The event ids a partition's state remembers, and the hasher for keys that are hashes.

use std::collections::{HashMap, VecDeque};

/// Remembered event ids: every id read with an ingest time within the horizon of the newest
/// one. A queue in offset order (its front is `seen_from`, where a restore starts reading)
/// with, per id, how many queued records carry it and the newest ingest time among them.
/// Records leave from the front once older than the horizon; one older than the horizon but
/// behind a newer one stays queued a little longer, but its id no longer counts as seen,
/// because lookups compare the id's newest ingest time with the cutoff. O(1) per record.
#[derive(Debug, Default)]
pub(super) struct SeenIds {
    pub(super) order: VecDeque<(u128, i64, i64)>,
    pub(super) ids: HashMap<u128, (u32, i64), Prehashed>,
}

impl SeenIds {
    /// Whether a record with this id and an ingest time at or after `cutoff` was read.
    pub(super) fn contains(&self, id: u128, cutoff: i64) -> bool {
        self.ids
            .get(&id)
            .is_some_and(|&(_, newest)| newest >= cutoff)
    }

    pub(super) fn push(&mut self, id: u128, ingest_time: i64, offset: i64) {
        self.order.push_back((id, ingest_time, offset));
        let entry = self.ids.entry(id).or_insert((0, i64::MIN));
        entry.0 += 1;
        entry.1 = entry.1.max(ingest_time);
    }

    /// Drops queued records from the front while they are older than `cutoff`.
    pub(super) fn prune(&mut self, cutoff: i64) {
        while let Some(&(id, ingest_time, _)) = self.order.front() {
            if ingest_time >= cutoff {
                break;
            }
            self.order.pop_front();
            if let Some(entry) = self.ids.get_mut(&id) {
                entry.0 -= 1;
                if entry.0 == 0 {
                    self.ids.remove(&id);
                }
            }
        }
    }

    pub(super) fn front_offset(&self) -> Option<i64> {
        self.order.front().map(|&(_, _, offset)| offset)
    }

    pub(super) fn len(&self) -> usize {
        self.order.len()
    }
}

/// Hashes a key that is itself a 128-bit hash (event ids, window ids) by taking its low bits:
/// hashing it again (SipHash) cost as much as the rest of an event's update.
#[derive(Default, Clone, Copy)]
pub struct PrehashedKey(u64);

impl std::hash::Hasher for PrehashedKey {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached for keys other than u128; fold them in.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }

    fn write_u128(&mut self, key: u128) {
        self.0 = key as u64;
    }
}

pub(super) type Prehashed = std::hash::BuildHasherDefault<PrehashedKey>;
