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

use std::sync::{Arc, OnceLock};

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

/// The coordinator the config implies: ZooKeeper when definitions come from ZooKeeper; the
/// process's one in-process coordinator otherwise (standalone), shared by every service in it,
/// which keeps sources' progress under `standalone.data_dir`/sources.
pub fn coordinator(config: &Config) -> Arc<dyn Coordinator> {
    static LOCAL: OnceLock<LocalCoordinator> = OnceLock::new();
    match config.definitions.source {
        DefinitionSourceKind::Zookeeper => Arc::new(ZkCoordinator::new(config.zookeeper.clone())),
        DefinitionSourceKind::File => Arc::new(
            LOCAL
                .get_or_init(|| {
                    LocalCoordinator::keeping_progress_in(
                        config.standalone.data_dir.join("sources"),
                    )
                })
                .clone(),
        ),
    }
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

/// Registers this service instance with the coordinator the config implies: host, admin
/// address, version and role now; assigned partitions as they change
/// ([`Registration::update`]).
pub async fn register_service(
    config: &Config,
    service: &str,
    admin: std::net::SocketAddr,
) -> Result<Registration, CoordError> {
    let info = InstanceInfo::of_this_process(service, admin);
    coordinator(config)
        .register(service, &instance_name(), info)
        .await
}
