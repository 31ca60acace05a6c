//! One buggy or hostile producer against the `instream-ingest` binary: what it sends must not
//! make other producers' events disappear, must not stall them, and a permanent refusal is
//! never dressed as "try again". Each test is one finding of a bad-input campaign, kept so that
//! it does not come back.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use instream_testkit::KafkaBroker;
use serde_json::Value;

mod common;
use common::{start_ready, wait_metric_line};

fn digest(key: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Two producers' keys: `shop` and `crm`, each its own producer.
fn two_keys(extra: &str) -> String {
    format!(
        "[[ingest.api_keys]]\nname = \"shop\"\nsha256 = \"{}\"\n{extra}\n[[ingest.api_keys]]\nname = \"crm\"\nsha256 = \"{}\"\n{extra}\n",
        digest("shop-key"),
        digest("crm-key")
    )
}

async fn post(
    http: u16,
    pipeline: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
    body: String,
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{http}/v1/pipelines/{pipeline}/events"
        ))
        .header("Content-Type", "application/x-ndjson")
        .body(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let answer = request.send().await.unwrap();
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
}

/// Every event on the pipeline's raw topic now.
async fn on_topic(broker: &KafkaBroker, pipeline: &str) -> Vec<instream_event::Event> {
    let kafka = instream_core::config::KafkaConfig {
        bootstrap_servers: broker.bootstrap_servers(),
        ..Default::default()
    };
    let (payloads, skipped) = instream_kafka::ops::scan_topic_since(
        &kafka,
        &instream_pipeline::topics::raw(pipeline),
        0,
        false,
        Vec::new(),
        |all: &mut Vec<Vec<u8>>, _, payload| all.push(payload.to_vec()),
    )
    .await
    .unwrap();
    assert!(skipped.is_empty());
    payloads
        .iter()
        .map(|p| instream_event::decode(p).unwrap())
        .collect()
}

fn event(account: &str, extra: &str) -> String {
    format!(r#"{{"account":"{account}","ts":1700000000000{extra}}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_too_large_event_is_refused_by_its_index_and_the_others_are_accepted_and_counted() {
    let broker = KafkaBroker::start().unwrap();
    let ingest = start_ready(&broker, "big", 1, "allow_anonymous = true").await;
    // 300 KB in strings each under the string limit.
    let parts = vec![format!("\"{}\"", "x".repeat(30 * 1024)); 10].join(",");
    let huge = event("a2", &format!(r#","blob":[{parts}]"#));
    let body = [event("a1", ""), huge, event("a3", "")].join("\n");
    let (status, answer) = post(ingest.http, &ingest.pipeline, None, &[], body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["accepted"], 2, "{answer}");
    assert_eq!(answer["rejected"][0]["index"], 1, "{answer}");
    assert_eq!(answer["rejected"][0]["code"], "event_too_large", "{answer}");
    let keys: Vec<String> = on_topic(&broker, &ingest.pipeline)
        .await
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(keys, ["a1", "a3"]);
    wait_metric_line(
        ingest.admin,
        &format!(
            "instream_events_total{{service=\"ingest\",pipeline=\"{}\",outcome=\"accepted\"}} 2",
            ingest.pipeline
        ),
        Duration::from_secs(5),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_broker_refuses_for_good_is_not_answered_503() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let broker = KafkaBroker::start().unwrap();
    if !broker.is_embedded() {
        eprintln!(
            "skipped: the test makes the broker refuse writes, which only the embedded one allows"
        );
        return;
    }
    let ingest = start_ready(&broker, "refused", 1, "allow_anonymous = true").await;
    broker
        .fail_requests(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
        )
        .unwrap();
    // Two identical events: the repeat shares its first copy's refusal.
    let body = [event("a1", ""), event("a1", "")].join("\n");
    let (status, answer) = post(ingest.http, &ingest.pipeline, None, &[], body).await;
    assert_eq!(status, 422, "a permanent refusal, not `retry`: {answer}");
    assert_eq!(answer["accepted"], 0, "{answer}");
    for i in 0..2 {
        assert_eq!(answer["rejected"][i]["index"], i, "{answer}");
        assert_eq!(answer["rejected"][i]["code"], "event_too_large", "{answer}");
    }
    broker.clear_request_errors(RDKafkaApiKey::Produce).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_ids_and_idempotency_keys_are_their_own() {
    let broker = KafkaBroker::start().unwrap();
    let ingest = start_ready(&broker, "scoped", 1, &two_keys("")).await;
    let p = &ingest.pipeline;
    // Both producers give the same event_id: two events, each the producer's own.
    let given = event("a1", r#","event_id":"order-1""#);
    assert_eq!(
        post(ingest.http, p, Some("shop-key"), &[], given.clone())
            .await
            .0,
        200
    );
    assert_eq!(
        post(ingest.http, p, Some("crm-key"), &[], given).await.0,
        200
    );
    // One Idempotency-Key, reused by shop with another body, and by crm with the same one.
    let idem = [("Idempotency-Key", "req-1")];
    for (key, body) in [
        ("shop-key", r#","n":1"#),
        ("shop-key", r#","n":2"#),
        ("shop-key", r#","n":1"#),
        ("crm-key", r#","n":1"#),
    ] {
        post(ingest.http, p, Some(key), &idem, event("a2", body)).await;
    }
    let events = on_topic(&broker, p).await;
    assert_eq!(events.len(), 6);
    assert_eq!(events[0].event_id, "order-1");
    assert_eq!(events[0].headers["producer"], "shop");
    assert_eq!(events[1].headers["producer"], "crm");
    let ids: Vec<&str> = events[2..].iter().map(|e| e.event_id.as_str()).collect();
    assert_ne!(
        ids[0], ids[1],
        "another body under the same key: a new event"
    );
    assert_eq!(ids[0], ids[2], "a true retry: the same event");
    assert_ne!(ids[0], ids[3], "another producer's key of the same text");
    // Derived ids are in their producer's scope too: a client giving one of them as its own
    // `event_id` (anonymous, or another producer) cannot make it a repeat downstream.
    assert!(
        events[2..]
            .iter()
            .all(|e| e.headers.contains_key("producer")),
        "derived ids carry their producer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numeric_keys_are_exact_and_identical_events_are_reported_as_repeats() {
    let broker = KafkaBroker::start().unwrap();
    let ingest = start_ready(&broker, "keys", 1, "allow_anonymous = true").await;
    let body = [
        r#"{"account":123456789012345678901234567890,"ts":1}"#,
        r#"{"account":123456789012345678901234567891,"ts":1}"#,
        r#"{"account":1.0,"ts":1}"#,
        r#"{"account":"1","ts":2}"#,
        r#"{"account":-0,"ts":1}"#,
    ]
    .join("\n");
    assert_eq!(
        post(ingest.http, &ingest.pipeline, None, &[], body).await.0,
        200
    );
    let keys: Vec<String> = on_topic(&broker, &ingest.pipeline)
        .await
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(
        keys,
        [
            "123456789012345678901234567890",
            "123456789012345678901234567891",
            "1",
            "1",
            "0"
        ]
    );
    // Three identical events without an id: one event, and the answer says so.
    let same = event("a9", "");
    let (status, answer) = post(
        ingest.http,
        &ingest.pipeline,
        None,
        &[],
        [same.clone(), same.clone(), same].join("\n"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        (answer["accepted"].as_u64(), answer["repeats"].as_u64()),
        (Some(3), Some(2))
    );
    assert_eq!(on_topic(&broker, &ingest.pipeline).await.len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_edges_are_refused_precisely() {
    let broker = KafkaBroker::start().unwrap();
    let keys = format!(
        "allow_anonymous = true\nmax_events_per_request = 5\n[[ingest.api_keys]]\nname = \"other\"\nsha256 = \"{}\"\npipelines = [\"other\"]\n\
         [[ingest.api_keys]]\nname = \"slow\"\nsha256 = \"{}\"\nevents_per_second = 5\n",
        digest("other-key"),
        digest("slow-key")
    );
    let ingest = start_ready(&broker, "edges", 1, &keys).await;
    // An escaped name (which the route would decode) is no name: nothing written through it,
    // whether the key's scope or anonymous access would have let it through.
    let escaped: String = ingest.pipeline.replacen('e', "%65", 1);
    let (status, answer) = post(ingest.http, &escaped, None, &[], event("a", "")).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (404, Some("unknown_pipeline")),
        "{answer}"
    );
    let (status, _) = post(
        ingest.http,
        &escaped,
        Some("other-key"),
        &[],
        event("a", ""),
    )
    .await;
    assert_eq!(status, 403);
    assert!(on_topic(&broker, &ingest.pipeline).await.is_empty());
    // A long unknown name is not echoed whole.
    let long = "x".repeat(5_000);
    let (status, answer) = post(ingest.http, &long, Some("slow-key"), &[], event("a", "")).await;
    assert_eq!(status, 404);
    assert!(answer["message"].as_str().unwrap().len() < 200, "{answer}");
    // A tab is not a visible character.
    let (status, answer) = post(
        ingest.http,
        &ingest.pipeline,
        Some("slow-key"),
        &[("Idempotency-Key", "a\tb")],
        event("a", ""),
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("bad_idempotency_key"))
    );
    // Requests whose events are all invalid are charged to the key's rate too.
    let invalid = [r#"{"no":"key"}"#; 5].join("\n");
    let (status, _) = post(
        ingest.http,
        &ingest.pipeline,
        Some("slow-key"),
        &[],
        invalid.clone(),
    )
    .await;
    assert_eq!(status, 422);
    // Still 422 past the rate (sent again, they would be refused again)...
    let (status, _) = post(
        ingest.http,
        &ingest.pipeline,
        Some("slow-key"),
        &[],
        invalid,
    )
    .await;
    assert_eq!(status, 422);
    // ...but the rate was spent on them: a valid event must wait.
    let (status, _) = post(
        ingest.http,
        &ingest.pipeline,
        Some("slow-key"),
        &[],
        event("a", ""),
    )
    .await;
    assert_eq!(status, 429, "the key spent its rate on invalid events");
}

/// Opens a connection and sends a request's headers with `Content-Length: length`, then
/// `body` a byte at a time every `pause`; returns the status line ingest answers.
fn trickle(http: u16, path: &str, key: &str, length: usize, pause: Duration) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", http)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/x-ndjson\r\nContent-Length: {length}\r\n\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    for _ in 0..length {
        if s.write_all(b" ").is_err() {
            break;
        }
        std::thread::sleep(pause);
        let mut buf = [0u8; 512];
        if let Ok(n) = s.read(&mut buf) {
            answer.extend_from_slice(&buf[..n]);
            if n > 0 {
                break;
            }
        }
    }
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 512];
    if let Ok(n) = s.read(&mut buf) {
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_do_not_stall_the_others() {
    let broker = KafkaBroker::start().unwrap();
    let ingest = start_ready(
        &broker,
        "slow",
        1,
        &format!("max_connections = 200\n{}", two_keys("")),
    )
    .await;
    let http = ingest.http;
    let path = format!("/v1/pipelines/{}/events", ingest.pipeline);
    // One producer: seventy connections trickling a byte every half second.
    let started = Instant::now();
    let trickling: Vec<_> = (0..70)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                let began = Instant::now();
                let status = trickle(http, &path, "shop-key", 1_000, Duration::from_millis(500));
                (status, began.elapsed())
            })
        })
        .collect();
    // And a thousand connections opened and left idle: more than ingest holds.
    let idle: Vec<std::net::TcpStream> = (0..1_000)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", http)).ok())
        .collect();
    assert!(idle.len() > 200);
    // Another producer meanwhile: answered at once, never 503.
    for _ in 0..5 {
        let asked = Instant::now();
        let (status, answer) =
            post(http, &ingest.pipeline, Some("crm-key"), &[], event("a", "")).await;
        assert_eq!(status, 200, "{answer}");
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "{:?}",
            asked.elapsed()
        );
    }
    // The trickling bodies were cut off early (408 once under the minimum rate; 503 past
    // the producer's share of request slots), not held for the request timeout.
    for t in trickling {
        let (status, took) = t.join().unwrap();
        assert!(
            status.starts_with("HTTP/1.1 408") || status.starts_with("HTTP/1.1 503"),
            "{status}"
        );
        // Two bytes a second is under the minimum from the start: cut off once the grace
        // of two seconds has passed, not after what a larger allowance would give.
        assert!(took < Duration::from_secs(5), "{status} after {took:?}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_announced_too_large_is_refused_before_it_is_sent() {
    let broker = KafkaBroker::start().unwrap();
    let ingest = start_ready(&broker, "announced", 1, "allow_anonymous = true").await;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", ingest.http)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "POST /v1/pipelines/{}/events HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\
         Content-Length: {}\r\n\r\n",
        ingest.pipeline,
        11 * 1024 * 1024
    )
    .unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "no 100 Continue first: {answer}"
    );
    assert!(answer.contains("body_too_large"), "{answer}");
}
