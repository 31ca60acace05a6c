//! libs/kafka against a real Kafka-protocol broker: commits follow the offset tracker, dead
//! letters carry their reason and origin.

use std::time::Duration;

use instream_core::config::Config;
use instream_kafka::client::{self, recv_batch};
use instream_kafka::{headers, DeadLetter, DeadLetters, Origin, Record};
use instream_testkit::{unique, KafkaBroker};
use rdkafka::producer::FutureRecord;

fn config(broker: &KafkaBroker) -> Config {
    Config::from_toml(&instream_integration_tests::base_config_toml(
        &broker.bootstrap_servers(),
    ))
    .expect("test config is valid")
}

async fn produce(cfg: &Config, topic: &str, n: usize) {
    let producer = client::producer(&cfg.kafka, "test").unwrap();
    let mut deliveries = Vec::new();
    for i in 0..n {
        let payload = format!("record-{i}");
        let key = format!("k{}", i % 7);
        let record = FutureRecord::to(topic)
            .key(key.as_bytes())
            .payload(payload.as_bytes());
        deliveries.push(client::send(&producer, record).await.unwrap());
    }
    for d in deliveries {
        client::delivered(d).await.unwrap();
    }
}

async fn consume_all(consumer: &client::Consumer, want: usize, timeout: Duration) -> Vec<Record> {
    let mut got = Vec::new();
    let mut batch = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while got.len() < want && tokio::time::Instant::now() < deadline {
        recv_batch(consumer, 500, Duration::from_millis(200), &mut batch)
            .await
            .unwrap();
        got.append(&mut batch);
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_cover_only_handled_records_and_resume_there() {
    let broker = KafkaBroker::start().unwrap();
    let cfg = config(&broker);
    let topic = unique("t");
    broker.create_topic(&topic, 2).unwrap();
    instream_kafka::admin::ensure_topics(
        &cfg.kafka,
        &[instream_kafka::admin::TopicSpec {
            name: topic.clone(),
            partitions: 2,
        }],
    )
    .await
    .unwrap();
    produce(&cfg, &topic, 1000).await;

    let group = unique("g");
    let consumer = client::consumer(&cfg.kafka, "test", &group, &[&topic]).unwrap();
    let first = consume_all(&consumer, 1000, Duration::from_secs(60)).await;
    assert_eq!(first.len(), 1000);
    // Handle everything except the last 100 records of partition 0.
    let p0: Vec<&Record> = first.iter().filter(|r| r.partition == 0).collect();
    let held_back: std::collections::BTreeSet<i64> =
        p0[p0.len() - 100..].iter().map(|r| r.offset).collect();
    client::complete(
        &consumer,
        first
            .iter()
            .filter(|r| !(r.partition == 0 && held_back.contains(&r.offset))),
    );
    client::commit(&consumer, true).unwrap();
    drop(consumer);

    let again = client::consumer(&cfg.kafka, "test", &group, &[&topic]).unwrap();
    let mut second = consume_all(&again, 100, Duration::from_secs(60)).await;
    // Anything more that would come back (a wrong redelivery of partition 1) shows up here.
    let mut more = Vec::new();
    recv_batch(&again, 1000, Duration::from_secs(2), &mut more)
        .await
        .unwrap();
    second.append(&mut more);
    assert_eq!(second.len(), 100, "nothing handled comes back");
    let offsets: std::collections::BTreeSet<i64> = second
        .iter()
        .filter(|r| r.partition == 0)
        .map(|r| r.offset)
        .collect();
    assert_eq!(
        offsets, held_back,
        "exactly the unhandled records come back"
    );
    assert!(second.iter().all(|r| r.partition == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_carry_reason_and_origin() {
    let broker = KafkaBroker::start().unwrap();
    let cfg = config(&broker);
    let pipeline = unique("p");
    let dlq = format!("{pipeline}.dlq");
    broker.create_topic(&dlq, 1).unwrap();
    let dead = DeadLetters::from_config(&cfg.kafka, instream_core::Service::Enricher).unwrap();
    let delivery = dead
        .publish(&DeadLetter {
            topic: &dlq,
            pipeline: &pipeline,
            key: Some(b"k1"),
            payload: b"{not json",
            code: instream_kafka::DeadLetterCode::DecodeError,
            reason: "expected value at line 1 column 2",
            origin: Some(Origin {
                topic: "x.raw",
                partition: 3,
                offset: 42,
            }),
        })
        .await
        .unwrap();
    client::delivered(delivery).await.unwrap();

    let consumer = client::consumer(&cfg.kafka, "test", &unique("g"), &[dlq]).unwrap();
    let got = consume_all(&consumer, 1, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(r.payload, b"{not json");
    assert_eq!(r.header(headers::DLQ_CODE), Some(&b"decode_error"[..]));
    assert_eq!(
        r.header(headers::DLQ_REASON),
        Some(&b"expected value at line 1 column 2"[..])
    );
    assert_eq!(r.header(headers::ORIGIN_TOPIC), Some(&b"x.raw"[..]));
    assert_eq!(r.header(headers::ORIGIN_PARTITION), Some(&b"3"[..]));
    assert_eq!(r.header(headers::ORIGIN_OFFSET), Some(&b"42"[..]));
}
