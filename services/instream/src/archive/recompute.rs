//! `instream archive recompute`: one aggregation's windows rebuilt from the archived raw
//! events, enriched with the reference data as it is now, and written whole over what the
//! store holds (docs/operations.md, "Recomputing from the archive").
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
use instream_archive::{Archive, ArchivedFile};
use instream_core::config::{BrokerMode, Config, StoreBackend};
use instream_enricher::transform::{self, Outcomes, Output, Quality};
use instream_kafka::Record;
use instream_pipeline::{topics, Aggregation, Catalog, PipelineDefinition};
use instream_refdata::CachedRefStore;
use instream_store::{AggregateStore, CheckpointKey, WindowAggregate};
use serde::Serialize;

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
    pub notes: Vec<String>,
}

/// The backends a recompute reads and writes.
pub struct Backends {
    pub archive: Arc<dyn Archive>,
    pub refdata: Arc<CachedRefStore>,
    pub store: Arc<dyn AggregateStore>,
    /// The live aggregator's consumer group (its checkpoints' key).
    pub aggregator_group: String,
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
    })
}

/// The definition the replay runs: the current version alone (every window made by it),
/// with only the aggregation asked for.
fn replay_definition(def: &PipelineDefinition, aggregation: &str) -> PipelineDefinition {
    let mut replay = def.clone();
    replay.previous.clear();
    replay.effective_from = None;
    replay.aggregations.retain(|a| a.name == aggregation);
    replay
}

/// A replay state and what it has given so far.
struct Replay {
    state: PartitionState,
    /// Closed windows taken from the state, by (group, start): the last value wins.
    taken: HashMap<(String, i64), WindowAggregate>,
}

impl Replay {
    fn new() -> Self {
        Replay {
            state: PartitionState::default(),
            taken: HashMap::new(),
        }
    }

    /// Moves the windows the watermark closed out of the state.
    fn collect(&mut self, def: &PipelineDefinition) {
        let mut rows = Vec::new();
        self.state.take_dirty(|_| Some(def), false, &mut rows);
        self.state.take_written_closes();
        self.state.close_windows(|_| Some(def.max_out_of_orderness));
        for row in rows {
            self.taken
                .insert((row.group_key.clone(), row.window_start), row);
        }
    }

    /// Whether nothing in `[.., to)` can change any more: the watermark passed the latest
    /// close of a window starting before `to`, and no such window is still open.
    fn settled(&self, def: &PipelineDefinition, aggregation: &Aggregation, to: i64) -> bool {
        let last_close = aggregation
            .window
            .closes_at(to, aggregation.allowed_lateness);
        self.state.watermark_for(def) >= last_close
    }
}

/// The archive's files of `pipeline` from the hour holding `start` on, grouped by hour
/// folder (`YYYY-MM-DDTHH`, in order); in each, by partition and first offset.
async fn files_from(
    archive: &dyn Archive,
    pipeline: &str,
    start: i64,
) -> anyhow::Result<BTreeMap<String, Vec<(i32, i64, ArchivedFile)>>> {
    let first_hour = hour_name(start);
    let mut hours: BTreeMap<String, Vec<(i32, i64, ArchivedFile)>> = BTreeMap::new();
    for file in archive.list(pipeline).await? {
        let (Some((partition, first, _)), Some(hour)) = (
            instream_archiver::parse_file_name(&file.path),
            instream_archiver::hour_of(&file.path),
        ) else {
            continue;
        };
        if hour >= first_hour {
            hours
                .entry(hour)
                .or_default()
                .push((partition, first, file));
        }
    }
    for files in hours.values_mut() {
        files.sort_by_key(|(p, first, _)| (*p, *first));
    }
    Ok(hours)
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
        };
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
                        let outcome = replay.state.apply_in(
                            scope,
                            record.offset,
                            &event,
                            None,
                            &self.def,
                            WHOLE_REPLAY,
                        );
                        match outcome {
                            Outcome::Counted => "counted".into(),
                            Outcome::TooLate(_) => "too_late".into(),
                            Outcome::RepeatedEvent => "repeated_event".into(),
                            Outcome::TooFarAhead => "future_time".into(),
                            // No origin, and offsets only increase: neither happens.
                            Outcome::RepeatedOrigin | Outcome::AlreadyApplied => "repeated".into(),
                        }
                    }
                };
                *report.outcomes.entry(outcome).or_default() += 1;
            }
        }
        replay.collect(&self.def);
        Ok(())
    }
}

/// The records of one archive file as the raw topic's records.
async fn read_file(
    archive: &dyn Archive,
    pipeline: &str,
    partition: i32,
    first: i64,
    file: &ArchivedFile,
) -> anyhow::Result<Vec<Record>> {
    let data = archive.get(&file.path).await?;
    let records = instream_archiver::read_records(&file.path, data, first, pipeline)
        .with_context(|| format!("reading {}", file.path))?;
    let topic = topics::raw(pipeline);
    Ok(records
        .into_iter()
        .map(|r| Record {
            topic: topic.clone(),
            partition,
            offset: r.offset,
            key: None,
            payload: r.bytes,
            headers: Vec::new(),
            generation: 0,
        })
        .collect())
}

/// The live aggregator's watermark for `topic`'s partitions, from its checkpoints: `None`
/// for a partition it has no checkpoint of.
async fn live_watermarks(
    store: &dyn AggregateStore,
    group: &str,
    topic: &str,
    partitions: i32,
    def: &PipelineDefinition,
) -> anyhow::Result<Vec<Option<i64>>> {
    let mut out = Vec::new();
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
        out.push(watermark);
    }
    Ok(out)
}

/// Replays, then writes (with `execute`) what both the replay and the live aggregator
/// closed. `def` is the pipeline's current definition.
pub async fn recompute(
    backends: &Backends,
    def: &PipelineDefinition,
    request: &Request,
) -> anyhow::Result<Report> {
    let Some(aggregation) = def
        .aggregations
        .iter()
        .find(|a| a.name == request.aggregation)
    else {
        let names: Vec<&str> = def.aggregations.iter().map(|a| a.name.as_str()).collect();
        bail!(
            "pipeline `{}` has no aggregation `{}` (it has: {})",
            def.name,
            request.aggregation,
            names.join(", ")
        );
    };
    let replay_def = replay_definition(def, &aggregation.name);
    let replayer = Replayer {
        catalog: Catalog::new([replay_def.clone()]),
        def: replay_def.clone(),
        aggregation: &aggregation.name,
        refdata: &backends.refdata,
    };
    let mut report = Report {
        pipeline: def.name.clone(),
        aggregation: aggregation.name.clone(),
        from: request.from,
        to: request.to,
        definition_version: def.version,
        executed: request.execute,
        ..Report::default()
    };
    // The first event that can count in a window starting at `from` was accepted no
    // earlier than `max_time_ahead` before it (and moves the watermark from a second
    // before: WATERMARK_AHEAD_OF_INGEST_MILLIS).
    let start = request
        .from
        .saturating_sub(def.max_time_ahead.as_millis() as i64)
        .saturating_sub(instream_aggregator::WATERMARK_AHEAD_OF_INGEST_MILLIS);
    let hours = files_from(backends.archive.as_ref(), &def.name, start).await?;
    let total = hours.values().map(|f| f.len() as u64).sum();
    let progress = if request.progress {
        instream_core::Progress::on_stderr("archive recompute", "files", Some(total))
    } else {
        instream_core::Progress::silent()
    };
    let repartitioned = aggregation.repartitioned();
    let partitions = usize::try_from(def.partitions.max(1)).unwrap_or(1);
    // Keyed: one state per partition, as live. Repartitioned: one state for every group.
    let mut replays: Vec<Replay> = (0..if repartitioned { 1 } else { partitions })
        .map(|_| Replay::new())
        .collect();
    for (hour, files) in hours {
        if replays
            .iter()
            .all(|r| r.settled(&replay_def, aggregation, request.to))
        {
            break;
        }
        report.hours.push(hour);
        let mut merged = Vec::new();
        let mut at = 0;
        while at < files.len() {
            // One partition's files of the hour, read in offset order.
            let partition = files[at].0;
            let mut records = Vec::new();
            while at < files.len() && files[at].0 == partition {
                let (_, first, file) = &files[at];
                records.extend(
                    read_file(
                        backends.archive.as_ref(),
                        &def.name,
                        partition,
                        *first,
                        file,
                    )
                    .await?,
                );
                report.files += 1;
                progress.add(1);
                at += 1;
            }
            records.sort_by_key(|r| r.offset);
            report.records += records.len() as u64;
            if repartitioned {
                merged.extend(records);
                continue;
            }
            let slot = usize::try_from(partition).unwrap_or(0) % partitions;
            replayer
                .batch(&records, &mut replays[slot], &mut report)
                .await?;
        }
        if repartitioned {
            // One repartition partition reads every enriched partition's records in about
            // the order they were accepted.
            merged.sort_by_cached_key(|r| {
                let ingest = instream_event::view(&r.payload).map_or(i64::MIN, |e| e.ingest_time);
                (ingest, r.partition, r.offset)
            });
            replayer
                .batch(&merged, &mut replays[0], &mut report)
                .await?;
        }
    }
    progress.finish();
    let live = if repartitioned {
        let topic = topics::repartition(&def.name, &aggregation.name);
        let marks = live_watermarks(
            backends.store.as_ref(),
            &backends.aggregator_group,
            &topic,
            def.partitions,
            def,
        )
        .await?;
        // Every group's owner is one of these partitions: the slowest bounds them all.
        let slowest = marks.iter().flatten().min().copied();
        vec![slowest]
    } else {
        live_watermarks(
            backends.store.as_ref(),
            &backends.aggregator_group,
            &topics::enriched(&def.name),
            def.partitions,
            def,
        )
        .await?
    };
    if live.iter().all(Option::is_none) {
        report.notes.push(
            "no live aggregator checkpoint of this pipeline: windows are bounded by the \
             archive alone"
                .into(),
        );
    }
    let lateness = aggregation.allowed_lateness.as_millis() as i64;
    let mut writes = Vec::new();
    // Up to where each replay (and the live aggregator beside it) has settled everything.
    let mut settled_until = i64::MAX;
    for (i, replay) in replays.iter_mut().enumerate() {
        let live_mark = live.get(i).copied().flatten();
        let replay_mark = replay.state.watermark_for(&replay_def);
        if replay.state.next_offset() > 0 {
            settled_until =
                settled_until.min(live_mark.map_or(replay_mark, |l| l.min(replay_mark)));
        }
        for (_, row) in replay.taken.drain() {
            if !(request.from..request.to).contains(&row.window_start) {
                continue;
            }
            let closes_at = row.window_end.saturating_add(lateness);
            if !row.is_final {
                report.left_open_in_archive += 1;
            } else if live_mark.is_some_and(|l| closes_at > l) {
                report.left_to_live += 1;
            } else {
                writes.push(row);
            }
        }
        // Open at the archive's end: still in the state, never taken.
        let mut open = Vec::new();
        replay
            .state
            .take_dirty(|_| Some(&replay_def), true, &mut open);
        report.left_open_in_archive += open
            .iter()
            .filter(|r| (request.from..request.to).contains(&r.window_start))
            .count() as u64;
    }
    if settled_until == i64::MAX {
        settled_until = i64::MIN;
    }
    let written: std::collections::HashSet<(String, i64)> = writes
        .iter()
        .map(|r| (r.group_key.clone(), r.window_start))
        .collect();
    let stale: Vec<WindowAggregate> = backends
        .store
        .windows_between(&def.name, &aggregation.name, request.from, request.to)
        .await?
        .into_iter()
        .filter(|w| !written.contains(&(w.group_key.clone(), w.window_start)))
        .filter(|w| w.window_end.saturating_add(lateness) <= settled_until)
        .collect();
    report.windows_rewritten = writes.len() as u64;
    report.events_in_rewritten = writes.iter().map(|w| w.count).sum();
    report.windows_deleted = stale.len() as u64;
    if request.execute {
        for chunk in writes.chunks(WRITE_ROWS) {
            backends.store.upsert(chunk).await?;
        }
        for chunk in stale.chunks(WRITE_ROWS) {
            backends.store.delete(chunk).await?;
        }
    }
    Ok(report)
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
    Ok(())
}

fn as_text(report: &Report) -> String {
    let time = instream_event::format_rfc3339_millis;
    let mut text = format!(
        "{} windows of `{}`.`{}` starting in [{}, {}), under definition version {}\n",
        if report.executed {
            "Recomputed"
        } else {
            "Would recompute (dry run; --execute writes)"
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
        instream_pipeline::parse_document(
            r#"
[[pipelines]]
name = "p"
key_field = "k"
time_field = "t"
partitions = 1
max_out_of_orderness = "1m"
[[pipelines.enrichments]]
name = "customer"
key_template = "customer:{k}"
fields = { region = "region" }
[[pipelines.aggregations]]
name = "per_region"
group_by = ["key", "enrichment.region"]
window = { kind = "tumbling", size = "1m" }
allowed_lateness = "1m"
"#,
        )
        .unwrap()
        .pipelines
        .remove(0)
    }

    /// Event `i`: customer `c<i mod 2>`, at T0 plus `i` seconds (ingested then too).
    fn event(i: i64) -> Vec<u8> {
        instream_event::encode(&instream_event::Event {
            event_id: format!("e{i}"),
            pipeline: "p".into(),
            key: format!("c{}", i % 2),
            event_time: T0 + i * 1000,
            ingest_time: T0 + i * 1000,
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

    /// Events 0..600 (ten minutes) archived as one Parquet file; customer c0 in region
    /// `north`, c1 in `south`.
    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let archive = LocalArchive::new(dir.path());
        let mut w = instream_archiver::FileWriter::new(ArchiveFormat::Parquet, &[], 1).unwrap();
        for i in 0..600 {
            let raw = event(i);
            w.append(i, &raw, &instream_event::decode(&raw).unwrap())
                .unwrap();
        }
        let path = format!(
            "p/dt=2024-05-01/hour=12/{}",
            instream_archiver::file_name(ArchiveFormat::Parquet, 0, 0, 599)
        );
        archive
            .put(&path, Bytes::from(w.finish().unwrap()))
            .await
            .unwrap();
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
            },
            refdata,
        }
    }

    fn request(execute: bool) -> Request {
        Request {
            pipeline: "p".into(),
            aggregation: "per_region".into(),
            from: T0,
            to: T0 + 3_600_000,
            execute,
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
            "pipeline `p` has no aggregation `per_city` (it has: per_region)"
        );
    }
}
