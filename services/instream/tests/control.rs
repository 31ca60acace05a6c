//! The control-plane commands as the real binary: `pipeline apply|get|list|diff`,
//! `refdata load`, `topics create`, `status` and `query`, against a real ZooKeeper, a real
//! Redis and a Kafka-protocol broker (the embedded one, or `INSTREAM_TEST_KAFKA`). Errors are
//! one line on stderr and a non-zero exit.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use instream_testkit::{unique, KafkaBroker, RedisServer, ZooKeeperServer};
use serde_json::Value;

struct Env {
    zk: String,
    root: String,
    bootstrap: String,
    redis: Option<String>,
    store: Option<std::path::PathBuf>,
}

impl Env {
    fn run(&self, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_instream"));
        command
            .args(args)
            .env("INSTREAM__ZOOKEEPER__CONNECT", &self.zk)
            .env("INSTREAM__ZOOKEEPER__ROOT", &self.root)
            .env("INSTREAM__KAFKA__BOOTSTRAP_SERVERS", &self.bootstrap)
            .env("INSTREAM__TELEMETRY__LOG_LEVEL", "error");
        if let Some(redis) = &self.redis {
            command.env("INSTREAM__REFDATA__REDIS_URL", redis);
        }
        if let Some(store) = &self.store {
            command
                .env("INSTREAM__STORE__BACKEND", "local")
                .env("INSTREAM__STORE__PATH", store);
        }
        command.output().expect("runs instream")
    }

    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "instream {args:?}: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let text = self.ok(args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
    }

    /// Runs a command that must fail; returns its one-line error.
    fn fails(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(!output.status.success(), "instream {args:?} succeeded");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "one line of error: {stderr}"
        );
        stderr
    }
}

fn definitions(dir: &Path, name: &str, version: u64, extra: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}-v{version}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
[[pipelines]]
name = "{name}"
version = {version}
key_field = "customer_id"
time_field = "ts"
partitions = 2
{extra}
[[pipelines.enrichments]]
name = "customer"
key_template = "customer:{{customer_id}}"

[[pipelines.aggregations]]
name = "per_minute"
window = {{ kind = "tumbling", size = "1m" }}
"#
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_commands_apply_get_list_and_diff_definitions() {
    let zookeeper = ZooKeeperServer::start().unwrap();
    let broker = KafkaBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = Env {
        zk: zookeeper.connect_string(),
        root: format!("/{}", unique("cli")),
        bootstrap: broker.bootstrap_servers(),
        redis: None,
        store: None,
    };
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
async fn refdata_load_switches_versions_and_enrichers_follow() {
    let zookeeper = ZooKeeperServer::start().unwrap();
    let redis = RedisServer::start().unwrap();
    let broker = KafkaBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = Env {
        zk: zookeeper.connect_string(),
        root: format!("/{}", unique("cli")),
        bootstrap: broker.bootstrap_servers(),
        redis: Some(redis.url()),
        store: None,
    };
    let defs = definitions(dir.path(), "orders", 1, "");
    env.ok(&["pipeline", "apply", defs.to_str().unwrap()]);

    // What an enricher holds: a store that follows the rule's version.
    let refdata = instream_core::config::RefDataConfig {
        redis_url: redis.url(),
        version_check_interval: Duration::from_secs(60),
        ..Default::default()
    };
    let store = instream_refdata::RedisRefStore::connect(&refdata)
        .await
        .unwrap();
    use instream_refdata::RefStore;
    let rule = ("orders".to_owned(), "customer".to_owned());
    store.track(std::slice::from_ref(&rule)).await.unwrap();
    assert_eq!(store.version("orders", "customer"), None);

    let csv = dir.path().join("customers.csv");
    std::fs::write(&csv, "id,tier,name\nc1,gold,Ann\nc2,silver,\"Bob, Jr.\"\n").unwrap();
    let loaded = env.json(&[
        "refdata",
        "load",
        csv.to_str().unwrap(),
        "--pipeline",
        "orders",
        "--rule",
        "customer",
        "--key-field",
        "id",
        "--output",
        "json",
    ]);
    assert_eq!(
        (loaded["version"].as_u64(), loaded["records"].as_u64()),
        (Some(1), Some(2))
    );
    // The announcement reaches the enricher's store within 2 s (the periodic check is 60 s).
    wait_for("version 1", || {
        store.version("orders", "customer") == Some(1)
    })
    .await;
    let key = |v: u64, k: &str| {
        format!(
            "{}customer:{k}",
            instream_refdata::versions::version_prefix("orders", "customer", v)
        )
    };
    let found = store
        .lookup_many(&[(key(1, "c2"), instream_pipeline::RecordShape::Hash)])
        .await
        .unwrap();
    let instream_refdata::Found::Record(record) = &found[0] else {
        panic!("{found:?}")
    };
    assert_eq!(record["name"], "Bob, Jr.");
    assert_eq!(record["tier"], "silver");

    // JSON lines as version 2, then 3: version 1 goes once 2 is the previous one.
    let jsonl = dir.path().join("customers.jsonl");
    std::fs::write(&jsonl, "{\"id\":\"c1\",\"tier\":\"platinum\"}\n").unwrap();
    for expected in [2u64, 3] {
        let loaded = env.json(&[
            "refdata",
            "load",
            jsonl.to_str().unwrap(),
            "--pipeline",
            "orders",
            "--rule",
            "customer",
            "--key-field",
            "id",
            "--output",
            "json",
        ]);
        assert_eq!(loaded["version"].as_u64(), Some(expected));
        wait_for("the new version", || {
            store.version("orders", "customer") == Some(expected)
        })
        .await;
    }
    let old = store
        .lookup_many(&[
            (key(1, "c1"), instream_pipeline::RecordShape::Hash),
            (key(2, "c1"), instream_pipeline::RecordShape::Hash),
            (key(3, "c1"), instream_pipeline::RecordShape::Hash),
        ])
        .await
        .unwrap();
    assert!(
        matches!(old[0], instream_refdata::Found::Record(_)),
        "a retired version stays readable for its grace period"
    );
    let redis_conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ttl = |k: String| {
        let mut c = redis_conn.clone();
        async move {
            redis::cmd("TTL")
                .arg(k)
                .query_async::<i64>(&mut c)
                .await
                .unwrap()
        }
    };
    let retired_ttl = ttl(key(1, "c1")).await;
    assert!(
        (1..=600).contains(&retired_ttl),
        "version 1 expires within the grace: {retired_ttl}"
    );
    assert_eq!(
        ttl(key(2, "c1")).await,
        -1,
        "the previous version does not expire"
    );
    assert!(
        matches!(old[1], instream_refdata::Found::Record(_)),
        "the previous version stays"
    );
    assert!(matches!(&old[2], instream_refdata::Found::Record(r) if r["tier"] == "platinum"));

    // Refusals name the problem.
    let error = env.fails(&[
        "refdata",
        "load",
        csv.to_str().unwrap(),
        "--pipeline",
        "orders",
        "--rule",
        "nope",
        "--key-field",
        "id",
    ]);
    assert!(error.contains("no enrichment rule `nope`"), "{error}");
    let error = env.fails(&[
        "refdata",
        "load",
        csv.to_str().unwrap(),
        "--pipeline",
        "orders",
        "--rule",
        "customer",
        "--key-field",
        "missing",
    ]);
    assert!(
        error.contains("line 2") && error.contains("`missing`"),
        "{error}"
    );
    let error = env.fails(&[
        "refdata",
        "load",
        csv.to_str().unwrap(),
        "--pipeline",
        "orders",
        "--rule",
        "customer",
        "--key-field",
        "id",
        "--key-field",
        "tier",
    ]);
    assert!(error.contains("one --key-field per field"), "{error}");
    assert_eq!(
        store.version("orders", "customer"),
        Some(3),
        "failed loads switch nothing"
    );

    // A load that finishes after a later one never moves the pointer back.
    let mut c = redis_conn.clone();
    let _: () = redis::cmd("SET")
        .arg(instream_refdata::versions::pointer_key(
            "orders", "customer",
        ))
        .arg(99)
        .query_async(&mut c)
        .await
        .unwrap();
    let loaded = env.json(&[
        "refdata",
        "load",
        jsonl.to_str().unwrap(),
        "--pipeline",
        "orders",
        "--rule",
        "customer",
        "--key-field",
        "id",
        "--output",
        "json",
    ]);
    assert_eq!(loaded["switched"], false, "{loaded}");
    let pointer: u64 = redis::cmd("GET")
        .arg(instream_refdata::versions::pointer_key(
            "orders", "customer",
        ))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(pointer, 99);
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_topics_and_query_show_the_running_platform() {
    let zookeeper = ZooKeeperServer::start().unwrap();
    let broker = KafkaBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("aggregates.redb");
    let env = Env {
        zk: zookeeper.connect_string(),
        root: format!("/{}", unique("cli")),
        bootstrap: broker.bootstrap_servers(),
        redis: None,
        store: Some(store_path.clone()),
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
        &serde_json::json!({"admin": "10.0.0.1:9464", "version": "0.1.0",
            "partitions": ["orders.raw/0"], "definitions": {"orders": 1}}),
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
