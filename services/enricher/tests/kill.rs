//! The `instream-enricher` binary killed with -9 twice mid-stream and restarted, in each
//! delivery mode: every raw record comes out enriched (nothing lost), with the right
//! reference data, and every copy of one record is the same bytes under the same origin
//! partition and offset — so the aggregator, which drops a repeated origin, counts each once.
//! In transactional delivery on a broker with full transactions (a real Kafka via
//! `INSTREAM_TEST_KAFKA`) there are no copies at all. On the embedded broker the transactional
//! path runs (the protocol is accepted) but shows copies: it neither stores the offsets sent
//! in a transaction nor hides aborted ones (README, "Test broker"). And the broker taken
//! down mid-stream, for longer than the producer's configured delivery timeout: the
//! enricher waits for it and loses nothing. Real Redis.

use std::collections::BTreeMap;
use std::time::Duration;

use instream_kafka::client::{self, recv_batch};
use instream_kafka::headers;
use instream_testkit::{
    free_port, metric_sum, process_config_toml, unique, ChildGuard, KafkaBroker, RedisServer,
};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

const BIN: &str = env!("CARGO_BIN_EXE_instream-enricher");
const EVENTS: usize = 12_000;
const CUSTOMERS: usize = 50;
const PARTITIONS: i32 = 4;

fn spawn(config: &std::path::Path) -> ChildGuard {
    instream_testkit::spawn_service(BIN, config).unwrap()
}

async fn enriched_so_far(admin: u16) -> f64 {
    let Ok(response) = reqwest::get(format!("http://127.0.0.1:{admin}/metrics")).await else {
        return 0.0;
    };
    let text = response.text().await.unwrap_or_default();
    metric_sum(&text, "instream_events_total", "outcome=\"enriched\"").0
}

fn tier(customer: usize) -> &'static str {
    ["gold", "silver", "bronze"][customer % 3]
}

async fn produce_raw(broker: &KafkaBroker, pipeline: &str) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let topic = format!("{pipeline}.raw");
    let mut pending = Vec::new();
    for i in 0..EVENTS {
        let customer = i % CUSTOMERS;
        let event = instream_event::Event {
            event_id: format!("e{i}"),
            pipeline: pipeline.to_owned(),
            key: format!("c{customer}"),
            event_time: 1_714_564_800_000 + i as i64,
            ingest_time: instream_event::now_millis(),
            headers: Default::default(),
            payload: serde_json::value::RawValue::from_string(format!(
                "{{\"customer_id\":\"c{customer}\",\"n\":{i}}}"
            ))
            .unwrap(),
            enrichment: None,
        };
        let bytes = instream_event::encode(&event);
        let key = event.key.clone();
        let topic = topic.clone();
        let producer = producer.clone();
        pending.push(tokio::spawn(async move {
            producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(&bytes[..]),
                    Duration::from_secs(30),
                )
                .await
                .map(|_| ())
                .map_err(|(e, _)| e)
        }));
        if pending.len() >= 2_000 {
            for p in pending.drain(..) {
                p.await.unwrap().unwrap();
            }
        }
    }
    for p in pending {
        p.await.unwrap().unwrap();
    }
}

/// The enriched records read so far: every copy under its origin (partition, offset), and
/// the origins an aggregator would count — reading each enriched partition in order, it drops
/// an origin offset at or below the highest it counted for that origin partition, so an
/// output lost behind a later one of its partition and written again would not count.
#[derive(Default)]
struct Output {
    copies: BTreeMap<(i32, i64), Vec<Vec<u8>>>,
    highest: BTreeMap<(i32, i32), i64>,
    counted: std::collections::BTreeSet<(i32, i64)>,
}

impl Output {
    fn take(&mut self, batch: &mut Vec<instream_kafka::Record>) {
        for record in batch.drain(..) {
            let origin = |name| {
                std::str::from_utf8(record.header(name).expect("origin headers"))
                    .unwrap()
                    .parse::<i64>()
                    .unwrap()
            };
            let key = (
                origin(headers::ORIGIN_PARTITION) as i32,
                origin(headers::ORIGIN_OFFSET),
            );
            let highest = self.highest.entry((record.partition, key.0)).or_insert(-1);
            if key.1 > *highest {
                *highest = key.1;
                self.counted.insert(key);
            }
            self.copies.entry(key).or_default().push(record.payload);
        }
    }
}

/// A pipeline of `PARTITIONS` partitions holding `EVENTS` raw records, a real Redis holding
/// every customer, and an enricher config for `delivery` with `extra` sections appended.
struct Scenario {
    _redis: RedisServer,
    broker: KafkaBroker,
    _dir: tempfile::TempDir,
    pipeline: String,
    config: std::path::PathBuf,
    admin: u16,
    delivery: String,
}

async fn scenario(delivery: &str, extra: &str) -> Scenario {
    let redis = RedisServer::start().unwrap();
    let broker = KafkaBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pipeline = unique("ekill");
    broker
        .create_pipeline_topics(&pipeline, PARTITIONS)
        .unwrap();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
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
    let definitions = dir.path().join("definitions.toml");
    std::fs::write(
        &definitions,
        format!(
            "[[pipelines]]\nname = \"{pipeline}\"\nkey_field = \"customer_id\"\ntime_field = \"n\"\npartitions = {PARTITIONS}\n\n[[pipelines.enrichments]]\nname = \"customer\"\nkey_template = \"customer:{{customer_id}}\"\nfields = {{ tier = \"tier\" }}\n"
        ),
    )
    .unwrap();
    let admin = free_port().unwrap();
    let config = dir.path().join("enricher.toml");
    std::fs::write(
        &config,
        process_config_toml(admin, &broker.bootstrap_servers(), &definitions, "1s", 4096)
            + &format!(
                "[refdata]\nbackend = \"redis\"\nredis_url = \"{}\"\n[enricher]\nbatch_size = 200\ndelivery = \"{delivery}\"\ntransactional_id = \"kill-test-{pipeline}\"\n{extra}",
                redis.url()
            ),
    )
    .unwrap();
    produce_raw(&broker, &pipeline).await;
    Scenario {
        _redis: redis,
        broker,
        _dir: dir,
        pipeline,
        config,
        admin,
        delivery: delivery.to_owned(),
    }
}

/// With `child` running: reads the enriched topic until every raw record is there, stops the
/// child (which must exit 0), reads each partition to its end, and checks that every event
/// came out enriched and right, every copy of one origin the same bytes. Returns the number
/// of repeated copies.
async fn check_output(s: &Scenario, mut child: ChildGuard) -> usize {
    let (broker, pipeline) = (&s.broker, &s.pipeline);

    // Read the enriched topic until every raw record is there.
    let kafka = instream_core::config::KafkaConfig {
        bootstrap_servers: broker.bootstrap_servers(),
        ..Default::default()
    };
    let consumer = client::consumer(
        &kafka,
        "test",
        &unique("reader"),
        &[format!("{pipeline}.enriched")],
    )
    .unwrap();
    let mut output = Output::default();
    let mut batch = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let mut distinct = 0;
    while distinct < EVENTS {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {distinct} of {EVENTS} raw records came out enriched"
        );
        assert!(!child.exited(), "the enricher exited");
        recv_batch(&consumer, 1_000, Duration::from_millis(200), &mut batch)
            .await
            .unwrap();
        output.take(&mut batch);
        distinct = output.copies.len();
    }
    child.terminate().unwrap();
    let status = child.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "a clean stop after the kills: {status}");
    // Then everything the enricher wrote, to each partition's end, so late copies count too.
    let topic = format!("{pipeline}.enriched");
    let mut ends = Vec::new();
    for p in 0..PARTITIONS {
        ends.push(
            instream_kafka::ops::watermarks(&kafka, &topic, p)
                .await
                .unwrap()
                .1,
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let positions = rdkafka::consumer::Consumer::position(&consumer).unwrap();
        let caught_up = (0..PARTITIONS).all(|p| {
            matches!(
                positions.find_partition(&topic, p).map(|e| e.offset()),
                Some(rdkafka::Offset::Offset(o)) if o >= ends[p as usize]
            ) || ends[p as usize] == 0
        });
        if caught_up {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "could not read to the end"
        );
        recv_batch(&consumer, 1_000, Duration::from_millis(200), &mut batch)
            .await
            .unwrap();
        output.take(&mut batch);
    }

    let mut repeated = 0;
    let mut seen_events = std::collections::BTreeSet::new();
    for ((partition, offset), versions) in &output.copies {
        assert!(
            versions.iter().all(|v| v == &versions[0]),
            "every copy of {partition}:{offset} is the same record"
        );
        repeated += versions.len() - 1;
        let event = instream_event::decode(&versions[0]).unwrap();
        let n: usize = event.event_id[1..].parse().unwrap();
        assert_eq!(
            event.enrichment.unwrap()["tier"],
            tier(n % CUSTOMERS),
            "{}",
            event.event_id
        );
        seen_events.insert(n);
    }
    assert_eq!(
        seen_events.len(),
        EVENTS,
        "every event enriched, once per origin"
    );
    assert_eq!(
        output.counted.len(),
        EVENTS,
        "an aggregator de-duplicating by origin counts every event: no output lost behind a later one"
    );
    repeated
}

/// Waits until the running enricher has enriched `at_least` events.
async fn wait_for_progress(admin: u16, child: &mut ChildGuard, at_least: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while enriched_so_far(admin).await < at_least {
        assert!(tokio::time::Instant::now() < deadline, "no progress");
        assert!(!child.exited(), "the enricher exited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn kill_twice_and_check(delivery: &str) {
    let s = scenario(delivery, "").await;
    let (config, admin) = (&s.config, s.admin);
    // Killed twice with -9 while it works, then run to the end.
    for kill_after in [EVENTS as f64 / 4.0, EVENTS as f64 / 4.0] {
        let mut child = spawn(config);
        wait_for_progress(admin, &mut child, kill_after).await;
        drop(child); // SIGKILL
    }
    let repeated = check_output(&s, spawn(config)).await;
    eprintln!("{delivery}: {repeated} repeated copies after two kills");
    if delivery == "transactional" && !s.broker.is_embedded() {
        assert_eq!(repeated, 0, "transactions leave no copies on a real broker");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_twice_in_transactional_delivery_nothing_lost_and_copies_identical() {
    kill_twice_and_check("transactional").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_twice_in_at_least_once_delivery_nothing_lost_and_copies_identical() {
    kill_twice_and_check("at_least_once").await;
}

/// The broker goes away while the enricher writes (longer than the producer's configured
/// `message.timeout.ms`, which at-least-once delivery overrides): deliveries wait for it
/// instead of failing, the enricher stays up, and every event comes out once per origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_mid_stream_holds_deliveries_back_and_loses_none() {
    if std::env::var("INSTREAM_TEST_KAFKA").is_ok_and(|v| !v.trim().is_empty()) {
        eprintln!("skipped: the test takes the broker down, which only the embedded one allows");
        return;
    }
    let s = scenario(
        "at_least_once",
        "[kafka.producer]\n\"message.timeout.ms\" = \"1000\"\n",
    )
    .await;
    let mut child = spawn(&s.config);
    wait_for_progress(s.admin, &mut child, EVENTS as f64 / 4.0).await;
    s.broker.set_up(false).unwrap();
    // Down until the enricher's broker probe notices (5 to 10 s): far past the 1 s timeout.
    let readyz = format!("http://127.0.0.1:{}/readyz", s.admin);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while reqwest::get(&readyz).await.map(|r| r.status()).ok()
        != Some(reqwest::StatusCode::SERVICE_UNAVAILABLE)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never turned 503"
        );
        assert!(!child.exited(), "the enricher exited during the outage");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!child.exited(), "the enricher exited during the outage");
    s.broker.set_up(true).unwrap();
    let repeated = check_output(&s, child).await;
    eprintln!(
        "{}: {repeated} repeated copies after the outage",
        s.delivery
    );
}

/// The broker refuses the enricher's writes with an error no retry mends (here: not
/// authorized) in the middle of the stream. Any record after a refused one could leave a gap
/// that origin de-duplication downstream would turn into a loss, so the enricher stops with
/// an error, committing nothing of the batch; restarted once the broker accepts again, it
/// writes everything, and an aggregator de-duplicating by origin counts every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_refused_for_good_stops_the_enricher_and_a_restart_loses_none() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    if std::env::var("INSTREAM_TEST_KAFKA").is_ok_and(|v| !v.trim().is_empty()) {
        eprintln!(
            "skipped: the test makes the broker fail requests, which only the embedded one allows"
        );
        return;
    }
    let s = scenario("at_least_once", "").await;
    let mut child = spawn(&s.config);
    wait_for_progress(s.admin, &mut child, EVENTS as f64 / 4.0).await;
    s.broker
        .fail_requests(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 3],
        )
        .unwrap();
    stops_naming_the_refusal_and_restarts(&s, child, RDKafkaApiKey::Produce).await;
}

/// The same in transactional delivery, the broker refusing (not authorized) to add the
/// enriched topic's partitions to the transaction, from the first batch on: no record gets
/// an error of its own (they are purged with the transaction), yet the enricher stops naming
/// the refusal instead of doing the batch again forever; restarted once the broker accepts,
/// it writes every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_refused_for_good_stops_the_enricher_and_a_restart_loses_none() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    if std::env::var("INSTREAM_TEST_KAFKA").is_ok_and(|v| !v.trim().is_empty()) {
        eprintln!(
            "skipped: the test makes the broker fail requests, which only the embedded one allows"
        );
        return;
    }
    let s = scenario("transactional", "").await;
    s.broker
        .fail_requests(
            RDKafkaApiKey::AddPartitionsToTxn,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 3],
        )
        .unwrap();
    let child = spawn(&s.config);
    stops_naming_the_refusal_and_restarts(&s, child, RDKafkaApiKey::AddPartitionsToTxn).await;
}

/// `child` must stop with an error naming the broker's refusal (not authorized); then the
/// broker accepts `api` requests again and a restarted enricher writes every event.
async fn stops_naming_the_refusal_and_restarts(
    s: &Scenario,
    mut child: ChildGuard,
    api: rdkafka::types::RDKafkaApiKey,
) {
    let status = child.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(
        !status.success(),
        "the enricher stops with an error when a write is refused for good: {status}"
    );
    let log = std::fs::read_to_string(child.1.as_ref().unwrap()).unwrap();
    // Refused by the broker (its error code), or, when the producer's watcher saw it
    // first, librdkafka's account of its fatal error (which names the refusal).
    let stopped = log
        .lines()
        .find(|l| l.contains("stopped with an error"))
        .unwrap_or_else(|| panic!("the enricher says it stopped: {log}"));
    assert!(
        stopped.contains("TopicAuthorizationFailed")
            || stopped.contains("Topic authorization failed"),
        "the enricher says why it stopped: {stopped}"
    );
    eprintln!("{}: {stopped}", s.delivery);
    s.broker.clear_request_errors(api).unwrap();
    let repeated = check_output(s, spawn(&s.config)).await;
    eprintln!(
        "{}: {repeated} repeated copies after the refusal",
        s.delivery
    );
}

/// Transactional delivery with the broker failing every write with an error it retries
/// (too few replicas in sync) for longer than the transaction timeout, from the first batch
/// on: the batch's writes time out in its transaction, which is aborted and the batch done
/// again, as often as it takes. The broker also fails the ends of transactions for a while
/// (coordinator loading): a commit or abort not finished in time is called again. The
/// enricher stays up, and once the broker takes writes again every event comes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_failing_past_the_transaction_timeout_abort_the_batch_and_do_it_again() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    if std::env::var("INSTREAM_TEST_KAFKA").is_ok_and(|v| !v.trim().is_empty()) {
        eprintln!(
            "skipped: the test makes the broker fail requests, which only the embedded one allows"
        );
        return;
    }
    // The error counts below outlast the 2 s timeouts only with librdkafka's retry pauses
    // (100 ms doubling to 1 s): pinned here rather than left to its defaults.
    let s = scenario(
        "transactional",
        "transaction_timeout = \"2s\"\n[kafka.producer]\n\"retry.backoff.ms\" = \"100\"\n\"retry.backoff.max.ms\" = \"1000\"\n",
    )
    .await;
    // Set before the enricher starts (the raw records are written already), so that its
    // first batches meet them whatever its speed.
    s.broker
        .fail_requests(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 40],
        )
        .unwrap();
    s.broker
        .fail_requests(
            RDKafkaApiKey::EndTxn,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 12],
        )
        .unwrap();
    let mut child = spawn(&s.config);
    let log = child.1.clone().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log)
        .is_ok_and(|text| text.contains("aborting its transaction and doing it again"))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no batch was aborted to be done again"
        );
        assert!(!child.exited(), "the enricher exited while writes failed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let repeated = check_output(&s, child).await;
    let text = std::fs::read_to_string(&log).unwrap();
    let (redone, called_again) = (
        text.matches("doing it again").count(),
        text.matches("calling it again").count(),
    );
    eprintln!(
        "{}: {redone} batches done again, {called_again} transactional calls repeated, {repeated} repeated copies",
        s.delivery
    );
    assert!(
        called_again > 0,
        "a commit or abort the broker did not finish in time is called again"
    );
}

/// Shutdown while the broker does not finish a transaction's commit (its coordinator keeps
/// answering "loading"): the enricher stops within seconds, not after the transaction
/// timeout, saying it left the transaction to the broker; nothing of the batch was counted
/// as committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_a_commit_waits_for_the_broker_leaves_the_transaction_to_it() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    if std::env::var("INSTREAM_TEST_KAFKA").is_ok_and(|v| !v.trim().is_empty()) {
        eprintln!(
            "skipped: the test makes the broker fail requests, which only the embedded one allows"
        );
        return;
    }
    let s = scenario("transactional", "transaction_timeout = \"60s\"\n").await;
    s.broker
        .fail_requests(
            RDKafkaApiKey::EndTxn,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 500],
        )
        .unwrap();
    let mut child = spawn(&s.config);
    let log = child.1.clone().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    // The first transaction's end: its commit, or an abort (a rebalance at the start).
    while !std::fs::read_to_string(&log).is_ok_and(|text| {
        text.contains("commit_transaction did not complete")
            || text.contains("abort_transaction did not complete")
    }) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no commit waited for the broker"
        );
        assert!(
            !child.exited(),
            "the enricher exited while its commit waited"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", s.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (committed, _) = metric_sum(
        &metrics,
        "instream_enrich_transactions_total",
        "outcome=\"committed\"",
    );
    assert_eq!(committed, 0.0, "no transaction could end");
    let asked = std::time::Instant::now();
    child.terminate().unwrap();
    let status = child.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "{status}");
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "stopped {took:?} after being asked, not at the 60 s transaction timeout"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("left to the broker") && !text.contains("drained and committed"),
        "says the transaction was left open: {text}"
    );
    s.broker
        .clear_request_errors(RDKafkaApiKey::EndTxn)
        .unwrap();
}

/// Transactional delivery started while the broker is down: the enricher waits for it to
/// register its transactional id (as its consumer waits to join), rather than exiting; once
/// the broker is up, every event comes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactional_enricher_started_while_the_broker_is_down_waits_for_it() {
    if std::env::var("INSTREAM_TEST_KAFKA").is_ok_and(|v| !v.trim().is_empty()) {
        eprintln!("skipped: the test takes the broker down, which only the embedded one allows");
        return;
    }
    let s = scenario("transactional", "").await;
    s.broker.set_up(false).unwrap();
    let mut child = spawn(&s.config);
    let log = child.1.clone().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log)
        .is_ok_and(|text| text.contains("init_transactions did not complete"))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the enricher never waited for the broker to register its id"
        );
        assert!(
            !child.exited(),
            "the enricher exited while the broker was down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !child.exited(),
        "the enricher exited while the broker was down"
    );
    let readyz = reqwest::get(format!("http://127.0.0.1:{}/readyz", s.admin))
        .await
        .unwrap();
    assert_eq!(
        readyz.status(),
        503,
        "not ready while waiting for the broker"
    );
    s.broker.set_up(true).unwrap();
    let repeated = check_output(&s, child).await;
    eprintln!("{}: {repeated} repeated copies", s.delivery);
}
