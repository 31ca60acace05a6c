//! Every service in one process: `instream standalone` and the demo.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use instream_core::config::{
    ArchiveBackend, BrokerMode, Config, DefinitionSourceKind, StoreBackend,
};
use instream_core::{AdminServer, Health, ServiceContext, Supervisor};
use instream_kafka::EmbeddedBroker;
use instream_pipeline::{topics, FileSource};
use instream_store::{AggregateStore, EmbeddedStore};
use tokio_util::sync::CancellationToken;

/// The services one standalone process runs.
const SERVICES: [&str; 4] = ["ingest", "enricher", "aggregator", "archiver"];

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
        let broker = match config.kafka.broker {
            BrokerMode::External => None,
            BrokerMode::Embedded => {
                let broker = EmbeddedBroker::start(1).context("starting the embedded broker")?;
                config.kafka.bootstrap_servers = broker.bootstrap_servers().to_owned();
                config.kafka.replication_factor = 1;
                Some(broker)
            }
        };
        if let Some(broker) = &broker {
            // The embedded broker has no CreateTopics API: create the topics here, before the
            // services look for them.
            if let (DefinitionSourceKind::File, Some(path)) =
                (config.definitions.source, &config.definitions.path)
            {
                let catalog = FileSource::new(path).load()?;
                for p in catalog.iter() {
                    for t in topics::of_pipeline(p) {
                        broker.create_topic(&t, p.partitions)?;
                    }
                }
            }
        }

        let health = Health::default();
        let admin = AdminServer::bind(config.admin.listen, health.clone())
            .await
            .with_context(|| format!("admin server on {}", config.admin.listen))?;
        let admin_addr = admin.local_addr()?;
        let (store, embedded_store): (Arc<dyn AggregateStore>, _) = match config.store.backend {
            StoreBackend::Embedded => {
                let s = Arc::new(EmbeddedStore::default());
                (s.clone(), Some(s))
            }
            StoreBackend::Scylla | StoreBackend::Local => {
                (instream_store::build(&config.store).await?, None)
            }
        };
        if config.archive.backend == ArchiveBackend::Local {
            std::fs::create_dir_all(&config.archive.root)
                .with_context(|| format!("creating archive.root {}", config.archive.root))?;
        }
        let archive = instream_archive::build(&config.archive)?;
        let ingest =
            instream_ingest::Ingest::start(&config, &health, admin_addr, token.clone()).await?;
        let ingest_addr = ingest.local_addr()?;
        let query =
            if config.query_api.api_key_sha256.is_empty() && !config.query_api.allow_anonymous {
                tracing::info!("query-api off: no query_api.api_key_sha256 and no allow_anonymous");
                None
            } else {
                Some(
                    instream_query_api::QueryApi::start(&config, store.clone(), &health, &token)
                        .await?,
                )
            };
        let query_addr = query.as_ref().map(|q| q.local_addr()).transpose()?;

        let context = || ServiceContext {
            config: config.clone(),
            health: health.clone(),
            shutdown: token.clone(),
            admin_addr,
        };
        let mut supervisor = Supervisor::new(token.clone());
        supervisor.spawn("admin", admin.serve(token.clone()));
        supervisor.spawn("ingest", ingest.serve(token.clone()));
        if let Some(query) = query {
            supervisor.spawn("query-api", query.serve(token.clone()));
        }
        supervisor.spawn("enricher", instream_enricher::run(context()));
        supervisor.spawn(
            "aggregator",
            instream_aggregator::run_with_store(context(), store),
        );
        supervisor.spawn(
            "archiver",
            instream_archiver::run_with_archive(context(), archive.clone()),
        );
        tracing::info!(%ingest_addr, %admin_addr, "standalone instream running");
        Ok(Standalone {
            ingest_addr,
            query_addr,
            admin_addr,
            embedded_store,
            archive,
            supervisor,
            health,
            _broker: broker,
        })
    }
}
