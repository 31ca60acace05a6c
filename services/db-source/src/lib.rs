//! instream-db-source: the seed's "streaming data from SQL databases". Polls PostgreSQL
//! tables the way the Kafka Connect JDBC source does (`incrementing`, `timestamp`,
//! `timestamp+incrementing`) and writes each new or changed row as an event of a pipeline to
//! `<pipeline>.raw`, keyed by the pipeline's key field like any ingested event.
//!
//! One instance at a time polls a table: each table has an election of the coordinator
//! (ZooKeeper's `elections/db-source-<name>`; in standalone mode the in-process one), and the
//! others stand by to take over when the leader's session ends. The last row handed over is
//! stored (ZooKeeper's `sources/<name>`; standalone: `<standalone.data_dir>/sources/<name>.json`)
//! only after the broker acknowledged every row up to it, with the leader's term, so a deposed
//! leader can no longer move it ([`instream_coord::SourceProgress`]).
//!
//! Guarantee: a restart or a takeover skips no row. The rows of the batch in flight when a
//! leader died are read again and produced again *with the same event ids* (derived from the
//! source, the table position and, for timestamp mode, the row's content), so the aggregator
//! drops the repeats as it drops an HTTP client's retries; the raw topic (and so the archive)
//! may hold such a row twice. A row the pipeline refuses (no key, bad time, schema) goes to
//! the dead-letter topic with the reason and its table position; the position moves past it.

mod table;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use instream_core::config::{BrokerMode, Config, DbSourceConfig, SqlTableConfig};
use instream_core::{events, Backoff, Readiness, Service};
use instream_event::Event;
use instream_kafka::client::{self, Producer};
use instream_kafka::{DeadLetter, DeadLetterCode, DeadLetters, Outgoing};
use instream_pipeline::{envelope, topics, Catalog, IdSource, PipelineDefinition, SchemaCache};
use instream_stage::ServiceContext;
use instream_stage::Stage;
use serde_json::value::RawValue;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use table::{Position, Row, Table, TableError};

const SERVICE: Service = Service::DbSource;
/// The waits between two attempts after an error (database or broker away).
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
/// Longest the broker may take to acknowledge a batch before the batch is tried again.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a leader reads the table's columns again, so added columns are picked up.
const REDESCRIBE_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum DbSourceError {
    #[error(transparent)]
    Stage(#[from] instream_stage::StageError),
    #[error(transparent)]
    Kafka(#[from] instream_kafka::KafkaError),
    #[error(transparent)]
    Coord(#[from] instream_coord::CoordError),
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("pipeline `{0}` is not defined (yet)")]
    UnknownPipeline(String),
    #[error("the broker did not acknowledge the batch within {0:?}")]
    AckTimeout(Duration),
    #[error("stored position of `{name}` is unreadable: {reason}")]
    BadPosition { name: String, reason: String },
}

/// What every table's poller shares.
struct Shared {
    config: Config,
    producer: Producer,
    dead_letters: DeadLetters,
    catalog: watch::Receiver<Arc<Catalog>>,
    database: Readiness,
    health: instream_core::Health,
    shutdown: CancellationToken,
    coordinator: Arc<dyn instream_coord::Coordinator>,
}

/// Elections and progress: ZooKeeper's, which span processes (whatever the definitions come
/// from) — or, in standalone mode (the embedded broker: every service in one process), the
/// in-process coordinator the service was given.
fn coordinator(ctx: &ServiceContext) -> Arc<dyn instream_coord::Coordinator> {
    let config = &ctx.config;
    match config.kafka.broker {
        BrokerMode::Embedded => ctx.coordinator.clone(),
        BrokerMode::External => {
            Arc::new(instream_coord::ZkCoordinator::new(config.zookeeper.clone()))
        }
    }
}

/// The service: one poller per configured table, each leading or standing by, until shutdown.
pub async fn run(ctx: ServiceContext) -> Result<(), DbSourceError> {
    let config = &ctx.config;
    if config.db_source.tables.is_empty() {
        tracing::warn!("db_source.tables is empty: nothing to poll");
    }
    let stage = Stage::start(SERVICE, &ctx).await?;
    let producer = instream_kafka::producer(&config.kafka, SERVICE.as_str())?;
    let shared = Arc::new(Shared {
        dead_letters: DeadLetters::new(producer.clone(), SERVICE),
        producer,
        catalog: stage.catalog.clone(),
        database: ctx.health.register("db-source.postgres"),
        health: ctx.health.clone(),
        shutdown: ctx.shutdown.clone(),
        config: config.clone(),
        coordinator: coordinator(&ctx),
    });
    ctx.tasks
        .spawn_infallible("database probe", watch_database(shared.clone()));
    for table in &config.db_source.tables {
        ctx.tasks.spawn_infallible(
            format!("table poller {}", table.name),
            poll_table(shared.clone(), table.clone()),
        );
    }
    // The pollers stop at shutdown; the registration lasts until then.
    ctx.shutdown.cancelled().await;
    drop(stage);
    Ok(())
}

/// Connects with the session settings the queries rely on: UTC, and a statement timeout.
pub async fn connect(cfg: &DbSourceConfig) -> Result<tokio_postgres::Client, TableError> {
    let mut settings: tokio_postgres::Config = cfg.url.parse()?;
    if let Some(password) = &cfg.password {
        settings.password(password.expose());
    }
    let (client, connection) =
        tokio::time::timeout(cfg.query_timeout, settings.connect(tokio_postgres::NoTls))
            .await
            .map_err(|_| TableError::Timeout(cfg.query_timeout))??;
    // The connection's driver: its end is seen by the client's next query; a panic is loud.
    instream_core::spawn_watched("postgres connection", async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    });
    client
        .batch_execute(&format!(
            "SET TimeZone = 'UTC'; SET statement_timeout = {}",
            cfg.query_timeout.as_millis()
        ))
        .await?;
    Ok(client)
}

/// Keeps `/readyz` saying whether the database answers, on standbys too (they must be able to
/// take over): `SELECT 1` every 5 s on a connection kept between checks.
async fn watch_database(shared: Arc<Shared>) {
    let client: Arc<tokio::sync::Mutex<Option<tokio_postgres::Client>>> = Arc::default();
    let cfg = shared.config.db_source.clone();
    let check = move || {
        let (client, cfg) = (client.clone(), cfg.clone());
        async move {
            let mut client = client.lock().await;
            let c = match client.take() {
                Some(c) => c,
                None => connect(&cfg).await?,
            };
            tokio::time::timeout(cfg.query_timeout, c.simple_query("SELECT 1"))
                .await
                .map_err(|_| TableError::Timeout(cfg.query_timeout))??;
            // Kept only while it answers: a failed check connects again.
            *client = Some(c);
            Ok::<(), TableError>(())
        }
    };
    let _ = shared
        .database
        .clone()
        .probe(Duration::from_secs(5), shared.shutdown.clone(), check)
        .await;
}

/// Campaigns for the table; while leading, polls it; gives it up on shutdown.
async fn poll_table(shared: Arc<Shared>, table: SqlTableConfig) {
    let name = table.name.clone();
    let leader_gauge = metrics::gauge!("instream_db_source_leader", "source" => name.clone());
    leader_gauge.set(0.0);
    // Not ready only while this instance leads the table and cannot poll it (a standby has
    // nothing to do and must not block a rollout).
    let polling = shared.health.register(&format!("db-source.table.{name}"));
    polling.set_ready();
    let mut pauses = BACKOFF.pauses();
    let duty = format!("db-source-{name}");
    let instance = instream_coord::instance_name();
    loop {
        let campaign = shared.coordinator.campaign(&duty, &instance);
        let mut leadership = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            l = campaign => match l {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(source = %name, error = %e, "cannot join the election; retrying");
                    if !pauses.sleep(&shared.shutdown).await { return; }
                    continue;
                }
            },
        };
        let fenced_while_leading = loop {
            if !leadership.is_leader() {
                // Standing by: nothing of ours to be unready about.
                polling.set_ready();
            }
            let term = tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                t = leadership.acquired() => match t {
                    Ok(term) => term,
                    // Its task is gone: join a new election after a pause.
                    Err(e) => {
                        tracing::error!(source = %name, error = %e, "joining the election again");
                        break true;
                    }
                },
            };
            tracing::info!(source = %name, term, "leading: polling the table");
            leader_gauge.set(1.0);
            let led_since = Instant::now();
            let outcome = tokio::select! {
                _ = shared.shutdown.cancelled() => { leader_gauge.set(0.0); return }
                _ = leadership.lost() => Ok(()),
                r = lead(&shared, &table, term, &polling) => r,
            };
            leader_gauge.set(0.0);
            if led_since.elapsed() > Duration::from_secs(60) {
                pauses.reset();
            }
            match after_term(&name, term, outcome, leadership.is_leader(), &polling) {
                AfterTerm::StandBy => {}
                AfterTerm::Rejoin { pause } => break pause,
                AfterTerm::Retry => {
                    if !pauses.sleep(&shared.shutdown).await {
                        return;
                    }
                }
            }
        };
        // Withdraw before waiting, so the candidacy is not held through the pause.
        drop(leadership);
        if fenced_while_leading && !pauses.sleep(&shared.shutdown).await {
            return;
        }
    }
}

/// What the end of a term leads to.
enum AfterTerm {
    /// Leadership lost: stand by in the same election.
    StandBy,
    /// Fenced by a later term: join the election again, after a pause when this instance
    /// still leads it (its node was recreated and the terms restarted).
    Rejoin { pause: bool },
    /// Polling failed: lead again after a pause.
    Retry,
}

/// Judges how term `term` of table `name` ended (`still_leading`: whether this instance
/// still leads its election), logs it and sets the table's readiness.
fn after_term(
    name: &str,
    term: u64,
    outcome: Result<(), DbSourceError>,
    still_leading: bool,
    polling: &Readiness,
) -> AfterTerm {
    match outcome {
        Ok(()) => {
            polling.set_ready();
            tracing::warn!(source = %name, term, "leadership lost: standing by");
            AfterTerm::StandBy
        }
        Err(DbSourceError::Coord(instream_coord::CoordError::Fenced { .. })) => {
            polling.set_ready();
            if still_leading {
                // Leading the election, yet a higher term is stored: the election's node was
                // recreated (terms restarted). Re-joining raises the term by one per round; an
                // operator should delete or fix the progress node.
                tracing::error!(source = %name, term, "the stored progress of {name} (ZooKeeper's sources/{name}, or standalone's <data_dir>/sources/{name}.json) holds a higher term than this leader's; re-joining the election (delete the stale term to resume at once)");
            } else {
                tracing::warn!(source = %name, term, "a later leader took the table: standing by");
            }
            AfterTerm::Rejoin {
                pause: still_leading,
            }
        }
        Err(e) => {
            polling.set_not_ready(e.to_string());
            tracing::warn!(source = %name, term, error = %e, "polling failed; retrying");
            AfterTerm::Retry
        }
    }
}

/// Polls the table as leader of `term` until an error (or until the caller stops it).
async fn lead(
    shared: &Shared,
    cfg: &SqlTableConfig,
    term: u64,
    polling: &Readiness,
) -> Result<(), DbSourceError> {
    let db = &shared.config.db_source;
    let mut progress = shared.coordinator.claim_progress(&cfg.name, term).await?;
    let mut position: Position = if progress.position().is_null() {
        Position::default()
    } else {
        serde_json::from_value(progress.position().clone()).map_err(|e| {
            DbSourceError::BadPosition {
                name: cfg.name.clone(),
                reason: e.to_string(),
            }
        })?
    };
    let client = connect(db).await?;
    let mut table = Table::describe(&client, cfg, db.query_timeout).await?;
    for column in &table.nullable {
        // A NULL compares as unknown: such a row is never read.
        tracing::warn!(table = %cfg.table, %column, "the column may hold NULL; rows where it does are not read (make it NOT NULL)");
    }
    let mut described = Instant::now();
    polling.set_ready();
    tracing::info!(source = %cfg.name, table = %cfg.table, from = %position.label(), "reading");
    let mut schemas = SchemaCache::default();
    let rows_total = |outcome: &'static str| metrics::counter!("instream_db_source_rows_total", "source" => cfg.name.clone(), "outcome" => outcome);
    loop {
        // Columns added to the table join the events within a minute.
        if described.elapsed() > REDESCRIBE_INTERVAL {
            table = Table::describe(&client, cfg, db.query_timeout).await?;
            described = Instant::now();
        }
        let started = Instant::now();
        let (rows, more) = table
            .next_rows(&client, &position, db.batch_rows, db.query_timeout)
            .await?;
        metrics::histogram!("instream_db_source_query_seconds", "source" => cfg.name.clone())
            .record(started.elapsed().as_secs_f64());
        let Some(last) = rows.last().map(|r| r.position.clone()) else {
            tokio::time::sleep(db.poll_interval).await;
            continue;
        };
        let def = shared
            .catalog
            .borrow()
            .get(&cfg.pipeline)
            .cloned()
            .ok_or_else(|| DbSourceError::UnknownPipeline(cfg.pipeline.clone()))?;
        let schema = schemas.get(&def);
        // A group of one timestamp may be larger than a batch: handed over in batch-sized
        // chunks, each acknowledged, and the position saved once the whole group is.
        let (mut produced, mut refused) = (0, 0);
        let occurrences = occurrences(&rows);
        let size = db.batch_rows as usize;
        for (chunk, occurrences) in rows.chunks(size).zip(occurrences.chunks(size)) {
            let (p, r) =
                hand_over(shared, cfg, &def, schema.as_deref(), chunk, occurrences).await?;
            produced += p;
            refused += r;
        }
        progress
            .save(serde_json::to_value(&last).unwrap_or_default())
            .await?;
        rows_total("produced").increment(produced);
        rows_total("dead_lettered").increment(refused);
        events::events_handled(SERVICE, cfg.pipeline.clone(), "accepted", produced);
        events::stage_latency(SERVICE.as_str()).record(started.elapsed().as_secs_f64());
        tracing::debug!(source = %cfg.name, rows = rows.len(), to = %last.label(), "batch handed over");
        position = last;
        if !more {
            tokio::time::sleep(db.poll_interval).await;
        }
    }
}

/// Produces the rows as events (refused ones as dead letters) and waits until the broker
/// acknowledged every one. Returns (produced, dead-lettered).
async fn hand_over(
    shared: &Shared,
    cfg: &SqlTableConfig,
    def: &PipelineDefinition,
    schema: Option<&jsonschema::Validator>,
    rows: &[Row],
    occurrences: &[usize],
) -> Result<(u64, u64), DbSourceError> {
    let topic = topics::raw(&def.name);
    let dlq = topics::dead_letter(&def.name);
    let ingest_time = instream_event::now_millis();
    let mut deliveries = Vec::with_capacity(rows.len());
    let (mut produced, mut refused) = (0, 0);
    let mut buf = Vec::with_capacity(512);
    for (row, &occurrence) in rows.iter().zip(occurrences) {
        match event_of(cfg, def, schema, row, occurrence, ingest_time) {
            Ok(event) => {
                instream_event::encode_into(&event, &mut buf);
                let record = Outgoing::to(&topic)
                    .key(event.key.as_bytes())
                    .payload(buf.as_slice());
                deliveries.push(client::send(&shared.producer, record).await?);
                produced += 1;
            }
            Err(rejection) => {
                let reason = format!(
                    "{} (table {} at {})",
                    rejection.message,
                    cfg.table,
                    row.position.label()
                );
                deliveries.push(
                    shared
                        .dead_letters
                        .publish(&DeadLetter {
                            topic: &dlq,
                            pipeline: &def.name,
                            key: None,
                            payload: row.json.as_bytes(),
                            code: DeadLetterCode::Invalid(rejection.code),
                            reason: &reason,
                            origin: None,
                        })
                        .await?,
                );
                refused += 1;
            }
        }
    }
    tokio::time::timeout(
        ACK_TIMEOUT,
        futures::future::try_join_all(deliveries.into_iter().map(client::delivered)),
    )
    .await
    .map_err(|_| DbSourceError::AckTimeout(ACK_TIMEOUT))??;
    Ok((produced, refused))
}

/// Each row's occurrence among identical rows of its position (0 for the first). Timestamp
/// mode tells identical rows of one timestamp apart by it: a timestamp's rows are always read
/// together, so a re-read numbers them the same way.
fn occurrences(rows: &[Row]) -> Vec<usize> {
    let mut seen: HashMap<(&Position, &str), usize> = HashMap::new();
    rows.iter()
        .map(|row| {
            let n = seen.entry((&row.position, row.json.as_str())).or_default();
            *n += 1;
            *n - 1
        })
        .collect()
}

/// A row's event: the pipeline's usual checks, an id that a re-read of the same row version
/// repeats, and the source in the headers.
fn event_of(
    cfg: &SqlTableConfig,
    def: &PipelineDefinition,
    schema: Option<&jsonschema::Validator>,
    row: &Row,
    occurrence: usize,
    ingest_time: i64,
) -> Result<Event, instream_event::Rejection> {
    let raw: Box<RawValue> = serde_json::from_str(&row.json)
        .map_err(|e| instream_event::Rejection::new("malformed_json", e.to_string()))?;
    // With an id column, the source and position name the row version. In timestamp mode
    // rows may share a position: the content and the occurrence of that content among the
    // timestamp's rows tell them apart, the same way on every read.
    let idempotency = if cfg.mode.uses_incrementing() {
        format!("db-source/{}/{}", cfg.name, row.position.label())
    } else {
        let content = xxhash_rust::xxh3::xxh3_128(row.json.as_bytes());
        format!(
            "db-source/{}/{}/{content:032x}",
            cfg.name,
            row.position.label()
        )
    };
    let ids = IdSource {
        producer: "",
        key_binds_content: false,
        pipeline: &def.name,
        idempotency_key: Some(&idempotency),
    };
    let mut event = envelope(def, schema, &raw, occurrence, &ids, ingest_time)?;
    event
        .headers
        .insert("source".into(), format!("{SERVICE}/{}", cfg.name));
    event
        .headers
        .insert("source_position".into(), row.position.label());
    Ok(event)
}
