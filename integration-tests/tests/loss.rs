//! Loss detection against the embedded broker, which deletes the oldest records of a partition
//! beyond 5 MB whether anyone read them or not: a consumer lagging while records are deleted
//! under it, and a group resuming from a commit the partition no longer holds, each count
//! exactly the offsets they never received (`instream_records_lost_total`), and a reader of a
//! range reports what it could not read. A real Kafka keeps what these tests need deleted, so
//! with `INSTREAM_TEST_KAFKA` they are skipped (they say so).

use std::collections::BTreeSet;
use std::time::Duration;

use instream_core::config::{Config, OnRecordsLost};
use instream_kafka::client::{self, recv_batch};
use instream_kafka::{Continuity, KafkaError, Lost};
use instream_testkit::{unique, KafkaBroker};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use rdkafka::consumer::Consumer as _;
use rdkafka::producer::FutureRecord;

/// One recorder for the whole test binary (the tests of this file run in one process).
fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: std::sync::OnceLock<Snapshotter> = std::sync::OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder of this test binary");
        snapshotter
    })
}

/// `instream_records_lost_total` of `service` on `topic`, partition 0.
fn lost_counter(service: &str, topic: &str) -> u64 {
    snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| {
            let key = key.key();
            key.name() == "instream_records_lost_total"
                && key
                    .labels()
                    .any(|l| l.key() == "service" && l.value() == service)
                && key
                    .labels()
                    .any(|l| l.key() == "topic" && l.value() == topic)
                && key
                    .labels()
                    .any(|l| l.key() == "partition" && l.value() == "0")
        })
        .map(|(.., value)| match value {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum()
}

/// A consumer that fetches little ahead of what the test has taken (so that it can fall
/// behind the broker's log start), under `policy`.
fn config(broker: &KafkaBroker, policy: &str) -> Config {
    let toml = instream_integration_tests::base_config_toml(&broker.bootstrap_servers())
        .replace(
            "[kafka.consumer]",
            "[kafka.consumer]\n\"queued.max.messages.kbytes\" = \"64\"\n\"queued.min.messages\" = \"10\"\n\"max.partition.fetch.bytes\" = \"32768\"",
        )
        .replace(
            "commit_interval = \"200ms\"",
            &format!("commit_interval = \"200ms\"\non_records_lost = \"{policy}\""),
        );
    Config::from_toml(&toml).expect("test config is valid")
}

/// Writes `n` records of about 1 KB that do not compress (the broker's cap counts stored
/// bytes), starting the pseudo-random stream at `seed`.
async fn produce(cfg: &Config, topic: &str, n: usize, seed: u64) {
    let producer = client::producer(&cfg.kafka, "test").unwrap();
    let mut x = seed | 1;
    let mut deliveries = Vec::new();
    for _ in 0..n {
        let payload: String = (0..64)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                format!("{x:016x}")
            })
            .collect();
        let record = FutureRecord::to(topic).payload(payload.as_bytes());
        deliveries.push(client::send(&producer, record).await.unwrap());
    }
    for d in deliveries {
        client::delivered(d).await.unwrap();
    }
}

fn skipped_under_kafka(broker: &KafkaBroker, test: &str) -> bool {
    if broker.is_embedded() {
        return false;
    }
    eprintln!("skipped: {test} needs the embedded broker's size cap (INSTREAM_TEST_KAFKA is set)");
    true
}

/// Receives and checks batches until every offset below the partition's end is either
/// received or counted lost; returns the received offsets and the lost ranges.
async fn read_to_the_end(
    consumer: &client::Consumer,
    continuity: &mut Continuity,
    start: i64,
    end: i64,
    mut received: BTreeSet<i64>,
    mut lost: Vec<Lost>,
) -> (BTreeSet<i64>, Vec<Lost>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut batch = Vec::new();
    loop {
        let accounted = received.len() as i64 + lost.iter().map(|l| l.count() as i64).sum::<i64>();
        if accounted >= end - start {
            return (received, lost);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{accounted} of {} offsets accounted for: received {}, lost {lost:?}",
            end - start,
            received.len()
        );
        recv_batch(consumer, 500, Duration::from_millis(200), &mut batch)
            .await
            .unwrap();
        lost.extend(continuity.check(consumer, &batch).await.unwrap());
        received.extend(batch.iter().map(|r| r.offset));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_lagging_while_records_are_deleted_counts_exactly_what_it_skipped() {
    snapshotter();
    let broker = KafkaBroker::start().unwrap();
    if skipped_under_kafka(&broker, "the lagging-consumer test") {
        return;
    }
    let cfg = config(&broker, "continue");
    let topic = unique("lag");
    broker.create_topic(&topic, 1).unwrap();
    produce(&cfg, &topic, 300, 1).await;

    let consumer = client::consumer(&cfg.kafka, "test", &unique("g"), &[&topic]).unwrap();
    let mut continuity = Continuity::new("lagging", &cfg.kafka, |_| false);
    let (received, lost) = read_to_the_end(
        &consumer,
        &mut continuity,
        0,
        300,
        BTreeSet::new(),
        Vec::new(),
    )
    .await;
    assert!(lost.is_empty(), "nothing deleted yet: {lost:?}");

    // The consumer takes nothing while 12 MB arrive: the broker keeps 5 MB of them.
    produce(&cfg, &topic, 12_000, 2).await;
    let (low, high) = instream_kafka::ops::watermarks(&cfg.kafka, &topic, 0)
        .await
        .unwrap();
    assert!(
        low > 1_000,
        "the broker deleted records (log starts at {low})"
    );
    let (received, lost) =
        read_to_the_end(&consumer, &mut continuity, 0, high, received, lost).await;

    let skipped: u64 = lost.iter().map(Lost::count).sum();
    assert!(skipped > 0, "records were deleted before they were read");
    for range in &lost {
        assert_eq!((range.topic.as_str(), range.partition), (topic.as_str(), 0));
        assert!(
            received.range(range.from..range.to).next().is_none(),
            "{range} counts offsets that were received"
        );
    }
    assert_eq!(
        received.len() as u64 + skipped,
        high as u64,
        "every offset is received or counted lost, once"
    );
    assert_eq!(lost_counter("lagging", &topic), skipped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_resuming_below_the_log_start_counts_the_gap_and_stops_when_told() {
    snapshotter();
    let broker = KafkaBroker::start().unwrap();
    if skipped_under_kafka(&broker, "the resume-below-log-start test") {
        return;
    }
    let topic = unique("resume");
    broker.create_topic(&topic, 1).unwrap();
    let group = unique("g");
    let cfg = config(&broker, "stop");
    produce(&cfg, &topic, 200, 3).await;
    {
        let consumer = client::consumer(&cfg.kafka, "test", &group, &[&topic]).unwrap();
        let mut continuity = Continuity::new("resumer", &cfg.kafka, |_| false);
        let (received, _) = read_to_the_end(
            &consumer,
            &mut continuity,
            0,
            200,
            BTreeSet::new(),
            Vec::new(),
        )
        .await;
        // Handled up to offset 150: the group resumes there.
        let mut tracker = consumer.context().tracker();
        for offset in received.range(..150) {
            tracker.complete(&topic, 0, *offset);
        }
        drop(tracker);
        client::commit(&consumer, true).unwrap();
    }
    produce(&cfg, &topic, 12_000, 4).await;
    let (low, high) = instream_kafka::ops::watermarks(&cfg.kafka, &topic, 0)
        .await
        .unwrap();
    assert!(low > 150);
    let expected = Lost {
        topic: topic.clone(),
        partition: 0,
        from: 150,
        to: low,
    };

    // `stop`: the first batch fails naming the range, before anything of it is handled.
    {
        let consumer = client::consumer(&cfg.kafka, "test", &group, &[&topic]).unwrap();
        let mut continuity = Continuity::new("resumer", &cfg.kafka, |_| false);
        let mut batch = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let error = loop {
            assert!(tokio::time::Instant::now() < deadline, "no record came");
            recv_batch(&consumer, 500, Duration::from_millis(200), &mut batch)
                .await
                .unwrap();
            match continuity.check(&consumer, &batch).await {
                Ok(lost) => assert!(lost.is_empty() && batch.is_empty(), "{lost:?}"),
                Err(error) => break error,
            }
        };
        assert!(
            matches!(&error, KafkaError::RecordsLost(lost) if *lost == expected),
            "{error}"
        );
        assert!(error.to_string().contains("on_records_lost"), "{error}");
        assert_eq!(lost_counter("resumer", &topic), expected.count());
    }

    // `continue`: counted the same way, and everything after the gap is read.
    let cfg = Config {
        kafka: instream_core::config::KafkaConfig {
            on_records_lost: OnRecordsLost::Continue,
            ..cfg.kafka.clone()
        },
        ..cfg
    };
    let consumer = client::consumer(&cfg.kafka, "test", &group, &[&topic]).unwrap();
    let mut continuity = Continuity::new("continuer", &cfg.kafka, |_| false);
    let (received, lost) = read_to_the_end(
        &consumer,
        &mut continuity,
        150,
        high,
        BTreeSet::new(),
        Vec::new(),
    )
    .await;
    assert_eq!(lost, vec![expected.clone()]);
    assert_eq!(received, (low..high).collect::<BTreeSet<i64>>());
    assert_eq!(lost_counter("continuer", &topic), expected.count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_of_a_range_the_partition_no_longer_holds_reports_what_it_skipped() {
    snapshotter();
    let broker = KafkaBroker::start().unwrap();
    if skipped_under_kafka(&broker, "the range-read test") {
        return;
    }
    let cfg = config(&broker, "continue");
    let topic = unique("range");
    broker.create_topic(&topic, 1).unwrap();
    produce(&cfg, &topic, 12_000, 5).await;
    let (low, high) = instream_kafka::ops::watermarks(&cfg.kafka, &topic, 0)
        .await
        .unwrap();
    assert!(low > 0);
    let (offsets, skipped) = instream_kafka::ops::scan_partition(
        &cfg.kafka,
        &topic,
        0,
        0,
        high,
        false,
        Vec::new(),
        |all: &mut Vec<i64>, offset, _| all.push(offset),
    )
    .await
    .unwrap();
    assert_eq!(
        skipped,
        vec![Lost {
            topic: topic.clone(),
            partition: 0,
            from: 0,
            to: low
        }]
    );
    assert_eq!(offsets, (low..high).collect::<Vec<i64>>());
}
