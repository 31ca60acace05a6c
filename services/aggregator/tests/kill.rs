//! The `instream-aggregator` binary killed with -9 twice mid-stream and restarted: every
//! window in the store ends with exactly the count one clean pass over the distinct events
//! gives — nothing lost, nothing counted twice — although the input also holds client retries
//! (an `event_id` again) and an upstream re-run's re-emits (an origin offset again), for an
//! aggregation grouped by the key and for one grouped by a payload field across keys
//! (repartitioned through `<pipeline>.by-per_bucket`). Runs
//! against a real Kafka-protocol broker (the embedded one, or `INSTREAM_TEST_KAFKA`), with the
//! local store, which outlives the process.

use std::collections::BTreeMap;
use std::time::Duration;

use instream_kafka::headers;
use instream_store::{AggregateQuery, AggregateStore, LocalStore};
use instream_testkit::{
    free_port, metric_sum, process_config_toml, unique, ChildGuard, KafkaBroker,
};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

const BIN: &str = env!("CARGO_BIN_EXE_instream-aggregator");
const EVENTS: usize = 12_000;
const KEYS: usize = 40;
/// Groups of the repartitioned aggregation; each spans keys of every partition.
const BUCKETS: usize = 7;
const PARTITIONS: i32 = 4;
const RETRY_DELAY: usize = 300;
/// 2024-05-01T12:00:00Z; event times are shuffled over five one-minute windows after it.
const T0: i64 = 1_714_564_800_000;

fn spawn(config: &std::path::Path) -> ChildGuard {
    instream_testkit::spawn_service(BIN, config).unwrap()
}

/// The sum of the `metric` lines (those containing `filter`) in the process's /metrics, and
/// how many lines matched.
async fn metric(admin: u16, metric: &str, filter: &str) -> (f64, usize) {
    let Ok(response) = reqwest::get(format!("http://127.0.0.1:{admin}/metrics")).await else {
        return (0.0, 0);
    };
    metric_sum(&response.text().await.unwrap_or_default(), metric, filter)
}

async fn wait_until<F: std::future::Future<Output = bool>>(
    what: &str,
    mut done: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Input {
    /// (key, window start) -> distinct events.
    expected: BTreeMap<(String, i64), i64>,
    /// (bucket, window start) -> distinct events.
    expected_buckets: BTreeMap<(String, i64), i64>,
    records: usize,
}

/// Produces the enriched stream: each key's events in one partition (as the enricher writes
/// them), with origin offsets per partition; every 10th event sent again later as a client
/// retry (same id, new origin offset) and, every 15 records of a partition, the last 3
/// re-emitted (same ids, same origin offsets) as an enricher re-run does.
async fn produce(broker: &KafkaBroker, pipeline: &str) -> Input {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let topic = format!("{pipeline}.enriched");
    let mut expected = BTreeMap::new();
    let mut expected_buckets = BTreeMap::new();
    let mut sent: Vec<Vec<(String, String, i64)>> = vec![Vec::new(); PARTITIONS as usize];
    let mut origin = vec![0i64; PARTITIONS as usize];
    let mut deliveries = Vec::new();
    let mut send = |key: &str, partition: i32, envelope: &str, origin_offset: i64| {
        let hs = OwnedHeaders::new()
            .insert(Header {
                key: headers::ORIGIN_PARTITION,
                value: Some(&partition.to_string()),
            })
            .insert(Header {
                key: headers::ORIGIN_OFFSET,
                value: Some(&origin_offset.to_string()),
            });
        deliveries.push(
            producer
                .send_result(
                    FutureRecord::to(&topic)
                        .partition(partition)
                        .key(key)
                        .payload(envelope)
                        .headers(hs),
                )
                .map_err(|(e, _)| e)
                .unwrap(),
        );
    };
    let mut records = 0;
    // Client retries arrive a while after the original (here 300 events later), so that many
    // of them cross a kill: the restored state must still know the original's id.
    let mut retries: std::collections::VecDeque<(usize, String, String, i32)> = Default::default();
    for i in 0..EVENTS + RETRY_DELAY {
        let mut outgoing = Vec::new();
        if retries.front().is_some_and(|(due, ..)| *due <= i) {
            let (_, key, envelope, partition) = retries.pop_front().expect("checked");
            outgoing.push((key, envelope, partition));
        }
        if i < EVENTS {
            let key = format!("k{}", i % KEYS);
            let partition = (i % KEYS) as i32 % PARTITIONS;
            let event_time = T0 + ((i * 7_919) % 300_000) as i64;
            // Buckets cut across keys and partitions: `per_bucket` is repartitioned.
            let bucket = format!("b{}", i % BUCKETS);
            let envelope = serde_json::json!({
                "event_id": format!("e{i}"), "pipeline": pipeline, "key": key,
                "event_time": event_time, "ingest_time": T0 + i as i64,
                "payload": {"n": i, "bucket": bucket},
            })
            .to_string();
            *expected
                .entry((key.clone(), event_time - event_time % 60_000))
                .or_insert(0) += 1;
            *expected_buckets
                .entry((bucket, event_time - event_time % 60_000))
                .or_insert(0) += 1;
            if i.is_multiple_of(10) {
                retries.push_back((i + RETRY_DELAY, key.clone(), envelope.clone(), partition));
            }
            outgoing.push((key, envelope, partition));
        }
        for (key, envelope, partition) in outgoing {
            let p = partition as usize;
            send(&key, partition, &envelope, origin[p]);
            sent[p].push((key, envelope, origin[p]));
            origin[p] += 1;
            records += 1;
            if sent[p].len().is_multiple_of(15) {
                let again: Vec<_> = sent[p][sent[p].len() - 3..].to_vec();
                for (k, e, o) in again {
                    send(&k, partition, &e, o);
                    records += 1;
                }
            }
        }
    }
    for d in deliveries {
        d.await.unwrap().unwrap();
    }
    Input {
        expected,
        expected_buckets,
        records,
    }
}

/// (group, window start) -> count of every window of `groups` in the first ten minutes.
async fn window_counts(
    store: &LocalStore,
    pipeline: &str,
    aggregation: &str,
    groups: &[String],
) -> BTreeMap<(String, i64), i64> {
    let mut got = BTreeMap::new();
    for group in groups {
        let rows = store
            .query(&AggregateQuery {
                pipeline: pipeline.to_owned(),
                aggregation: aggregation.into(),
                group_key: group.clone(),
                from: T0,
                to: T0 + 600_000,
                limit: 100,
            })
            .await
            .unwrap();
        for r in rows {
            got.insert((r.group_key, r.window_start), r.count);
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_twice_with_9_every_window_holds_the_count_of_one_clean_pass() {
    let broker = KafkaBroker::start().unwrap();
    let pipeline = unique("aggkill");
    broker
        .create_pipeline_topics(&pipeline, PARTITIONS)
        .unwrap();
    // Services create it on a Kafka cluster; the embedded broker has no CreateTopics API.
    broker
        .create_topic(&format!("{pipeline}.by-per_bucket"), PARTITIONS)
        .unwrap();
    let input = produce(&broker, &pipeline).await;

    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("aggregates.redb");
    let definitions = dir.path().join("definitions.toml");
    std::fs::write(
        &definitions,
        format!(
            r#"
[[pipelines]]
name = "{pipeline}"
key_field = "k"
time_field = "t"
partitions = {PARTITIONS}
max_out_of_orderness = "10m"
[[pipelines.aggregations]]
name = "per_minute"
window = {{ kind = "tumbling", size = "1m" }}
[[pipelines.aggregations]]
name = "per_bucket"
group_by = ["payload.bucket"]
window = {{ kind = "tumbling", size = "1m" }}
"#
        ),
    )
    .unwrap();
    let admin = free_port().unwrap();
    let config = dir.path().join("instream.toml");
    std::fs::write(
        &config,
        format!(
            r#"{process}
[store]
backend = "local"
path = "{store}"
[aggregator]
flush_interval = "150ms"
batch_size = 300
"#,
            process = process_config_toml(
                admin,
                &broker.bootstrap_servers(),
                &definitions,
                "500ms",
                16_384
            ),
            store = store_path.display(),
        ),
    )
    .unwrap();

    // Two kills, each after that run made progress of its own.
    let target = (input.records / 4) as f64;
    for _ in 0..2 {
        let mut run = spawn(&config);
        wait_until("progress before the kill", || async {
            metric(admin, "instream_events_total", "service=\"aggregator\"")
                .await
                .0
                >= target
        })
        .await;
        run.0.kill().unwrap(); // SIGKILL: no drain, no final flush or commit
        run.wait_exit(Duration::from_secs(10)).unwrap();
    }

    // The last run catches up: every partition's lag is 0, so everything is committed, and
    // a commit comes only after the checkpoint.
    let mut last = spawn(&config);
    wait_until("the last run to catch up", || async {
        let (lag, lines) = metric(
            admin,
            "instream_consumer_lag",
            "group=\"instream-aggregator\"",
        )
        .await;
        // The enriched topic and `per_bucket`'s repartition topic.
        lines == 2 * PARTITIONS as usize && lag == 0.0
    })
    .await;
    last.terminate().unwrap();
    let status = last.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "{status}");

    let store = LocalStore::open(&store_path).unwrap();
    let keys: Vec<String> = (0..KEYS).map(|k| format!("k{k}")).collect();
    let got = window_counts(&store, &pipeline, "per_minute", &keys).await;
    let total: i64 = got.values().sum();
    assert_eq!(total, EVENTS as i64, "every distinct event counted once");
    assert_eq!(
        got, input.expected,
        "per-key, per-window counts of one clean pass"
    );
    // Repartitioned by bucket: each bucket's windows hold the events of every partition.
    let buckets: Vec<String> = (0..BUCKETS).map(|b| format!("b{b}")).collect();
    let got = window_counts(&store, &pipeline, "per_bucket", &buckets).await;
    assert_eq!(
        got, input.expected_buckets,
        "per-bucket, per-window counts of one clean pass"
    );
}
