//! `ingest.tls`: the binary serves HTTPS with the configured certificate (a real rustls client
//! checks it against that certificate), refuses plain HTTP on that port, and names the file
//! when the key cannot be read.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use instream_testkit::{spawn_service, unique, KafkaBroker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

mod common;
use common::{wait_metric_line, wait_ok, write_config, BIN};

/// A self-signed certificate for 127.0.0.1, written as PEM files; returns the TLS settings.
fn certificate(dir: &std::path::Path) -> (String, Vec<u8>) {
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let cert = certified.cert.pem();
    std::fs::write(dir.join("cert.pem"), &cert).unwrap();
    std::fs::write(dir.join("key.pem"), certified.signing_key.serialize_pem()).unwrap();
    let settings = format!(
        "allow_anonymous = true\ntls = {{ cert_file = \"{0}/cert.pem\", key_file = \"{0}/key.pem\" }}",
        dir.display()
    );
    (settings, cert.into_bytes())
}

async fn https_post(port: u16, cert_pem: &[u8], path: &str, body: &str) -> String {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(cert_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .expect("handshake with the configured certificate");
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_https_with_the_configured_certificate() {
    let broker = KafkaBroker::start().unwrap();
    let pipeline = unique("tls");
    broker.create_pipeline_topics(&pipeline, 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (settings, cert) = certificate(dir.path());
    let (config, admin, http) = write_config(
        dir.path(),
        &broker.bootstrap_servers(),
        &pipeline,
        &settings,
    );
    let _child = spawn_service(BIN, &config).unwrap();
    wait_ok(
        &format!("http://127.0.0.1:{admin}/readyz"),
        Duration::from_secs(30),
    )
    .await;

    let answer = https_post(
        http,
        &cert,
        &format!("/v1/pipelines/{pipeline}/events"),
        r#"[{"account":"a1","ts":1700000000000},{"account":"a2","ts":1700000000001}]"#,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""accepted":2"#), "{answer}");

    // Plain HTTP on the TLS port gets no HTTP answer, and the failed handshake is counted.
    let plain = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{http}/v1/pipelines/{pipeline}/events"
        ))
        .body("{}")
        .timeout(Duration::from_secs(15))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
    wait_metric_line(
        admin,
        "instream_ingest_tls_handshake_failures_total 1",
        Duration::from_secs(10),
    )
    .await;
}

#[tokio::test]
async fn an_unreadable_key_file_is_named_at_start() {
    let broker = KafkaBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (settings, _) = certificate(dir.path());
    std::fs::write(dir.path().join("key.pem"), "not a key").unwrap();
    let (config, _, _) = write_config(dir.path(), &broker.bootstrap_servers(), "p", &settings);
    let mut child = instream_testkit::ChildGuard::new(
        Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let status = child
        .wait_exit(Duration::from_secs(30))
        .expect("exits at once");
    assert!(!status.success());
    let mut stderr = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(stderr.contains("ingest.tls.key_file"), "{stderr}");
}
