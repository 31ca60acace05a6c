//! `instream refdata load` as the real binary against a real ZooKeeper and a real Redis:
//! versions switched atomically and followed by an enricher's store, retired versions kept
//! for their grace, bad input refused with nothing switched.

mod common;

use instream_testkit::wait_for;
use std::time::Duration;

use common::{definitions, Env};
use instream_refdata::RefStore;
use instream_testkit::{KafkaBroker, RedisServer, ZooKeeperServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refdata_load_switches_versions_and_enrichers_follow() {
    let zookeeper = ZooKeeperServer::start().unwrap();
    let redis = RedisServer::start().unwrap();
    let broker = KafkaBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = Env {
        redis: Some(redis.url()),
        ..Env::new(&zookeeper, &broker)
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
    let rule = ("orders".to_owned(), "customer".to_owned());
    store.track(std::slice::from_ref(&rule)).await.unwrap();
    assert_eq!(store.version("orders", "customer"), None);

    let csv = dir.path().join("customers.csv");
    std::fs::write(&csv, "id,tier,name\nc1,gold,Ann\nc2,silver,\"Bob, Jr.\"\n").unwrap();
    let loaded = env.json(&load(
        csv.to_str().unwrap(),
        "customer",
        &["id"],
        &["--output", "json"],
    ));
    assert_eq!(
        (loaded["version"].as_u64(), loaded["records"].as_u64()),
        (Some(1), Some(2))
    );
    // The announcement reaches the enricher's store within 2 s (the periodic check is 60 s).
    wait_for("version 1", Duration::from_secs(2), || {
        std::future::ready(store.version("orders", "customer") == Some(1))
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
        let loaded = env.json(&load(
            jsonl.to_str().unwrap(),
            "customer",
            &["id"],
            &["--output", "json"],
        ));
        assert_eq!(loaded["version"].as_u64(), Some(expected));
        wait_for("the new version", Duration::from_secs(2), || {
            std::future::ready(store.version("orders", "customer") == Some(expected))
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
    let error = env.fails(&load(csv.to_str().unwrap(), "nope", &["id"], &[]));
    assert!(error.contains("no enrichment rule `nope`"), "{error}");
    let error = env.fails(&load(csv.to_str().unwrap(), "customer", &["missing"], &[]));
    assert!(
        error.contains("line 2") && error.contains("`missing`"),
        "{error}"
    );
    let error = env.fails(&load(
        csv.to_str().unwrap(),
        "customer",
        &["id", "tier"],
        &[],
    ));
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
    let loaded = env.json(&load(
        jsonl.to_str().unwrap(),
        "customer",
        &["id"],
        &["--output", "json"],
    ));
    assert_eq!(loaded["switched"], false, "{loaded}");
    let pointer = pointer(&mut c).await;
    assert_eq!(pointer, 99);
}

/// `instream refdata load FILE --pipeline orders --rule RULE --key-field K…` and `extra`.
fn load<'a>(
    file: &'a str,
    rule: &'a str,
    key_fields: &[&'a str],
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "refdata",
        "load",
        file,
        "--pipeline",
        "orders",
        "--rule",
        rule,
    ];
    for key in key_fields {
        args.extend(["--key-field", key]);
    }
    args.extend(extra);
    args
}

/// Applies the `orders` pipeline, then loads `rows` (CSV) for its rule `customer` keyed by
/// `id` with `refdata` as the config's `[refdata]` section: the load's JSON report.
fn load_customers(env: &Env, refdata: &str, rows: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let defs = definitions(dir.path(), "orders", 1, "");
    env.ok(&["pipeline", "apply", defs.to_str().unwrap()]);
    let config = dir.path().join("instream.toml");
    std::fs::write(&config, format!("[refdata]\n{refdata}")).unwrap();
    let csv = dir.path().join("customers.csv");
    std::fs::write(&csv, rows).unwrap();
    env.json(&load(
        csv.to_str().unwrap(),
        "customer",
        &["id"],
        &["--config", config.to_str().unwrap(), "--output", "json"],
    ))
}

/// An enricher's store with `cfg`, following the versions of `orders`/`customer`.
async fn tracking_customers(
    cfg: &instream_core::config::RefDataConfig,
) -> instream_refdata::RedisRefStore {
    let store = instream_refdata::RedisRefStore::connect(cfg).await.unwrap();
    store
        .track(&[("orders".into(), "customer".into())])
        .await
        .unwrap();
    store
}

/// The version pointer of `orders`/`customer`, read on `connection`.
async fn pointer(connection: &mut redis::aio::MultiplexedConnection) -> u64 {
    redis::cmd("GET")
        .arg(instream_refdata::versions::pointer_key(
            "orders", "customer",
        ))
        .query_async(connection)
        .await
        .unwrap()
}

/// With `refdata.redis_mode = "sentinel"` the load goes to the master the sentinel names, and
/// a store in sentinel mode reads the new version there (enrichers in that mode follow
/// switches by the pointer check: pub/sub is standalone only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refdata_load_writes_to_the_master_a_sentinel_names() {
    let zookeeper = ZooKeeperServer::start().unwrap();
    let sentinel = instream_testkit::RedisSentinel::start().unwrap();
    let broker = KafkaBroker::start().unwrap();
    let env = Env::new(&zookeeper, &broker);
    let loaded = load_customers(
        &env,
        &format!(
            "redis_mode = \"sentinel\"\nredis_nodes = [\"{}\"]\nsentinel_master = \"mymaster\"\n",
            sentinel.sentinel_url()
        ),
        "id,tier\nc1,gold\n",
    );
    assert_eq!(
        (loaded["version"].as_u64(), loaded["switched"].as_bool()),
        (Some(1), Some(true)),
        "{loaded}"
    );
    // On the master itself: the pointer and the version's record.
    let mut master = redis::Client::open(sentinel.master().url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let pointer = pointer(&mut master).await;
    assert_eq!(pointer, 1);
    let tier: String = redis::cmd("HGET")
        .arg(format!(
            "{}customer:c1",
            instream_refdata::versions::version_prefix("orders", "customer", 1)
        ))
        .arg("tier")
        .query_async(&mut master)
        .await
        .unwrap();
    assert_eq!(tier, "gold");
    // An enricher's store in sentinel mode reads the pointer from the master.
    let store = tracking_customers(&sentinel.refdata_config()).await;
    assert_eq!(store.version("orders", "customer"), Some(1));
}

/// With `refdata.redis_mode = "cluster"` the load writes each record to its slot's node, and
/// a store in cluster mode reads the new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refdata_load_writes_to_a_cluster() {
    let zookeeper = ZooKeeperServer::start().unwrap();
    let cluster = instream_testkit::RedisCluster::start().unwrap();
    let broker = KafkaBroker::start().unwrap();
    let env = Env::new(&zookeeper, &broker);
    let nodes: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let mut rows = String::from("id,tier\n");
    for i in 0..200 {
        rows.push_str(&format!("c{i},tier{i}\n"));
    }
    let loaded = load_customers(
        &env,
        &format!(
            "redis_mode = \"cluster\"\nredis_nodes = [{}]\n",
            nodes.join(", ")
        ),
        &rows,
    );
    assert_eq!(
        (
            loaded["version"].as_u64(),
            loaded["records"].as_u64(),
            loaded["switched"].as_bool()
        ),
        (Some(1), Some(200), Some(true)),
        "{loaded}"
    );
    let store = tracking_customers(&instream_core::config::RefDataConfig {
        redis_mode: instream_core::config::RedisMode::Cluster,
        redis_nodes: cluster.urls(),
        ..Default::default()
    })
    .await;
    assert_eq!(store.version("orders", "customer"), Some(1));
    let prefix = instream_refdata::versions::version_prefix("orders", "customer", 1);
    let lookups: Vec<(String, instream_pipeline::RecordShape)> = (0..200)
        .map(|i| {
            (
                format!("{prefix}customer:c{i}"),
                instream_pipeline::RecordShape::Hash,
            )
        })
        .collect();
    let found = store.lookup_many(&lookups).await.unwrap();
    for (i, f) in found.iter().enumerate() {
        match f {
            instream_refdata::Found::Record(r) => assert_eq!(r["tier"], format!("tier{i}")),
            other => panic!("customer:c{i}: {other:?}"),
        }
    }
}

/// Redis with ACL users only (`default` off): `refdata load` logs in as the user of
/// `refdata.redis_url`, and an enricher's store logs in the same way, its subscription to the
/// announcements included (it follows the switch within 2 s, not by the 60 s check). A wrong
/// password is refused with an error that does not repeat it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refdata_load_and_enrichers_log_in_as_an_acl_user() {
    let zookeeper = ZooKeeperServer::start().unwrap();
    let redis = RedisServer::start_acl("instream-loader", "Acl-Pass-42").unwrap();
    let broker = KafkaBroker::start().unwrap();
    let env = Env {
        redis: Some(redis.url()),
        ..Env::new(&zookeeper, &broker)
    };
    let store = tracking_customers(&instream_core::config::RefDataConfig {
        redis_url: redis.url(),
        version_check_interval: Duration::from_secs(60),
        ..Default::default()
    })
    .await;
    assert_eq!(store.version("orders", "customer"), None);
    let loaded = load_customers(&env, "", "id,tier\nc1,gold\n");
    assert_eq!(
        (loaded["version"].as_u64(), loaded["records"].as_u64()),
        (Some(1), Some(1)),
        "{loaded}"
    );
    wait_for("version 1", Duration::from_secs(2), || {
        std::future::ready(store.version("orders", "customer") == Some(1))
    })
    .await;

    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("customers.csv");
    std::fs::write(&csv, "id,tier\nc2,silver\n").unwrap();
    let wrong = Env {
        redis: Some(redis.url().replace("Acl-Pass-42", "Wrong-Pass-7")),
        ..env
    };
    let error = wrong.fails(&load(csv.to_str().unwrap(), "customer", &["id"], &[]));
    assert!(error.contains("authentication failed"), "{error}");
    assert!(!error.contains("Wrong-Pass-7"), "{error}");
    // Nothing switched by the refused load.
    let mut connection = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    assert_eq!(pointer(&mut connection).await, 1);
}
