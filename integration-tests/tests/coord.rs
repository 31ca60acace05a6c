//! ZooKeeper as the control plane, on a real ZooKeeper 3.8: definitions reach a subscriber
//! without a restart, an invalid stored definition is ignored with the last good version kept,
//! a lower version is refused, and registry nodes live exactly as long as their session.

use std::time::Duration;

use instream_coord::{publish_definition, register_instance, ZkDefinitionSource};
use instream_core::config::ZooKeeperConfig;
use instream_pipeline::{parse_document, DefinitionSource, PipelineDefinition};
use instream_testkit::{unique, ZooKeeperServer};
use tokio_util::sync::CancellationToken;
use zookeeper_client as zk;

fn definition(name: &str, version: u64, partitions: i32) -> PipelineDefinition {
    let mut doc = parse_document(&format!(
        "[[pipelines]]\nname = \"{name}\"\nversion = {version}\nkey_field = \"k\"\ntime_field = \"t\"\npartitions = {partitions}\n"
    ))
    .unwrap();
    doc.pipelines.remove(0)
}

fn config(zk: &ZooKeeperServer) -> ZooKeeperConfig {
    ZooKeeperConfig {
        connect: zk.connect_string(),
        root: format!("/{}", unique("instream")),
        session_timeout: Duration::from_secs(4),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definition_changes_reach_subscribers_and_bad_ones_are_ignored() {
    let server = ZooKeeperServer::start().unwrap();
    let cfg = config(&server);
    publish_definition(&cfg, &definition("orders", 1, 4))
        .await
        .unwrap();

    let shutdown = CancellationToken::new();
    let mut rx = ZkDefinitionSource::new(cfg.clone())
        .subscribe(shutdown.clone())
        .await
        .unwrap();
    assert_eq!(rx.borrow_and_update().get("orders").unwrap().version, 1);

    // A new version arrives within 2 s, with no restart.
    publish_definition(&cfg, &definition("orders", 2, 8))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(2), rx.changed())
        .await
        .expect("the change arrives within 2 s")
        .unwrap();
    let current = rx.borrow_and_update().get("orders").unwrap().clone();
    assert_eq!((current.version, current.partitions), (2, 8));

    // A second pipeline appears.
    publish_definition(&cfg, &definition("clicks", 1, 2))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(2), rx.changed())
        .await
        .expect("a new pipeline arrives within 2 s")
        .unwrap();
    assert_eq!(rx.borrow_and_update().len(), 2);

    // A version that is not higher is refused at publish.
    let err = publish_definition(&cfg, &definition("orders", 2, 3))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("not above the stored version"),
        "{err}"
    );

    // Garbage written behind publish's back is ignored; the last good version stays.
    let client = zk::Client::connect(&cfg.connect).await.unwrap();
    client
        .set_data(
            &format!("{}/pipelines/orders", cfg.root),
            b"{not json",
            None,
        )
        .await
        .unwrap();
    // Give the watch time to fire and the reload to run; the catalog must not change.
    let changed = tokio::time::timeout(Duration::from_secs(2), rx.changed()).await;
    assert!(
        changed.is_err(),
        "an invalid definition must not change the catalog"
    );
    assert_eq!(rx.borrow().get("orders").unwrap().version, 2);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_nodes_live_as_long_as_their_session() {
    let server = ZooKeeperServer::start().unwrap();
    let cfg = config(&server);
    let info = serde_json::json!({"admin": "127.0.0.1:9464"});
    let registration = register_instance(&cfg, "enricher", "host-1", &info)
        .await
        .unwrap();
    let client = zk::Client::connect(&cfg.connect).await.unwrap();
    let folder = format!("{}/services/enricher", cfg.root);
    assert_eq!(client.list_children(&folder).await.unwrap(), ["host-1"]);
    let (data, _) = client.get_data(&registration.path).await.unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&data).unwrap(),
        info
    );
    drop(registration);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !client.list_children(&folder).await.unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node outlived its session"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
