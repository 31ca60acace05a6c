//! instream-stage: what every pipeline stage does around its own work, written once.
//!
//! [`Stage::start`] loads the pipeline definitions (and follows their changes), keeps the
//! pipelines' topics in existence, reports whether the broker answers, and registers the
//! instance in ZooKeeper — each with its own readiness component. [`Subscription`] is a group
//! consumer whose topics follow the definitions, so a pipeline added at run time is picked up
//! without a restart.

mod driver;

use std::sync::Arc;
use std::time::Duration;

pub use instream_coord::{service_main, ServiceContext};
use instream_core::config::Config;
use instream_core::{Service, Tasks};
use instream_kafka::client::{self, Consumer};
use instream_kafka::KafkaError;
use instream_pipeline::Catalog;
use rdkafka::consumer::Consumer as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use driver::{Commit, Flow, Hooks, Processed, ResumeAt, Spec, Tick};

/// How long a stopping stage waits for its consumer to leave the group.
const GROUP_LEAVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the broker's reachability is checked for `/readyz`.
const BROKER_CHECK_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Definitions(#[from] instream_pipeline::DefinitionError),
    #[error(transparent)]
    Coord(#[from] instream_coord::CoordError),
}

/// A started stage: the live definitions, and the registration that lasts as long as this.
pub struct Stage {
    pub service: Service,
    pub catalog: watch::Receiver<Arc<Catalog>>,
    pub registration: Arc<instream_coord::Registration>,
    pub config: Config,
    pub shutdown: CancellationToken,
    pub tasks: Tasks,
}

impl Stage {
    pub async fn start(service: Service, ctx: &ServiceContext) -> Result<Stage, StageError> {
        let (config, shutdown, tasks) = (&ctx.config, &ctx.shutdown, &ctx.tasks);
        let definitions = ctx.health.register(&format!("{service}.definitions"));
        let catalog = instream_coord::definition_source(config)
            .subscribe(shutdown.clone())
            .await?;
        definitions.set_ready();
        tasks.spawn_infallible(
            format!("{service} pipeline topics"),
            instream_kafka::admin::keep_pipeline_topics(
                config.kafka.clone(),
                catalog.clone(),
                shutdown.clone(),
            ),
        );
        tasks.spawn(
            format!("{service} broker probe"),
            instream_kafka::admin::watch_broker(
                config.kafka.clone(),
                ctx.health.register(&format!("{service}.kafka")),
                BROKER_CHECK_INTERVAL,
                shutdown.clone(),
            ),
        );
        let registration = Arc::new(
            instream_coord::register_service(&*ctx.coordinator, service.as_str(), ctx.admin_addr)
                .await?,
        );
        tasks.spawn_infallible(
            format!("{service} definition announcer"),
            announce_definitions(catalog.clone(), registration.clone(), shutdown.clone()),
        );
        Ok(Stage {
            service,
            catalog,
            registration,
            config: config.clone(),
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
        })
    }
}

/// Keeps the registry and `instream_definition_version{pipeline}` saying which version of
/// each definition this instance runs, so an operator (and a test) can see a change arrive.
async fn announce_definitions(
    mut catalog: watch::Receiver<Arc<Catalog>>,
    registration: Arc<instream_coord::Registration>,
    shutdown: CancellationToken,
) {
    loop {
        let versions: std::collections::BTreeMap<String, u64> = catalog
            .borrow_and_update()
            .iter()
            .map(|def| {
                metrics::gauge!("instream_definition_version", "pipeline" => def.name.clone())
                    .set(def.version as f64);
                (def.name.clone(), def.version)
            })
            .collect();
        registration.update(|info| info.definitions = versions);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = catalog.changed() => if changed.is_err() {
                // The source stopped sending (a file): nothing will change any more.
                shutdown.cancelled().await;
                return;
            },
        }
    }
}

/// The consumer group of a service's stage: `<kafka.group_prefix>-<service>` (what its
/// commits, and the aggregator's checkpoints, are keyed by).
pub fn group_of(config: &Config, service: &str) -> String {
    format!("{}-{service}", config.kafka.group_prefix)
}

/// A group consumer (`<kafka.group_prefix>-<service>`) subscribed to the topics that
/// `topics_of` names for the current definitions.
pub struct Subscription {
    consumer: Consumer,
    group: String,
    topics: Vec<String>,
    topics_of: fn(&Catalog) -> Vec<String>,
    /// Where the assignment is announced, and the generation last announced.
    registration: Option<(Arc<instream_coord::Registration>, u64)>,
}

impl Subscription {
    pub fn new(
        config: &Config,
        service: &str,
        catalog: &mut watch::Receiver<Arc<Catalog>>,
        topics_of: fn(&Catalog) -> Vec<String>,
    ) -> Result<Subscription, KafkaError> {
        let group = group_of(config, service);
        let topics = topics_of(&catalog.borrow_and_update());
        let consumer = client::consumer(&config.kafka, service, &group, &topics)?;
        Ok(Subscription {
            consumer,
            group,
            topics,
            topics_of,
            registration: None,
        })
    }

    /// Announces this consumer's group and assigned partitions in the registry from now on
    /// (`instream status` shows them).
    pub fn announce_in(&mut self, registration: Arc<instream_coord::Registration>) {
        let group = self.group.clone();
        registration.update(|info| info.group = Some(group));
        self.registration = Some((registration, u64::MAX));
    }

    pub fn consumer(&self) -> &Consumer {
        &self.consumer
    }

    /// The consumer group id.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Leaves the group on a blocking thread, waiting at most `within` (and never more than
    /// 10 s): librdkafka's close revokes the assignment and waits for the broker, which must
    /// neither block the runtime nor keep a stopping process alive when the broker is slow
    /// (the group's session timeout then hands the partitions on).
    pub async fn close(self, within: Duration) {
        let timeout = within.min(GROUP_LEAVE_TIMEOUT);
        let group = self.group.clone();
        // A thread of its own, not the blocking pool: a close librdkafka never finishes must
        // not keep the runtime (a test's, or a process's at exit) waiting for it.
        let (closed, done) = tokio::sync::oneshot::channel();
        let closing = std::thread::Builder::new()
            .name("consumer-close".into())
            .spawn(move || {
                drop(self);
                let _ = closed.send(());
            });
        if let Err(error) = closing {
            tracing::warn!(%group, %error, "no thread to leave the group on; the broker's session timeout will");
            return;
        }
        if tokio::time::timeout(timeout, done).await.is_err() {
            tracing::warn!(
                %group,
                timeout_ms = timeout.as_millis() as u64,
                "the consumer did not leave its group in time; the broker's session timeout will"
            );
        }
    }

    /// Re-subscribes when the definitions changed the set of topics (a rebalance follows).
    pub fn follow(
        &mut self,
        catalog: &mut watch::Receiver<Arc<Catalog>>,
    ) -> Result<(), KafkaError> {
        if let Some((registration, announced)) = &mut self.registration {
            let context = self.consumer.context();
            let generation = context.generation();
            if generation != *announced {
                *announced = generation;
                let mut partitions: Vec<String> = context
                    .assignment()
                    .into_iter()
                    .map(|(topic, partition)| format!("{topic}/{partition}"))
                    .collect();
                partitions.sort();
                registration.update(|info| info.partitions = partitions);
            }
        }
        if !catalog.has_changed().unwrap_or(false) {
            return Ok(());
        }
        let wanted = (self.topics_of)(&catalog.borrow_and_update());
        if wanted != self.topics {
            let names: Vec<&str> = wanted.iter().map(String::as_str).collect();
            self.consumer
                .subscribe(&names)
                .map_err(KafkaError::Consume)?;
            tracing::info!(topics = ?wanted, "subscription follows the new definitions");
            self.topics = wanted;
        }
        Ok(())
    }
}
