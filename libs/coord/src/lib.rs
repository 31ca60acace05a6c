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
