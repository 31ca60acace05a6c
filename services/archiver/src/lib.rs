//! instream-archiver: `<pipeline>.raw` in, time-partitioned zstd JSON-lines files out, on
//! HDFS or a local directory (the [`Archive`] trait).
//!
//! Each partition's records go to one open file at a time, named by partition and offset
//! range: `<pipeline>/dt=YYYY-MM-DD/hour=HH/part-<partition>-<first>-<last>.jsonl.zst`. A
//! file is rolled by size, record count, age and at hour boundaries; it is written under a
//! temporary name and renamed whole (`Archive::put`), and only then are its offsets
//! committed. After a crash, records at or below the highest offset already archived for
//! their partition are skipped, so no offset is written twice even when the commit after a
//! rename was lost.

mod layout;
mod retention;

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use instream_archive::Archive;
use instream_core::config::ArchiverConfig;
use instream_core::{Readiness, ServiceContext};
use instream_kafka::client::{self, recv_batch, Consumer};
use instream_kafka::{DeadLetters, Record};
use instream_pipeline::{topics, ArchiveTime, Catalog};
use instream_stage::{Stage, Subscription};
use tokio_util::sync::CancellationToken;

pub use layout::{file_name, folder, parse_file_name};
pub use retention::{retention_pass, run_retention, RETENTION_DUTY};

const SERVICE: &str = "archiver";

#[derive(Debug, thiserror::Error)]
pub enum ArchiverError {
    #[error(transparent)]
    Kafka(#[from] instream_kafka::KafkaError),
    #[error(transparent)]
    Archive(#[from] instream_archive::ArchiveError),
    #[error(transparent)]
    Stage(#[from] instream_stage::StageError),
    #[error("compressing: {0}")]
    Compress(std::io::Error),
    #[error(transparent)]
    Coord(#[from] instream_coord::CoordError),
}

type PartitionKey = (String, i32);

/// The file being filled for one partition.
struct OpenFile {
    folder: String,
    hour_start: i64,
    partition: i32,
    offsets: Vec<i64>,
    encoder: zstd::stream::Encoder<'static, Vec<u8>>,
    opened: Instant,
}

impl OpenFile {
    fn first(&self) -> i64 {
        self.offsets.first().copied().unwrap_or(-1)
    }

    fn last(&self) -> i64 {
        self.offsets.last().copied().unwrap_or(-1)
    }
}

struct Archiver {
    archive: Arc<dyn Archive>,
    config: ArchiverConfig,
    ready: Readiness,
    files: HashMap<PartitionKey, OpenFile>,
    /// Highest offset already in the archive per partition, read on first sight of it.
    archived: HashMap<PartitionKey, i64>,
    generation: u64,
    /// Partitions whose file could not be written before shutdown: nothing more is written
    /// for them by this process.
    abandoned: std::collections::HashSet<PartitionKey>,
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
    let ServiceContext {
        config,
        health,
        shutdown,
        admin_addr,
    } = ctx;
    // Registered before the first await, so /readyz cannot pass without it.
    let ready = health.register("archiver.archive");
    let stage = Stage::start(SERVICE, &config, &health, admin_addr, &shutdown).await?;
    let mut catalog = stage.catalog.clone();
    archive.ping().await?;
    if !config.archiver.retention.is_zero() {
        let leadership = instream_coord::coordinator(&config)
            .campaign(RETENTION_DUTY, &instream_coord::instance_name())
            .await?;
        tokio::spawn(run_retention(
            archive.clone(),
            catalog.clone(),
            leadership,
            config.archiver.retention,
            config.archiver.retention_check_interval,
            shutdown.clone(),
        ));
    }
    ready.set_ready();
    let initial = catalog.borrow().clone();
    for p in initial.iter() {
        let removed = archive.remove_leftovers(&p.name).await?;
        if removed > 0 {
            tracing::info!(pipeline = %p.name, removed, "removed unfinished files of an earlier run");
        }
    }
    let dead = DeadLetters::from_config(&config.kafka, SERVICE)?;
    let mut subscription = Subscription::new(&config, SERVICE, &mut catalog, Catalog::raw_topics)?;
    subscription.announce_in(stage.registration.clone());
    let mut archiver = Archiver {
        archive,
        config: config.archiver.clone(),
        ready,
        files: HashMap::new(),
        archived: HashMap::new(),
        generation: 0,
        abandoned: Default::default(),
    };
    let tick = config.archiver.roll_max_age.min(Duration::from_secs(1));
    let mut batch = Vec::new();
    let mut last_commit = Instant::now();
    while !shutdown.is_cancelled() {
        subscription.follow(&mut catalog)?;
        let consumer = subscription.consumer();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            received = recv_batch(consumer, 10_000, tick, &mut batch) => received?,
        }
        let current = catalog.borrow().clone();
        for record in batch.drain(..) {
            archiver
                .add(&current, consumer, &dead, record, &shutdown)
                .await?;
        }
        archiver.follow_generation(client::generation(consumer));
        archiver.roll_aged(consumer, &shutdown).await?;
        if last_commit.elapsed() >= config.kafka.commit_interval {
            client::commit(consumer, false)?;
            last_commit = Instant::now();
        }
    }
    // Drain: close every open file, then commit what the files hold.
    let consumer = subscription.consumer();
    archiver.follow_generation(client::generation(consumer));
    let keys: Vec<PartitionKey> = archiver.files.keys().cloned().collect();
    for key in keys {
        archiver
            .roll(&key, "shutdown", consumer, &CancellationToken::new())
            .await?;
    }
    client::commit(consumer, true)?;
    tracing::info!("archiver drained and committed");
    Ok(())
}

impl Archiver {
    /// After a rebalance, open files hold records of partitions we may have lost. Their
    /// offsets were never committed, so dropping them loses nothing; writing them could
    /// overlap the new owner's files.
    fn follow_generation(&mut self, generation: u64) {
        if generation != self.generation {
            self.files.clear();
            self.archived.clear();
            self.generation = generation;
        }
    }

    async fn highest_archived(&mut self, key: &PartitionKey) -> Result<i64, ArchiverError> {
        if let Some(&max) = self.archived.get(key) {
            return Ok(max);
        }
        let pipeline = topics::pipeline_of(&key.0);
        let max = self
            .archive
            .list(pipeline)
            .await?
            .iter()
            .filter_map(|f| parse_file_name(&f.path))
            .filter(|(partition, _, _)| *partition == key.1)
            .map(|(_, _, last)| last)
            .max()
            .unwrap_or(-1);
        self.archived.insert(key.clone(), max);
        Ok(max)
    }

    async fn add(
        &mut self,
        catalog: &Catalog,
        consumer: &Consumer,
        dead: &DeadLetters,
        record: Record,
        stop: &CancellationToken,
    ) -> Result<(), ArchiverError> {
        self.follow_generation(record.generation);
        if self
            .abandoned
            .contains(&(record.topic.clone(), record.partition))
        {
            // A file of this partition could not be written before shutdown; writing later
            // records would leave a gap that a restart could not see. They are read again.
            return Ok(());
        }
        let pipeline = topics::pipeline_of(&record.topic).to_owned();
        let event = match instream_event::decode(&record.payload) {
            Ok(e) => e,
            Err(e) => {
                let delivery = dead
                    .publish_record(&record, "decode_error", &e.to_string())
                    .await?;
                client::delivered(delivery).await?;
                client::complete(consumer, [&record]);
                return Ok(());
            }
        };
        let key: PartitionKey = (record.topic.clone(), record.partition);
        if record.offset <= self.highest_archived(&key).await? {
            metrics::counter!("instream_archive_skipped_total", "pipeline" => pipeline)
                .increment(1);
            client::complete(consumer, [&record]);
            return Ok(());
        }
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
            self.roll(&key, "hour", consumer, stop).await?;
            if self.abandoned.contains(&key) {
                return Ok(());
            }
        }
        let file = match self.files.entry(key.clone()) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(OpenFile {
                folder: dir,
                hour_start,
                partition: record.partition,
                offsets: Vec::new(),
                encoder: zstd::stream::Encoder::new(Vec::new(), self.config.zstd_level)
                    .map_err(ArchiverError::Compress)?,
                opened: Instant::now(),
            }),
        };
        file.encoder
            .write_all(&record.payload)
            .and_then(|()| file.encoder.write_all(b"\n"))
            .map_err(ArchiverError::Compress)?;
        file.offsets.push(record.offset);
        let full = file.offsets.len() as u64 >= self.config.roll_max_records
            || file.encoder.get_ref().len() as u64 >= self.config.roll_max_bytes;
        if full {
            self.roll(&key, "size", consumer, stop).await?;
        }
        Ok(())
    }

    async fn roll_aged(
        &mut self,
        consumer: &Consumer,
        stop: &CancellationToken,
    ) -> Result<(), ArchiverError> {
        let aged: Vec<PartitionKey> = self
            .files
            .iter()
            .filter(|(_, f)| f.opened.elapsed() >= self.config.roll_max_age)
            .map(|(k, _)| k.clone())
            .collect();
        for key in aged {
            self.roll(&key, "age", consumer, stop).await?;
        }
        Ok(())
    }

    /// Closes the partition's open file: writes it whole, then marks its offsets handled.
    async fn roll(
        &mut self,
        key: &PartitionKey,
        reason: &'static str,
        consumer: &Consumer,
        stop: &CancellationToken,
    ) -> Result<(), ArchiverError> {
        let Some(file) = self.files.remove(key) else {
            return Ok(());
        };
        if file.offsets.is_empty() {
            return Ok(());
        }
        let (first, last, records) = (file.first(), file.last(), file.offsets.len());
        let path = format!("{}/{}", file.folder, file_name(file.partition, first, last));
        let data = Bytes::from(file.encoder.finish().map_err(ArchiverError::Compress)?);
        let size = data.len();
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.archive.put(&path, data.clone()).await {
                Ok(()) => {
                    self.ready.set_ready();
                    break;
                }
                Err(error) => {
                    self.ready.set_not_ready(error.to_string());
                    tracing::warn!(%error, %path, "archive write failed; retrying");
                    if stop
                        .run_until_cancelled(tokio::time::sleep(backoff))
                        .await
                        .is_none()
                    {
                        // Not written, not committed: read again after the restart.
                        self.abandoned.insert(key.clone());
                        return Ok(());
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        self.archived.insert(key.clone(), last);
        client::complete_offsets(consumer, &key.0, key.1, &file.offsets);
        let pipeline = topics::pipeline_of(&key.0).to_owned();
        metrics::counter!("instream_archive_files_total", "pipeline" => pipeline.clone(), "reason" => reason)
            .increment(1);
        metrics::counter!("instream_archive_records_total", "pipeline" => pipeline.clone())
            .increment(records as u64);
        metrics::counter!("instream_archive_bytes_total", "pipeline" => pipeline)
            .increment(size as u64);
        tracing::debug!(%path, records, size, reason, "file archived");
        Ok(())
    }
}
