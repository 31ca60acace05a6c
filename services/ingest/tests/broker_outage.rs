//! The `instream-ingest` binary while its broker is down: requests answered 503 with
//! Retry-After (never a 200 for events the broker did not take), `/readyz` false, and both
//! recover by themselves when the broker is back.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use instream_testkit::{metric_sum, KafkaBroker};

mod common;
use common::{start_ready, wait_ok};

/// NDJSON of events numbered `range`, one key per ten.
fn batch(range: std::ops::Range<u32>) -> String {
    range
        .map(|n| {
            format!(
                "{{\"account\":\"a{}\",\"ts\":1700000000000,\"n\":{n}}}\n",
                n / 10
            )
        })
        .collect()
}

async fn post(http: u16, pipeline: &str, body: String) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{http}/v1/pipelines/{pipeline}/events"
        ))
        .header("content-type", "application/x-ndjson")
        .timeout(Duration::from_secs(30))
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn wait_status(url: &str, want: u16, timeout: Duration) {
    instream_testkit::wait_for(&format!("{url} to answer {want}"), timeout, || async {
        reqwest::get(url).await.is_ok_and(|r| r.status() == want)
    })
    .await;
}

/// The `n` of every event on the pipeline's raw topic.
async fn numbers_on_topic(bootstrap: &str, pipeline: &str) -> BTreeSet<u64> {
    let cfg = instream_core::config::KafkaConfig {
        bootstrap_servers: bootstrap.to_owned(),
        ..Default::default()
    };
    let payloads = instream_kafka::ops::scan_topic_since(
        &cfg,
        &instream_pipeline::topics::raw(pipeline),
        0,
        false,
        Vec::new(),
        |all: &mut Vec<Vec<u8>>, _, payload| all.push(payload.to_vec()),
    )
    .await
    .unwrap()
    .0;
    payloads
        .iter()
        .map(|bytes| {
            let event = instream_event::decode(bytes).unwrap();
            let payload: serde_json::Value = serde_json::from_str(event.payload.get()).unwrap();
            payload["n"].as_u64().unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_answers_503_turns_readyz_false_and_recovers() {
    let broker = KafkaBroker::start().unwrap();
    if !broker.is_embedded() {
        eprintln!("skipped: the test takes the broker down, which only the embedded one allows");
        return;
    }
    let ingest = start_ready(
        &broker,
        "outage",
        2,
        "produce_timeout = \"2s\"\nretry_after = \"3s\"\nallow_anonymous = true",
    )
    .await;
    let (admin, http, pipeline) = (ingest.admin, ingest.http, ingest.pipeline.clone());
    let readyz = format!("http://127.0.0.1:{admin}/readyz");

    let before = post(http, &pipeline, batch(0..100)).await;
    assert_eq!(before.status(), 200);

    broker.set_up(false).unwrap();
    // Probed every 5 s, each probe waiting up to 5 s for an answer.
    wait_status(&readyz, 503, Duration::from_secs(30)).await;
    let refused = post(http, &pipeline, batch(100..200)).await;
    assert_eq!(refused.status(), 503, "{:?}", refused.text().await);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("3")
    );
    let answer: serde_json::Value = refused.json().await.unwrap();
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(
        error == "broker_timeout" || error == "broker_unavailable",
        "{answer}"
    );
    let exposition = reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (unavailable, _) = metric_sum(&exposition, "instream_http_requests_total", "\"503\"");
    assert!(unavailable >= 1.0, "503 answers not counted:\n{exposition}");

    broker.set_up(true).unwrap();
    wait_ok(&readyz, Duration::from_secs(60)).await;
    // The producer reconnects on its own; clients that retry get through.
    let start = Instant::now();
    loop {
        let again = post(http, &pipeline, batch(200..300)).await;
        if again.status() == 200 {
            let answer: serde_json::Value = again.json().await.unwrap();
            assert_eq!(answer["accepted"], 100);
            break;
        }
        assert_eq!(again.status(), 503);
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "still refused after the broker came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Everything answered 200 is on the topic; what was refused may be too (the producer
    // delivers it once the broker is back), with the same ids, which is why clients may
    // send it again.
    let on_topic = numbers_on_topic(&broker.bootstrap_servers(), &pipeline).await;
    for n in (0..100).chain(200..300) {
        assert!(
            on_topic.contains(&n),
            "accepted event {n} is not on the topic"
        );
    }
}

/// The broker answers a write with a sequence the producer cannot reconcile (out of order at
/// the head of the line): the idempotent producer fails for good, so every later request
/// could only be refused. The request in flight is not answered 200; the process stops
/// with an error naming the cause, to be restarted with a new producer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_failed_for_good_stops_ingest_naming_the_cause() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let broker = KafkaBroker::start().unwrap();
    if !broker.is_embedded() {
        eprintln!(
            "skipped: the test makes the broker fail requests, which only the embedded one allows"
        );
        return;
    }
    // Bound whole: its directory (the config, the log) must outlive the process.
    let mut ingest = start_ready(
        &broker,
        "fatal",
        1,
        "produce_timeout = \"5s\"\nallow_anonymous = true",
    )
    .await;
    broker
        .fail_requests(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
        )
        .unwrap();
    // The request may be cut short by the stop; it is never accepted.
    let answer = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{}/v1/pipelines/{}/events",
            ingest.http, ingest.pipeline
        ))
        .header("content-type", "application/x-ndjson")
        .timeout(Duration::from_secs(30))
        .body(batch(0..10))
        .send()
        .await;
    if let Ok(answer) = answer {
        assert_ne!(answer.status(), 200, "{:?}", answer.text().await);
    }
    let status = ingest.child.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(!status.success(), "{status}");
    let stopped = ingest.child.stopped_with_an_error();
    assert!(
        stopped.contains("failed for good") && stopped.contains("sequence desynchronization"),
        "ingest says why it stopped: {stopped}"
    );
}
