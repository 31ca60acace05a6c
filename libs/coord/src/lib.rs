//! instream-coord: ZooKeeper as instream's control plane.
//!
//! Every path lives below `zookeeper.root` (default `/instream`), used as the client's
//! chroot, so one ensemble can hold several deployments:
//! - `pipelines/<name>`: one pipeline definition as JSON, validated before it is stored and
//!   watched by every service ([`ZkDefinitionSource`]).
//! - `services/<service>/<instance>`: an ephemeral node per running instance (host, admin
//!   address, version, assigned partitions), re-created after a session expiry.
//! - `elections/<duty>/_c_…-latch-<seq>`: contenders for a singleton duty; the lowest leads.
//! - `sources/<name>`: a SQL source's progress, claimed by each new leader's term
//!   ([`Progress`]).
//!
//! With `zookeeper.auth` set, every node is created with `creator_all` digest ACLs.
//! [`LocalCoordinator`] gives standalone mode the same registry and elections in-process.

mod definitions;
mod election;
mod instance;
mod local;
mod progress;
mod registry;
mod session;
mod tls;

use std::process::ExitCode;
use std::sync::Arc;

use async_trait::async_trait;

pub use definitions::{
    publish_definition, stored_definitions, StoredDefinition, ZkDefinitionSource,
};
pub use election::{campaign, Leadership};
pub use instance::InstanceInfo;
pub use local::LocalCoordinator;
pub use progress::{stored_position, Progress, SourceProgress};
pub use registry::{instances, register_instance, Instance, Registration};
pub use session::{connect, CoordError};

use instream_core::config::{Config, DefinitionSourceKind, ZooKeeperConfig};
use instream_pipeline::{DefinitionSource, FileSource};

/// Registry and elections, from ZooKeeper or in-process.
#[async_trait]
pub trait Coordinator: Send + Sync {
    /// Registers an instance; it stays registered while the returned value lives.
    async fn register(
        &self,
        service: &str,
        instance: &str,
        info: InstanceInfo,
    ) -> Result<Registration, CoordError>;
    /// Joins the election for `duty`.
    async fn campaign(&self, duty: &str, instance: &str) -> Result<Leadership, CoordError>;
    /// Every registered instance.
    async fn instances(&self) -> Result<Vec<Instance>, CoordError>;
    /// Claims source `name`'s progress for leadership `term`, with the position stored;
    /// [`CoordError::Fenced`] when a later term claimed it.
    async fn claim_progress(
        &self,
        name: &str,
        term: u64,
    ) -> Result<Box<dyn SourceProgress>, CoordError>;
}

/// [`Coordinator`] on ZooKeeper.
pub struct ZkCoordinator {
    cfg: ZooKeeperConfig,
}

impl ZkCoordinator {
    pub fn new(cfg: ZooKeeperConfig) -> Self {
        Self { cfg }
    }
}

#[async_trait]
impl Coordinator for ZkCoordinator {
    async fn register(
        &self,
        service: &str,
        instance: &str,
        info: InstanceInfo,
    ) -> Result<Registration, CoordError> {
        register_instance(&self.cfg, service, instance, info).await
    }

    async fn campaign(&self, duty: &str, instance: &str) -> Result<Leadership, CoordError> {
        campaign(&self.cfg, duty, instance).await
    }

    async fn instances(&self) -> Result<Vec<Instance>, CoordError> {
        instances(&self.cfg).await
    }

    async fn claim_progress(
        &self,
        name: &str,
        term: u64,
    ) -> Result<Box<dyn SourceProgress>, CoordError> {
        Ok(Box::new(Progress::claim(&self.cfg, name, term).await?))
    }
}

/// A new coordinator of the kind the config implies: ZooKeeper when definitions come from
/// ZooKeeper; an in-process one otherwise, keeping sources' progress under
/// `standalone.data_dir`/sources. Services sharing a process must share one: make it once and
/// hand it to each in its [`ServiceContext`].
pub fn coordinator(config: &Config) -> Arc<dyn Coordinator> {
    match config.definitions.source {
        DefinitionSourceKind::Zookeeper => Arc::new(ZkCoordinator::new(config.zookeeper.clone())),
        DefinitionSourceKind::File => Arc::new(LocalCoordinator::keeping_progress_in(
            config.standalone.data_dir.join("sources"),
        )),
    }
}

/// What a service gets to run, with the coordinator it registers, campaigns and keeps
/// progress with.
pub type ServiceContext = instream_core::ServiceContext<Arc<dyn Coordinator>>;

/// A context for a service run inside a test or a tool, with the coordinator `config` implies.
pub fn service_context(
    config: instream_core::Config,
    health: instream_core::Health,
    shutdown: tokio_util::sync::CancellationToken,
    admin_addr: std::net::SocketAddr,
) -> ServiceContext {
    let coordinator = coordinator(&config);
    instream_core::ServiceContext::new(config, health, shutdown, admin_addr)
        .with_coordinator(coordinator)
}

/// [`instream_core::service_main`] with the coordinator the config implies.
pub fn service_main<F, Fut, E>(service: instream_core::Service, run: F) -> ExitCode
where
    F: FnOnce(ServiceContext) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + 'static,
{
    instream_core::service_main(service, coordinator, run)
}

/// [`instream_core::run_service`] with the coordinator the config implies.
pub fn run_service<F, Fut, E>(
    service: instream_core::Service,
    config: Option<&std::path::Path>,
    run: F,
) -> ExitCode
where
    F: FnOnce(ServiceContext) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + 'static,
{
    instream_core::run_service(service, config, coordinator, run)
}

/// The definition source `config.definitions` names.
pub fn definition_source(config: &Config) -> Box<dyn DefinitionSource> {
    match (&config.definitions.source, &config.definitions.path) {
        (DefinitionSourceKind::File, Some(path)) => Box::new(FileSource::new(path)),
        // Validation refuses `file` without a path; ZooKeeper is the default either way.
        _ => Box::new(ZkDefinitionSource::new(config.zookeeper.clone())),
    }
}

/// A name for this instance, unique even when several share a process (standalone, tests).
pub fn instance_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{host}-{}-{started:x}", std::process::id())
}

/// Registers this service instance with `coordinator`: host, admin address, version and role
/// now; assigned partitions as they change ([`Registration::update`]).
pub async fn register_service(
    coordinator: &dyn Coordinator,
    service: &str,
    admin: std::net::SocketAddr,
) -> Result<Registration, CoordError> {
    let info = InstanceInfo::of_this_process(service, admin);
    coordinator.register(service, &instance_name(), info).await
}
