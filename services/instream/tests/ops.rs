//! `instream offsets reset` and `instream dlq tail|redrive`, run as the real binary against a
//! Kafka-protocol broker (the embedded one, or `INSTREAM_TEST_KAFKA`).

use std::process::{Command, Output};
use std::time::Duration;

use instream_core::config::KafkaConfig;
use instream_kafka::{ops, DeadLetter, DeadLetters, Origin};
use instream_testkit::{unique, KafkaBroker};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

fn instream(broker: &KafkaBroker, args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_instream"))
        .args(args)
        .env(
            "INSTREAM__KAFKA__BOOTSTRAP_SERVERS",
            broker.bootstrap_servers(),
        )
        .env("INSTREAM__TELEMETRY__LOG_LEVEL", "warn")
        .output()
        .expect("runs instream");
    assert!(
        output.status.success(),
        "instream {args:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn kafka_config(broker: &KafkaBroker) -> KafkaConfig {
    KafkaConfig {
        bootstrap_servers: broker.bootstrap_servers(),
        ..KafkaConfig::default()
    }
}

#[tokio::test]
async fn offsets_reset_moves_a_group_to_the_first_record_at_a_time_only_with_execute() {
    let broker = KafkaBroker::start().unwrap();
    let topic = format!("{}.raw", unique("replay"));
    broker.create_topic(&topic, 2).unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .create()
        .unwrap();
    // Per partition: 5 records an hour apart, from 10:00 on 2026-11-25.
    let ten = 1_795_600_800_000i64; // 2026-11-25T10:00:00Z
    for p in 0..2 {
        for i in 0..5i64 {
            producer
                .send(
                    FutureRecord::<[u8], [u8]>::to(&topic)
                        .partition(p)
                        .payload(b"{}")
                        .timestamp(ten + i * 3_600_000),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
    }
    let group = unique("group");
    let cfg = kafka_config(&broker);
    // The group has read everything.
    let done: Vec<ops::PartitionReset> = (0..2)
        .map(|p| ops::PartitionReset {
            partition: p,
            committed: None,
            target: 5,
        })
        .collect();
    ops::apply_offset_reset(&cfg, &group, &topic, &done)
        .await
        .unwrap();

    // Replay from 12:30: the first record at or after it is the fourth (13:00), offset 3.
    let args = [
        "offsets",
        "reset",
        "--group",
        &group,
        "--topic",
        &topic,
        "--to-datetime",
        "2026-11-25T12:30:00Z",
        "--output",
        "json",
    ];
    let dry: serde_json::Value = serde_json::from_slice(&instream(&broker, &args).stdout).unwrap();
    assert_eq!(dry["executed"], false);
    for p in dry["partitions"].as_array().unwrap() {
        assert_eq!(
            (p["committed"].as_i64(), p["target"].as_i64()),
            (Some(5), Some(3)),
            "{dry}"
        );
    }
    let still = ops::plan_offset_reset(&cfg, &group, &topic, ten)
        .await
        .unwrap();
    assert!(
        still.iter().all(|r| r.committed == Some(5)),
        "a dry run commits nothing: {still:?}"
    );

    let mut execute = args.to_vec();
    execute.push("--execute");
    instream(&broker, &execute);
    let now = ops::plan_offset_reset(&cfg, &group, &topic, ten)
        .await
        .unwrap();
    assert!(now.iter().all(|r| r.committed == Some(3)), "{now:?}");
}

#[tokio::test]
async fn dlq_tail_shows_dead_letters_and_redrive_sends_raw_ones_back_once() {
    let broker = KafkaBroker::start().unwrap();
    let pipeline = unique("orders");
    let dlq = instream_pipeline::topics::dead_letter(&pipeline);
    let raw = instream_pipeline::topics::raw(&pipeline);
    let enriched = instream_pipeline::topics::enriched(&pipeline);
    for t in [&dlq, &raw, &enriched] {
        broker.create_topic(t, 1).unwrap();
    }
    let cfg = kafka_config(&broker);
    let letters = DeadLetters::from_config(&cfg, "enricher").unwrap();
    let cases: [(&str, &str, &str); 3] = [
        (&raw, "enrich_miss", r#"{"n":1}"#),
        (&raw, "refdata_malformed", r#"{"n":2}"#),
        (&enriched, "unknown_pipeline", r#"{"n":3}"#),
    ];
    for (i, (origin, code, payload)) in cases.iter().enumerate() {
        let delivery = letters
            .publish(&DeadLetter {
                topic: &dlq,
                pipeline: &pipeline,
                key: Some(b"c1"),
                payload: payload.as_bytes(),
                code,
                reason: "because",
                origin: Some(Origin {
                    topic: origin,
                    partition: 0,
                    offset: i as i64,
                }),
            })
            .await
            .unwrap();
        instream_kafka::client::delivered(delivery).await.unwrap();
    }

    let tail = instream(
        &broker,
        &["dlq", "tail", "--pipeline", &pipeline, "--output", "json"],
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&tail.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["code"], "enrich_miss");
    assert_eq!(lines[0]["origin"]["topic"], raw.as_str());
    assert_eq!(lines[2]["record"]["n"], 3);

    // A dry run sends nothing and offers no place to continue from.
    let dry = instream(&broker, &["dlq", "redrive", "--pipeline", &pipeline]);
    let text = String::from_utf8_lossy(&dry.stdout);
    assert!(text.contains("dry run: 2 dead letters"), "{text}");
    assert!(!text.contains("--from-offset"), "{text}");
    let newest = instream(
        &broker,
        &[
            "dlq",
            "tail",
            "--pipeline",
            &pipeline,
            "--limit",
            "1",
            "--output",
            "json",
        ],
    );
    let newest = String::from_utf8_lossy(&newest.stdout);
    assert_eq!(newest.lines().count(), 1, "{newest}");
    assert!(newest.contains("unknown_pipeline"), "{newest}");
    let nothing = ops::read_dead_letters(&cfg, &raw, Default::default(), None)
        .await
        .unwrap();
    assert!(nothing.is_empty(), "{nothing:?}");

    // All codes: the two that came from the raw topic go back; the aggregator's does not.
    let out = instream(
        &broker,
        &["dlq", "redrive", "--pipeline", &pipeline, "--execute"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("redrove 2 dead letters"), "{text}");
    assert!(text.contains("--from-offset 0:3"), "{text}");
    let back = ops::read_dead_letters(&cfg, &raw, Default::default(), None)
        .await
        .unwrap();
    let payloads: Vec<&[u8]> = back.iter().map(|d| d.payload.as_slice()).collect();
    assert_eq!(payloads, vec![&br#"{"n":1}"#[..], &br#"{"n":2}"#[..]]);
    assert!(back.iter().all(|d| d.key.as_deref() == Some(&b"c1"[..])));

    // Continuing after the printed offsets sends nothing more.
    let out = instream(
        &broker,
        &[
            "dlq",
            "redrive",
            "--pipeline",
            &pipeline,
            "--from-offset",
            "0:3",
            "--execute",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("redrove 0 dead letters"), "{text}");
    assert!(
        text.contains("--from-offset 0:3"),
        "still continues after 0:3: {text}"
    );
    let again = ops::read_dead_letters(&cfg, &raw, Default::default(), None)
        .await
        .unwrap();
    assert_eq!(again.len(), 2);
}
