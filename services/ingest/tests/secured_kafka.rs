//! Ingest against a Kafka reached only through mutual TLS (stunnel in front of the embedded
//! broker): with the cluster's authority and a client certificate whose key password comes
//! from the environment it accepts events; with another authority it exits at once naming
//! the cause, instead of waiting unready.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use instream_testkit::{unique, ChildGuard, TestPki, TlsBroker};

mod common;
use common::{wait_ok, write_config, BIN};

const KEY_PASSWORD: &str = "client key pass";

/// `[ingest]` settings, then the librdkafka properties of mutual TLS with `ca`.
fn secured(pki: &TestPki, ca: &std::path::Path) -> String {
    format!(
        "allow_anonymous = true\n[kafka.properties]\n\"security.protocol\" = \"ssl\"\n\
         \"ssl.ca.location\" = \"{}\"\n\"ssl.certificate.location\" = \"{}\"\n\
         \"ssl.key.location\" = \"{}\"\n",
        ca.display(),
        pki.path("client.pem").display(),
        pki.path("client.key").display()
    )
}

fn spawn(config: &std::path::Path) -> ChildGuard {
    ChildGuard::new(
        Command::new(BIN)
            .arg("--config")
            .arg(config)
            // The key's password as a named secret from the environment.
            .env("INSTREAM__KAFKA__SSL_KEY_PASSWORD", KEY_PASSWORD)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

#[tokio::test]
async fn ingest_writes_through_mutual_tls_and_stops_naming_an_unknown_authority() {
    let pki = TestPki::new(KEY_PASSWORD).unwrap();
    let tls = TlsBroker::start(&pki).unwrap();
    let pipeline = unique("secured");
    for topic in ["raw", "enriched", "dlq", "quality"] {
        tls.broker
            .create_topic(&format!("{pipeline}.{topic}"), 2)
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let (config, admin, http) = write_config(
        dir.path(),
        &tls.bootstrap_servers(),
        &pipeline,
        &secured(&pki, &pki.ca_file),
    );
    let _ingest = spawn(&config);
    wait_ok(
        &format!("http://127.0.0.1:{admin}/readyz"),
        Duration::from_secs(30),
    )
    .await;
    let answer = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{http}/v1/pipelines/{pipeline}/events"
        ))
        .header("content-type", "application/json")
        .body(r#"{"account":"a1","ts":1714564800000}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert!(answer.text().await.unwrap().contains(r#""accepted":1"#));

    let other = TestPki::new(KEY_PASSWORD).unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let (config, _, _) = write_config(
        other_dir.path(),
        &tls.bootstrap_servers(),
        &pipeline,
        &secured(&pki, &other.ca_file),
    );
    let mut refused = spawn(&config);
    // Read as it comes: a full pipe would block the process's logging, and with it the probe.
    let mut pipe = refused.0.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    });
    let exited = refused.wait_exit(Duration::from_secs(60));
    if exited.is_err() {
        let _ = refused.0.kill();
    }
    let stderr = reader.join().unwrap();
    let status = exited.unwrap_or_else(|e| {
        panic!(
            "a lasting refusal stops ingest (after 15 s of refusals, not a timeout): {e}\n{stderr}"
        )
    });
    assert!(!status.success());
    assert!(
        stderr.contains("kafka refused the connection")
            && stderr.contains("certificate verify failed"),
        "{stderr}"
    );
}
