//! instream-coord: ZooKeeper as instream's control plane.
//!
//! Layout under `zookeeper.root` (default `/instream`):
//! - `pipelines/<name>`: one pipeline definition as JSON, validated before it is stored and
//!   watched by every service ([`ZkDefinitionSource`]).
//! - `services/<service>/<instance>`: an ephemeral node per running instance
//!   ([`register_instance`]), gone when the instance's session ends.

mod definitions;
mod registry;
mod session;

pub use definitions::{publish_definition, ZkDefinitionSource};
pub use registry::{register_instance, Registration};
pub use session::{connect, CoordError};

use instream_core::config::{Config, DefinitionSourceKind};
use instream_pipeline::{DefinitionSource, FileSource};

/// The definition source `config.definitions` names.
pub fn definition_source(config: &Config) -> Box<dyn DefinitionSource> {
    match (&config.definitions.source, &config.definitions.path) {
        (DefinitionSourceKind::File, Some(path)) => Box::new(FileSource::new(path)),
        // Validation refuses `file` without a path; ZooKeeper is the default either way.
        _ => Box::new(ZkDefinitionSource::new(config.zookeeper.clone())),
    }
}

/// Registers this instance in ZooKeeper when the deployment uses ZooKeeper (definitions
/// from ZooKeeper); standalone set-ups with a definitions file have no registry.
pub async fn register_service(
    config: &Config,
    service: &str,
    admin: std::net::SocketAddr,
) -> Result<Option<Registration>, CoordError> {
    if config.definitions.source != DefinitionSourceKind::Zookeeper {
        return Ok(None);
    }
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
    // Several instances may share a process (standalone mode, tests): the start time tells
    // them apart.
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let instance = format!("{host}-{}-{started:x}", std::process::id());
    let info = serde_json::json!({
        "service": service,
        "host": host,
        "pid": std::process::id(),
        "admin": admin.to_string(),
        "version": env!("CARGO_PKG_VERSION"),
    });
    register_instance(&config.zookeeper, service, &instance, &info)
        .await
        .map(Some)
}
