//! instream-core: what every instream service shares at run time.
//!
//! - [`config`]: the one validated configuration (a TOML file plus `INSTREAM__SECTION__KEY`
//!   environment overrides over embedded defaults), from the data-only `instream-config`
//!   crate. Every knob of every service lives there so that one file configures a whole
//!   deployment and an invalid value stops a process at start, naming the key.
//! - [`telemetry`]: `tracing` set-up (JSON or pretty) and the Prometheus recorder.
//! - [`admin`]: the admin HTTP server each service runs on its own port (`/metrics`,
//!   `/healthz`, `/readyz`) and the [`admin::Health`] registry behind `/readyz`.
//! - [`shutdown`]: SIGTERM/SIGINT handling and a supervisor that stops every task of a process
//!   when one fails.
//!
//! Nothing here talks to Kafka, Redis, ZooKeeper or a store: those live in their own libs.

pub mod admin;
pub mod auth;
/// The configuration, in its own crate ([`instream_config`]); here so that services name one
/// crate for what they share.
pub use instream_config as config;
pub use instream_config::backlog;
pub mod events;
mod metric_help;
pub mod progress;
pub mod retry;
pub mod service;
pub mod shutdown;
pub mod telemetry;

pub use admin::{AdminServer, Health, Readiness};
pub use config::{Config, ConfigError};
pub use progress::Progress;
pub use retry::{Backoff, GaveUp, Pauses, Retry};
pub use service::{run_service, service_main, Service, ServiceContext};
pub use shutdown::{shutdown_on_signal, spawn_watched, Supervisor, SupervisorError, Tasks};

/// Makes ring rustls's process-wide default. Clients that take the default instead of being
/// given one (the Redis client, the ZooKeeper client) panic when more than one provider is
/// built in, and the ZooKeeper client's TLS brings aws-lc-rs besides the ring every other TLS
/// user here is given. Idempotent; call before building such a client.
pub fn install_tls_provider() {
    // Err: a default is set already (by an earlier call): that one stays.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
}
