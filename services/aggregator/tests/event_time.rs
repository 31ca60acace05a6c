//! Event time through the `instream-aggregator` binary: a stream that stops has its last
//! windows closed and written final once its partitions are idle (the pipeline's
//! `idle_timeout`), for aggregations grouped by the key, written only when final
//! (`emit = "final"`), and repartitioned by a payload field; and an aggregator restarted
//! behind a backlog after a downtime longer than the idle time closes nothing early; a
//! definition change switches at its event-time boundary through kills (one taken up from
//! ZooKeeper while the aggregator runs); final-only results are published once through a
//! crash. Runs against a real Kafka-protocol broker (the embedded one, or
//! `INSTREAM_TEST_KAFKA`) and a real ZooKeeper, with the local store, read once the process has
//! exited (one process opens it at a time).

use std::collections::BTreeMap;
use std::time::Duration;

use instream_core::config::ZooKeeperConfig;
use instream_store::{AggregateQuery, AggregateStore, LocalStore, WindowAggregate};
use instream_testkit::{
    free_port, metric_sum, process_config_toml, unique, wait_for, ChildGuard, KafkaBroker,
};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

const BIN: &str = env!("CARGO_BIN_EXE_instream-aggregator");
const KEYS: usize = 8;
const BUCKETS: usize = 3;
const PARTITIONS: i32 = 4;
/// 2024-05-01T12:00:00Z: event times are history (ingest times are now), so an idle
/// watermark must move on from the last event, not jump to the wall clock.
const T0: i64 = 1_714_564_800_000;

/// Aggregations: by key with early values, by key final only, and by a payload field
/// (repartitioned); windows of `window` seconds without lateness; idle after `idle`.
fn definitions(pipeline: &str, idle: &str, window: i64) -> String {
    format!(
        r#"
[[pipelines]]
name = "{pipeline}"
key_field = "k"
time_field = "t"
partitions = {PARTITIONS}
max_out_of_orderness = "1s"
idle_timeout = "{idle}"
[[pipelines.aggregations]]
name = "per_key"
window = {{ kind = "tumbling", size = "{window}s" }}
allowed_lateness = "0s"
[[pipelines.aggregations]]
name = "per_key_final"
emit = "final"
window = {{ kind = "tumbling", size = "{window}s" }}
allowed_lateness = "0s"
[[pipelines.aggregations]]
name = "per_bucket"
group_by = ["payload.bucket"]
window = {{ kind = "tumbling", size = "{window}s" }}
allowed_lateness = "0s"
[[pipelines.outputs]]
kind = "kafka"
aggregation = "per_key"
[[pipelines.outputs]]
kind = "kafka"
aggregation = "per_key_final"
"#
    )
}

struct Scenario {
    broker: KafkaBroker,
    _dir: tempfile::TempDir,
    pipeline: String,
    store_path: std::path::PathBuf,
    config: std::path::PathBuf,
    definitions: std::path::PathBuf,
    admin: u16,
    /// Window size, ms.
    window: i64,
    /// (aggregation, group, window start) -> distinct events sent.
    expected: BTreeMap<(String, String, i64), i64>,
    /// (key, event time) of every event sent.
    times: Vec<(String, i64)>,
    sent: usize,
}

fn scenario(idle: &str, window_secs: i64) -> Scenario {
    let broker = KafkaBroker::start().unwrap();
    let pipeline = unique("idle");
    broker
        .create_pipeline_topics(&pipeline, PARTITIONS)
        .unwrap();
    // Services create it on a Kafka cluster; the embedded broker has no CreateTopics API.
    for topic in ["by-per_bucket", "results.per_key", "results.per_key_final"] {
        broker
            .create_topic(&format!("{pipeline}.{topic}"), PARTITIONS)
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("aggregates.redb");
    let defs = dir.path().join("definitions.toml");
    std::fs::write(&defs, definitions(&pipeline, idle, window_secs)).unwrap();
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
flush_interval = "100ms"
early_results_every = "200ms"
batch_size = 100
"#,
            process =
                process_config_toml(admin, &broker.bootstrap_servers(), &defs, "500ms", 16_384),
            store = store_path.display(),
        ),
    )
    .unwrap();
    Scenario {
        broker,
        _dir: dir,
        pipeline,
        store_path,
        config,
        definitions: defs,
        admin,
        window: window_secs * 1_000,
        expected: BTreeMap::new(),
        times: Vec::new(),
        sent: 0,
    }
}

impl Scenario {
    /// The idle time the next aggregator started reads.
    fn set_idle(&self, idle: &str) {
        let text = definitions(&self.pipeline, idle, self.window / 1_000);
        std::fs::write(&self.definitions, text).unwrap();
    }

    /// Sends `n` events with event times spread evenly over `[from, to)` (ms after T0), each
    /// key's in order, ingest time now.
    async fn send(&mut self, n: usize, from: i64, to: i64) {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", self.broker.bootstrap_servers())
            .set("linger.ms", "5")
            .create()
            .unwrap();
        let topic = format!("{}.enriched", self.pipeline);
        let now = instream_event::now_millis();
        let mut deliveries = Vec::new();
        for i in 0..n {
            let id = self.sent + i;
            let key = format!("k{}", id % KEYS);
            let bucket = format!("b{}", id % BUCKETS);
            let event_time = T0 + from + (to - from) * i as i64 / n as i64;
            let start = event_time - event_time % self.window;
            self.times.push((key.clone(), event_time));
            for (aggregation, group) in [
                ("per_key", &key),
                ("per_key_final", &key),
                ("per_bucket", &bucket),
            ] {
                *self
                    .expected
                    .entry((aggregation.into(), group.clone(), start))
                    .or_insert(0) += 1;
            }
            let envelope = serde_json::json!({
                "event_id": format!("e{id}"), "pipeline": self.pipeline, "key": key,
                "event_time": event_time, "ingest_time": now,
                "payload": {"bucket": bucket, "n": 1},
            })
            .to_string();
            let partition = (id % KEYS) as i32 % PARTITIONS;
            deliveries.push(
                producer
                    .send_result(
                        FutureRecord::to(&topic)
                            .partition(partition)
                            .key(&key)
                            .payload(&envelope),
                    )
                    .map_err(|(e, _)| e)
                    .unwrap(),
            );
        }
        for d in deliveries {
            d.await.unwrap().unwrap();
        }
        self.sent += n;
    }

    async fn metric(&self, metric: &str, filter: &str) -> (f64, usize) {
        let Ok(response) = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.admin)).await
        else {
            return (0.0, 0);
        };
        metric_sum(&response.text().await.unwrap_or_default(), metric, filter)
    }

    /// Moves the definitions to ZooKeeper (the aggregator then follows changes while it
    /// runs): version 1 published there, the config reading it from there.
    async fn definitions_in(
        &self,
        zookeeper: &instream_testkit::ZooKeeperServer,
    ) -> ZooKeeperConfig {
        let zk = ZooKeeperConfig {
            connect: zookeeper.connect_string(),
            root: format!("/{}", self.pipeline),
            ..Default::default()
        };
        let text = std::fs::read_to_string(&self.definitions).unwrap();
        for def in instream_pipeline::parse_document(&text).unwrap().pipelines {
            instream_coord::publish_definition(&zk, &def).await.unwrap();
        }
        let config = std::fs::read_to_string(&self.config).unwrap();
        let file_source = format!(
            "[definitions]\nsource = \"file\"\npath = \"{}\"\n",
            self.definitions.display()
        );
        assert!(config.contains(&file_source));
        let config = config.replace(
            &file_source,
            &format!(
                "[definitions]\nsource = \"zookeeper\"\n[zookeeper]\nconnect = \"{}\"\nroot = \"{}\"\n",
                zk.connect, zk.root
            ),
        );
        std::fs::write(&self.config, config).unwrap();
        zk
    }

    /// Whether the running aggregator runs `version` of the pipeline.
    async fn runs_version(&self, version: f64) -> bool {
        let filter = format!("pipeline=\"{}\"", self.pipeline);
        self.metric("instream_definition_version", &filter).await.0 == version
    }

    /// Writes the definitions of version 2, taking over at `effective_from` (ms after T0):
    /// `per_key` has 5-second windows, and it and `per_bucket` also sum `n`; version 1 is
    /// kept for the windows before.
    fn apply_version_2(&self, effective_from: i64) {
        let text = std::fs::read_to_string(&self.definitions).unwrap();
        let one = instream_pipeline::parse_document(&text)
            .unwrap()
            .pipelines
            .remove(0);
        let mut two = one.clone();
        two.version = 2;
        for aggregation in two.aggregations.iter_mut() {
            if aggregation.name == "per_key" {
                aggregation.window =
                    serde_json::from_value(serde_json::json!({"kind": "tumbling", "size": "5s"}))
                        .unwrap();
            }
            if aggregation.name != "per_key_final" {
                aggregation.functions = vec![serde_json::from_value(
                    serde_json::json!({"fn": "sum", "field": "payload.n"}),
                )
                .unwrap()];
            }
        }
        two.effective_from = Some(T0 + effective_from);
        let two = two.succeeding(&one, instream_event::now_millis());
        two.validate().unwrap();
        let document = instream_pipeline::DefinitionsDocument {
            pipelines: vec![two],
        };
        std::fs::write(&self.definitions, toml::to_string(&document).unwrap()).unwrap();
    }

    /// Version 2 (see [`Self::apply_version_2`]) published to ZooKeeper, as `pipeline apply`
    /// stores it: running aggregators take it up from their watch.
    async fn publish_version_2(&self, zk: &ZooKeeperConfig, effective_from: i64) {
        self.apply_version_2(effective_from);
        let text = std::fs::read_to_string(&self.definitions).unwrap();
        for def in instream_pipeline::parse_document(&text).unwrap().pipelines {
            instream_coord::publish_definition(zk, &def).await.unwrap();
        }
    }

    /// The windows of the definition-change runs: (per_bucket, per_key) as stored, against
    /// what versions 1 and 2 make of every event sent, the boundary at 10 s.
    async fn assert_versions_switched_at_10_s(&self) {
        let got = self.versions_stored("per_bucket").await;
        let expected: BTreeMap<_, _> = self
            .expected
            .iter()
            .filter(|((a, ..), _)| a == "per_bucket")
            .map(|((_, group, start), n)| {
                let shape = if *start < T0 + 10_000 {
                    (1, *n, None)
                } else {
                    (2, *n, Some(*n as f64))
                };
                ((group.clone(), *start), shape)
            })
            .collect();
        assert_eq!(got, expected, "per_bucket");
        // By key: 10-second windows before the boundary, 5-second ones from it on.
        let mut expected: BTreeMap<(String, i64), (i64, i64, Option<f64>)> = BTreeMap::new();
        for (key, t) in &self.times {
            let (start, version) = if *t < T0 + 10_000 {
                (t - t % 10_000, 1)
            } else {
                (t - t % 5_000, 2)
            };
            let entry = expected
                .entry((key.clone(), start))
                .or_insert((version, 0, None));
            entry.1 += 1;
            if version == 2 {
                entry.2 = Some(entry.1 as f64);
            }
        }
        assert_eq!(self.versions_stored("per_key").await, expected, "per_key");
    }

    /// Every window of `aggregation` in the store: (group, start) -> (version, count, sum of `n`).
    async fn versions_stored(
        &self,
        aggregation: &str,
    ) -> BTreeMap<(String, i64), (i64, i64, Option<f64>)> {
        let store = LocalStore::open(&self.store_path).unwrap();
        self.rows(&store, aggregation)
            .await
            .into_iter()
            .map(|r| {
                let sum = r.values.get("sum_n").and_then(|v| v.as_f64());
                (
                    (r.group_key, r.window_start),
                    (r.definition_version, r.count, sum),
                )
            })
            .collect()
    }

    /// The rows of `aggregation` for every group sent, around T0.
    async fn rows(&self, store: &LocalStore, aggregation: &str) -> Vec<WindowAggregate> {
        let groups: Vec<String> = if aggregation == "per_bucket" {
            (0..BUCKETS).map(|b| format!("b{b}")).collect()
        } else {
            (0..KEYS).map(|k| format!("k{k}")).collect()
        };
        let mut rows = Vec::new();
        for group in groups {
            let query = AggregateQuery {
                pipeline: self.pipeline.clone(),
                aggregation: aggregation.into(),
                group_key: group,
                from: T0 - 60_000,
                to: T0 + 60_000,
                limit: 100,
            };
            rows.extend(store.query(&query).await.unwrap());
        }
        rows
    }

    /// Whether this process counted `n` enriched records and their forwarded copies.
    async fn counted(&self, n: usize) -> bool {
        let (keyed, _) = self
            .metric("instream_events_total", "outcome=\"aggregated\"")
            .await;
        let (forwarded, _) = self
            .metric(
                "instream_aggregator_repartition_events_total",
                "outcome=\"aggregated\"",
            )
            .await;
        keyed >= n as f64 && forwarded >= n as f64
    }

    /// Whether the aggregators' group has committed every partition it reads (enriched and
    /// repartition) to its end, as the broker says; commits follow the checkpoints.
    async fn caught_up(&self) -> bool {
        let kafka = instream_core::config::KafkaConfig {
            bootstrap_servers: self.broker.bootstrap_servers(),
            ..Default::default()
        };
        for topic in ["enriched", "by-per_bucket"] {
            let topic = format!("{}.{topic}", self.pipeline);
            let lags = instream_kafka::ops::group_lag(&kafka, "instream-aggregator", &topic).await;
            if !lags.is_ok_and(|lags| lags.iter().all(|p| p.lag == 0)) {
                return false;
            }
        }
        true
    }

    /// Whether every window is closed (final and written) after idle partitions moved on.
    async fn all_closed_by_idleness(&self) -> bool {
        let (idle, _) = self
            .metric(
                "instream_aggregator_idle_partitions",
                "service=\"aggregator\"",
            )
            .await;
        let (open, lines) = self
            .metric("instream_open_windows", "service=\"aggregator\"")
            .await;
        idle >= 1.0 && lines > 0 && open == 0.0
    }

    /// Events this process dead-lettered as too late, in either kind of partition.
    async fn too_late(&self) -> f64 {
        let (keyed, _) = self
            .metric("instream_events_total", "outcome=\"too_late\"")
            .await;
        let (forwarded, _) = self
            .metric(
                "instream_aggregator_repartition_events_total",
                "outcome=\"too_late\"",
            )
            .await;
        keyed + forwarded
    }

    async fn stop(&self, mut run: ChildGuard) {
        run.terminate().unwrap();
        let status = run.wait_exit(Duration::from_secs(20)).unwrap();
        assert!(status.success(), "{status}");
    }

    /// Every window in the store: (aggregation, group, start) -> (count, final).
    async fn stored(&self) -> BTreeMap<(String, String, i64), (i64, bool)> {
        let store = LocalStore::open(&self.store_path).unwrap();
        let mut got = BTreeMap::new();
        for aggregation in ["per_key", "per_key_final", "per_bucket"] {
            for r in self.rows(&store, aggregation).await {
                got.insert(
                    (r.aggregation, r.group_key, r.window_start),
                    (r.count, r.is_final),
                );
            }
        }
        got
    }

    /// The records of an aggregation's results topic, in the order of each partition.
    async fn results(&self, aggregation: &str) -> Vec<serde_json::Value> {
        let topic = format!("{}.results.{aggregation}", self.pipeline);
        let records = self.broker.read_topic(&topic).await.unwrap();
        records
            .iter()
            .map(|(_, payload)| serde_json::from_slice(payload).expect("a JSON result"))
            .collect()
    }

    /// The results topics say what the store says: for each window of `per_key`, its last
    /// record (values while open, then final); for `per_key_final`, one record, final.
    async fn assert_results_equal_the_store(&self) {
        let stored = self.stored().await;
        for (aggregation, once) in [("per_key", false), ("per_key_final", true)] {
            let mut last: BTreeMap<(String, String, i64), (i64, bool)> = BTreeMap::new();
            let mut records = 0;
            for r in self.results(aggregation).await {
                assert_eq!(r["pipeline"], self.pipeline.as_str());
                assert_eq!(r["id"].as_str().map(str::len), Some(36), "a UUID id: {r}");
                assert_eq!(r["aggregation"], aggregation);
                assert_eq!(r["definition_version"], 1);
                let start = instream_event::parse_event_time(&r["window_start"]).expect("RFC 3339");
                let group = r["group"].as_str().expect("a group").to_owned();
                let value = (
                    r["count"].as_i64().expect("a count"),
                    r["final"].as_bool().expect("final"),
                );
                last.insert((aggregation.to_owned(), group, start), value);
                records += 1;
            }
            let expected: BTreeMap<_, _> = stored
                .iter()
                .filter(|((a, ..), _)| a == aggregation)
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            assert_eq!(last, expected, "{aggregation}");
            if once {
                assert_eq!(
                    records,
                    expected.len(),
                    "{aggregation}: one record per window"
                );
            } else {
                assert!(records > expected.len(), "{aggregation}: early values too");
            }
        }
    }

    /// The store holds every window sent, final, with the count of the events sent.
    async fn assert_every_window_final_and_exact(&self) {
        let expected: BTreeMap<_, _> = self
            .expected
            .iter()
            .map(|(k, n)| (k.clone(), (*n, true)))
            .collect();
        assert_eq!(self.stored().await, expected);
    }
}

/// Events stop while the last window of every group is open (its end is 5 s of event time
/// past the newest event). Nothing more ever comes, yet once the partitions have been quiet
/// for the idle time their watermarks move on and every window is written final — the
/// repartitioned ones too — and the final-only aggregation has no other value in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_stops_has_its_last_windows_closed_and_written_final() {
    let mut s = scenario("2s", 10);
    s.send(400, 0, 15_000).await;
    let run = instream_testkit::spawn_service(BIN, &s.config).unwrap();
    wait_for("every event counted", Duration::from_secs(60), || {
        s.counted(400)
    })
    .await;
    wait_for(
        "the quiet partitions' windows closed",
        Duration::from_secs(60),
        || s.all_closed_by_idleness(),
    )
    .await;
    assert_eq!(s.too_late().await, 0.0);
    s.stop(run).await;
    s.assert_every_window_final_and_exact().await;
    s.assert_results_equal_the_store().await;
}

/// The aggregator crashes (an abort, like kill -9) right after the first final results are
/// on their topics, before the checkpoint that drops their windows. Restarted from the older
/// checkpoint it makes the same windows final again; it reads back what was published after
/// that checkpoint, so the final-only aggregation's topic holds each window once — and every
/// window is in the store, final and exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_result_published_just_before_a_crash_is_not_published_again() {
    let mut s = scenario("2s", 10);
    s.send(400, 0, 15_000).await;
    let mut crashing = ChildGuard::new(
        std::process::Command::new(BIN)
            .arg("--config")
            .arg(&s.config)
            .env("FAILPOINTS", "aggregator-results-published=return")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let status = crashing.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(!status.success(), "it stopped at the fail point: {status}");
    assert!(
        !s.results("per_key_final").await.is_empty(),
        "final results were on the topic before the crash"
    );
    let run = instream_testkit::spawn_service(BIN, &s.config).unwrap();
    wait_for("every event counted", Duration::from_secs(60), || {
        s.counted(400)
    })
    .await;
    wait_for(
        "the quiet partitions' windows closed",
        Duration::from_secs(60),
        || s.all_closed_by_idleness(),
    )
    .await;
    s.stop(run).await;
    s.assert_every_window_final_and_exact().await;
    s.assert_results_equal_the_store().await;
}

/// The aggregator counts the first events and stops; while it is away for longer than the
/// idle time, a backlog arrives for the same windows. Restarted, it reads the backlog first:
/// the time it was away does not count as quiet, so no backlog event is too late and every
/// window ends final with all of its events. (Counted as quiet, the 4 s away would have moved
/// the watermark from 2 s to 5 s and closed the window [0, 4 s) before its backlog; the first
/// run waits a minute before idling, so that how long it takes to stop cannot matter.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregator_restarted_behind_a_backlog_closes_nothing_early() {
    let mut s = scenario("1m", 4);
    s.send(200, 1_000, 2_000).await;
    let first = instream_testkit::spawn_service(BIN, &s.config).unwrap();
    wait_for("the first events counted", Duration::from_secs(60), || {
        s.counted(200)
    })
    .await;
    s.stop(first).await;
    s.set_idle("3s");
    // Away for longer than the idle time (the scenario, not a synchronization): the backlog
    // is sent meanwhile, with event times a quiet watermark moved on by this downtime would
    // have passed.
    let away = tokio::time::Instant::now();
    s.send(4_000, 2_000, 3_900).await;
    tokio::time::sleep_until(away + Duration::from_secs(4)).await;
    let second = instream_testkit::spawn_service(BIN, &s.config).unwrap();
    wait_for("the backlog counted", Duration::from_secs(60), || {
        s.counted(4_000)
    })
    .await;
    wait_for(
        "the quiet partitions' windows closed",
        Duration::from_secs(60),
        || s.all_closed_by_idleness(),
    )
    .await;
    assert_eq!(s.too_late().await, 0.0, "nothing closed early");
    s.stop(second).await;
    s.assert_every_window_final_and_exact().await;
}

/// Version 1 counts in 10-second windows; version 2 also sums, and `per_key` in 5-second
/// windows, from 10 s of event time on. The aggregator counts
/// the first events under version 1 and is killed with -9; it restarts under version 2 (with
/// version 1 kept), reads again what was not checkpointed and the rest: every window starting
/// before 10 s is version 1's, whole (its late events included), every one from 10 s on is
/// version 2's — for the aggregation grouped by the key and the repartitioned one alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_definition_change_takes_over_at_its_boundary_through_a_kill() {
    let mut s = scenario("1h", 10);
    s.send(300, 0, 9_000).await;
    let mut first = instream_testkit::spawn_service(BIN, &s.config).unwrap();
    wait_for("the first events counted", Duration::from_secs(60), || {
        s.counted(300)
    })
    .await;
    first.0.kill().unwrap(); // SIGKILL: what was not checkpointed is read again
    first.wait_exit(Duration::from_secs(10)).unwrap();
    s.apply_version_2(10_000);
    // Some for version 1's windows (within the out-of-orderness), most after the boundary.
    s.send(400, 9_000, 19_000).await;
    let second = instream_testkit::spawn_service(BIN, &s.config).unwrap();
    // This run also reads again what the first did not checkpoint: counting 400 is not yet
    // having read everything; nothing left to read on any partition is.
    wait_for("every event counted", Duration::from_secs(60), || async {
        s.counted(400).await && s.caught_up().await
    })
    .await;
    assert_eq!(s.too_late().await, 0.0);
    s.stop(second).await;
    s.assert_versions_switched_at_10_s().await;
}

/// The same change made while the aggregator runs mid-stream: version 2 is published to
/// ZooKeeper and taken up from the watch mid-stream, then events of both versions' windows
/// are counted; the aggregator is killed (-9) right after, with more events still to come; restarted, it reads again what it had not checkpointed. Every window is
/// still the version's its start says, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_definition_change_taken_up_mid_stream_and_killed_right_after_switches_at_its_boundary() {
    let zookeeper = instream_testkit::ZooKeeperServer::start().unwrap();
    let mut s = scenario("1h", 10);
    let zk = s.definitions_in(&zookeeper).await;
    s.send(300, 0, 9_000).await;
    let mut first = instream_testkit::spawn_service(BIN, &s.config).unwrap();
    wait_for("the first events counted", Duration::from_secs(60), || {
        s.counted(300)
    })
    .await;
    s.publish_version_2(&zk, 10_000).await;
    // The version must reach the aggregator before an event of its windows does (what the
    // `effective_from` margin gives a deployment, DESIGN §7); then events of both versions'
    // windows are counted by a run that knows both.
    wait_for("version 2 taken up", Duration::from_secs(60), || {
        s.runs_version(2.0)
    })
    .await;
    s.send(200, 9_000, 14_000).await;
    wait_for(
        "the events around the boundary counted",
        Duration::from_secs(60),
        || s.counted(500),
    )
    .await;
    first.0.kill().unwrap(); // right after it counted across the change
    first.wait_exit(Duration::from_secs(10)).unwrap();
    s.send(200, 14_000, 19_000).await;
    let second = instream_testkit::spawn_service(BIN, &s.config).unwrap();
    // It counts the 200 new events and whatever the first run had not checkpointed: done
    // when the broker says every partition is committed to its end.
    wait_for("every event counted", Duration::from_secs(60), || async {
        s.counted(200).await && s.caught_up().await
    })
    .await;
    assert_eq!(s.too_late().await, 0.0);
    s.stop(second).await;
    s.assert_versions_switched_at_10_s().await;
}
