//! instream-testkit: real servers for tests, on free loopback ports, torn down on drop.
//!
//! - [`RedisServer`]: `redis-server` with persistence off, in a temp dir.
//! - [`ZooKeeperServer`]: a ZooKeeper 3.8 standalone server (Debian's `zookeeper` package)
//!   with a temp dataDir.
//! - [`KafkaBroker`]: the Kafka-protocol broker a test talks to — the cluster named by
//!   `INSTREAM_TEST_KAFKA=host:port` when set (a real Apache Kafka), else librdkafka's
//!   in-process broker (see `instream_kafka::EmbeddedBroker`).
//! - [`PostgresServer`]: a PostgreSQL cluster made by `initdb` in a temp dir (as the `postgres`
//!   user under root), trust authentication.
//! - [`TcpProxy`]: a proxy a test cuts to partition a client from its server.
//! - [`RedisCluster`], [`RedisSentinel`]: Redis as Cluster (three masters) and behind a Sentinel.
//!
//! Every start waits on a condition (the server answering its protocol), never a fixed sleep,
//! and every server is killed when its handle drops, also when the test panics.

mod bench;
mod config;
mod metrics;
pub mod openapi;
mod pki;
mod postgres;
mod process;
mod proxy;
mod redis_topologies;
mod servers;
mod tls_proxy;
mod wait;

pub use bench::{
    bench_broker, bench_topics, cpu_seconds, percentile_ms, seed_bidders, spawn_bench_aggregator,
    spawn_bench_service, spawn_release_binary, BIDS_PIPELINE,
};
pub use config::process_config_toml;
pub use metrics::metric_sum;
pub use pki::TestPki;
pub use postgres::PostgresServer;
pub use process::{
    free_port, spawn_service, spawn_service_with, wait_until, ChildGuard, TestkitError,
};
pub use proxy::TcpProxy;
pub use redis_topologies::{RedisCluster, RedisSentinel};
pub use servers::{KafkaBroker, RedisServer, ZooKeeperServer};
pub use tls_proxy::{TlsBroker, TlsProxy, TlsProxySettings};
pub use wait::wait_for;

/// A unique suffix for names a test creates (topics, pipelines, znodes), so tests sharing a
/// broker never see each other's data.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{n}-{nanos:x}", std::process::id())
}
