//! `instream archive recompute`: one aggregation's windows rebuilt from the archived raw
//! events, enriched with the reference data as it is now, and written whole over what the
//! store holds (docs/runbook.md, "Repairing a range").
//!
//! The replay is the live path run again in one process: the enricher's own planning and
//! rendering, then the aggregator's own [`PartitionState`], fed each raw partition's records
//! in offset order as the live aggregator reads its enriched partition (a repartitioned
//! aggregation: every partition merged by ingest time into one state). So lateness, filters,
//! functions and de-duplication are judged as live; the only differences are deliberate:
//! every window is made by the current definition version, and repeats are dropped by event
//! id across the whole replay, not only within the live horizon.
//!
//! A window is rewritten only when both the replay and the live aggregator have closed it:
//! the replay's watermark passed its end plus the allowed lateness (so every event that could
//! count was archived before the replay moved on), and the live aggregator's, as its last
//! checkpoint holds it (so the live aggregator will not write it again). Others are left,
//! and reported. Writes replace whole windows, so a run stopped half way and started again
//! ends with the same store.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use instream_aggregator::{Outcome, PartitionState, Scope};
use instream_archive::Archive;
use instream_core::config::{BrokerMode, Config, StoreBackend};
use instream_enricher::transform::{self, Outcomes, Output, Quality};
use instream_kafka::Record;
use instream_pipeline::{topics, Aggregation, Catalog, PipelineDefinition};
use instream_refdata::CachedRefStore;
use instream_store::{AggregateStore, CheckpointKey, WindowAggregate};
use serde::Serialize;

use super::stream::{self, PartitionStream};

const HOUR_MS: i64 = 3_600_000;
/// Repeats are dropped by event id over the whole replay: a horizon no replay reaches.
const WHOLE_REPLAY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// Records enriched per round of lookups.
const BATCH: usize = 2_000;
/// Windows written per store request.
const WRITE_ROWS: usize = 500;

/// What to recompute.
pub struct Request {
    pub pipeline: String,
    pub aggregation: String,
    /// Windows whose start lies in `[from, to)`.
    pub from: i64,
    pub to: i64,
    pub execute: bool,
    /// Write even with offsets in no archive file within what is read (a range at the start
    /// of an archive cut by retention): the windows lack those records.
    pub accept_gaps: bool,
    /// Progress on stderr (files read).
    pub progress: bool,
}

/// What a recompute found, and did (or would do, without `--execute`).
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub pipeline: String,
    pub aggregation: String,
    pub from: i64,
    pub to: i64,
    /// The definition version every window is made by.
    pub definition_version: u64,
    pub executed: bool,
    /// Archive hours read (`YYYY-MM-DDTHH`), in order.
    pub hours: Vec<String>,
    pub files: u64,
    pub records: u64,
    /// What the replay made of the records, by outcome (`counted`, `repeated_event`,
    /// `too_late`, `future_time`, `dead_letter:<code>`).
    pub outcomes: BTreeMap<String, u64>,
    /// Windows written whole, as final.
    pub windows_rewritten: u64,
    /// Events in the rewritten windows.
    pub events_in_rewritten: i64,
    /// Windows the store held in the range that the replay does not make (another shape, a
    /// group that no longer exists): deleted.
    pub windows_deleted: u64,
    /// Windows in the range still open in the live aggregator: left to it.
    pub left_to_live: u64,
    /// Windows the archive cannot close yet (nothing archived past their end plus lateness).
    pub left_open_in_archive: u64,
    /// Offsets of the raw topic within what was read that no archive file answers for
    /// (`<partition>:<first>-<last>`): windows made without them would be short, so
    /// `--execute` writes nothing while there are any.
    pub gaps: Vec<String>,
    pub notes: Vec<String>,
}

/// The backends a recompute reads and writes.
pub struct Backends {
    pub archive: Arc<dyn Archive>,
    pub refdata: Arc<CachedRefStore>,
    pub store: Arc<dyn AggregateStore>,
    /// The live aggregator's consumer group (its checkpoints' key).
    pub aggregator_group: String,
    /// `aggregator.repartition_idle_timeout`: a partition that brought nothing for this long
    /// (of ingest time, in a replay) no longer holds a merged replay's watermark back.
    pub repartition_idle_timeout: Duration,
}

/// Opens what `config` names, refusing what a separate process cannot share.
pub async fn backends(config: &Config) -> anyhow::Result<Backends> {
    if config.store.backend == StoreBackend::Embedded {
        bail!(
            "store.backend is `embedded`: the windows live inside the `instream standalone` \
             process, out of this command's reach; recompute against a store it can open \
             (`local` with the standalone stopped, or `scylla`)"
        );
    }
    if config.kafka.broker == BrokerMode::Embedded
        && config.store.backend == StoreBackend::Local
        && crate::standalone::state::running(config)
    {
        bail!(
            "the running `instream standalone` holds the store file {}; stop it first (a \
             local store opens in one process at a time)",
            config
                .store
                .path
                .as_deref()
                .map_or_else(|| "(store.path)".to_owned(), |p| p.display().to_string())
        );
    }
    let archive = instream_archive::build(&config.archive)?;
    let store = instream_store::build(&config.store)
        .await
        .context("opening the aggregate store")?;
    let refdata = instream_refdata::build(&config.refdata)
        .await
        .context("connecting to reference data")?;
    let refdata = Arc::new(CachedRefStore::new(
        refdata,
        &instream_refdata::CacheSettings {
            max_bytes: config.refdata.cache_max_bytes,
            ttl: config.refdata.cache_ttl,
            negative_ttl: config.refdata.cache_negative_ttl,
        },
    ));
    Ok(Backends {
        archive,
        refdata,
        store,
        aggregator_group: instream_stage::group_of(config, "aggregator"),
        repartition_idle_timeout: config.aggregator.repartition_idle_timeout,
    })
}

/// The definition the replay runs: the version in effect now alone (every window made by
/// it; a version applied with an `effective_from` still ahead is not in effect yet), with only
/// the aggregation asked for.
fn replay_definition(def: &PipelineDefinition, aggregation: &str) -> PipelineDefinition {
    let now = instream_event::now_millis();
    let in_effect = def
        .versions()
        .find(|(_, from, _)| *from <= now)
        .map_or(def, |(version, ..)| version);
    let mut replay = in_effect.clone();
    replay.previous.clear();
    replay.effective_from = None;
    replay.aggregations.retain(|a| a.name == aggregation);
    replay
}

/// A replay state and what it has given so far.
struct Replay {
    state: PartitionState,
    /// The position of the next record in this replay: the state skips a record below the
    /// last one applied (a re-read, live), and a merged replay's raw offsets do not increase.
    next: i64,
    /// The raw partitions it merges (one for a keyed aggregation): its watermark follows the
    /// slowest.
    origins: Vec<i32>,
    /// Closed windows in the range taken from the state, by (group, start): the last value
    /// wins.
    taken: HashMap<(String, i64), WindowAggregate>,
}

impl Replay {
    fn new(origins: Vec<i32>) -> Self {
        Replay {
            state: PartitionState::default(),
            next: 0,
            origins,
            taken: HashMap::new(),
        }
    }

    /// Moves the windows the watermark closed out of the state, keeping those of the range.
    fn collect(&mut self, def: &PipelineDefinition, range: &std::ops::Range<i64>) {
        let mut rows = Vec::new();
        self.state.take_dirty(|_| Some(def), false, &mut rows);
        self.state.take_written_closes();
        self.state.close_windows(|_| Some(def.max_out_of_orderness));
        for row in rows.into_iter().filter(|r| range.contains(&r.window_start)) {
            self.taken
                .insert((row.group_key.clone(), row.window_start), row);
        }
    }

    /// Whether nothing in the range can change any more: the watermark passed the latest
    /// close of a window starting before `to`.
    fn settled(&self, def: &PipelineDefinition, aggregation: &Aggregation, to: i64) -> bool {
        let last_close = aggregation
            .window
            .closes_at(to, aggregation.allowed_lateness);
        self.state.watermark_for(def) >= last_close
    }
}

/// `YYYY-MM-DDTHH` of the hour holding `millis`, as the archive's folders name it.
pub(super) fn hour_name(millis: i64) -> String {
    let (folder, _) = instream_archiver::folder("p", millis.div_euclid(HOUR_MS) * HOUR_MS);
    instream_archiver::hour_of(&format!("{folder}/x")).unwrap_or_default()
}

/// What every batch of the replay needs: the definition it runs, the enricher's catalog of
/// it, and reference data.
struct Replayer<'a> {
    catalog: Catalog,
    def: PipelineDefinition,
    aggregation: &'a str,
    refdata: &'a CachedRefStore,
    range: std::ops::Range<i64>,
    idle_timeout: Duration,
}

impl Replayer<'_> {
    /// Enriches `records` (in replay order) and applies each to `replay`, then moves the
    /// windows it closed out of its state.
    async fn batch(
        &self,
        records: &[Record],
        replay: &mut Replay,
        report: &mut Report,
    ) -> anyhow::Result<()> {
        let store = self.refdata.store().clone();
        let mut quality = Quality::new(0);
        let mut outcomes = Outcomes::default();
        let mut arena = Vec::new();
        let scope = Scope::Recompute {
            aggregation: self.aggregation,
            origins: &replay.origins,
            idle_timeout: self.idle_timeout,
        };
        report.records += records.len() as u64;
        for batch in records.chunks(BATCH) {
            let plans = transform::plan(&self.catalog, &|p, r| store.version(p, r), batch);
            let answers = self
                .refdata
                .lookup_many(&plans.lookups)
                .await
                .context("looking up reference data")?;
            let outputs = transform::render(
                plans,
                batch,
                &answers,
                &mut outcomes,
                &mut quality,
                &mut arena,
            );
            for (record, output) in batch.iter().zip(outputs) {
                let outcome = match output {
                    Output::Dead { code, .. } => format!("dead_letter:{}", code.as_str()),
                    Output::Enriched { bytes, .. } => {
                        let event = instream_event::decode(&arena[bytes])
                            .context("an enriched record did not read back")?;
                        let at = replay.next;
                        replay.next += 1;
                        let origin = Some((record.partition, record.offset));
                        match replay.state.apply_in(
                            scope,
                            at,
                            &event,
                            origin,
                            &self.def,
                            WHOLE_REPLAY,
                        ) {
                            Outcome::Counted => "counted".into(),
                            Outcome::TooLate(_) => "too_late".into(),
                            Outcome::RepeatedEvent => "repeated_event".into(),
                            Outcome::TooFarAhead => "future_time".into(),
                            Outcome::RepeatedOrigin => "repeated_origin".into(),
                            Outcome::OutOfOrderOrigin => "out_of_order_origin".into(),
                            // Positions only increase.
                            Outcome::AlreadyApplied => {
                                bail!("the replay applied record {} twice", record.offset)
                            }
                        }
                    }
                };
                *report.outcomes.entry(outcome).or_default() += 1;
            }
        }
        replay.collect(&self.def, &self.range);
        Ok(())
    }
}

/// The files of hours from `first_hour` on (read), and those of earlier hours (only their
/// names are used), each per partition.
fn split_at_hour(
    all: BTreeMap<i32, Vec<stream::PartFile>>,
    first_hour: &str,
) -> (
    BTreeMap<i32, Vec<stream::PartFile>>,
    BTreeMap<i32, Vec<stream::PartFile>>,
) {
    let (mut read, mut before) = (BTreeMap::new(), BTreeMap::new());
    for (partition, files) in all {
        let (later, earlier): (Vec<_>, Vec<_>) = files
            .into_iter()
            .partition(|f| f.hour.as_str() >= first_hour);
        if !later.is_empty() {
            read.insert(partition, later);
        }
        if !earlier.is_empty() {
            before.insert(partition, earlier);
        }
    }
    (read, before)
}

/// An archived record as the raw topic's record it was.
fn raw_record(topic: &str, partition: i32, record: instream_archiver::ArchivedRecord) -> Record {
    Record {
        topic: topic.to_owned(),
        partition,
        offset: record.offset,
        key: None,
        payload: record.bytes,
        headers: Vec::new(),
        generation: 0,
    }
}

/// The live aggregator's watermark for `topic`'s partitions, from its checkpoints: `None`
/// for a partition it has no checkpoint of.
async fn live_watermarks(
    store: &dyn AggregateStore,
    group: &str,
    topic: &str,
    partitions: i32,
    def: &PipelineDefinition,
) -> anyhow::Result<BTreeMap<i32, Option<i64>>> {
    let mut out = BTreeMap::new();
    for partition in 0..partitions {
        let key = CheckpointKey {
            group: group.to_owned(),
            topic: topic.to_owned(),
            partition,
        };
        let watermark = match store.load_checkpoint(&key).await? {
            Some(checkpoint) => {
                let (state, _) = PartitionState::restore(&checkpoint.state)
                    .with_context(|| format!("the live checkpoint of {topic}/{partition}"))?;
                Some(state.watermark_for(def))
            }
            None => None,
        };
        out.insert(partition, watermark);
    }
    Ok(out)
}

/// Replays every partition's stream through its own state (keyed), one after the other,
/// each until it settled: a merge of one stream.
async fn replay_keyed(
    replayer: &Replayer<'_>,
    streams: Vec<PartitionStream<'_>>,
    aggregation: &Aggregation,
    report: &mut Report,
) -> anyhow::Result<BTreeMap<i32, Replay>> {
    let mut replays = BTreeMap::new();
    for stream in streams {
        let partition = stream.partition;
        let replay = replay_merged(replayer, vec![stream], aggregation, report).await?;
        replays.insert(partition, replay);
    }
    Ok(replays)
}

/// Replays the streams merged into one state (every partition's, for a repartitioned
/// aggregation; one, for a keyed one), in the order of ingest time, each partition's records
/// in offset order, until it settled.
async fn replay_merged(
    replayer: &Replayer<'_>,
    mut streams: Vec<PartitionStream<'_>>,
    aggregation: &Aggregation,
    report: &mut Report,
) -> anyhow::Result<Replay> {
    let topic = topics::raw(&replayer.def.name);
    let mut replay = Replay::new(streams.iter().map(|s| s.partition).collect());
    let mut heads = Vec::with_capacity(streams.len());
    for stream in &mut streams {
        heads.push(stream.next().await?.map(|r| (ingest_time(&r), r)));
    }
    let mut records = Vec::with_capacity(BATCH);
    loop {
        let next = heads
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.as_ref().map(|(t, _)| (*t, i)))
            .min();
        if let Some((_, i)) = next {
            let (_, record) = heads[i].take().context("the head record")?;
            records.push(raw_record(&topic, streams[i].partition, record));
            heads[i] = streams[i].next().await?.map(|r| (ingest_time(&r), r));
        }
        if records.len() >= BATCH || (next.is_none() && !records.is_empty()) {
            replayer.batch(&records, &mut replay, report).await?;
            records.clear();
            if replay.settled(&replayer.def, aggregation, replayer.range.end) {
                break;
            }
        }
        if next.is_none() {
            break;
        }
    }
    for stream in &streams {
        finish_stream(stream, report);
    }
    Ok(replay)
}

fn ingest_time(record: &instream_archiver::ArchivedRecord) -> i64 {
    instream_event::view(&record.bytes).map_or(i64::MIN, |e| e.ingest_time)
}

/// Adds what a stream read to the report.
fn finish_stream(stream: &PartitionStream<'_>, report: &mut Report) {
    report.files += stream.files_read;
    report.hours.extend(stream.hours.iter().cloned());
    report.gaps.extend(
        stream
            .gaps()
            .iter()
            .map(|g| format!("{}:{}-{}", stream.partition, g.first, g.last)),
    );
}

/// Replays, then writes (with `execute`) what both the replay and the live aggregator
/// closed. `def` is the pipeline's current definition.
pub async fn recompute(
    backends: &Backends,
    def: &PipelineDefinition,
    request: &Request,
) -> anyhow::Result<Report> {
    let (replay_def, aggregation) = replay_setup(backends, def, request).await?;
    let mut report = Report {
        pipeline: def.name.clone(),
        aggregation: aggregation.name.clone(),
        from: request.from,
        to: request.to,
        definition_version: replay_def.version,
        executed: request.execute,
        ..Report::default()
    };
    let replayer = Replayer {
        catalog: Catalog::new([replay_def.clone()]),
        def: replay_def.clone(),
        aggregation: &aggregation.name,
        refdata: &backends.refdata,
        range: request.from..request.to,
        idle_timeout: backends.repartition_idle_timeout,
    };
    let opened = open_streams(backends, def, request, &aggregation, &mut report).await?;
    let missing = opened.missing.clone();
    let first_hour = opened.first_hour.clone();
    let (replays, live) =
        replay_all(backends, &replayer, opened, &aggregation, &mut report).await?;
    report.hours.sort();
    report.hours.dedup();
    if live.values().all(Option::is_none) {
        report.notes.push(
            "no live aggregator checkpoint of this pipeline: windows are bounded by the \
             archive alone"
                .into(),
        );
    }
    let mut decided = decide(replays, &live, &replayer, &aggregation, &mut report);
    if !missing.is_empty() {
        report.notes.push(format!(
            "partitions {missing:?} have no archived record from {first_hour} on: windows the \
             replay does not make are not deleted"
        ));
        decided.settled_until = i64::MIN;
    }
    let stale = stale_windows(backends, def, request, &aggregation, &decided).await?;
    let writes = decided.writes;
    report.left_open_in_archive = decided.left_open.len() as u64;
    report.windows_rewritten = writes.len() as u64;
    report.events_in_rewritten = writes.iter().map(|w| w.count).sum();
    report.windows_deleted = stale.len() as u64;
    if aggregation.window.session_gap_millis().is_some() {
        report.notes.push(
            "session windows: a session open across --from is made again from --from's \
             events only; pick a --from the sessions were quiet at"
                .into(),
        );
    }
    if request.execute && !report.gaps.is_empty() && !request.accept_gaps {
        report.executed = false;
        report.notes.push(
            "nothing written: the archive has gaps in what was read (`instream archive \
             verify` for the cause; --accept-gaps writes windows short of them)"
                .into(),
        );
    }
    if report.executed {
        for chunk in writes.chunks(WRITE_ROWS) {
            backends.store.upsert(chunk).await?;
        }
        for chunk in stale.chunks(WRITE_ROWS) {
            backends.store.delete(chunk).await?;
        }
    }
    Ok(report)
}

/// The definition the replay runs (the current version, with `request.aggregation` only) and
/// that aggregation; the reference data's versions followed, so that data loaded by
/// `instream refdata load` (under its current version) is found.
async fn replay_setup(
    backends: &Backends,
    def: &PipelineDefinition,
    request: &Request,
) -> anyhow::Result<(PipelineDefinition, Aggregation)> {
    let replay_def = replay_definition(def, &request.aggregation);
    let Some(aggregation) = replay_def.aggregations.first().cloned() else {
        let names: Vec<&str> = def.aggregations.iter().map(|a| a.name.as_str()).collect();
        bail!(
            "pipeline `{}` has no aggregation `{}` in effect (it has: {})",
            def.name,
            request.aggregation,
            names.join(", ")
        );
    };
    let rules: Vec<(String, String)> = replay_def
        .enrichments
        .iter()
        .map(|r| (replay_def.name.clone(), r.name.clone()))
        .collect();
    backends
        .refdata
        .store()
        .track(&rules)
        .await
        .context("reading the reference data's versions")?;
    Ok((replay_def, aggregation))
}

/// Every partition's archive stream from the first hour that can hold an event of a window
/// starting at `from`.
struct Opened<'a> {
    streams: Vec<PartitionStream<'a>>,
    /// Partitions with no archived record from `first_hour` on.
    missing: Vec<i32>,
    first_hour: String,
    progress: instream_core::Progress,
    /// The pipeline's partition count now (that of its current definition).
    partitions: i32,
}

/// Lists the archive, opens a stream per partition from the first hour needed, and reports
/// what is missing before it.
async fn open_streams<'a>(
    backends: &'a Backends,
    def: &'a PipelineDefinition,
    request: &Request,
    aggregation: &Aggregation,
    report: &mut Report,
) -> anyhow::Result<Opened<'a>> {
    // The first event that can count in a window starting at `from` was accepted no
    // earlier than `max_time_ahead` before it (and moves the watermark from a second
    // before: WATERMARK_AHEAD_OF_INGEST_MILLIS); by event time, it is in `from`'s hour.
    let start = request
        .from
        .saturating_sub(def.max_time_ahead.as_millis() as i64)
        .saturating_sub(instream_aggregator::WATERMARK_AHEAD_OF_INGEST_MILLIS);
    let first_hour = hour_name(start);
    let all = stream::partition_files(backends.archive.as_ref(), &def.name, |_| true).await?;
    let (files, before) = split_at_hour(all, &first_hour);
    let total = files.values().map(|f| f.len() as u64).sum();
    if total == 0 && request.execute {
        bail!(
            "the archive of `{}` has no file from {first_hour} on: nothing to recompute from",
            def.name
        );
    }
    let progress = if request.progress {
        instream_core::Progress::on_stderr("archive recompute", "files", Some(total))
    } else {
        instream_core::Progress::silent()
    };
    let missing: Vec<i32> = (0..def.partitions)
        .filter(|p| !files.contains_key(p))
        .collect();
    if aggregation.repartitioned() {
        // Every partition feeds every group: one without records makes every window short.
        report.gaps.extend(
            missing
                .iter()
                .map(|p| format!("{p}:no archived record from {first_hour} on")),
        );
    }
    let mut streams = Vec::new();
    for (partition, files) in files {
        let head = files.first().map_or(0, |f| f.first);
        let earlier = before
            .get(&partition)
            .map(Vec::as_slice)
            .unwrap_or_default();
        // Straggler files in an earlier hour's folder answer for offsets inside the span read;
        // the one just before it shows that the span starts where the archive goes on.
        if head > 0 && !earlier.iter().any(|f| f.first < head && f.last >= head - 1) {
            report.gaps.push(format!(
                "{partition}:..-{} (no file ends right before the first one read)",
                head - 1
            ));
        }
        let mut stream = PartitionStream::new(
            backends.archive.as_ref(),
            &def.name,
            files,
            progress.clone(),
        );
        stream.also_covered(earlier.iter().filter(|f| f.last >= head).map(|f| {
            instream_archiver::OffsetRange {
                first: f.first.max(head),
                last: f.last,
            }
        }));
        streams.push(stream);
    }
    Ok(Opened {
        streams,
        missing,
        first_hour,
        progress,
        partitions: def.partitions,
    })
}

/// The replays (per raw partition; one, under key 0, for a repartitioned aggregation) and,
/// beside each, the live aggregator's watermark of what it replays (`None`: no checkpoint).
async fn replay_all(
    backends: &Backends,
    replayer: &Replayer<'_>,
    opened: Opened<'_>,
    aggregation: &Aggregation,
    report: &mut Report,
) -> anyhow::Result<(BTreeMap<i32, Replay>, BTreeMap<i32, Option<i64>>)> {
    let def = &replayer.def;
    let partitions = opened.partitions;
    let live_marks = |topic: String| async move {
        live_watermarks(
            backends.store.as_ref(),
            &backends.aggregator_group,
            &topic,
            partitions,
            def,
        )
        .await
    };
    let replayed = if aggregation.repartitioned() {
        let replay = replay_merged(replayer, opened.streams, aggregation, report).await?;
        let marks = live_marks(topics::repartition(&def.name, &aggregation.name)).await?;
        // Every group's owner is one of these partitions: the slowest bounds them all (one
        // without a checkpoint, beside others that have one, has closed nothing).
        let slowest = (!marks.values().all(Option::is_none))
            .then(|| marks.values().map(|m| m.unwrap_or(i64::MIN)).min())
            .flatten();
        (
            BTreeMap::from([(0, replay)]),
            BTreeMap::from([(0, slowest)]),
        )
    } else {
        let replays = replay_keyed(replayer, opened.streams, aggregation, report).await?;
        let mut marks = live_marks(topics::enriched(&def.name)).await?;
        // A partition without a checkpoint beside others that have one has closed nothing.
        if marks.values().any(Option::is_some) {
            for mark in marks.values_mut() {
                mark.get_or_insert(i64::MIN);
            }
        }
        (replays, marks)
    };
    opened.progress.finish();
    Ok(replayed)
}

/// What the replays decided: the windows to write, those the archive leaves open, and the
/// time up to which every replay (and the live aggregator beside it) settled everything.
struct Decided {
    writes: Vec<WindowAggregate>,
    left_open: std::collections::HashSet<(String, i64)>,
    settled_until: i64,
}

/// Takes from each replay the windows it closed that the live aggregator closed too (the
/// others are left to it, and counted), and those still open at its end.
fn decide(
    replays: BTreeMap<i32, Replay>,
    live: &BTreeMap<i32, Option<i64>>,
    replayer: &Replayer<'_>,
    aggregation: &Aggregation,
    report: &mut Report,
) -> Decided {
    let replay_def = &replayer.def;
    let lateness = aggregation.allowed_lateness.as_millis() as i64;
    let mut decided = Decided {
        writes: Vec::new(),
        left_open: Default::default(),
        settled_until: i64::MAX,
    };
    for (partition, mut replay) in replays {
        let live_mark = live.get(&partition).copied().flatten();
        let replay_mark = replay.state.watermark_for(replay_def);
        decided.settled_until = decided
            .settled_until
            .min(live_mark.map_or(replay_mark, |l| l.min(replay_mark)));
        for (key, row) in replay.taken.drain() {
            let closes_at = row.window_end.saturating_add(lateness);
            if !row.is_final {
                decided.left_open.insert(key);
            } else if live_mark.is_some_and(|l| closes_at > l) {
                report.left_to_live += 1;
            } else {
                decided.writes.push(row);
            }
        }
        // Open at the end of the replay: still in the state, never taken.
        let mut open = Vec::new();
        replay
            .state
            .take_dirty(|_| Some(replay_def), true, &mut open);
        decided.left_open.extend(
            open.into_iter()
                .filter(|r| replayer.range.contains(&r.window_start))
                .map(|r| (r.group_key, r.window_start)),
        );
    }
    decided
}

/// The windows of the aggregation in the range that the store holds and the replay does not
/// make (another shape, a group that no longer exists), where every replay settled.
async fn stale_windows(
    backends: &Backends,
    def: &PipelineDefinition,
    request: &Request,
    aggregation: &Aggregation,
    decided: &Decided,
) -> anyhow::Result<Vec<WindowAggregate>> {
    let lateness = aggregation.allowed_lateness.as_millis() as i64;
    let written: std::collections::HashSet<(String, i64)> = decided
        .writes
        .iter()
        .map(|r| (r.group_key.clone(), r.window_start))
        .collect();
    Ok(backends
        .store
        .windows_between(&def.name, &aggregation.name, request.from, request.to)
        .await?
        .into_iter()
        .filter(|w| !written.contains(&(w.group_key.clone(), w.window_start)))
        .filter(|w| {
            !decided
                .left_open
                .contains(&(w.group_key.clone(), w.window_start))
        })
        .filter(|w| w.window_end.saturating_add(lateness) <= decided.settled_until)
        .collect())
}

/// The command: the config's backends, the current definition, the replay, the report.
pub async fn run(
    config: Option<&std::path::Path>,
    request: &Request,
    output: crate::output::Output,
) -> anyhow::Result<()> {
    if request.to <= request.from {
        bail!("--to must be after --from");
    }
    // The archive of a standalone's last run, whether it runs or not.
    let config = crate::standalone::state::cli_config(config, false)?;
    let def = crate::control::current_catalog(&config)
        .await?
        .get(&request.pipeline)
        .cloned()
        .with_context(|| format!("no pipeline `{}` is defined", request.pipeline))?;
    let backends = backends(&config).await?;
    let report = recompute(&backends, &def, request).await?;
    match output {
        crate::output::Output::Json => crate::output::emit_json(&serde_json::to_value(&report)?)?,
        crate::output::Output::Table => crate::output::emit(&as_text(&report))?,
    }
    if request.execute && !report.gaps.is_empty() && !request.accept_gaps {
        bail!(
            "the archive of `{}` has offsets in no file within the range read ({}); nothing \
             written",
            report.pipeline,
            report.gaps.join(" ")
        );
    }
    Ok(())
}

fn as_text(report: &Report) -> String {
    let time = instream_event::format_rfc3339_millis;
    let mut text = format!(
        "{} windows of `{}`.`{}` starting in [{}, {}), under definition version {}\n",
        match (report.executed, report.gaps.is_empty()) {
            (true, _) => "Recomputed",
            (false, true) => "Would recompute (dry run; --execute writes)",
            (false, false) => "Would recompute, but for the gaps below,",
        },
        report.pipeline,
        report.aggregation,
        time(report.from),
        time(report.to),
        report.definition_version,
    );
    let hours = match (report.hours.first(), report.hours.last()) {
        (Some(first), Some(last)) => format!("{first} to {last}"),
        _ => "none".into(),
    };
    text.push_str(&format!(
        "read: {} files, {} records, {} archive hours ({hours})\n",
        report.files,
        report.records,
        report.hours.len()
    ));
    let outcomes: Vec<String> = report
        .outcomes
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    text.push_str(&format!("records: {}\n", outcomes.join(", ")));
    let verb = |done: &'static str, would: &'static str| if report.executed { done } else { would };
    text.push_str(&format!(
        "windows {}: {} ({} events); {}: {}\n",
        verb("rewritten", "to rewrite"),
        report.windows_rewritten,
        report.events_in_rewritten,
        verb(
            "deleted (another shape, or no longer made)",
            "to delete (another shape, or no longer made)"
        ),
        report.windows_deleted
    ));
    text.push_str(&format!(
        "windows left: {} still open in the live aggregator, {} the archive cannot close yet\n",
        report.left_to_live, report.left_open_in_archive
    ));
    if !report.gaps.is_empty() {
        text.push_str(&format!(
            "GAPS (partition:offsets in no archive file): {}\n",
            report.gaps.join(" ")
        ));
    }
    for note in &report.notes {
        text.push_str(&format!("note: {note}\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use instream_archive::LocalArchive;
    use instream_pipeline::ArchiveFormat;
    use instream_refdata::MemoryRefStore;
    use instream_store::{Checkpoint, EmbeddedStore};

    use super::*;

    /// 2024-05-01T12:00:00Z.
    const T0: i64 = 1_714_564_800_000;
    const MINUTE: i64 = 60_000;

    fn definition() -> PipelineDefinition {
        definition_with(1, r#"["key", "enrichment.region"]"#, "ingest_time")
    }

    fn definition_with(partitions: i32, group_by: &str, layout: &str) -> PipelineDefinition {
        instream_pipeline::parse_document(&format!(
            r#"
[[pipelines]]
name = "p"
key_field = "k"
time_field = "t"
partitions = {partitions}
max_out_of_orderness = "1m"
archive = {{ partition_by = "{layout}" }}
[[pipelines.enrichments]]
name = "customer"
key_template = "customer:{{k}}"
fields = {{ region = "region" }}
[[pipelines.aggregations]]
name = "per_region"
group_by = {group_by}
window = {{ kind = "tumbling", size = "1m" }}
allowed_lateness = "1m"
"#
        ))
        .unwrap()
        .pipelines
        .remove(0)
    }

    /// The event a test may archive late: ingested after all the others.
    const LATE: i64 = 100;
    /// Event 5 again, redriven from the dead letters a day later: beyond the live horizon.
    const REDRIVEN: i64 = 10_000;

    /// Event `i`: customer `c<i mod 2>`, at T0 plus `i` seconds (ingested then too, but for
    /// [`LATE`]: at T0 + 10m; and see [`REDRIVEN`]).
    fn event(i: i64) -> Vec<u8> {
        let (i, ingest) = match i {
            LATE => (i, 600),
            REDRIVEN => (5, 86_400),
            i => (i, i),
        };
        instream_event::encode(&instream_event::Event {
            event_id: format!("e{i}"),
            pipeline: "p".into(),
            key: format!("c{}", i % 2),
            event_time: T0 + i * 1000,
            ingest_time: T0 + ingest * 1000,
            headers: Default::default(),
            payload: serde_json::value::RawValue::from_string(format!(r#"{{"k":"c{}"}}"#, i % 2))
                .unwrap(),
            enrichment: None,
        })
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        backends: Backends,
        refdata: Arc<MemoryRefStore>,
    }

    /// Archives `events` (raw topic partition, offset, event index), in files of `per_file`
    /// records of one partition, under the hour folder `folder` gives an event index.
    async fn archived(
        archive: &LocalArchive,
        events: &[(i32, i64, i64)],
        per_file: usize,
        folder: impl Fn(i64) -> String,
    ) {
        for file in events.chunks(per_file) {
            let mut w = instream_archiver::FileWriter::new(ArchiveFormat::Parquet, &[], 1).unwrap();
            for &(_, offset, i) in file {
                let raw = event(i);
                w.append(offset, &raw, &instream_event::decode(&raw).unwrap())
                    .unwrap();
            }
            let (partition, first, i) = file[0];
            let last = file[file.len() - 1].1;
            let name = instream_archiver::file_name(ArchiveFormat::Parquet, partition, first, last);
            archive
                .put(
                    &format!("p/{}/{name}", folder(i)),
                    Bytes::from(w.finish().unwrap()),
                )
                .await
                .unwrap();
        }
    }

    /// Events 0..600 (ten minutes), then event 5 redriven a day later, archived as one
    /// Parquet file; customer c0 in region `north`, c1 in `south`.
    async fn fixture() -> Fixture {
        let events: Vec<(i32, i64, i64)> = (0..600)
            .map(|i| (0, i, i))
            .chain([(0, 600, REDRIVEN)])
            .collect();
        fixture_of(&events, 601, |_| "dt=2024-05-01/hour=12".into()).await
    }

    async fn fixture_of(
        events: &[(i32, i64, i64)],
        per_file: usize,
        folder: impl Fn(i64) -> String,
    ) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let archive = LocalArchive::new(dir.path());
        archived(&archive, events, per_file, folder).await;
        let refdata = Arc::new(MemoryRefStore::default());
        for (customer, region) in [("c0", "north"), ("c1", "south")] {
            refdata.insert(
                format!("customer:{customer}"),
                serde_json::json!({ "region": region })
                    .as_object()
                    .cloned()
                    .unwrap(),
            );
        }
        let cached = CachedRefStore::new(
            refdata.clone(),
            &instream_refdata::CacheSettings {
                max_bytes: 0,
                ttl: Duration::ZERO,
                negative_ttl: Duration::ZERO,
            },
        );
        Fixture {
            _dir: dir,
            backends: Backends {
                archive: Arc::new(archive),
                refdata: Arc::new(cached),
                store: Arc::new(EmbeddedStore::default()),
                aggregator_group: "instream-aggregator".into(),
                repartition_idle_timeout: Duration::from_secs(30),
            },
            refdata,
        }
    }

    #[tokio::test]
    async fn partitions_merged_for_a_repartitioned_aggregation_and_an_event_time_layout() {
        // Two partitions (c0's events on 0, c1's on 1), files of 50 records, and one late
        // event of c0 (index 100, 1m40s) archived after the others of its partition: in an
        // event-time layout it lands in an earlier hour folder than records before it.
        let mut events: Vec<(i32, i64, i64)> = Vec::new();
        let mut next = [0i64; 2];
        for i in (0..600).filter(|i| *i != LATE).chain([LATE]) {
            let p = (i % 2) as usize;
            events.push((p as i32, next[p], i));
            next[p] += 1;
        }
        events.sort_by_key(|(p, o, _)| (*p, *o));
        // The folder by event time: minutes 0-4 in hour 12, the rest in hour 13 (a layout
        // that puts minutes in hours, to make the late event's folder the earlier one).
        let f = fixture_of(&events, 50, |i| {
            format!("dt=2024-05-01/hour={}", if i < 300 { 12 } else { 13 })
        })
        .await;
        for (group_by, expected_groups) in [(r#"["enrichment.region"]"#, 2), (r#"["key"]"#, 2)] {
            let def = definition_with(2, group_by, "event_time");
            let report = recompute(&f.backends, &def, &request(true)).await.unwrap();
            // The late event came after the watermark passed its window's close (plus a
            // minute of lateness) in both partitions' order: too late, as live.
            assert_eq!(
                report.outcomes.get("too_late"),
                Some(&1),
                "{group_by}: {report:?}"
            );
            assert_eq!(
                report.outcomes.get("counted"),
                Some(&599),
                "{group_by}: {report:?}"
            );
            assert_eq!(
                report.windows_rewritten,
                7 * expected_groups,
                "{group_by}: {report:?}"
            );
            let got = windows(&f.backends).await;
            let minute_one: i64 = got
                .iter()
                .filter(|((_, start), _)| *start == T0 + MINUTE)
                .map(|(_, n)| n)
                .sum();
            assert_eq!(
                minute_one, 59,
                "{group_by}: the late event is not in its window"
            );
            f.backends
                .store
                .delete(
                    &f.backends
                        .store
                        .windows_between("p", "per_region", T0, T0 + 3_600_000)
                        .await
                        .unwrap(),
                )
                .await
                .unwrap();
        }
    }

    fn request(execute: bool) -> Request {
        Request {
            pipeline: "p".into(),
            aggregation: "per_region".into(),
            from: T0,
            to: T0 + 3_600_000,
            execute,
            accept_gaps: false,
            progress: false,
        }
    }

    async fn windows(backends: &Backends) -> BTreeMap<(String, i64), i64> {
        backends
            .store
            .windows_between("p", "per_region", T0, T0 + 3_600_000)
            .await
            .unwrap()
            .into_iter()
            .map(|w| {
                assert!(w.is_final);
                ((w.group_key, w.window_start), w.count)
            })
            .collect()
    }

    #[tokio::test]
    async fn reference_data_fixed_after_a_bad_load_regroups_the_windows_it_made() {
        let f = fixture().await;
        let def = definition();
        let report = recompute(&f.backends, &def, &request(true)).await.unwrap();
        // Ten minutes of two customers. The replay's watermark ends a minute behind the last
        // event (T0 + 8m59s): with a minute of lateness, seven minutes are final, three not.
        assert_eq!(report.windows_rewritten, 14, "{report:?}");
        assert_eq!(report.left_open_in_archive, 6);
        assert_eq!(report.outcomes.get("counted"), Some(&600));
        // Archived twice with one id, a day apart: counted once.
        assert_eq!(report.outcomes.get("repeated_event"), Some(&1));
        let north = r#"["c0","north"]"#.to_owned();
        assert_eq!(
            windows(&f.backends).await.get(&(north.clone(), T0)),
            Some(&30)
        );

        // c0 moves to `east`: its windows are made again under the new group, and those
        // under the old one (a shape the replay no longer makes) go.
        f.refdata.insert(
            "customer:c0".into(),
            serde_json::json!({ "region": "east" })
                .as_object()
                .cloned()
                .unwrap(),
        );
        let dry = recompute(&f.backends, &def, &request(false)).await.unwrap();
        assert_eq!((dry.windows_rewritten, dry.windows_deleted), (14, 7));
        assert_eq!(
            windows(&f.backends).await.get(&(north.clone(), T0)),
            Some(&30)
        );
        let done = recompute(&f.backends, &def, &request(true)).await.unwrap();
        assert_eq!((done.windows_rewritten, done.windows_deleted), (14, 7));
        let after = windows(&f.backends).await;
        assert_eq!(after.get(&(north, T0)), None);
        assert_eq!(after.get(&(r#"["c0","east"]"#.to_owned(), T0)), Some(&30));
        assert_eq!(after.len(), 14);
    }

    #[tokio::test]
    async fn windows_still_open_in_the_live_aggregator_are_left_to_it() {
        let f = fixture().await;
        let def = definition();
        // The live aggregator's checkpoint: it has read up to T0 + 4m30s, so its watermark
        // (a minute behind) has closed, with a minute of lateness, the first two minutes
        // only.
        let mut live = PartitionState::default();
        let raw = event(270);
        let at = instream_event::decode(&raw).unwrap();
        live.apply(270, &at, None, &def, Duration::from_secs(600));
        let (next_offset, state) = live.snapshot().unwrap();
        f.backends
            .store
            .save_checkpoints(&[Checkpoint {
                key: CheckpointKey {
                    group: "instream-aggregator".into(),
                    topic: "p.enriched".into(),
                    partition: 0,
                },
                next_offset,
                state,
            }])
            .await
            .unwrap();
        let report = recompute(&f.backends, &def, &request(true)).await.unwrap();
        assert_eq!(report.windows_rewritten, 4, "{report:?}");
        assert_eq!(report.left_to_live, 10);
        assert_eq!(report.left_open_in_archive, 6);
        let starts: std::collections::BTreeSet<i64> =
            windows(&f.backends).await.keys().map(|(_, s)| *s).collect();
        assert_eq!(starts, [T0, T0 + MINUTE].into());
    }

    #[tokio::test]
    async fn offsets_in_no_file_are_named_and_nothing_is_written() {
        let events: Vec<(i32, i64, i64)> = (0..600).map(|i| (0, i, i)).collect();
        let f = fixture_of(&events, 100, |_| "dt=2024-05-01/hour=12".into()).await;
        let file = |first: i64, last: i64| {
            format!(
                "p/dt=2024-05-01/hour=12/{}",
                instream_archiver::file_name(ArchiveFormat::Parquet, 0, first, last)
            )
        };
        f.backends.archive.delete(&file(200, 299)).await.unwrap();
        let report = recompute(&f.backends, &definition(), &request(true))
            .await
            .unwrap();
        assert_eq!(report.gaps, ["0:200-299"]);
        assert!(!report.executed);
        assert!(
            report.windows_rewritten > 0,
            "what it would write: {report:?}"
        );
        assert!(windows(&f.backends).await.is_empty(), "nothing written");
        // The start of the range missing: no file ends right before the first one read.
        f.backends.archive.delete(&file(0, 99)).await.unwrap();
        let report = recompute(&f.backends, &definition(), &request(true))
            .await
            .unwrap();
        assert_eq!(report.gaps.len(), 2, "{:?}", report.gaps);
        assert!(report.gaps[0].starts_with("0:..-99"), "{:?}", report.gaps);
        // Accepted: written, short of them.
        let mut accepted = request(true);
        accepted.accept_gaps = true;
        let report = recompute(&f.backends, &definition(), &accepted)
            .await
            .unwrap();
        assert!(report.executed && report.windows_rewritten > 0);
    }

    #[tokio::test]
    async fn a_partition_gone_quiet_stops_holding_a_merged_replay_back() {
        // c1 (partition 1) sends for two minutes only; c0 (partition 0) for ten.
        let mut events: Vec<(i32, i64, i64)> = Vec::new();
        let mut next = [0i64; 2];
        for i in (0..600).filter(|i| i % 2 == 0 || *i < 120) {
            let p = (i % 2) as usize;
            events.push((p as i32, next[p], i));
            next[p] += 1;
        }
        events.sort_by_key(|(p, o, _)| (*p, *o));
        let f = fixture_of(&events, 50, |_| "dt=2024-05-01/hour=12".into()).await;
        let def = definition_with(2, r#"["enrichment.region"]"#, "ingest_time");
        let report = recompute(&f.backends, &def, &request(true)).await.unwrap();
        // Partition 1 goes idle 30 s (of ingest time) after its last event: the watermark
        // follows partition 0 on, and seven of north's minutes and south's two are final.
        assert_eq!(report.windows_rewritten, 9, "{report:?}");
        assert_eq!(report.outcomes.get("too_late"), None, "{report:?}");
    }

    #[tokio::test]
    async fn an_aggregation_the_pipeline_does_not_have_is_named_with_those_it_has() {
        let f = fixture().await;
        let mut asked = request(false);
        asked.aggregation = "per_city".into();
        let error = recompute(&f.backends, &definition(), &asked)
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "pipeline `p` has no aggregation `per_city` in effect (it has: per_region)"
        );
    }
}
