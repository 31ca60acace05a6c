//! `instream offsets reset`, `instream dlq tail|redrive` and `instream quality report`, run
//! as the real binary against a Kafka-protocol broker (the embedded one, or
//! `INSTREAM_TEST_KAFKA`).

use std::process::{Command, Output};
use std::time::Duration;

use instream_core::config::KafkaConfig;
use instream_kafka::{ops, DeadLetter, DeadLetterCode, DeadLetters, Origin};
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
    let letters = DeadLetters::from_config(&cfg, instream_core::Service::Enricher).unwrap();
    let cases: [(&str, DeadLetterCode, &str); 3] = [
        (&raw, DeadLetterCode::EnrichMiss, r#"{"n":1}"#),
        (&raw, DeadLetterCode::RefdataMalformed, r#"{"n":2}"#),
        (&enriched, DeadLetterCode::UnknownPipeline, r#"{"n":3}"#),
    ];
    for (i, (origin, code, payload)) in cases.iter().enumerate() {
        let delivery = letters
            .publish(&DeadLetter {
                topic: &dlq,
                pipeline: &pipeline,
                key: Some(b"c1"),
                payload: payload.as_bytes(),
                code: *code,
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
    // The newest of one code, though newer letters of other codes follow it.
    let of_code = instream(
        &broker,
        &[
            "dlq",
            "tail",
            "--pipeline",
            &pipeline,
            "--code",
            "enrich_miss",
            "--limit",
            "1",
            "--output",
            "json",
        ],
    );
    let of_code = String::from_utf8_lossy(&of_code.stdout);
    assert_eq!(of_code.lines().count(), 1, "{of_code}");
    assert!(of_code.contains("enrich_miss"), "{of_code}");
    let nothing = ops::read_dead_letters(&cfg, &raw, Default::default(), None, false)
        .await
        .unwrap()
        .0;
    assert!(nothing.is_empty(), "{nothing:?}");

    // All codes: the two that came from the raw topic go back; the aggregator's does not.
    let out = instream(
        &broker,
        &["dlq", "redrive", "--pipeline", &pipeline, "--execute"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("redrove 2 dead letters"), "{text}");
    assert!(text.contains("--from-offset 0:3"), "{text}");
    let back = ops::read_dead_letters(&cfg, &raw, Default::default(), None, false)
        .await
        .unwrap()
        .0;
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
    let again = ops::read_dead_letters(&cfg, &raw, Default::default(), None, false)
        .await
        .unwrap()
        .0;
    assert_eq!(again.len(), 2);
}

#[tokio::test]
async fn quality_report_counts_each_event_and_rule_once_per_hour() {
    let broker = KafkaBroker::start().unwrap();
    let pipeline = unique("orders");
    let topic = instream_pipeline::topics::quality(&pipeline);
    broker.create_topic(&topic, 2).unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .create()
        .unwrap();
    // 10:00Z and 11:00Z on 2026-11-25.
    let (ten, eleven) = (1_795_600_800_000i64, 1_795_604_400_000i64);
    let violation = |event: &str, rule: &str, ingest_time: i64, sample: bool| {
        let mut v = serde_json::json!({
            "pipeline": pipeline, "version": 1, "rule": rule, "severity": "error",
            "action": "tag", "event_id": event, "key": "c1", "event_time": ingest_time,
            "ingest_time": ingest_time, "value": -3, "message": "-3 is below min 0",
            "raw_partition": 0, "raw_offset": 7,
        });
        if sample {
            v["sample"] = serde_json::json!({"amount": -3});
        }
        v.to_string()
    };
    let records = [
        violation("e1", "amount", ten + 1, true),
        violation("e1", "amount", ten + 1, false), // written again after a crash
        violation("e2", "amount", ten + 2, false),
        violation("e2", "currency", ten + 2, false),
        violation("e3", "amount", eleven + 5, false),
        violation("e4", "amount", eleven + 3_600_000, false), // after --to
        "not a violation record".to_owned(),
    ];
    for (i, r) in records.iter().enumerate() {
        let key = format!("e{i}");
        producer
            .send(
                FutureRecord::to(&topic).key(&key).payload(r),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let args = [
        "quality",
        "report",
        "--pipeline",
        &pipeline,
        "--from",
        "2026-11-25T10:00:00Z",
        "--to",
        "2026-11-25T12:00:00Z",
    ];
    let json = instream(&broker, &[&args[..], &["--output", "json"]].concat());
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let rows: Vec<(String, String, u64)> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["hour"].as_str().unwrap().to_owned(),
                r["rule"].as_str().unwrap().to_owned(),
                r["violations"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("2026-11-25T10:00:00Z".to_owned(), "amount".to_owned(), 2),
            ("2026-11-25T10:00:00Z".to_owned(), "currency".to_owned(), 1),
            ("2026-11-25T11:00:00Z".to_owned(), "amount".to_owned(), 1),
        ]
    );
    assert_eq!(report["samples"]["amount"][0]["sample"]["amount"], -3);
    assert!(String::from_utf8_lossy(&json.stderr).contains("1 records"));
    let table = instream(&broker, &args);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("2026-11-25T11:00:00Z  amount"), "{text}");
    assert!(text.contains("samples of `amount`"), "{text}");
}
