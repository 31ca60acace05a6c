//! instream-archiver: `<pipeline>.raw` in, time-partitioned files out (zstd JSON lines or
//! Parquet, per pipeline), on HDFS or a local directory (the [`Archive`] trait).
//!
//! Each partition's records go to one open file at a time, named by partition and offset
//! range: `<pipeline>/dt=YYYY-MM-DD/hour=HH/part-<partition>-<first>-<last>.<ext>`. A file
//! is rolled by size, record count, age and at hour boundaries; it is written under a
//! temporary name and renamed whole (`Archive::put`), and only then are its offsets
//! committed. After a crash, records at or below the highest offset already archived for
//! their partition are skipped, so no offset is written twice even when the commit after a
//! rename was lost. A record that cannot be decoded goes to the dead-letter topic and its
//! offset into the open file's range (not its rows), so the ranges of a partition's files
//! still meet end to end: [`verify`] checks exactly that.

pub mod format;
mod layout;
mod retention;
mod verify;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use instream_archive::Archive;
use instream_core::config::ArchiverConfig;
use instream_core::{GaveUp, Readiness, Retry, Service};
use instream_kafka::{BatchOutputs, DeadLetterCode, DeadLetters, Input, Record};
use instream_pipeline::{topics, ArchiveFormat, ArchiveTime, Catalog};
use instream_stage::ServiceContext;
use instream_stage::{Commit, Flow, Hooks, Processed, ResumeAt, Spec, Stage, Tick};
use tokio_util::sync::CancellationToken;

pub use format::{
    read_records, ArchivedRecord, FileRecords, FileWriter, FormatError, OffsetRange, Runs,
};
pub use layout::{file_name, folder, hour_of, parse_file_name};
pub use retention::{retention_pass, run_retention, RETENTION_DUTY};
pub use verify::{verify, FileProblem, PartitionReport, VerifyReport};

const SERVICE: Service = Service::Archiver;

/// How long after the consumer's last poll file writes may go on (each write, and its
/// retries). The consumer is not polled meanwhile, so this stays well inside librdkafka's
/// `max.poll.interval.ms` (5 min): past it the group would hand the partition to another
/// instance while this one still writes.
const WRITE_RETRY_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ArchiverError {
    #[error(transparent)]
    Kafka(#[from] instream_kafka::KafkaError),
    #[error(transparent)]
    Archive(#[from] instream_archive::ArchiveError),
    #[error(transparent)]
    Stage(#[from] instream_stage::StageError),
    #[error("encoding an archive file: {0}")]
    Format(#[from] FormatError),
    #[error(transparent)]
    Coord(#[from] instream_coord::CoordError),
    #[error("`{path}` could not be written for {waited:?} ({error}); stopping before the consumer group moves the partition")]
    Unwritable {
        path: String,
        waited: Duration,
        error: instream_archive::ArchiveError,
    },
}

type PartitionKey = (String, i32);

/// The file being filled for one partition.
struct OpenFile {
    folder: String,
    hour_start: i64,
    partition: i32,
    format: ArchiveFormat,
    /// Every offset the file answers for: its records', and dead letters' in between.
    offsets: Vec<i64>,
    records: u64,
    writer: FileWriter,
    opened: Instant,
}

struct Archiver {
    archive: Arc<dyn Archive>,
    config: ArchiverConfig,
    ready: Readiness,
    files: HashMap<PartitionKey, OpenFile>,
    /// Highest offset already in the archive per partition, read on first sight of it.
    archived: HashMap<PartitionKey, i64>,
    /// Per pipeline, the highest archived offset of each partition: one listing of the
    /// archive per assignment, not one per partition.
    listed: HashMap<String, HashMap<i32, i64>>,
    generation: u64,
    /// When the consumer was last polled: file writes must end within `WRITE_RETRY_LIMIT` of it.
    polled_at: Instant,
    /// Partitions whose file could not be written before shutdown: nothing more is written
    /// for them by this process.
    abandoned: std::collections::HashSet<PartitionKey>,
    dead: DeadLetters,
    /// Dead letters sent since the last file was written: on the broker before any file
    /// (whose offsets include theirs) is, in one wait.
    outputs: BatchOutputs,
    /// Shutdown came while dead letters were unanswered: which files hold their offsets is
    /// not known any more, so no file is written by this process from then on.
    outputs_unconfirmed: bool,
    shutdown: CancellationToken,
}

/// Runs with the archive `config.archive` names.
pub async fn run(ctx: ServiceContext) -> Result<(), ArchiverError> {
    let archive = instream_archive::build(&ctx.config.archive)?;
    run_with_archive(ctx, archive).await
}

pub async fn run_with_archive(
    ctx: ServiceContext,
    archive: Arc<dyn Archive>,
) -> Result<(), ArchiverError> {
    // Registered before the first await, so /readyz cannot pass without it.
    let ready = ctx.health.register("archiver.archive");
    let stage = Stage::start(SERVICE, &ctx).await?;
    let config = &ctx.config;
    archive.ping().await?;
    if !config.archiver.retention.is_zero() {
        let leadership = ctx
            .coordinator
            .campaign(RETENTION_DUTY, &instream_coord::instance_name())
            .await?;
        ctx.tasks.spawn(
            "archive retention",
            run_retention(
                archive.clone(),
                stage.catalog.clone(),
                leadership,
                config.archiver.retention,
                config.archiver.retention_check_interval,
                ctx.shutdown.clone(),
            ),
        );
    }
    ready.set_ready();
    let mut archiver = Archiver {
        archive,
        config: config.archiver.clone(),
        ready,
        files: HashMap::new(),
        archived: HashMap::new(),
        listed: HashMap::new(),
        polled_at: Instant::now(),
        generation: 0,
        abandoned: Default::default(),
        dead: DeadLetters::from_config(&config.kafka, SERVICE)?,
        outputs: BatchOutputs::default(),
        outputs_unconfirmed: false,
        shutdown: ctx.shutdown.clone(),
    };
    let spec = Spec {
        topics_of: Catalog::raw_topics,
        batch_size: 10_000,
        commit: Commit::Offsets {
            interval: config.kafka.commit_interval,
        },
        // Raw topics are never written in transactions: every gap is records skipped.
        in_transactions: Box::new(|_| false),
    };
    stage.drive(spec, &mut archiver).await
}

#[async_trait::async_trait]
impl Hooks for Archiver {
    type Error = ArchiverError;

    fn receive_wait(&self) -> Duration {
        self.config.roll_max_age.min(Duration::from_secs(1))
    }

    fn rebalanced(&mut self, input: Input<'_>) {
        self.follow_generation(input.generation());
    }

    /// A partition resumes after its highest archived offset, even where the commit that
    /// followed the file was lost.
    async fn received(
        &mut self,
        input: Input<'_>,
        batch: &[Record],
        resume: &mut Vec<ResumeAt>,
    ) -> Result<Flow, ArchiverError> {
        self.polled_at = Instant::now();
        // The first generation too (the driver tells only changes): what is listed below
        // belongs to it.
        self.follow_generation(input.generation());
        let mut seen: Vec<(&str, i32)> = Vec::new();
        for record in batch {
            if !seen.contains(&(record.topic.as_str(), record.partition)) {
                seen.push((&record.topic, record.partition));
                let key = (record.topic.clone(), record.partition);
                let highest = self.highest_archived(&key).await?;
                if highest >= 0 {
                    resume.push(ResumeAt {
                        topic: key.0,
                        partition: key.1,
                        next: highest + 1,
                    });
                }
            }
        }
        Ok(Flow::Continue)
    }

    async fn process(
        &mut self,
        input: Input<'_>,
        catalog: &Arc<Catalog>,
        batch: &mut Vec<Record>,
    ) -> Result<Processed, ArchiverError> {
        let stop = self.shutdown.clone();
        for record in batch.drain(..) {
            self.add(catalog, input, record, &stop).await?;
        }
        Ok(Processed::Kept)
    }

    async fn tick(&mut self, input: Input<'_>, _: &Arc<Catalog>) -> Result<Tick, ArchiverError> {
        let stop = self.shutdown.clone();
        self.roll_aged(input, &stop).await?;
        Ok(Tick::Durable)
    }

    /// Closes every open file, so that the last commit covers what they hold.
    async fn drain(&mut self, input: Input<'_>, _: &Arc<Catalog>) -> Result<bool, ArchiverError> {
        let keys: Vec<PartitionKey> = self.files.keys().cloned().collect();
        for key in keys {
            self.roll(&key, "shutdown", input, &CancellationToken::new())
                .await?;
        }
        Ok(true)
    }
}

impl Archiver {
    /// After a rebalance, open files hold records of partitions we may have lost. Their
    /// offsets were never committed, so dropping them loses nothing; writing them could
    /// overlap the new owner's files.
    fn follow_generation(&mut self, generation: u64) {
        if generation != self.generation {
            self.files.clear();
            self.archived.clear();
            self.listed.clear();
            self.generation = generation;
            metrics::gauge!("instream_archive_open_files").set(0.0);
        }
    }

    /// The highest offset of the partition already in the archive. On first sight of a
    /// partition (at start, after a rebalance) this also removes its files left unfinished
    /// by a crash: only this partition's, as other instances write other partitions.
    async fn highest_archived(&mut self, key: &PartitionKey) -> Result<i64, ArchiverError> {
        if let Some(&max) = self.archived.get(key) {
            return Ok(max);
        }
        let pipeline = topics::pipeline_of(&key.0);
        let removed = self
            .archive
            .remove_leftovers(pipeline, &layout::partition_prefix(key.1))
            .await?;
        if removed > 0 {
            tracing::info!(%pipeline, partition = key.1, removed, "removed unfinished files of an earlier run");
        }
        if !self.listed.contains_key(pipeline) {
            let mut highest: HashMap<i32, i64> = HashMap::new();
            for (partition, _, last) in self
                .archive
                .list(pipeline)
                .await?
                .iter()
                .filter_map(|f| parse_file_name(&f.path))
            {
                let h = highest.entry(partition).or_insert(last);
                *h = (*h).max(last);
            }
            self.listed.insert(pipeline.to_owned(), highest);
        }
        let max = self.listed[pipeline].get(&key.1).copied().unwrap_or(-1);
        self.archived.insert(key.clone(), max);
        Ok(max)
    }

    fn open(
        &mut self,
        catalog: &Catalog,
        key: &PartitionKey,
        folder: String,
        hour_start: i64,
    ) -> Result<&mut OpenFile, ArchiverError> {
        if !self.files.contains_key(key) {
            let policy = catalog
                .get(topics::pipeline_of(&key.0))
                .map(|d| d.archive.clone())
                .unwrap_or_default();
            let writer = FileWriter::new(policy.format, &policy.columns, self.config.zstd_level)?;
            self.files.insert(
                key.clone(),
                OpenFile {
                    folder,
                    hour_start,
                    partition: key.1,
                    format: policy.format,
                    offsets: Vec::new(),
                    records: 0,
                    writer,
                    opened: Instant::now(),
                },
            );
            metrics::gauge!("instream_archive_open_files").set(self.files.len() as f64);
        }
        Ok(self.files.get_mut(key).expect("inserted above"))
    }

    async fn add(
        &mut self,
        catalog: &Catalog,
        input: Input<'_>,
        record: Record,
        stop: &CancellationToken,
    ) -> Result<(), ArchiverError> {
        let key: PartitionKey = (record.topic.clone(), record.partition);
        if self.abandoned.contains(&key) {
            // A file of this partition could not be written before shutdown; writing later
            // records would leave a gap that a restart could not see. They are read again.
            return Ok(());
        }
        let pipeline = topics::pipeline_of(&record.topic).to_owned();
        // Before decoding: an offset some file already answers for (even as a dead letter)
        // is neither archived nor dead-lettered twice.
        if record.offset <= self.highest_archived(&key).await? {
            metrics::counter!("instream_archive_skipped_total", "pipeline" => pipeline)
                .increment(1);
            input.complete([&record]);
            return Ok(());
        }
        let event = match instream_event::decode(&record.payload) {
            Ok(e) => e,
            Err(e) => {
                let delivery = self
                    .dead
                    .publish_record(&record, DeadLetterCode::DecodeError, &e.to_string())
                    .await?;
                self.outputs.push(delivery);
                // The offset joins the open file (completed when it is written), or a file of
                // its own in the current hour, so the files' offsets stay end to end. Until
                // then a crash or rebalance reads the record again and dead-letters it again:
                // the dead-letter topic is at-least-once, as for every stage.
                let (dir, hour_start) = folder(&pipeline, instream_event::now_millis());
                let file = self.open(catalog, &key, dir, hour_start)?;
                file.writer.dead_lettered(record.offset)?;
                file.offsets.push(record.offset);
                return Ok(());
            }
        };
        let by = catalog
            .get(&pipeline)
            .map(|d| d.archive.partition_by)
            .unwrap_or_default();
        let at = match by {
            ArchiveTime::IngestTime => event.ingest_time,
            ArchiveTime::EventTime => event.event_time,
        };
        let (dir, hour_start) = folder(&pipeline, at);
        if self
            .files
            .get(&key)
            .is_some_and(|f| f.hour_start != hour_start)
        {
            self.roll(&key, "hour", input, stop).await?;
            if self.abandoned.contains(&key) {
                return Ok(());
            }
        }
        let (max_records, max_bytes) = (self.config.roll_max_records, self.config.roll_max_bytes);
        let file = self.open(catalog, &key, dir, hour_start)?;
        file.writer.append(record.offset, &record.payload, &event)?;
        file.offsets.push(record.offset);
        file.records += 1;
        if file.records >= max_records {
            self.roll(&key, "records", input, stop).await?;
        } else if file.writer.size() >= max_bytes {
            self.roll(&key, "size", input, stop).await?;
        }
        Ok(())
    }

    async fn roll_aged(
        &mut self,
        input: Input<'_>,
        stop: &CancellationToken,
    ) -> Result<(), ArchiverError> {
        let aged: Vec<PartitionKey> = self
            .files
            .iter()
            .filter(|(_, f)| f.opened.elapsed() >= self.config.roll_max_age)
            .map(|(k, _)| k.clone())
            .collect();
        for key in aged {
            self.roll(&key, "age", input, stop).await?;
        }
        Ok(())
    }

    /// Closes the partition's open file: writes it whole, then marks its offsets handled.
    async fn roll(
        &mut self,
        key: &PartitionKey,
        reason: &'static str,
        input: Input<'_>,
        stop: &CancellationToken,
    ) -> Result<(), ArchiverError> {
        // The file answers for its dead letters' offsets too: they are on the broker first.
        if !self.outputs_unconfirmed
            && !self.outputs.is_empty()
            && !self
                .outputs
                .delivered_unless(self.dead.producer(), stop)
                .await?
        {
            self.outputs_unconfirmed = true;
        }
        if self.outputs_unconfirmed {
            // Not written, not committed: read again after the restart.
            self.files.remove(key);
            self.abandoned.insert(key.clone());
            return Ok(());
        }
        let Some(file) = self.files.remove(key) else {
            return Ok(());
        };
        metrics::gauge!("instream_archive_open_files").set(self.files.len() as f64);
        let (Some(&first), Some(&last)) = (file.offsets.first(), file.offsets.last()) else {
            return Ok(());
        };
        let records = file.records;
        let path = format!(
            "{}/{}",
            file.folder,
            file_name(file.format, file.partition, first, last)
        );
        let data = Bytes::from(file.writer.finish()?);
        let size = data.len();
        let started = Instant::now();
        match self.write(&path, data, started, stop).await {
            Ok(()) => {}
            Err(GaveUp::TimedOut { error, waited }) => {
                return Err(ArchiverError::Unwritable {
                    path,
                    waited,
                    error,
                })
            }
            Err(GaveUp::Failed(error)) => return Err(error.into()),
            Err(GaveUp::Stopped) => {
                // Not written, not committed: read again after the restart.
                self.abandoned.insert(key.clone());
                return Ok(());
            }
        }
        self.archived.insert(key.clone(), last);
        input.complete_offsets(&key.0, key.1, &file.offsets);
        let pipeline = topics::pipeline_of(&key.0).to_owned();
        metrics::histogram!("instream_archive_write_seconds", "pipeline" => pipeline.clone())
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("instream_archive_files_total", "pipeline" => pipeline.clone(), "reason" => reason)
            .increment(1);
        metrics::counter!("instream_archive_records_total", "pipeline" => pipeline.clone())
            .increment(records);
        metrics::counter!("instream_archive_bytes_total", "pipeline" => pipeline)
            .increment(size as u64);
        tracing::debug!(%path, records, size, reason, "file archived");
        Ok(())
    }

    /// Writes one file, retrying until the consumer's poll deadline. The consumer is not
    /// polled while we retry; before the group takes the partition away and a second writer
    /// starts on the same offsets, stop. Nothing of this file was committed: the restart reads
    /// it again.
    async fn write(
        &self,
        path: &str,
        data: Bytes,
        started: Instant,
        stop: &CancellationToken,
    ) -> Result<(), GaveUp<instream_archive::ArchiveError>> {
        let deadline = self.polled_at + WRITE_RETRY_LIMIT;
        let archive = self.archive.clone();
        Retry::new("archive write", stop)
            .reporting_to(&self.ready)
            .give_up_after(deadline.saturating_duration_since(started))
            .run_while(
                |_| true,
                || {
                    let (archive, path, data) = (archive.clone(), path.to_owned(), data.clone());
                    async move {
                        let left = deadline.saturating_duration_since(Instant::now());
                        match tokio::time::timeout(left, archive.put(&path, data)).await {
                            Ok(result) => result,
                            Err(_) => Err(instream_archive::ArchiveError::Io {
                                path,
                                message: format!("no answer within {left:?}"),
                            }),
                        }
                    }
                },
            )
            .await
    }
}
