//! The store conformance suite against a real ScyllaDB/Cassandra. No such server can be
//! installed on the CI machine, so these tests are ignored unless `INSTREAM_TEST_SCYLLA` is
//! given (`scripts/test.sh` then runs them with `--ignored`).

use instream_config::{StoreBackend, StoreConfig};
use instream_store::{conformance, ScyllaStore};

fn config() -> StoreConfig {
    let addr = std::env::var("INSTREAM_TEST_SCYLLA")
        .expect("INSTREAM_TEST_SCYLLA=host:9042 must be set to run this suite");
    StoreConfig {
        backend: StoreBackend::Scylla,
        scylla_nodes: vec![addr],
        keyspace: "instream_test".into(),
        replication_factor: 1,
        ..StoreConfig::default()
    }
}

#[tokio::test]
#[ignore = "needs INSTREAM_TEST_SCYLLA=host:9042"]
async fn scylla_store_passes_the_conformance_suite() {
    let store = ScyllaStore::connect(&config()).await.unwrap();
    conformance::run(&store, &instream_testkit::unique("p")).await;
}

#[tokio::test]
#[ignore = "needs INSTREAM_TEST_SCYLLA=host:9042"]
async fn scylla_schema_apply_is_idempotent() {
    let cfg = config();
    ScyllaStore::connect(&cfg).await.unwrap();
    ScyllaStore::connect(&cfg).await.unwrap();
}
