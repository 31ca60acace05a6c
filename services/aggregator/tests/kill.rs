//! The `instream-aggregator` binary killed with -9 twice mid-stream and restarted: every
//! window in the store ends with exactly the count one clean pass over the distinct events
//! gives — nothing lost, nothing counted twice — although the input also holds client retries
//! (an `event_id` again) and an upstream re-run's re-emits (an origin offset again), for an
//! aggregation grouped by the key and for one grouped by a payload field across keys
//! (repartitioned through `<pipeline>.by-per_bucket`). Runs
//! against a real Kafka-protocol broker (the embedded one, or `INSTREAM_TEST_KAFKA`), with the
//! local store, which outlives the process.

use instream_testkit::wait_for;
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

/// A broker with the pipeline's topics and the produced input, and an aggregator's config
/// whose local store outlives its processes.
struct Scenario {
    broker: KafkaBroker,
    _dir: tempfile::TempDir,
    pipeline: String,
    input: Input,
    store_path: std::path::PathBuf,
    config: std::path::PathBuf,
    admin: u16,
}

/// Windows are written early every `early_results_every` while open (the drain writes them
/// too unless it is zero).
async fn scenario(early_results_every: &str) -> Scenario {
    let broker = KafkaBroker::start().unwrap();
    let pipeline = unique("aggkill");
    broker
        .create_pipeline_topics(&pipeline, PARTITIONS)
        .unwrap();
    // Services create it on a Kafka cluster; the embedded broker has no CreateTopics API.
    for topic in ["by-per_bucket", "results.per_minute", "results.per_bucket"] {
        broker
            .create_topic(&format!("{pipeline}.{topic}"), PARTITIONS)
            .unwrap();
    }
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
[[pipelines.outputs]]
kind = "kafka"
aggregation = "per_minute"
[[pipelines.outputs]]
kind = "kafka"
aggregation = "per_bucket"
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
early_results_every = "{early_results_every}"
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
    Scenario {
        broker,
        _dir: dir,
        pipeline,
        input,
        store_path,
        config,
        admin,
    }
}

/// Every partition of the enriched topic and of `per_bucket`'s repartition topic.
const ASSIGNED: usize = 2 * PARTITIONS as usize;

/// Whether every partition's lag is 0: everything is committed, and a commit comes only
/// after the checkpoint.
async fn caught_up(admin: u16) -> bool {
    let (lag, lines) = metric(
        admin,
        "instream_consumer_lag",
        "group=\"instream-aggregator\"",
    )
    .await;
    lines == ASSIGNED && lag == 0.0
}

/// Whether every partition is assigned to this process and its state restored (counted
/// for the current assignment: a rebalance after the start restores them again).
async fn all_restored(admin: u16) -> bool {
    let (assigned, _) = metric(
        admin,
        "instream_assigned_partitions",
        "group=\"instream-aggregator\"",
    )
    .await;
    let (states, _) = metric(
        admin,
        "instream_aggregator_partition_states",
        "service=\"aggregator\"",
    )
    .await;
    assigned == ASSIGNED as f64 && states == ASSIGNED as f64
}

/// A run started now catches up and restores every partition; stopped, it exits 0 and
/// both aggregations' windows hold the counts of one clean pass.
async fn last_run_catches_up_and_counts_one_clean_pass(s: &Scenario) {
    let mut last = spawn(&s.config);
    wait_for(
        "the last run to catch up",
        Duration::from_secs(120),
        || async { caught_up(s.admin).await && all_restored(s.admin).await },
    )
    .await;
    last.terminate().unwrap();
    let status = last.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "{status}");
    assert_one_clean_pass(s).await;
}

/// Both aggregations' windows in the store hold the counts of one clean pass.
async fn assert_one_clean_pass(s: &Scenario) {
    let store = LocalStore::open(&s.store_path).unwrap();
    let keys: Vec<String> = (0..KEYS).map(|k| format!("k{k}")).collect();
    let got = window_counts(&store, &s.pipeline, "per_minute", &keys).await;
    let total: i64 = got.values().sum();
    assert_eq!(total, EVENTS as i64, "every distinct event counted once");
    assert_eq!(
        got, s.input.expected,
        "per-key, per-window counts of one clean pass"
    );
    // Repartitioned by bucket: each bucket's windows hold the events of every partition.
    let buckets: Vec<String> = (0..BUCKETS).map(|b| format!("b{b}")).collect();
    let got = window_counts(&store, &s.pipeline, "per_bucket", &buckets).await;
    assert_eq!(
        got, s.input.expected_buckets,
        "per-bucket, per-window counts of one clean pass"
    );
    // Every value written went to the results topics before the checkpoint that could drop
    // its window: the last record of each window says what the store says, kills or not.
    for (aggregation, expected) in [
        ("per_minute", &s.input.expected),
        ("per_bucket", &s.input.expected_buckets),
    ] {
        let topic = format!("{}.results.{aggregation}", s.pipeline);
        let mut last = BTreeMap::new();
        for (_, payload) in s.broker.read_topic(&topic).await.unwrap() {
            let r: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            let start = instream_event::parse_event_time(&r["window_start"]).unwrap();
            let group = r["group"].as_str().unwrap().to_owned();
            last.insert((group, start), r["count"].as_i64().unwrap());
        }
        assert_eq!(
            &last, expected,
            "{aggregation}: the last result of each window"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_twice_with_9_every_window_holds_the_count_of_one_clean_pass() {
    let s = scenario("1s").await;
    // Two kills, each after that run made progress of its own.
    let target = (s.input.records / 4) as f64;
    for _ in 0..2 {
        let mut run = spawn(&s.config);
        wait_for(
            "progress before the kill",
            Duration::from_secs(120),
            || async {
                metric(s.admin, "instream_events_total", "service=\"aggregator\"")
                    .await
                    .0
                    >= target
            },
        )
        .await;
        run.0.kill().unwrap(); // SIGKILL: no drain, no final flush or commit
        run.wait_exit(Duration::from_secs(10)).unwrap();
    }

    // The last run catches up and restores every partition, also one whose records were all
    // checkpointed before a kill: its windows live in its checkpoint and the drain writes
    // them.
    last_run_catches_up_and_counts_one_clean_pass(&s).await;
}

/// A run counts everything and checkpoints it, then is killed before any window was written
/// (no early result yet, none closed). The next run has nothing new to read, yet restores
/// every partition and writes their windows: they are not left in the checkpoints until a
/// record arrives, which may be never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_only_in_checkpoints_are_written_after_a_kill_with_nothing_new_to_read() {
    let s = scenario("1h").await;
    let mut run = spawn(&s.config);
    wait_for(
        "everything counted and committed",
        Duration::from_secs(120),
        || async {
            let (events, _) =
                metric(s.admin, "instream_events_total", "service=\"aggregator\"").await;
            let (forwarded, _) = metric(
                s.admin,
                "instream_aggregator_repartition_events_total",
                "aggregation=\"per_bucket\"",
            )
            .await;
            events >= s.input.records as f64
                && forwarded >= EVENTS as f64
                && caught_up(s.admin).await
        },
    )
    .await;
    run.0.kill().unwrap(); // SIGKILL: no drain, so no window written
    run.wait_exit(Duration::from_secs(10)).unwrap();
    {
        let store = LocalStore::open(&s.store_path).unwrap();
        let keys: Vec<String> = (0..KEYS).map(|k| format!("k{k}")).collect();
        let written = window_counts(&store, &s.pipeline, "per_minute", &keys).await;
        assert!(
            written.is_empty(),
            "windows written before the kill: {written:?}"
        );
    }

    let mut next = spawn(&s.config);
    wait_for(
        "every partition restored",
        Duration::from_secs(120),
        || async { all_restored(s.admin).await },
    )
    .await;
    next.terminate().unwrap();
    let status = next.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "{status}");
    assert_one_clean_pass(&s).await;
}

/// The broker refuses the aggregator's forwarding to the repartition topic with an error no
/// retry mends (not authorized). A forward lost behind a later one would be a count lost for
/// good (repartition partitions drop origin offsets at or below the highest seen), so the
/// aggregator stops with that error, committing nothing it did not forward; restarted once
/// the broker accepts again, every window holds the count of one clean pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_refused_for_good_stops_the_aggregator_and_a_restart_counts_every_event() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    if std::env::var("INSTREAM_TEST_KAFKA").is_ok_and(|v| !v.trim().is_empty()) {
        eprintln!(
            "skipped: the test makes the broker fail requests, which only the embedded one allows"
        );
        return;
    }
    let s = scenario("1s").await;
    // The input is written already: the next writes are the aggregator's forwards.
    s.broker
        .fail_requests(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 3],
        )
        .unwrap();
    let mut refused = spawn(&s.config);
    let status = refused.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(
        !status.success(),
        "the aggregator stops with an error when a forward is refused for good: {status}"
    );
    // Refused by the broker (its error code), or, when the producer's watcher saw it
    // first, librdkafka's account of its fatal error (which names the refusal).
    let stopped = refused.stopped_with_an_error();
    assert!(
        stopped.contains("TopicAuthorizationFailed")
            || stopped.contains("Topic authorization failed"),
        "the aggregator says why it stopped: {stopped}"
    );
    s.broker
        .clear_request_errors(RDKafkaApiKey::Produce)
        .unwrap();

    last_run_catches_up_and_counts_one_clean_pass(&s).await;
}
