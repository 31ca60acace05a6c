//! A partition state's checkpoint: what is saved with the offset it reflects, its format
//! (older layouts still read, newer ones refused rather than misread), and the restore.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::ledger::{Ledger, LedgerV7};
use super::outbox::{Outbox, OutboxSnapshot};
use super::published::{PublishedFinal, ResultMark};
use super::seen::{Prehashed, SeenIds};
use super::{session_group, PartitionState, SnapshotError, WindowId, WindowValue};

/// Increments when the snapshot layout (or what its fields mean) changes; older snapshots are
/// read and upgraded where listed in [`PartitionState::restore`], newer ones refused, never
/// misread. 5: group keys of several fields are JSON arrays (4 joined them with `|`). 6: the
/// [`Snapshot`] is followed by a [`Trailer`]: webhook notifications owed and result marks.
/// 7: the trailer is followed by the audit [`Ledger`]. 8: the ledger's counts per aggregation
/// are a list (7: an array of its eight outcomes of then), so that an outcome added later
/// reads older lines as zero.
const SNAPSHOT_FORMAT: u8 = 8;

/// The checkpointed part of a [`PartitionState`].
#[derive(Serialize, Deserialize)]
pub(super) struct Snapshot {
    pub(super) next_offset: i64,
    pub(super) max_event_time: i64,
    pub(super) max_ingest_time: i64,
    /// Where the seen ids start: a restore reads `[seen_from, next_offset)` again.
    pub(super) seen_from: i64,
    pub(super) origin_max: Vec<(i32, i64)>,
    pub(super) windows: Vec<(WindowId, WindowValue)>,
    /// Repartition partitions: each origin's highest event time and the wall-clock time it
    /// was last heard from (format 4 on), so an origin silent before a restart stays silent.
    pub(super) origin_times: Vec<(i32, i64, i64)>,
}

/// What format 6 adds after the [`Snapshot`].
#[derive(Serialize, Deserialize, Default)]
pub(super) struct Trailer {
    pub(super) outbox: OutboxSnapshot,
    /// Where a restore reads the results topics back from (see `published.rs`).
    pub(super) result_marks: Vec<ResultMark>,
}

impl Trailer {
    fn is_empty(&self) -> bool {
        self.outbox.pending.is_empty()
            && self.outbox.notified.is_empty()
            && self.result_marks.is_empty()
    }
}

/// [`Snapshot`] as format 3 wrote it (before per-origin event times), still read.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
pub(super) struct SnapshotV3 {
    pub(super) next_offset: i64,
    pub(super) max_event_time: i64,
    pub(super) max_ingest_time: i64,
    pub(super) seen_from: i64,
    pub(super) origin_max: Vec<(i32, i64)>,
    pub(super) windows: Vec<(WindowId, WindowValue)>,
}

impl PartitionState {
    /// The checkpoint of this state, if it changed since the last one.
    pub fn snapshot(&self) -> Option<(i64, Vec<u8>)> {
        if !self.changed {
            return None;
        }
        let snapshot = Snapshot {
            next_offset: self.next_offset,
            max_event_time: self.max_event_time,
            max_ingest_time: self.max_ingest_time,
            seen_from: self.seen.front_offset().unwrap_or(self.next_offset),
            origin_max: self.origin_max.iter().map(|(&p, &o)| (p, o)).collect(),
            windows: self.windows.values().cloned().collect(),
            origin_times: self
                .origin_times
                .iter()
                .map(|(&p, &(t, heard))| (p, t, heard))
                .collect(),
        };
        // The format byte comes first, outside the encoded body, so that a build reading
        // another layout says so instead of misreading the body. Group keys not rewritten
        // yet are still format 4's.
        // Without a ledger (no record applied yet), format 6 or — without a trailer either —
        // 5, which builds before them still read.
        let trailer = Trailer {
            outbox: self.outbox.snapshot(),
            result_marks: self.published.marks.clone(),
        };
        debug_assert!(
            !self.legacy_group_keys || trailer.is_empty(),
            "notifications and marks come after the group keys are rewritten"
        );
        let format = if self.legacy_group_keys {
            4
        } else if !self.ledger.is_empty() {
            SNAPSHOT_FORMAT
        } else if trailer.is_empty() {
            5
        } else {
            6
        };
        let mut bytes = vec![format];
        // Encoding plain structs into a Vec cannot fail.
        bytes.extend(postcard::to_allocvec(&snapshot).unwrap_or_default());
        if format >= 6 {
            bytes.extend(postcard::to_allocvec(&trailer).unwrap_or_default());
        }
        if format >= 7 {
            bytes.extend(postcard::to_allocvec(&self.ledger).unwrap_or_default());
        }
        Some((self.next_offset, bytes))
    }

    /// Moves the state to the start of a new, empty partition (the broker it was counted on
    /// was replaced, as a restarted standalone's is): its windows and watermark stay, and
    /// what refers to the old partition's offsets (origin offsets, seen ids) is forgotten.
    pub fn rebase(&mut self) {
        self.next_offset = 0;
        self.origin_max.clear();
        self.seen = SeenIds::default();
        // Results marks point into the old broker's topics.
        self.published = PublishedFinal::default();
        // Its lines count from offsets of the old broker, and their rows are written: the
        // new broker's records are counted in lines (rows) of their own.
        self.ledger = Default::default();
        self.changed = true;
    }

    /// The snapshot from [`Self::snapshot`] is durable: the state is unchanged since.
    pub fn mark_saved(&mut self) {
        self.changed = false;
        self.idle_unsaved = false;
        self.saved_max_event_time = self.max_event_time;
        self.ledger.let_go_before(self.max_ingest_time);
    }

    /// The state a checkpoint holds, without its seen ids: read `[seen_from, next_offset)` of
    /// the partition into [`Self::rebuild_seen`], then call [`Self::finish_rebuild`].
    /// Returns the state and `seen_from`.
    pub fn restore(bytes: &[u8]) -> Result<(PartitionState, i64), SnapshotError> {
        let Some((&format, body)) = bytes.split_first() else {
            return Err(SnapshotError("empty".into()));
        };
        let (s, trailer, ledger) = decode(format, body)?;
        // An origin keeps the silence it had; one heard from "later" than now (a clock set
        // back) counts as heard now.
        let now = instream_event::now_millis();
        let mut sessions: HashMap<u128, Vec<u128>, Prehashed> = HashMap::default();
        for (id, v) in &s.windows {
            if v.gap.is_some() {
                let group = session_group(&id.pipeline, &id.aggregation, &id.group_key, v.version);
                sessions.entry(group).or_default().push(id.hash());
            }
        }
        let state = PartitionState {
            next_offset: s.next_offset,
            max_event_time: s.max_event_time,
            max_ingest_time: s.max_ingest_time,
            origin_max: s.origin_max.into_iter().collect(),
            origin_times: s
                .origin_times
                .into_iter()
                .map(|(p, t, heard)| (p, (t, heard.min(now))))
                .collect(),
            seen: SeenIds::default(),
            windows: s
                .windows
                .into_iter()
                .map(|(id, v)| (id.hash(), (id, v)))
                .collect(),
            sessions,
            deletes: Vec::new(),
            changed: false,
            clock: Default::default(),
            quiet: None,
            idle: false,
            idle_unsaved: false,
            saved_max_event_time: s.max_event_time,
            legacy_group_keys: format < 5,
            outbox: Outbox::restore(trailer.outbox),
            published: PublishedFinal {
                saved_topics: trailer
                    .result_marks
                    .iter()
                    .map(|(topic, ..)| topic.clone())
                    .collect(),
                marks: trailer.result_marks,
                ..Default::default()
            },
            ledger,
        };
        let mut state = state;
        state.ledger.restored(state.max_ingest_time);
        // Windows restored are not timed: when they closed (or close) is not known here.
        state.clock.untimed(state.windows.keys().copied());
        Ok((state, s.seen_from))
    }
}

/// A checkpoint's snapshot, trailer and ledger, from any format this build reads (`format`:
/// the first byte; `body`: the rest). What older formats lack is empty.
fn decode(format: u8, body: &[u8]) -> Result<(Snapshot, Trailer, Ledger), SnapshotError> {
    let mut trailer = Trailer::default();
    let mut ledger = Ledger::default();
    let decoded = match format {
        SNAPSHOT_FORMAT | 7 => postcard::take_from_bytes::<Snapshot>(body).and_then(|(s, rest)| {
            let (t, rest) = postcard::take_from_bytes(rest)?;
            trailer = t;
            ledger = match format {
                7 => postcard::from_bytes::<LedgerV7>(rest)?.into(),
                _ => postcard::from_bytes(rest)?,
            };
            Ok(s)
        }),
        6 => postcard::take_from_bytes::<Snapshot>(body).and_then(|(s, rest)| {
            trailer = postcard::from_bytes(rest)?;
            Ok(s)
        }),
        5 | 4 => postcard::from_bytes::<Snapshot>(body),
        3 => postcard::from_bytes::<SnapshotV3>(body).map(|v3| Snapshot {
            next_offset: v3.next_offset,
            max_event_time: v3.max_event_time,
            max_ingest_time: v3.max_ingest_time,
            seen_from: v3.seen_from,
            origin_max: v3.origin_max,
            windows: v3.windows,
            origin_times: Vec::new(),
        }),
        _ => {
            return Err(SnapshotError(format!(
                "format {format} (this build reads 3 to {SNAPSHOT_FORMAT})"
            )))
        }
    };
    let s = decoded.map_err(|e| SnapshotError(e.to_string()))?;
    Ok((s, trailer, ledger))
}
