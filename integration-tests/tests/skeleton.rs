//! The walking skeleton: 10,000 events posted over HTTP go through ingest, the enricher (real
//! Redis), the aggregator (embedded store) and the archiver (local archive), with definitions
//! in a real ZooKeeper and a real Kafka-protocol broker between the stages. Every stage runs
//! as its own service task with its own config, exactly as its binary would run it.

use instream_testkit::wait_for;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use instream_archive::{Archive, LocalArchive};
use instream_coord::service_context;
use instream_core::config::Config;
use instream_core::Health;
use instream_pipeline::{parse_document, topics, PipelineDefinition};
use instream_store::EmbeddedStore;
use instream_testkit::{unique, KafkaBroker, RedisServer, ZooKeeperServer};
use tokio_util::sync::CancellationToken;

const EVENTS: usize = 10_000;
const CUSTOMERS: usize = 20;
const BATCH: usize = 500;
/// 2024-05-01T12:00:00Z: event times spread over five one-minute windows after it.
const T0: i64 = 1_714_564_800_000;

fn definition(name: &str) -> PipelineDefinition {
    parse_document(&format!(
        r#"
[[pipelines]]
name = "{name}"
key_field = "customer_id"
time_field = "ts"
partitions = 4
# The events' times are shuffled over five minutes: none of them is late.
max_out_of_orderness = "10m"

[[pipelines.enrichments]]
name = "customer"
key_template = "customer:{{customer_id}}"
fields = {{ tier = "customer_tier" }}

[[pipelines.aggregations]]
name = "per_minute"
window = {{ kind = "tumbling", size = "1m" }}

[[pipelines.aggregations]]
name = "per_tier"
group_by = ["key", "enrichment.customer_tier"]
window = {{ kind = "tumbling", size = "1h" }}
"#
    ))
    .expect("the test definition is valid")
    .pipelines
    .remove(0)
}

fn tier(customer: usize) -> &'static str {
    ["gold", "silver", "bronze"][customer % 3]
}

fn event(i: usize) -> serde_json::Value {
    let customer = i % CUSTOMERS;
    serde_json::json!({
        "customer_id": format!("c{customer}"),
        "ts": T0 + ((i * 7_919) % 300_000) as i64,
        "amount": i,
    })
}

/// Every record in the archive, decompressed, with the file it is in.
async fn archived_records(
    archive: &LocalArchive,
    pipeline: &str,
) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    for file in archive.list(pipeline).await.unwrap() {
        let bytes = archive.get(&file.path).await.unwrap();
        let text = zstd::decode_all(&bytes[..]).expect("archive files are zstd");
        for line in String::from_utf8(text).unwrap().lines() {
            out.push((file.path.clone(), serde_json::from_str(line).unwrap()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_flow_through_every_stage_exactly() {
    let redis = RedisServer::start().unwrap();
    let zookeeper = ZooKeeperServer::start().unwrap();
    let broker = KafkaBroker::start().unwrap();
    let archive_dir = tempfile::tempdir().unwrap();
    let pipeline = unique("skel");
    let def = definition(&pipeline);
    for topic in [
        topics::raw(&pipeline),
        topics::enriched(&pipeline),
        topics::dead_letter(&pipeline),
    ] {
        broker.create_topic(&topic, def.partitions).unwrap();
    }

    let config = Config::from_toml(&format!(
        r#"{base}
[zookeeper]
connect = "{zk}"
root = "/{root}"

[definitions]
source = "zookeeper"

[refdata]
backend = "redis"
redis_url = "{redis}"

[ingest]
listen = "127.0.0.1:0"
allow_anonymous = true

[aggregator]
flush_interval = "200ms"

[archiver]
roll_max_age = "1s"

[archive]
backend = "local"
root = "{archive}"
"#,
        base = instream_integration_tests::base_config_toml(&broker.bootstrap_servers()),
        zk = zookeeper.connect_string(),
        root = unique("instream"),
        redis = redis.url(),
        archive = archive_dir.path().display(),
    ))
    .unwrap();
    instream_coord::publish_definition(&config.zookeeper, &def)
        .await
        .unwrap();

    let redis_client = redis::Client::open(redis.url()).unwrap();
    let mut conn = redis_client
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for c in 0..CUSTOMERS {
        let _: () = redis::cmd("HSET")
            .arg(format!("customer:c{c}"))
            .arg("tier")
            .arg(tier(c))
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    let shutdown = CancellationToken::new();
    let health = Health::default();
    let context = || {
        service_context(
            config.clone(),
            health.clone(),
            shutdown.clone(),
            "127.0.0.1:0".parse().unwrap(),
        )
    };
    let store = Arc::new(EmbeddedStore::default());
    let archive = Arc::new(LocalArchive::new(archive_dir.path()));
    let ingest = instream_ingest::Ingest::start(&context()).await.unwrap();
    let ingest_addr = ingest.local_addr().unwrap();
    let tasks = vec![
        tokio::spawn({
            let s = shutdown.clone();
            async move { ingest.serve(s).await.map_err(|e| e.to_string()) }
        }),
        tokio::spawn({
            let ctx = context();
            async move { instream_enricher::run(ctx).await.map_err(|e| e.to_string()) }
        }),
        tokio::spawn({
            let (ctx, store) = (context(), store.clone());
            async move {
                instream_aggregator::run_with_store(ctx, store)
                    .await
                    .map_err(|e| e.to_string())
            }
        }),
        tokio::spawn({
            let (ctx, archive) = (context(), archive.clone());
            async move {
                instream_archiver::run_with_archive(ctx, archive)
                    .await
                    .map_err(|e| e.to_string())
            }
        }),
    ];

    // Post every event, in batches, each with an Idempotency-Key.
    let http = reqwest::Client::new();
    let url = format!("http://{ingest_addr}/v1/pipelines/{pipeline}/events");
    for (n, chunk) in (0..EVENTS).collect::<Vec<_>>().chunks(BATCH).enumerate() {
        let body: Vec<serde_json::Value> = chunk.iter().map(|&i| event(i)).collect();
        let answer = http
            .post(&url)
            .header("idempotency-key", format!("batch-{n}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "batch {n}: {:?}", answer.text().await);
        let json: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(json["accepted"], BATCH, "{json}");
        assert_eq!(json["rejected"], serde_json::json!([]));
    }

    // The exact counts one clean pass gives.
    let mut per_minute: BTreeMap<(String, i64), i64> = BTreeMap::new();
    let mut per_tier: BTreeMap<String, i64> = BTreeMap::new();
    for i in 0..EVENTS {
        let e = event(i);
        let key = e["customer_id"].as_str().unwrap().to_owned();
        let ts = e["ts"].as_i64().unwrap();
        *per_minute
            .entry((key.clone(), ts - ts % 60_000))
            .or_default() += 1;
        *per_tier
            // Several group fields make a JSON array: no separator two groups could share.
            .entry(serde_json::json!([key, tier(i % CUSTOMERS)]).to_string())
            .or_default() += 1;
    }
    assert_eq!(
        per_minute.len(),
        CUSTOMERS * 5,
        "the stream spans five windows per key"
    );

    let counted = |aggregation: &str| -> i64 {
        store
            .all()
            .iter()
            .filter(|w| w.pipeline == pipeline && w.aggregation == aggregation)
            .map(|w| w.count)
            .sum()
    };
    wait_for("every event in the store", Duration::from_secs(180), || {
        let done = counted("per_minute") == EVENTS as i64 && counted("per_tier") == EVENTS as i64;
        async move { done }
    })
    .await;
    let stored = store.all();
    let got_minute: BTreeMap<(String, i64), i64> = stored
        .iter()
        .filter(|w| w.pipeline == pipeline && w.aggregation == "per_minute")
        .map(|w| ((w.group_key.clone(), w.window_start), w.count))
        .collect();
    assert_eq!(got_minute, per_minute, "per-key, per-window counts");
    assert!(stored
        .iter()
        .filter(|w| w.aggregation == "per_minute")
        .all(|w| w.window_end - w.window_start == 60_000 && w.definition_version == 1));
    let got_tier: BTreeMap<String, i64> = stored
        .iter()
        .filter(|w| w.pipeline == pipeline && w.aggregation == "per_tier")
        .map(|w| (w.group_key.clone(), w.count))
        .collect();
    assert_eq!(
        got_tier, per_tier,
        "enrichment from Redis reached the aggregates"
    );

    // The archive: exactly 10,000 records, each offset once, each event once.
    wait_for(
        "every event in the archive",
        Duration::from_secs(120),
        || {
            let archive = archive.clone();
            let pipeline = pipeline.clone();
            async move { archived_records(&archive, &pipeline).await.len() >= EVENTS }
        },
    )
    .await;
    let records = archived_records(&archive, &pipeline).await;
    assert_eq!(records.len(), EVENTS);
    let ids: BTreeSet<&str> = records
        .iter()
        .map(|(_, r)| r["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), EVENTS, "no event archived twice");
    let mut offsets: BTreeMap<i32, Vec<(i64, i64)>> = BTreeMap::new();
    for file in archive.list(&pipeline).await.unwrap() {
        let (partition, first, last) = instream_archiver::parse_file_name(&file.path).unwrap();
        offsets.entry(partition).or_default().push((first, last));
        // Nothing was dead-lettered, so a file holds every offset of its range, once.
        let held = records
            .iter()
            .filter(|(path, _)| *path == file.path)
            .count() as i64;
        assert_eq!(held, last - first + 1, "{}", file.path);
    }
    for (partition, mut ranges) in offsets {
        ranges.sort();
        let mut next = 0;
        for (first, last) in ranges {
            assert_eq!(first, next, "partition {partition}: no gap, no overlap");
            next = last + 1;
        }
    }

    // Every running service is in the registry, the consumers with their partitions; a new
    // definition version reaches every one of them within 2 s.
    let instances = instream_coord::instances(&config.zookeeper).await.unwrap();
    let services: BTreeSet<&str> = instances.iter().map(|i| i.service.as_str()).collect();
    assert_eq!(
        services,
        BTreeSet::from(["aggregator", "archiver", "enricher", "ingest"])
    );
    let ingest_node = instances.iter().find(|i| i.service == "ingest").unwrap();
    assert_eq!(ingest_node.info["ports"]["http"], ingest_addr.port());
    for consumer in ["aggregator", "archiver", "enricher"] {
        let instance = instances.iter().find(|i| i.service == consumer).unwrap();
        let partitions = instance.info["partitions"].as_array().unwrap();
        assert_eq!(partitions.len(), 4, "{consumer}: {}", instance.info);
    }
    let mut next = def.clone();
    next.version = 2;
    instream_coord::publish_definition(&config.zookeeper, &next)
        .await
        .unwrap();
    let published = std::time::Instant::now();
    wait_for("version 2 at every service", Duration::from_secs(2), || {
        let zk = config.zookeeper.clone();
        let pipeline = pipeline.clone();
        async move {
            let instances = instream_coord::instances(&zk).await.unwrap();
            instances.len() == 4
                && instances
                    .iter()
                    .all(|i| i.info["definitions"][pipeline.as_str()] == 2)
        }
    })
    .await;
    eprintln!(
        "version 2 reached every service in {:?}",
        published.elapsed()
    );

    shutdown.cancel();
    for task in tasks {
        let result = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("every service stops within 30 s of shutdown")
            .expect("no service panicked");
        assert_eq!(result, Ok(()));
    }
}
