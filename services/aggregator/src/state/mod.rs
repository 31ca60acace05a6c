//! What the aggregator knows about one input partition: its open windows, its watermark, and
//! what it needs to drop repeats — all as of one offset, so that a checkpoint of it and that
//! offset are restored together.
//!
//! Repeats come in two kinds (docs/guarantees.md). A client retry puts an event into the raw topic twice
//! with the same `event_id`; ids seen within a horizon of ingest time are remembered and a
//! repeat is dropped. An enricher that re-runs after a crash emits records again; they carry
//! their origin partition and offset, and anything at or below the highest origin offset
//! already counted is dropped.
//!
//! The seen ids are not written into checkpoints (at 100k events/s, ten minutes of ids are
//! tens of millions): an id counts as seen when a record read before carries it with an ingest
//! time within the horizon of the newest ingest time read. That is a function of the records
//! in `[seen_from, next_offset)` of the partition (`seen_from` being the oldest record still
//! queued), so a restore reads that range again and rebuilds exactly the queue the checkpoint
//! was taken from.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use instream_pipeline::{Emit, PipelineDefinition};
use instream_store::WindowAggregate;
use serde::{Deserialize, Serialize};

use crate::event::EventFields;
use crate::functions::{accepts, field_value, Acc};
use crate::windows::group_key;
use seen::{Prehashed, SeenIds};

/// How far past its ingest time an event's time may move the watermark: clocks of producers
/// and of ingest's hosts disagree a little.
pub const WATERMARK_AHEAD_OF_INGEST_MILLIS: i64 = 1_000;

/// What identifies an event to the de-duplication: its id in its producer's scope.
fn event_identity(event: &impl EventFields) -> u128 {
    instream_event::scoped_id_hash(event.producer(), event.event_id())
}

mod close_clock;
mod ledger;
mod outbox;
mod published;

pub use ledger::Tally;
pub use published::{source_header, ReadBack, ResultMark};
mod quiet;
mod seen;
mod sessions;
mod snapshot;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WindowId {
    pub pipeline: String,
    pub aggregation: String,
    pub group_key: String,
    pub start: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct WindowValue {
    end: i64,
    /// Watermark time at which the window closes (end plus allowed lateness).
    closes_at: i64,
    /// The definition version the window opened under; it finishes under it (docs/guarantees.md).
    version: u64,
    count: i64,
    /// One accumulator per function of the aggregation, in its order.
    accs: Vec<Acc>,
    /// Session windows: the gap (their end moves as events arrive, and they merge).
    gap: Option<i64>,
    /// Changed since it was last written. Checkpointed: without early results a window can
    /// be due (changed, not yet written) when its partition's state is saved.
    dirty: bool,
}

/// Where [`PartitionState::count_in`] counts an event: one definition version, the window
/// starts it makes, and what the event's aggregations share.
struct Into<'d, 'p, 'e> {
    def: &'d PipelineDefinition,
    starts: std::ops::Range<i64>,
    watermark: i64,
    payload: &'p mut crate::payload::Payload<'e>,
    values: &'p mut Vec<Option<serde_json::Value>>,
    late: &'p mut Vec<String>,
    /// Aggregations counted in some window, when several versions are kept (a hopping
    /// aggregation late under one may count under another).
    counted: Option<&'p mut Vec<&'d str>>,
}

/// What happened to one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Counted into the windows of every aggregation.
    Counted,
    /// At an offset the state already reflects (read again after a restart or rebalance).
    AlreadyApplied,
    /// Re-emitted by a stage upstream: its origin offset was already counted.
    RepeatedOrigin,
    /// At or below the highest origin offset counted, yet its `event_id` was not seen within
    /// the horizon: written out of order upstream (or re-emitted beyond the horizon). Dropped
    /// by the origin rule, and counted apart so that it is alerted on.
    OutOfOrderOrigin,
    /// Its `event_id` was counted within the horizon.
    RepeatedEvent,
    /// Beyond the allowed lateness of these aggregations (counted in the others).
    TooLate(Vec<String>),
    /// Its event time is further after its ingest time than the pipeline allows; it moved
    /// nothing (not the watermark either).
    TooFarAhead,
}

/// Keeps the best verdict for `aggregation` (the lowest: counted, late, filtered, outside).
fn best<'d>(verdicts: &mut Vec<(&'d str, Tally)>, aggregation: &'d str, verdict: Tally) {
    match verdicts.iter_mut().find(|(a, _)| *a == aggregation) {
        Some((_, kept)) => *kept = (*kept).min(verdict),
        None => verdicts.push((aggregation, verdict)),
    }
}

fn window_hash(pipeline: &str, aggregation: &str, group_key: &str, start: i64) -> u128 {
    // Lengths first, so that no two different ids hash the same bytes. XXH3 of the bytes in
    // one piece equals the streaming digest of the same bytes, so both paths give one id;
    // the one-piece hash of a short id is several times faster than the streaming state.
    let parts = [pipeline, aggregation, group_key];
    let len = parts.iter().map(|p| 8 + p.len()).sum::<usize>() + 8;
    // Ids of up to 192 bytes (names and groups of usual lengths) take the fast path; xxh3
    // hashes inputs up to 240 bytes in one step either way.
    let mut buf = [0u8; 192];
    if len <= buf.len() {
        let mut at = 0;
        for part in parts {
            buf[at..at + 8].copy_from_slice(&(part.len() as u64).to_le_bytes());
            buf[at + 8..at + 8 + part.len()].copy_from_slice(part.as_bytes());
            at += 8 + part.len();
        }
        buf[at..at + 8].copy_from_slice(&start.to_le_bytes());
        return xxhash_rust::xxh3::xxh3_128(&buf[..len]);
    }
    window_hash_streaming(pipeline, aggregation, group_key, start)
}

/// The sessions of one group of one aggregation made by one definition version: sessions of
/// different versions never merge (docs/pipelines.md), so a session is made whole by one.
fn session_group(pipeline: &str, aggregation: &str, group_key: &str, version: u64) -> u128 {
    let version = i64::try_from(version).unwrap_or(i64::MAX);
    window_hash(
        pipeline,
        aggregation,
        group_key,
        i64::MIN.saturating_add(version),
    )
}

fn window_hash_streaming(pipeline: &str, aggregation: &str, group_key: &str, start: i64) -> u128 {
    let parts = [pipeline, aggregation, group_key];
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for part in parts {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(&start.to_le_bytes());
    h.digest128()
}

impl WindowId {
    fn hash(&self) -> u128 {
        window_hash(
            &self.pipeline,
            &self.aggregation,
            &self.group_key,
            self.start,
        )
    }
}

/// The state of one input partition.
#[derive(Debug)]
pub struct PartitionState {
    /// The first offset not reflected here; records below it are skipped.
    next_offset: i64,
    max_event_time: i64,
    max_ingest_time: i64,
    /// Origin partition -> highest origin offset counted.
    origin_max: BTreeMap<i32, i64>,
    /// Repartition partitions: origin partition -> (highest event time, wall-clock ms of its
    /// last event); the event times are checkpointed.
    origin_times: BTreeMap<i32, (i64, i64)>,
    seen: SeenIds,
    /// Keyed by a 128-bit hash of the id, so that finding an existing window allocates
    /// nothing.
    windows: HashMap<u128, (WindowId, WindowValue), Prehashed>,
    /// Session windows by group (a hash of pipeline, aggregation and group): the hashes of
    /// their open sessions, which never overlap.
    sessions: HashMap<u128, Vec<u128>, Prehashed>,
    /// Store rows of sessions that merged into one with another start: deleted at the next
    /// flush. Not checkpointed: a replay after a crash merges the same sessions again.
    deletes: Vec<WindowAggregate>,
    /// Changed since the last checkpoint.
    changed: bool,
    /// When windows closed, for the close-to-store delay (not checkpointed).
    clock: close_clock::CloseClock,
    /// Since when (wall-clock ms) the partition brought nothing new, and its event-time
    /// progress then: what an idle watermark moves on from. Not checkpointed: after a restart
    /// the quiet time counts from the restore, so nothing closes earlier than it would have.
    quiet: Option<(i64, i64)>,
    /// The watermark moved on because the partition is idle (not checkpointed).
    idle: bool,
    /// An idle advance not in a saved checkpoint yet: the windows it closes are written only
    /// once it is, so that a crash cannot undo the advance after their final values were
    /// written (a replay would count events the advance had made late). Until then windows
    /// are judged by `saved_max_event_time`, the progress the last saved checkpoint holds.
    idle_unsaved: bool,
    saved_max_event_time: i64,
    /// Restored from a checkpoint older than format 5: its windows' group keys of several
    /// fields are still joined with `|`, to be written as JSON arrays once the definition is
    /// at hand (see [`PartitionState::upgrade_group_keys`]).
    legacy_group_keys: bool,
    /// Webhook notifications owed (checkpointed).
    outbox: outbox::Outbox,
    /// Final results already on their topic (marks checkpointed, windows read back).
    published: published::PublishedFinal,
    /// What became of the records, per hour of ingest time (checkpointed).
    ledger: ledger::Ledger,
}

/// A checkpoint's state could not be read.
#[derive(Debug, thiserror::Error)]
#[error("unreadable aggregator checkpoint: {0}")]
pub struct SnapshotError(pub(crate) String);

impl Default for PartitionState {
    fn default() -> Self {
        PartitionState {
            next_offset: 0,
            max_event_time: i64::MIN,
            max_ingest_time: i64::MIN,
            origin_max: BTreeMap::new(),
            origin_times: BTreeMap::new(),
            seen: SeenIds::default(),
            windows: HashMap::default(),
            sessions: HashMap::default(),
            deletes: Vec::new(),
            changed: false,
            clock: Default::default(),
            quiet: None,
            idle: false,
            idle_unsaved: false,
            saved_max_event_time: i64::MIN,
            legacy_group_keys: false,
            outbox: Default::default(),
            published: Default::default(),
            ledger: Default::default(),
        }
    }
}

/// Which of a pipeline's aggregations the events of one input partition feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// A partition of `<pipeline>.enriched`: the aggregations grouped by the key.
    Keyed,
    /// A partition of `<pipeline>.by-<aggregation>`: that one repartitioned aggregation.
    Repartitioned {
        aggregation: &'a str,
        /// The record's key: the group it was partitioned by, so the window it lands in is
        /// the one this partition owns even if the group-by changed since it was written
        /// (`None`: computed from the event).
        group: Option<&'a str>,
        /// An origin (enriched partition) that sent nothing for this long (wall clock) no
        /// longer holds the watermark back.
        idle_timeout: Duration,
    },
    /// `instream archive recompute`: one aggregation, keyed or repartitioned, over records
    /// read back from the archive in one process, each with its raw partition and offset as
    /// origin: an offset archived twice counts once, and the watermark follows the slowest
    /// of `origins` (the raw partitions the replay merges; one for a keyed aggregation) —
    /// but for one that brought nothing for `idle_timeout` of ingest time (the replay's clock:
    /// live, records are read about when they are accepted).
    Recompute {
        aggregation: &'a str,
        origins: &'a [i32],
        idle_timeout: Duration,
    },
}

impl Scope<'_> {
    pub fn takes(&self, aggregation: &instream_pipeline::Aggregation) -> bool {
        match self {
            Scope::Keyed => !aggregation.repartitioned(),
            Scope::Recompute {
                aggregation: name, ..
            } => aggregation.name == *name,
            Scope::Repartitioned {
                aggregation: name, ..
            } => aggregation.repartitioned() && aggregation.name == *name,
        }
    }
}

impl PartitionState {
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }

    pub fn window_count(&self) -> usize {
        self.windows.len()
    }

    pub fn remembered_ids(&self) -> usize {
        self.seen.len()
    }

    fn watermark(&self, def: &PipelineDefinition) -> i64 {
        self.max_event_time
            .saturating_sub(def.max_out_of_orderness.as_millis() as i64)
    }

    /// Applies the record at `offset` of an enriched-topic partition to the aggregations
    /// grouped by the key. `origin` is (partition, offset) in the stage's input when the
    /// record carries it.
    pub fn apply(
        &mut self,
        offset: i64,
        event: &impl EventFields,
        origin: Option<(i32, i64)>,
        def: &PipelineDefinition,
        horizon: Duration,
    ) -> Outcome {
        self.apply_in(Scope::Keyed, offset, event, origin, def, horizon)
    }

    /// Applies the record at `offset` to the aggregations of `scope`; repeats and the time
    /// checks are judged the same way whatever the scope.
    pub fn apply_in(
        &mut self,
        scope: Scope<'_>,
        offset: i64,
        event: &impl EventFields,
        origin: Option<(i32, i64)>,
        def: &PipelineDefinition,
        horizon: Duration,
    ) -> Outcome {
        if offset < self.next_offset {
            return Outcome::AlreadyApplied;
        }
        if self.legacy_group_keys {
            self.upgrade_group_keys(|_| Some(def));
        }
        self.next_offset = offset + 1;
        self.changed = true;
        let line = self.ledger.line(event.ingest_time(), offset);
        if scope == Scope::Keyed {
            self.ledger.applied(line);
        }
        if let Some(repeat) = self.repeat(scope, (line, offset), event, origin, def, horizon) {
            return repeat;
        }
        let ahead = def.max_time_ahead.as_millis() as i64;
        if event.event_time() > event.ingest_time().saturating_add(ahead) {
            self.tally_all(line, scope, def, Tally::FutureTime);
            return Outcome::TooFarAhead;
        }
        let watermark = self.watermark(def);
        let mut late = Vec::new();
        let mut payload = crate::payload::Payload::new(event.payload());
        // The functions' input values, one aggregation at a time: one allocation per event.
        let mut values: Vec<Option<serde_json::Value>> = Vec::new();
        // A window is made by the version its start falls under (docs/pipelines.md), so
        // that every partition and every replay switches at the same event time.
        let mut counted: Vec<&str> = Vec::new();
        // Each aggregation's verdict, the best over the versions (counted under one beats
        // late under another); collected only when there are several versions.
        let several = !def.previous.is_empty();
        let mut verdicts: Vec<(&str, Tally)> = Vec::new();
        for (version, from, until) in def.versions() {
            // The windows an event is in start at or before its time.
            if event.event_time() < from {
                if several {
                    for aggregation in version.aggregations.iter().filter(|a| scope.takes(a)) {
                        best(&mut verdicts, &aggregation.name, Tally::OutsideWindows);
                    }
                }
                continue;
            }
            let mut into = Into {
                def: version,
                starts: from..until,
                watermark,
                payload: &mut payload,
                values: &mut values,
                late: &mut late,
                counted: (!def.previous.is_empty()).then_some(&mut counted),
            };
            for aggregation in version.aggregations.iter().filter(|a| scope.takes(a)) {
                let verdict = self.count_in(scope, aggregation, event, &mut into);
                if several {
                    best(&mut verdicts, &aggregation.name, verdict);
                } else {
                    self.ledger.tally(line, &aggregation.name, verdict);
                }
            }
        }
        for (aggregation, verdict) in verdicts {
            self.ledger.tally(line, aggregation, verdict);
        }
        // A hopping aggregation counted under one version is not late for having windows
        // under another that closed.
        late.retain(|name| !counted.contains(&name.as_str()));
        late.sort();
        late.dedup();
        self.advance_watermark(scope, origin, event, def);
        if late.is_empty() {
            Outcome::Counted
        } else {
            Outcome::TooLate(late)
        }
    }

    /// Whether the record at `offset` is a repeat (by event id, or by origin offset), counted
    /// in the ledger's `line` as such; remembers its id either way.
    fn repeat(
        &mut self,
        scope: Scope<'_>,
        (line, offset): (usize, i64),
        event: &impl EventFields,
        origin: Option<(i32, i64)>,
        def: &PipelineDefinition,
        horizon: Duration,
    ) -> Option<Outcome> {
        let id = event_identity(event);
        let cutoff = self
            .max_ingest_time
            .saturating_sub(horizon.as_millis() as i64);
        let repeated = self.seen.contains(id, cutoff);
        self.remember(id, event.ingest_time(), offset, horizon);
        if let Some((partition, origin_offset)) = origin {
            let highest = self.origin_max.entry(partition).or_insert(-1);
            if origin_offset <= *highest {
                // A repeat is the same event again. An event accepted within the horizon
                // whose id was never seen was written out of order upstream, and dropping it
                // loses it; one from before the horizon cannot be told from a re-emit (an
                // enricher replaying an older range, a partition far behind the others) and
                // is taken for one.
                let unseen_recent = !repeated && event.ingest_time() >= cutoff;
                let (tally, outcome) = if unseen_recent {
                    (Tally::OutOfOrderOrigin, Outcome::OutOfOrderOrigin)
                } else {
                    (Tally::RepeatedOrigin, Outcome::RepeatedOrigin)
                };
                // On a repartition topic, a copy is not a record of the enriched topic, so
                // not in the ledger: the audit finds it forwarded and never counted.
                if scope == Scope::Keyed {
                    self.tally_all(line, scope, def, tally);
                }
                return Some(outcome);
            }
            *highest = origin_offset;
        }
        if repeated {
            self.tally_all(line, scope, def, Tally::RepeatedEvent);
            return Some(Outcome::RepeatedEvent);
        }
        None
    }

    /// Moves the partition's event-time progress (its watermark's base) for `event`.
    fn advance_watermark(
        &mut self,
        scope: Scope<'_>,
        origin: Option<(i32, i64)>,
        event: &impl EventFields,
        def: &PipelineDefinition,
    ) {
        // An event moves the watermark no further than its own ingest time (and a little):
        // one producer's clock running ahead must not make the others' current events late.
        let time = event.event_time().min(
            event
                .ingest_time()
                .saturating_add(WATERMARK_AHEAD_OF_INGEST_MILLIS),
        );
        let progress = match (scope, origin) {
            (Scope::Repartitioned { idle_timeout, .. }, Some((partition, _))) => {
                let now = instream_event::now_millis();
                self.origin_progress(partition, time, idle_timeout, 0..def.partitions, now)
            }
            (
                Scope::Recompute {
                    origins,
                    idle_timeout,
                    ..
                },
                Some((partition, _)),
            ) => self.origin_progress(
                partition,
                time,
                idle_timeout,
                origins.iter().copied(),
                event.ingest_time(),
            ),
            _ => time,
        };
        if progress > self.max_event_time {
            self.max_event_time = progress;
            // At most once per millisecond of event time: not a clock read per event.
            self.clock.advanced(progress, instream_event::now_millis());
        }
    }

    /// Puts `tally` in the ledger for every aggregation of `scope` the definition keeps (on
    /// the enriched topic, the repartitioned ones too: the record is not forwarded).
    fn tally_all(&mut self, line: usize, scope: Scope<'_>, def: &PipelineDefinition, tally: Tally) {
        let mut named: Vec<&str> = Vec::new();
        for (version, ..) in def.versions() {
            for aggregation in &version.aggregations {
                let ours = scope == Scope::Keyed || scope.takes(aggregation);
                if ours && !named.contains(&aggregation.name.as_str()) {
                    named.push(&aggregation.name);
                    self.ledger.tally(line, &aggregation.name, tally);
                }
            }
        }
    }

    /// Puts `tally` in the ledger for one aggregation of the record applied last at or below
    /// `offset` (what the forwarding to a repartition topic decided).
    pub fn tally(&mut self, ingest_time: i64, offset: i64, aggregation: &str, tally: Tally) {
        let line = self.ledger.line(ingest_time, offset);
        self.ledger.tally(line, aggregation, tally);
    }

    /// The ledger rows changed since they were last written, for the store.
    pub fn ledger_rows(&self, pipeline: &str, source: &str) -> Vec<instream_store::LedgerRow> {
        self.ledger.rows(pipeline, source)
    }

    /// The rows from [`Self::ledger_rows`] are in the store.
    pub fn ledger_written(&mut self) {
        self.ledger.written();
    }

    /// Counts an event into the windows of one aggregation of one definition version that
    /// start within that version's range; says what became of it there.
    fn count_in<'d>(
        &mut self,
        scope: Scope<'_>,
        aggregation: &'d instream_pipeline::Aggregation,
        event: &impl EventFields,
        into: &mut Into<'d, '_, '_>,
    ) -> Tally {
        let t = event.event_time();
        if !aggregation.window.makes_window_of(t, &into.starts) {
            return Tally::OutsideWindows;
        }
        if let Some(filter) = &aggregation.filter {
            if !accepts(filter, event, into.payload) {
                return Tally::FilteredOut;
            }
        }
        let group = match scope {
            Scope::Repartitioned {
                group: Some(group), ..
            } => std::borrow::Cow::Borrowed(group),
            _ => group_key(aggregation, event, into.payload),
        };
        into.values.clear();
        let payload = &mut *into.payload;
        into.values.extend(
            aggregation
                .functions
                .iter()
                .map(|f| f.field().and_then(|path| field_value(path, event, payload))),
        );
        let def = into.def;
        if let Some(gap) = aggregation.window.session_gap_millis() {
            // Late when more than the allowed lateness behind the watermark: such an
            // event could otherwise overlap a session already closed and dropped.
            let lateness = aggregation.allowed_lateness.as_millis() as i64;
            if t.saturating_add(lateness) < into.watermark {
                into.late.push(aggregation.name.clone());
                return Tally::TooLate;
            }
            self.add_to_session(def, aggregation, &group, gap, event, into.values);
            if let Some(counted) = into.counted.as_mut() {
                counted.push(&aggregation.name);
            }
            return Tally::Counted;
        }
        if !self.add_to_windows(aggregation, &group, t, into) {
            into.late.push(aggregation.name.clone());
            return Tally::TooLate;
        }
        if let Some(counted) = into.counted.as_mut() {
            counted.push(&aggregation.name);
        }
        Tally::Counted
    }

    /// Adds the event at `t` (its function inputs in `into.values`) to every window of
    /// `aggregation` it falls in that is still open; false when every one had closed. A hopping
    /// window's event is in several windows; it is late for the aggregation only when it is
    /// late for all of them.
    fn add_to_windows(
        &mut self,
        aggregation: &instream_pipeline::Aggregation,
        group: &str,
        t: i64,
        into: &Into<'_, '_, '_>,
    ) -> bool {
        let def = into.def;
        let mut all_late = true;
        for start in aggregation
            .window
            .starts_of(t)
            .filter(|s| into.starts.contains(s))
        {
            let closes_at = aggregation
                .window
                .closes_at(start, aggregation.allowed_lateness);
            if closes_at <= into.watermark {
                continue;
            }
            all_late = false;
            let hash = window_hash(&def.name, &aggregation.name, group, start);
            let (_, value) = self.windows.entry(hash).or_insert_with(|| {
                (
                    WindowId {
                        pipeline: def.name.clone(),
                        aggregation: aggregation.name.clone(),
                        group_key: group.to_owned(),
                        start,
                    },
                    WindowValue {
                        end: start.saturating_add(aggregation.window.size_millis()),
                        closes_at,
                        version: def.version,
                        count: 0,
                        accs: aggregation.functions.iter().map(Acc::new).collect(),
                        gap: None,
                        dirty: false,
                    },
                )
            });
            value.count += 1;
            for (acc, v) in value.accs.iter_mut().zip(into.values.iter()) {
                acc.add(v.as_ref(), t);
            }
            value.dirty = true;
        }
        !all_late
    }

    /// A repartition partition merges the events of every enriched partition, which do not
    /// progress together (one may be restarting while the others race on): its watermark
    /// follows the slowest origin still sending, so that an origin's events are late only
    /// against its own progress, as in one clean pass. An origin silent for `idle_timeout`
    /// stops holding it back. Returns the time the watermark may follow.
    ///
    /// Every enriched partition is an origin from the first event on, heard from or not: one
    /// whose backlog has not come through yet (the forwarding instance reads another
    /// partition first, or is restarting) must hold the watermark back, or its events would
    /// all be late.
    fn origin_progress(
        &mut self,
        origin: i32,
        event_time: i64,
        idle_timeout: Duration,
        origins: impl Iterator<Item = i32>,
        now: i64,
    ) -> i64 {
        if self.origin_times.is_empty() {
            self.origin_times
                .extend(origins.map(|p| (p, (i64::MIN, now))));
        }
        let entry = self.origin_times.entry(origin).or_insert((event_time, now));
        entry.0 = entry.0.max(event_time);
        entry.1 = now;
        let idle = idle_timeout.as_millis() as i64;
        self.origin_times
            .values()
            .filter(|(_, seen)| now.saturating_sub(*seen) <= idle)
            .map(|(t, _)| *t)
            .min()
            .unwrap_or(event_time)
    }

    fn remember(&mut self, id: u128, ingest_time: i64, offset: i64, horizon: Duration) {
        self.seen.push(id, ingest_time, offset);
        self.max_ingest_time = self.max_ingest_time.max(ingest_time);
        self.seen.prune(
            self.max_ingest_time
                .saturating_sub(horizon.as_millis() as i64),
        );
    }

    /// The windows changed since the last call, as whole values to upsert, and the windows
    /// that became final (the watermark passed their end plus the allowed lateness) once
    /// more, marked final. `def_of` gives the pipeline definitions, for the names and
    /// settings of the functions. With `early` false, only windows the watermark has passed
    /// (their end, not counting lateness) are taken: results on close; open windows stay due
    /// until then or until the next early round. An aggregation with `emit = "final"` has its
    /// windows taken only when final.
    pub fn take_dirty<'d>(
        &mut self,
        def_of: impl Fn(&str) -> Option<&'d PipelineDefinition>,
        early: bool,
        out: &mut Vec<WindowAggregate>,
    ) {
        if self.legacy_group_keys {
            self.upgrade_group_keys(&def_of);
        }
        let max_event_time = self.finality_time();
        let clock = &mut self.clock;
        // A partition's windows are nearly always of one pipeline: one lookup, not one each.
        let mut last: Option<&'d PipelineDefinition> = None;
        for (hash, (id, v)) in self.windows.iter_mut() {
            let def = match last {
                Some(d) if d.name == id.pipeline => Some(d),
                _ => {
                    let d = def_of(&id.pipeline);
                    last = d.or(last);
                    d
                }
            };
            let watermark = def
                .map(|d| max_event_time.saturating_sub(d.max_out_of_orderness.as_millis() as i64));
            let is_final = watermark.is_some_and(|w| v.closes_at <= w);
            if !v.dirty && !is_final && clock.is_timed(hash) {
                continue;
            }
            // No definition any more: written as it is (nothing will change it).
            let closed = watermark.is_none_or(|w| v.end <= w);
            // The version the window was made by names and settles its functions (the
            // current one when that version is no longer kept).
            let made_by = def.map(|d| d.version_def(v.version).unwrap_or(d));
            let aggregation =
                made_by.and_then(|d| d.aggregations.iter().find(|a| a.name == id.aggregation));
            let final_only = aggregation.is_some_and(|a| a.emit == Emit::Final);
            if !v.dirty && !is_final {
                if closed && !final_only {
                    clock.closed_already_written(*hash);
                }
                continue;
            }
            if (final_only && !is_final) || (!early && !closed) {
                continue;
            }
            if let (true, Some(d)) = (closed, def) {
                let ooo = d.max_out_of_orderness.as_millis() as i64;
                // Written once final: its close is when the lateness ran out.
                let end = if final_only { v.closes_at } else { v.end };
                clock.closed(*hash, end, ooo);
            }
            v.dirty = false;
            let functions = aggregation
                .map(|a| a.functions.as_slice())
                .unwrap_or_default();
            let mut values = serde_json::Map::new();
            for (function, acc) in functions.iter().zip(&v.accs) {
                if !matches!(acc, Acc::Count) {
                    values.insert(function.output_name(), acc.output(function));
                }
            }
            out.push(WindowAggregate {
                pipeline: id.pipeline.clone(),
                aggregation: id.aggregation.clone(),
                group_key: id.group_key.clone(),
                window_start: id.start,
                window_end: v.end,
                definition_version: v.version as i64,
                count: v.count,
                values,
                is_final,
            });
        }
    }

    /// Rewrites the group keys of windows restored from a format-4 checkpoint (several fields
    /// joined with `|`, a missing one as `null`) as JSON arrays, so that the events that
    /// follow find their windows. A value that held a `|` itself is split at the wrong place
    /// (the old encoding could not tell), and such a window goes on under a key of its own.
    pub fn upgrade_group_keys<'d>(
        &mut self,
        def_of: impl Fn(&str) -> Option<&'d PipelineDefinition>,
    ) {
        self.legacy_group_keys = false;
        let windows = std::mem::take(&mut self.windows);
        for (_, (mut id, mut value)) in windows {
            let aggregation = def_of(&id.pipeline)
                .and_then(|d| d.aggregations.iter().find(|a| a.name == id.aggregation));
            // A repartitioned aggregation's window is owned by the partition its old name
            // hashed to: renamed, events routed by the new name would open a second one
            // elsewhere. It finishes under its old name.
            let renamed = aggregation
                .filter(|a| a.group_by.len() > 1 && !a.repartitioned())
                .map(|a| a.group_by.len());
            if let (Some(fields), false) = (renamed, id.group_key.starts_with('[')) {
                let parts: Vec<Option<&str>> = id
                    .group_key
                    .splitn(fields, '|')
                    .map(|p| (p != "null").then_some(p))
                    .collect();
                let new_key = serde_json::to_string(&parts).unwrap_or_default();
                // The row under the old name goes; the window is written under the new one.
                self.deletes.push(WindowAggregate {
                    pipeline: id.pipeline.clone(),
                    aggregation: id.aggregation.clone(),
                    group_key: std::mem::replace(&mut id.group_key, new_key),
                    window_start: id.start,
                    window_end: value.end,
                    definition_version: value.version as i64,
                    count: value.count,
                    values: Default::default(),
                    is_final: false,
                });
                value.dirty = true;
                self.changed = true;
            }
            self.windows.insert(id.hash(), (id, value));
        }
        self.sessions.clear();
        for (hash, (id, value)) in &self.windows {
            if value.gap.is_some() {
                let group =
                    session_group(&id.pipeline, &id.aggregation, &id.group_key, value.version);
                self.sessions.entry(group).or_default().push(*hash);
            }
        }
        self.clock = Default::default();
        self.clock.untimed(self.windows.keys().copied());
    }

    /// Whether the state came from a checkpoint older than format 5 and its group keys are
    /// not rewritten yet (see [`Self::upgrade_group_keys`]).
    pub fn has_legacy_group_keys(&self) -> bool {
        self.legacy_group_keys
    }

    /// Wall-clock close times of the closed windows taken by [`Self::take_dirty`] since the
    /// last call (`None`: its final value was written before it closed): the caller records
    /// each one's delay once the write is durable.
    pub fn take_written_closes(&mut self) -> Vec<Option<i64>> {
        self.clock.take_written()
    }

    /// Marks windows dirty again after a failed write, so the next flush retries them.
    pub fn mark_dirty(&mut self, rows: &[WindowAggregate]) {
        for row in rows {
            let hash = window_hash(
                &row.pipeline,
                &row.aggregation,
                &row.group_key,
                row.window_start,
            );
            if let Some((_, v)) = self.windows.get_mut(&hash) {
                v.dirty = true;
            }
        }
    }

    /// Drops flushed windows the watermark has passed (end plus allowed lateness): their
    /// value in the store is final. `out_of_orderness` gives a pipeline's
    /// `max_out_of_orderness` (None: no definition any more, so nothing can close safely).
    /// Returns how many closed.
    pub fn close_windows(&mut self, out_of_orderness: impl Fn(&str) -> Option<Duration>) -> usize {
        let before = self.windows.len();
        let max_event_time = self.finality_time();
        self.windows.retain(|_, (id, v)| {
            let Some(delay) = out_of_orderness(&id.pipeline) else {
                return true;
            };
            let watermark = max_event_time.saturating_sub(delay.as_millis() as i64);
            v.dirty || v.closes_at > watermark
        });
        let closed = before - self.windows.len();
        if closed > 0 {
            self.changed = true;
            let windows = &self.windows;
            self.clock.retain(|hash| windows.contains_key(hash));
            self.outbox
                .retain_windows(|hash| windows.contains_key(hash));
            self.sessions.retain(|_, open| {
                open.retain(|hash| windows.contains_key(hash));
                !open.is_empty()
            });
        }
        closed
    }

    /// The watermark of this partition under `def`.
    pub fn watermark_for(&self, def: &PipelineDefinition) -> i64 {
        self.watermark(def)
    }

    /// Puts back one record of the range a restore reads again (undecodable records are
    /// skipped, as they are when first read).
    pub fn rebuild_seen(&mut self, offset: i64, payload: &[u8]) {
        if offset >= self.next_offset {
            return;
        }
        if let Ok(event) = crate::event::RecordEvent::read(payload) {
            self.seen
                .push(event_identity(&event), event.ingest_time(), offset);
        }
    }

    /// Applies the horizon to the rebuilt ids, as the live state did.
    pub fn finish_rebuild(&mut self, horizon: Duration) {
        self.seen.prune(
            self.max_ingest_time
                .saturating_sub(horizon.as_millis() as i64),
        );
    }
}

#[cfg(test)]
mod tests;
