//! A record a stage cannot write because it would be larger than the brokers take: the
//! enricher, whose enrichment made an event too large, dead-letters it (with the reason) and
//! goes on with the rest; and a dead letter of a record too large to be kept whole is cut
//! short, its original size in a header. Nothing stops.

use std::time::Duration;

use instream_coord::service_context;
use instream_core::config::Config;
use instream_core::Health;
use instream_kafka::client::{self, recv_batch};
use instream_kafka::headers;
use instream_pipeline::topics;
use instream_testkit::{unique, KafkaBroker};
use rdkafka::producer::FutureRecord;
use tokio_util::sync::CancellationToken;

fn raw_event(pipeline: &str, customer: &str, i: i64) -> Vec<u8> {
    let event = instream_event::Event {
        event_id: format!("e{i}"),
        pipeline: pipeline.to_owned(),
        key: customer.into(),
        event_time: 1_714_564_800_000 + i,
        ingest_time: instream_event::now_millis(),
        headers: Default::default(),
        payload: serde_json::value::RawValue::from_string(format!(
            r#"{{"customer_id":"{customer}","ts":1714564800000}}"#
        ))
        .unwrap(),
        enrichment: None,
    };
    instream_event::encode(&event)
}

async fn read(consumer: &client::Consumer, want: usize) -> Vec<instream_kafka::Record> {
    let mut got = Vec::new();
    let mut batch = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while got.len() < want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {want}",
            got.len()
        );
        recv_batch(consumer, 100, Duration::from_millis(100), &mut batch)
            .await
            .unwrap();
        got.append(&mut batch);
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_enrichment_makes_too_large_is_dead_lettered_and_the_enricher_goes_on() {
    let broker = KafkaBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pipeline = unique("large");
    for topic in [
        topics::raw(&pipeline),
        topics::enriched(&pipeline),
        topics::dead_letter(&pipeline),
        topics::quality(&pipeline),
    ] {
        broker.create_topic(&topic, 1).unwrap();
    }
    let definitions = dir.path().join("definitions.toml");
    std::fs::write(
        &definitions,
        format!(
            "[[pipelines]]\nname = \"{pipeline}\"\nkey_field = \"customer_id\"\ntime_field = \"ts\"\npartitions = 1\n\
             [[pipelines.enrichments]]\nname = \"customer\"\nkey_template = \"customer:{{customer_id}}\"\n"
        ),
    )
    .unwrap();
    // c2's reference record is larger than the brokers take (65,536 bytes here).
    let seed = dir.path().join("refdata.jsonl");
    std::fs::write(
        &seed,
        format!(
            "{}\n{}\n{}\n",
            serde_json::json!({"key": "customer:c1", "fields": {"tier": "gold"}}),
            serde_json::json!({"key": "customer:c2", "fields": {"notes": "n".repeat(70_000)}}),
            serde_json::json!({"key": "customer:c3", "fields": {"tier": "bronze"}}),
        ),
    )
    .unwrap();
    let config = Config::from_toml(&format!(
        "{base}\n[ingest]\nmax_event_bytes = 32768\n[definitions]\nsource = \"file\"\npath = \"{defs}\"\n\
         [refdata]\nbackend = \"memory\"\nseed_file = \"{seed}\"\n[enricher]\ndelivery = \"at_least_once\"\n",
        base = instream_integration_tests::base_config_toml(&broker.bootstrap_servers())
            .replace("[kafka]\n", "[kafka]\nmax_record_bytes = 65536\n"),
        defs = definitions.display(),
        seed = seed.display(),
    ))
    .unwrap_or_else(|e| panic!("{e}"));

    let producer = client::producer(&config.kafka, "test").unwrap();
    let raw = topics::raw(&pipeline);
    // Not even an envelope, and larger than a dead letter keeps whole.
    let garbage = vec![b'x'; 40_000];
    for (i, payload) in [
        raw_event(&pipeline, "c1", 1),
        raw_event(&pipeline, "c2", 2),
        garbage.clone(),
        raw_event(&pipeline, "c3", 3),
    ]
    .iter()
    .enumerate()
    {
        let key = format!("k{i}");
        let record = FutureRecord::to(&raw)
            .key(key.as_bytes())
            .payload(payload.as_slice());
        client::delivered(client::send(&producer, record).await.unwrap())
            .await
            .unwrap();
    }

    let shutdown = CancellationToken::new();
    let enricher = tokio::spawn(instream_enricher::run(service_context(
        config.clone(),
        Health::default(),
        shutdown.clone(),
        "127.0.0.1:0".parse().unwrap(),
    )));
    let enriched = client::consumer(
        &config.kafka,
        "test",
        &unique("g"),
        &[topics::enriched(&pipeline)],
    )
    .unwrap();
    let keys: Vec<String> = read(&enriched, 2)
        .await
        .iter()
        .map(|r| instream_event::decode(&r.payload).unwrap().key)
        .collect();
    assert_eq!(keys, ["c1", "c3"], "the events after the large one went on");
    let dead = client::consumer(
        &config.kafka,
        "test",
        &unique("g"),
        &[topics::dead_letter(&pipeline)],
    )
    .unwrap();
    let letters = read(&dead, 2).await;
    let code = |r: &instream_kafka::Record| {
        r.header(headers::DLQ_CODE)
            .map(|c| String::from_utf8_lossy(c).into_owned())
    };
    assert_eq!(code(&letters[0]).as_deref(), Some("too_large"));
    let reason =
        String::from_utf8_lossy(letters[0].header(headers::DLQ_REASON).unwrap()).into_owned();
    assert!(reason.contains("kafka.max_record_bytes"), "{reason}");
    assert_eq!(
        instream_event::decode(&letters[0].payload).unwrap().key,
        "c2"
    );
    assert_eq!(code(&letters[1]).as_deref(), Some("decode_error"));
    assert_eq!(letters[1].payload.len(), 65_536 / 2, "cut short to fit");
    assert_eq!(
        letters[1].header(headers::DLQ_CUT_FROM),
        Some(&b"40000"[..])
    );
    assert!(!enricher.is_finished(), "the enricher did not stop");
    shutdown.cancel();
    enricher.await.unwrap().unwrap();
}
