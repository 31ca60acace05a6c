//! The `instream-ingest` binary as a process: admin endpoints, a real request through a real
//! Kafka-protocol broker, SIGTERM, and an invalid config.

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use instream_testkit::{spawn_service, unique, KafkaBroker};

mod common;
use common::{wait_metric_line, wait_ok, write_config, BIN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_admin_endpoints_ingests_and_stops_cleanly_on_sigterm() {
    let broker = KafkaBroker::start().unwrap();
    let pipeline = unique("proc");
    broker.create_pipeline_topics(&pipeline, 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (config, admin, http) = write_config(
        dir.path(),
        &broker.bootstrap_servers(),
        &pipeline,
        "max_in_flight_requests = 1\nproduce_timeout = \"1s\"\nrequest_timeout = \"2s\"\nheader_read_timeout = \"1s\"\nallow_anonymous = true",
    );
    let mut child = spawn_service(BIN, &config).unwrap();

    wait_ok(
        &format!("http://127.0.0.1:{admin}/healthz"),
        Duration::from_secs(30),
    )
    .await;
    wait_ok(
        &format!("http://127.0.0.1:{admin}/readyz"),
        Duration::from_secs(30),
    )
    .await;

    let answer = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{http}/v1/pipelines/{pipeline}/events"))
        .body(r#"[{"account":"a1","ts":1700000000000},{"ts":1700000000000},{"account":"a2","ts":"2024-05-01T12:00:00Z"}]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let json: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(json["accepted"], 2);
    assert_eq!(json["rejected"][0]["index"], 1);
    assert_eq!(json["rejected"][0]["code"], "missing_key");

    let unknown = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{http}/v1/pipelines/nope/events"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    // One request in flight at most: while a slow client holds the slot (its body not yet
    // sent), another request is refused with 503 and Retry-After before its body is read.
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", http)).unwrap();
    let body = r#"{"account":"a3","ts":1700000000000}"#;
    write!(
        slow,
        "POST /v1/pipelines/{pipeline}/events HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    wait_metric_line(
        admin,
        "instream_ingest_requests_in_flight 1",
        Duration::from_secs(10),
    )
    .await;
    let refused = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{http}/v1/pipelines/{pipeline}/events"
        ))
        .body(r#"{"account":"a4","ts":1700000000000}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    slow.write_all(body.as_bytes()).unwrap();
    let mut answer = String::new();
    slow.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // A client that never sends its body loses the slot after ingest.request_timeout.
    let mut stuck = std::net::TcpStream::connect(("127.0.0.1", http)).unwrap();
    write!(
        stuck,
        "POST /v1/pipelines/{pipeline}/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{{"
    )
    .unwrap();
    stuck
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut answer = String::new();
    let _ = stuck.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // A client that never finishes its headers (slow-loris) is cut off after
    // ingest.header_read_timeout, before any slot or body.
    let mut loris = std::net::TcpStream::connect(("127.0.0.1", http)).unwrap();
    write!(
        loris,
        "POST /v1/pipelines/{pipeline}/events HTTP/1.1\r\nHost: x\r\n"
    )
    .unwrap();
    loris
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let read = loris.read_to_end(&mut answer);
    assert!(read.is_ok(), "the connection was not closed: {read:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "closed only after {:?}",
        started.elapsed()
    );
    assert!(!String::from_utf8_lossy(&answer).contains("200 OK"));

    let metrics = reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "instream_http_requests_total",
        "instream_events_total",
        "instream_events_rejected_total",
        "instream_produce_latency_seconds",
        "instream_ingest_in_flight_bytes",
        "instream_component_ready",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}:\n{metrics}");
    }

    child.terminate().unwrap();
    let status = child
        .wait_exit(Duration::from_secs(15))
        .expect("exit within 15 s of SIGTERM");
    assert!(status.success(), "clean shutdown exits 0, got {status}");
}

#[test]
fn an_invalid_config_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, _) = write_config(dir.path(), "127.0.0.1:1", "p", "");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .env("INSTREAM__INGEST__MAX_BODY_BYTES", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ingest.max_body_bytes"), "{stderr}");
}

#[tokio::test]
async fn without_keys_or_anonymous_access_ingest_does_not_start() {
    let broker = KafkaBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (config, _, _) = write_config(dir.path(), &broker.bootstrap_servers(), "p", "");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ingest.api_keys") && stderr.contains("ingest.allow_anonymous"),
        "{stderr}"
    );
}
