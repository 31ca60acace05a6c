//! What the enricher's process tests share: a pipeline with reference data in a real Redis,
//! raw records on the test broker, the binary spawned on them, and the check of its output.

#![allow(dead_code)] // each test file uses its part

use std::collections::BTreeMap;
use std::time::Duration;

use instream_kafka::client::{self, recv_batch};
use instream_kafka::headers;
use instream_testkit::{
    free_port, metric_sum, process_config_toml, unique, ChildGuard, KafkaBroker, RedisServer,
};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

pub const BIN: &str = env!("CARGO_BIN_EXE_instream-enricher");
pub const EVENTS: usize = 12_000;
pub const CUSTOMERS: usize = 50;
pub const PARTITIONS: i32 = 4;

pub fn spawn(config: &std::path::Path) -> ChildGuard {
    instream_testkit::spawn_service(BIN, config).unwrap()
}

pub async fn enriched_so_far(admin: u16) -> f64 {
    let Ok(response) = reqwest::get(format!("http://127.0.0.1:{admin}/metrics")).await else {
        return 0.0;
    };
    let text = response.text().await.unwrap_or_default();
    metric_sum(&text, "instream_events_total", "outcome=\"enriched\"").0
}

pub fn tier(customer: usize) -> &'static str {
    ["gold", "silver", "bronze"][customer % 3]
}

pub async fn produce_raw(broker: &KafkaBroker, pipeline: &str) {
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
pub struct Output {
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
pub struct Scenario {
    _redis: RedisServer,
    pub broker: KafkaBroker,
    _dir: tempfile::TempDir,
    pub pipeline: String,
    pub config: std::path::PathBuf,
    pub admin: u16,
    pub delivery: String,
}

pub async fn scenario(delivery: &str, extra: &str) -> Scenario {
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
pub async fn check_output(s: &Scenario, mut child: ChildGuard) -> usize {
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
pub async fn wait_for_progress(admin: u16, child: &mut ChildGuard, at_least: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while enriched_so_far(admin).await < at_least {
        assert!(tokio::time::Instant::now() < deadline, "no progress");
        assert!(!child.exited(), "the enricher exited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `child` must stop with an error naming the broker's refusal (not authorized); then the
/// broker accepts `api` requests again and a restarted enricher writes every event.
pub async fn stops_naming_the_refusal_and_restarts(
    s: &Scenario,
    mut child: ChildGuard,
    api: rdkafka::types::RDKafkaApiKey,
) {
    let status = child.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(
        !status.success(),
        "the enricher stops with an error when a write is refused for good: {status}"
    );
    // Refused by the broker (its error code), or, when the producer's watcher saw it
    // first, librdkafka's account of its fatal error (which names the refusal).
    let stopped = child.stopped_with_an_error();
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

/// Whether the test must be skipped: it makes the broker fail requests or go down, which only
/// the embedded one allows (not a real Kafka named by `INSTREAM_TEST_KAFKA`). Says so.
pub fn skipped_without_the_embedded_broker() -> bool {
    let real = std::env::var("INSTREAM_TEST_KAFKA").is_ok_and(|v| !v.trim().is_empty());
    if real {
        eprintln!("skipped: the test makes the broker fail or go down, which only the embedded one allows");
    }
    real
}

/// Waits (up to a minute) until `child`'s log holds one of `texts`, asserting meanwhile that
/// it is still running; `what` names the awaited step in a failure.
pub async fn wait_for_log(child: &mut ChildGuard, texts: &[&str], what: &str) {
    let log = child.1.clone().expect("a service's log");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log).is_ok_and(|text| texts.iter().any(|t| text.contains(t))) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        assert!(!child.exited(), "the enricher exited waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
