//! Every service in one process: `instream standalone` and the demo.
//!
//! On the embedded broker (`kafka.broker = "embedded"`), which keeps at most 5 MB a partition
//! and nothing across a restart: every topic's unread bytes are accounted for in the process
//! (`instream_core::backlog`), so ingest answers 503 and the stages wait before any topic holds
//! more than `standalone.max_unread_bytes` unread; the topics no stage reads (dead letters,
//! quality records) are copied to disk by the [`keeper`]; a stop drains every topic before the
//! stages stop; each run archives into a folder of its own and takes over the aggregator's
//! checkpoints at offset 0 of the new broker's topics; and `standalone.json` in the data
//! directory tells the CLI where the running broker is ([`state`]).

pub mod keeper;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use instream_coord::ServiceContext;
use instream_core::backlog::Backlog;
use instream_core::config::{
    ArchiveBackend, BrokerMode, Config, DefinitionSourceKind, StoreBackend,
};
use instream_core::{AdminServer, Health, Supervisor};
use instream_kafka::EmbeddedBroker;
use instream_pipeline::{topics, Catalog, FileSource};
use instream_store::{AggregateStore, EmbeddedStore};
use tokio_util::sync::CancellationToken;

/// The services one standalone process runs.
const SERVICES: [&str; 4] = ["ingest", "enricher", "aggregator", "archiver"];

/// Which service reads each topic of `catalog` in standalone mode: what the account of unread
/// bytes waits for, and what a stop waits to see committed (the archiver excepted: it writes
/// what it read when it stops). What no stage reads, the keeper does.
fn readers(catalog: &Catalog) -> Vec<(String, &'static str)> {
    let mut readers = Vec::new();
    for def in catalog.iter() {
        readers.push((topics::raw(&def.name), "enricher"));
        readers.push((topics::raw(&def.name), "archiver"));
        for topic in topics::of_pipeline(def) {
            if keeper::keeps(def, &topic) {
                readers.push((topic, keeper::SERVICE));
            } else if topic.ends_with(".enriched") || topic.contains(".by-") {
                readers.push((topic, "aggregator"));
            }
        }
    }
    readers
}

/// A running standalone platform.
pub struct Standalone {
    pub ingest_addr: SocketAddr,
    /// Where query-api serves, when the config lets it run (API keys, or anonymous access).
    pub query_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    /// The embedded store, when the config selects it (the demo reads its summary from it).
    pub embedded_store: Option<Arc<EmbeddedStore>>,
    pub archive: Arc<dyn instream_archive::Archive>,
    pub supervisor: Supervisor,
    /// Readiness of every component: the platform is up when this says so.
    pub health: Health,
    /// Closes ingest (first step of a stop).
    intake: CancellationToken,
    /// The keeper, on the embedded broker: stopped last, once every other task has, so that
    /// it copies every dead letter they wrote.
    keeper: Option<(Supervisor, CancellationToken)>,
    /// Stops everything else.
    token: CancellationToken,
    /// On the embedded broker: the unread bytes of every topic, and this run's state file.
    backlog: Option<Backlog>,
    run: Option<(state::RunState, std::path::PathBuf)>,
    /// Held while this standalone runs (the CLI tells a live one by it).
    _run_lock: Option<state::RunLock>,
    /// The consumer groups that must have committed every topic to its end before a stop
    /// lets the stages go (the embedded broker keeps nothing once the process is gone).
    drained_when: Vec<(String, String)>,
    kafka: instream_core::config::KafkaConfig,
    // Dropped last: the services talk to it until they stop.
    _broker: Option<EmbeddedBroker>,
}

impl Standalone {
    /// Starts the platform and waits until every service has registered its components and
    /// all of them report ready. A service that fails during start-up (a bad seed file, an
    /// unreachable store) stops the wait at once, and its own error is returned.
    pub async fn start_ready(
        config: Config,
        token: CancellationToken,
        timeout: std::time::Duration,
    ) -> anyhow::Result<Self> {
        let drain = config.shutdown.drain_timeout;
        let platform = Self::start(config, token.clone()).await?;
        match platform.ready(timeout).await {
            Ok(()) => Ok(platform),
            Err(waiting) => {
                token.cancel();
                if let Some((_, last)) = &platform.keeper {
                    last.cancel();
                }
                match platform.supervisor.wait(drain).await {
                    Err(failed) => {
                        Err(anyhow::Error::new(failed)
                            .context("instream standalone could not start"))
                    }
                    Ok(()) => Err(waiting),
                }
            }
        }
    }

    async fn ready(&self, timeout: std::time::Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let stopped = self.supervisor.token();
        loop {
            let report = self.health.report();
            let registered = SERVICES
                .iter()
                .all(|s| report.iter().any(|c| c.name.starts_with(&format!("{s}."))));
            if registered && report.iter().all(|c| c.ready) {
                return Ok(());
            }
            if stopped.is_cancelled() {
                anyhow::bail!("instream standalone stopped while starting");
            }
            if tokio::time::Instant::now() > deadline {
                let waiting: Vec<String> = report
                    .iter()
                    .filter(|c| !c.ready)
                    .map(|c| format!("{} ({})", c.name, c.reason))
                    .collect();
                anyhow::bail!(
                    "instream standalone not ready after {timeout:?}; waiting for: {}",
                    waiting.join(", ")
                );
            }
            tokio::select! {
                _ = stopped.cancelled() => {}
                _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
            }
        }
    }

    /// Starts the embedded broker (if selected), creates the pipelines' topics on it, and
    /// starts every service under one supervisor with one admin server.
    pub async fn start(mut config: Config, token: CancellationToken) -> anyhow::Result<Self> {
        let (embedded, catalog) = start_broker(&mut config)?;
        let run = embedded.run;
        let health = Health::default();
        let admin = AdminServer::from_config(&config.admin, health.clone())
            .await
            .with_context(|| format!("admin server on {}", config.admin.listen))?;
        let admin_addr = admin.local_addr()?;
        let (store, embedded_store) = open_store(&config).await?;
        if let (Some(number), Some(catalog)) = (run, &catalog) {
            if number > 1 {
                take_over_checkpoints(&config, &*store, catalog).await?;
            }
        }
        let archive = open_archive(&config)?;
        let mut supervisor = Supervisor::new(token.clone());
        let tasks = supervisor.tasks();
        // One coordinator for every service of the process: they share its elections, its
        // registry and its sources' progress (db-source's, with an external broker, are
        // ZooKeeper's: see instream_db_source).
        let coordinator = instream_coord::coordinator(&config);
        let context = || ServiceContext {
            config: config.clone(),
            health: health.clone(),
            shutdown: token.clone(),
            admin_addr,
            tasks: tasks.clone(),
            coordinator: coordinator.clone(),
        };
        let ingest = instream_ingest::Ingest::start(&context()).await?;
        let ingest_addr = ingest.local_addr()?;
        let query = start_query(&context(), &store).await?;
        let query_addr = query.as_ref().map(|q| q.local_addr()).transpose()?;

        let intake = token.child_token();
        supervisor.spawn("admin", admin.serve(token.clone()));
        // Ingest closes first on a stop (see `stop`), and its task then waits for the rest.
        supervisor.spawn(
            "ingest",
            serve_ingest(ingest, intake.clone(), token.clone()),
        );
        if let Some(query) = query {
            supervisor.spawn("query-api", query.serve(token.clone()));
        }
        spawn_stages(&mut supervisor, context, store, archive.clone(), &intake);
        let keeper = match &embedded.broker {
            None => None,
            Some(_) => Some(start_keeper(&config, run, &token).await?),
        };
        let run = match (run, &embedded.broker) {
            (Some(number), Some(broker)) => Some(record_run(
                &config,
                number,
                broker,
                ingest_addr,
                admin_addr,
                query_addr,
            )?),
            _ => None,
        };
        tracing::info!(%ingest_addr, %admin_addr, "standalone instream running");
        Ok(Standalone {
            ingest_addr,
            query_addr,
            admin_addr,
            embedded_store,
            archive,
            supervisor,
            health,
            intake,
            keeper,
            token,
            backlog: config.kafka.backlog.clone(),
            run,
            _run_lock: embedded.run_lock,
            drained_when: catalog
                .as_ref()
                .map(|c| committing_groups(&config, c))
                .unwrap_or_default(),
            kafka: config.kafka.clone(),
            _broker: embedded.broker,
        })
    }

    /// A topic some group has not committed to its end yet, with how many records are left.
    async fn uncommitted(&self) -> Option<(String, u64)> {
        for (group, topic) in &self.drained_when {
            match instream_kafka::ops::group_lag(&self.kafka, group, topic).await {
                Ok(lags) => {
                    let left: i64 = lags
                        .iter()
                        .filter(|l| l.committed.is_some() || l.end > 0)
                        .map(|l| l.lag)
                        .sum();
                    if left > 0 {
                        return Some((format!("{topic} ({group})"), left as u64));
                    }
                }
                Err(error) => return Some((format!("{topic} ({group}): {error}"), 0)),
            }
        }
        None
    }

    /// The embedded broker's address and this run's number, on the embedded broker.
    pub fn run_state(&self) -> Option<&state::RunState> {
        self.run.as_ref().map(|(state, _)| state)
    }

    /// Stops cleanly: ingest takes no more events; on the embedded broker (which keeps nothing
    /// once the process is gone) the stages then go on until every topic is read to its end
    /// and what they wrote of it committed (the archiver writes what it read when it stops),
    /// for at most `timeout`; then every stage drains and commits, and the supervisor's result
    /// is returned.
    pub async fn stop(self, timeout: Duration, drain: Duration) -> anyhow::Result<()> {
        self.intake.cancel();
        if let Some(backlog) = &self.backlog {
            let deadline = tokio::time::Instant::now() + timeout;
            // Twice in a row: a topic found done may get a record from one checked after it.
            let mut clean = 0;
            while !self.token.is_cancelled() && clean < 2 {
                let unread = backlog.fullest();
                let uncommitted = match unread {
                    Some(_) => None,
                    None => self.uncommitted().await,
                };
                let Some(left) = unread.or(uncommitted) else {
                    clean += 1;
                    continue;
                };
                clean = 0;
                if tokio::time::Instant::now() >= deadline {
                    tracing::error!(topic = %left.0, records_or_bytes = left.1, "stopping with records no stage finished: they are lost with the embedded broker");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.token.cancel();
        let result = self.supervisor.wait(drain).await;
        if let Some((keeping, last)) = self.keeper {
            last.cancel();
            keeping.wait(drain).await?;
        }
        if let Some((mut state, path)) = self.run {
            state.stopped_at_ms = Some(instream_event::now_millis());
            state.write(&path)?;
        }
        Ok(result?)
    }
}

/// The embedded broker, when `kafka.broker` selects it, with this run's number and the lock
/// held while it runs.
struct Broker {
    broker: Option<EmbeddedBroker>,
    run: Option<u64>,
    run_lock: Option<state::RunLock>,
}

/// Starts the embedded broker (if selected) and creates the pipelines' topics on it; the
/// definitions file's catalog, when definitions come from one.
fn start_broker(config: &mut Config) -> anyhow::Result<(Broker, Option<Catalog>)> {
    let mut run = None;
    let mut run_lock = None;
    let broker = match config.kafka.broker {
        BrokerMode::External => None,
        BrokerMode::Embedded => {
            let (lock, number) = state::claim(config)?;
            run_lock = Some(lock);
            let broker = EmbeddedBroker::start(1).context("starting the embedded broker")?;
            config.kafka.bootstrap_servers = broker.bootstrap_servers().to_owned();
            config.kafka.replication_factor = 1;
            // Each run's broker numbers offsets from 0: its files go to a folder of its own.
            if config.standalone.archive_per_run {
                let root = state::run_archive_root(config, number);
                config.archive.root = root.display().to_string();
            }
            run = Some(number);
            Some(broker)
        }
    };
    let catalog = match (config.definitions.source, &config.definitions.path) {
        (DefinitionSourceKind::File, Some(path)) => Some(FileSource::new(path).load()?),
        _ => None,
    };
    if broker.is_some() && catalog.is_none() {
        anyhow::bail!(
            "the embedded broker (kafka.broker = \"embedded\") takes its topics from a \
             definitions file (definitions.source = \"file\" with a path): it has no API to \
             create topics when ZooKeeper's definitions change"
        );
    }
    if let (Some(_), Some(catalog)) = (&broker, &catalog) {
        config.kafka.backlog = Some(Backlog::new(
            config.standalone.max_unread_bytes,
            readers(catalog),
        ));
    }
    if let (Some(broker), Some(catalog)) = (&broker, &catalog) {
        // The embedded broker has no CreateTopics API: create the topics here, before the
        // services look for them.
        for p in catalog.iter() {
            for t in topics::of_pipeline(p) {
                broker.create_topic(&t, p.partitions)?;
            }
        }
    }
    Ok((
        Broker {
            broker,
            run,
            run_lock,
        },
        catalog,
    ))
}

/// Writes this run's state file (what `instream status` and `instream stop` read).
fn record_run(
    config: &Config,
    number: u64,
    broker: &EmbeddedBroker,
    ingest_addr: SocketAddr,
    admin_addr: SocketAddr,
    query_addr: Option<SocketAddr>,
) -> anyhow::Result<(state::RunState, std::path::PathBuf)> {
    let state = state::RunState {
        run: number,
        pid: std::process::id(),
        broker: broker.bootstrap_servers().to_owned(),
        ingest: ingest_addr.to_string(),
        admin: admin_addr.to_string(),
        query: query_addr.map(|a| a.to_string()),
        archive_root: Some(config.archive.root.clone().into()),
        started_at_ms: instream_event::now_millis(),
        stopped_at_ms: None,
    };
    let path = config.standalone.state_file();
    state.write(&path)?;
    Ok((state, path))
}

/// The groups whose stages hand records on (so they must have committed their input before
/// the stages stop), with each topic they read: every reader but the archiver.
fn committing_groups(config: &Config, catalog: &Catalog) -> Vec<(String, String)> {
    readers(catalog)
        .into_iter()
        .filter(|(_, service)| *service != "archiver")
        .map(|(topic, service)| (format!("{}-{service}", config.kafka.group_prefix), topic))
        .collect()
}

/// A restarted standalone's broker is new and empty: the aggregator's checkpoints (in a store
/// that outlived the last run) move to offset 0 of its topics, keeping their windows.
async fn take_over_checkpoints(
    config: &Config,
    store: &dyn AggregateStore,
    catalog: &Catalog,
) -> anyhow::Result<()> {
    let group = format!("{}-aggregator", config.kafka.group_prefix);
    let moved = instream_aggregator::rebase_checkpoints(store, &group, catalog)
        .await
        .context("taking over the last run's aggregator checkpoints")?;
    if moved > 0 {
        tracing::info!(
            checkpoints = moved,
            "the last run's open windows go on counting on this run's broker"
        );
    }
    Ok(())
}

/// The aggregate store the config names: the embedded one kept in this process (the CLI
/// reads it through the standalone), or one opened by its backend.
async fn open_store(
    config: &Config,
) -> anyhow::Result<(Arc<dyn AggregateStore>, Option<Arc<EmbeddedStore>>)> {
    Ok(match config.store.backend {
        StoreBackend::Embedded => {
            let s = Arc::new(EmbeddedStore::default());
            (s.clone(), Some(s))
        }
        StoreBackend::Scylla | StoreBackend::Local => {
            (instream_store::build(&config.store).await?, None)
        }
    })
}

/// Ingest until `intake` closes, then waiting until everything else has stopped.
async fn serve_ingest(
    ingest: instream_ingest::Ingest,
    intake: CancellationToken,
    token: CancellationToken,
) -> Result<(), instream_ingest::IngestError> {
    ingest.serve(intake).await?;
    token.cancelled().await;
    Ok(())
}

/// The archive the config names, its folder created when it is a local one.
fn open_archive(config: &Config) -> anyhow::Result<Arc<dyn instream_archive::Archive>> {
    if config.archive.backend == ArchiveBackend::Local {
        std::fs::create_dir_all(&config.archive.root)
            .with_context(|| format!("creating archive.root {}", config.archive.root))?;
    }
    Ok(instream_archive::build(&config.archive)?)
}

/// The keeper copying dead letters and quality records to `<data_dir>/topics/run-<n>`, under a
/// supervisor of its own that stops last; a failing keeper stops the platform like any task.
async fn start_keeper(
    config: &Config,
    run: Option<u64>,
    token: &CancellationToken,
) -> anyhow::Result<(Supervisor, CancellationToken)> {
    let definitions = instream_coord::definition_source(config)
        .subscribe(token.clone())
        .await?;
    let last = CancellationToken::new();
    let mut keeping = Supervisor::new(last.clone());
    let failed = token.clone();
    let copies = config
        .standalone
        .data_dir
        .join("topics")
        .join(format!("run-{}", run.unwrap_or(1)));
    let run = keeper::run(config.clone(), copies, definitions, last.clone());
    keeping.spawn("keeper", async move {
        let result = run.await;
        failed.cancel();
        result
    });
    Ok((keeping, last))
}

/// query-api on the store, unless nobody could be let in (no key and no anonymous access).
async fn start_query(
    ctx: &ServiceContext,
    store: &Arc<dyn AggregateStore>,
) -> anyhow::Result<Option<instream_query_api::QueryApi>> {
    let config = &ctx.config;
    if config.query_api.api_key_sha256.is_empty() && !config.query_api.allow_anonymous {
        tracing::info!("query-api off: no query_api.api_key_sha256 and no allow_anonymous");
        return Ok(None);
    }
    let definitions = instream_coord::definition_source(config)
        .subscribe(ctx.shutdown.clone())
        .await?;
    Ok(Some(
        instream_query_api::QueryApi::start(ctx, store.clone(), definitions).await?,
    ))
}

/// The enricher, aggregator and archiver under `supervisor`, and db-source when tables are
/// configured.
fn spawn_stages(
    supervisor: &mut Supervisor,
    context: impl Fn() -> ServiceContext,
    store: Arc<dyn AggregateStore>,
    archive: Arc<dyn instream_archive::Archive>,
    intake: &CancellationToken,
) {
    supervisor.spawn("enricher", instream_enricher::run(context()));
    supervisor.spawn(
        "aggregator",
        instream_aggregator::run_with_store(context(), store),
    );
    supervisor.spawn(
        "archiver",
        instream_archiver::run_with_archive(context(), archive),
    );
    // Tables to poll: db-source too, its elections and progress with the in-process
    // coordinator on the embedded broker (progress in `standalone.data_dir`/sources, across
    // restarts), ZooKeeper's with an external one. It stops
    // with ingest, before the drain: a row handed over later would be acknowledged by the
    // broker, its progress saved, and never processed.
    let ctx = context();
    if !ctx.config.db_source.tables.is_empty() {
        // Its own supervisor, on ingest's token: its tasks end with intake, not before.
        let mut polling = Supervisor::new(intake.clone());
        let (token, drain) = (ctx.shutdown.clone(), ctx.config.shutdown.drain_timeout);
        polling.spawn(
            "db-source",
            instream_db_source::run(ServiceContext {
                shutdown: intake.clone(),
                tasks: polling.tasks(),
                ..ctx
            }),
        );
        supervisor.spawn("db-source", async move {
            polling.wait(drain).await?;
            token.cancelled().await;
            Ok::<(), instream_core::SupervisorError>(())
        });
    }
}
