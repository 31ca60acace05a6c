//! The control-plane commands as the real binary: `pipeline apply|get|list|diff`,
//! `refdata load`, `topics create`, `status` and `query`, against a real ZooKeeper, a real
//! Redis and a Kafka-protocol broker (the embedded one, or `INSTREAM_TEST_KAFKA`). Errors are
//! one line on stderr and a non-zero exit.

mod common;

use std::time::Duration;

use common::{definitions, Env};
use instream_testkit::{KafkaBroker, ZooKeeperServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_commands_apply_get_list_and_diff_definitions() {
    let zookeeper = ZooKeeperServer::start().unwrap();
    let broker = KafkaBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = Env::new(&zookeeper, &broker);
    let v1 = definitions(dir.path(), "orders", 1, "");
    let v1 = v1.to_str().unwrap();

    // Before anything is stored, diff says `new`.
    let diff = env.json(&["pipeline", "diff", v1, "--output", "json"]);
    assert_eq!(diff[0]["state"], "new");
    assert!(env
        .ok(&["pipeline", "apply", v1])
        .contains("pipeline `orders` version 1 stored"));

    let listed = env.json(&["pipeline", "list", "--output", "json"]);
    assert_eq!(listed[0]["name"], "orders");
    assert_eq!(listed[0]["version"], 1);
    assert_eq!(listed[0]["aggregations"], 1);
    let table = env.ok(&["pipeline", "list"]);
    assert!(table.starts_with("PIPELINE"), "{table}");
    assert!(table.contains("orders"), "{table}");

    // `get` prints TOML that `apply` takes back (with a higher version).
    let toml_text = env.ok(&["pipeline", "get", "orders"]);
    let got = env.json(&["pipeline", "get", "orders", "--output", "json"]);
    assert_eq!(got["partitions"], 2);
    let again = dir.path().join("again.toml");
    std::fs::write(&again, toml_text.replace("version = 1", "version = 2")).unwrap();
    let again = again.to_str().unwrap();
    assert_eq!(
        env.json(&["pipeline", "diff", again, "--output", "json"])[0]["state"],
        "changed",
        "only the version differs"
    );
    let applied = env.json(&["pipeline", "apply", again, "--output", "json"]);
    assert_eq!(applied[0]["outcome"], "stored");
    // Version 2 takes over at a window boundary after the apply, keeping version 1 for the
    // windows before it.
    let from = applied[0]["effective_from"].as_str().expect("stamped");
    let from = instream_event::parse_event_time(&serde_json::json!(from)).unwrap();
    assert!(from > instream_event::now_millis(), "{from}");
    assert_eq!(from % 60_000, 0, "on a window boundary");
    let stored = env.json(&["pipeline", "get", "orders", "--output", "json"]);
    assert_eq!(stored["previous"][0]["version"], 1);
    assert!(
        !env.ok(&["pipeline", "get", "orders"]).contains("previous"),
        "the TOML is what apply takes back"
    );
    // Applying the same file again changes nothing and is not an error.
    let applied = env.json(&["pipeline", "apply", again, "--output", "json"]);
    assert_eq!(applied[0]["outcome"], "unchanged");
    assert_eq!(
        env.json(&["pipeline", "diff", again, "--output", "json"])[0]["state"],
        "unchanged"
    );

    // A changed file: diff shows the changed line, stores nothing.
    let v3 = definitions(dir.path(), "orders", 3, "max_out_of_orderness = \"30s\"");
    let v3 = v3.to_str().unwrap();
    let diff = env.ok(&["pipeline", "diff", v3]);
    assert!(diff.contains("pipeline `orders`: changed"), "{diff}");
    assert!(diff.contains("+  \"max_out_of_orderness\""), "{diff}");
    assert_eq!(
        env.json(&["pipeline", "get", "orders", "--output", "json"])["version"],
        2
    );

    // Refusals: one line each, non-zero exit, nothing stored.
    let error = env.fails(&["pipeline", "apply", v1]);
    assert!(error.contains("not above the stored version 2"), "{error}");
    // All or nothing: a file whose second pipeline is refused stores neither.
    let both = dir.path().join("both.toml");
    std::fs::write(
        &both,
        std::fs::read_to_string(definitions(dir.path(), "clicks", 1, "")).unwrap()
            + &std::fs::read_to_string(v1).unwrap(),
    )
    .unwrap();
    let error = env.fails(&["pipeline", "apply", both.to_str().unwrap()]);
    assert!(error.contains("nothing stored"), "{error}");
    let listed = env.json(&["pipeline", "list", "--output", "json"]);
    assert_eq!(
        listed.as_array().unwrap().len(),
        1,
        "clicks was not stored: {listed}"
    );
    let invalid = definitions(dir.path(), "orders", 4, "partitions = 0");
    let error = env.fails(&["pipeline", "apply", invalid.to_str().unwrap()]);
    assert!(error.contains("partitions"), "{error}");
    let error = env.fails(&["pipeline", "get", "nope"]);
    assert!(error.contains("no pipeline `nope`"), "{error}");
    let error = env.fails(&["pipeline", "apply", "/no/such/file.toml"]);
    assert!(error.contains("/no/such/file.toml"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_topics_and_query_show_the_running_platform() {
    let zookeeper = ZooKeeperServer::start().unwrap();
    let broker = KafkaBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("aggregates.redb");
    let env = Env {
        store: Some(store_path.clone()),
        ..Env::new(&zookeeper, &broker)
    };
    let defs = definitions(dir.path(), "orders", 1, "");
    env.ok(&["pipeline", "apply", defs.to_str().unwrap()]);
    // A second pipeline whose topics do not exist yet.
    let clicks = definitions(dir.path(), "clicks", 1, "");
    env.ok(&["pipeline", "apply", clicks.to_str().unwrap()]);
    for topic in ["orders.raw", "orders.enriched", "orders.dlq"] {
        broker.create_topic(topic, 2).unwrap();
    }
    // Five records no group has read yet.
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .create()
        .unwrap();
    for i in 0..5 {
        producer
            .send(
                rdkafka::producer::FutureRecord::<str, str>::to("orders.raw")
                    .key(&format!("k{i}"))
                    .payload("{}"),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }

    // topics create: the topics exist, so they are left as they are.
    let created = env.json(&[
        "topics",
        "create",
        "--pipeline",
        "orders",
        "--output",
        "json",
    ]);
    let outcomes: Vec<&str> = created
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["existed"; 3], "{created}");
    if !broker.is_embedded() {
        // A real broker answers CreateTopics (the embedded one has no such API): clicks' topics
        // are created with the flags given.
        let created = env.json(&[
            "topics",
            "create",
            "--pipeline",
            "clicks",
            "--partitions",
            "3",
            "--replication",
            "1",
            "--retention",
            "7d",
            "--output",
            "json",
        ]);
        for topic in created.as_array().unwrap() {
            assert_eq!(topic["outcome"], "created", "{created}");
            assert_eq!(topic["partitions"], 3);
            assert_eq!(topic["retention_ms"], 7 * 24 * 3_600_000u64);
        }
        let again = env.json(&[
            "topics",
            "create",
            "--pipeline",
            "clicks",
            "--output",
            "json",
        ]);
        assert!(
            again
                .as_array()
                .unwrap()
                .iter()
                .all(|t| t["outcome"] == "existed"),
            "{again}"
        );
    }
    let error = env.fails(&["topics", "create", "--pipeline", "nope"]);
    assert!(error.contains("no pipeline `nope`"), "{error}");

    // status: a registered instance and every group's lag.
    let zk = instream_core::config::ZooKeeperConfig {
        connect: env.zk.clone(),
        root: env.root.clone(),
        ..Default::default()
    };
    let registration = instream_coord::register_instance(
        &zk,
        "enricher",
        "host-1",
        serde_json::from_value(
            serde_json::json!({"admin": "10.0.0.1:9464", "version": "0.1.0",
            "partitions": ["orders.raw/0"], "definitions": {"orders": 1}}),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    let status = env.json(&["status", "--output", "json"]);
    assert_eq!(status["instances"][0]["service"], "enricher");
    assert_eq!(status["instances"][0]["info"]["admin"], "10.0.0.1:9464");
    let rows: Vec<(&str, &str, Option<i64>)> = status["lag"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["group"].as_str().unwrap(),
                l["topic"].as_str().unwrap(),
                l["lag"].as_i64(),
            )
        })
        .collect();
    // clicks' topics exist only where `topics create` could make them.
    let clicks = if broker.is_embedded() { None } else { Some(0) };
    assert_eq!(
        rows,
        [
            ("instream-aggregator", "clicks.enriched", clicks),
            ("instream-aggregator", "orders.enriched", Some(0)),
            ("instream-archiver", "clicks.raw", clicks),
            ("instream-archiver", "orders.raw", Some(5)),
            ("instream-enricher", "clicks.raw", clicks),
            ("instream-enricher", "orders.raw", Some(5)),
        ],
        "{status}"
    );
    let table = env.ok(&["status"]);
    assert!(
        table.contains("orders@1") && table.contains("orders.raw/0"),
        "{table}"
    );
    drop(registration);

    // query: windows written by an aggregator into the local store.
    {
        let store = instream_store::LocalStore::open(&store_path).unwrap();
        use instream_store::AggregateStore;
        let window = |start: i64, count: i64| instream_store::WindowAggregate {
            pipeline: "orders".into(),
            aggregation: "per_minute".into(),
            group_key: "c1".into(),
            window_start: start,
            window_end: start + 60_000,
            definition_version: 1,
            count,
            values: Default::default(),
            is_final: false,
        };
        store
            .upsert(&[window(1_714_564_800_000, 3), window(1_714_564_860_000, 5)])
            .await
            .unwrap();
    }
    let windows = env.json(&[
        "query",
        "--pipeline",
        "orders",
        "--aggregation",
        "per_minute",
        "--key",
        "c1",
        "--from",
        "2024-05-01T12:01:00Z",
        "--output",
        "json",
    ]);
    assert_eq!(windows.as_array().unwrap().len(), 1, "{windows}");
    assert_eq!(windows[0]["count"], 5);
    let table = env.ok(&[
        "query",
        "--pipeline",
        "orders",
        "--aggregation",
        "per_minute",
        "--key",
        "c1",
    ]);
    assert!(
        table.contains("2024-05-01T12:00:00") && table.contains("2024-05-01T12:01:00"),
        "{table}"
    );
    let error = env.fails(&[
        "query",
        "--pipeline",
        "orders",
        "--aggregation",
        "per_minute",
        "--key",
        "c1",
        "--from",
        "yesterday",
    ]);
    assert!(error.contains("RFC 3339"), "{error}");
}
