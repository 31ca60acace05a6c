//! The example files the README points at stay valid, and `instream standalone` serves with
//! the example config.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use instream_testkit::ChildGuard;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A minimal HTTP/1.1 POST over a plain socket (no HTTP client needed for one request).
fn post(port: u16, path: &str, body: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

#[test]
fn example_configs_and_definitions_validate() {
    for name in ["standalone.toml", "production.toml"] {
        let status = Command::new(env!("CARGO_BIN_EXE_instream"))
            .args(["check-config", "--config"])
            .arg(repo().join("examples").join(name))
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "examples/{name} must validate");
    }
    let text = std::fs::read_to_string(repo().join("examples/definitions.toml")).unwrap();
    let doc = instream_pipeline::parse_document(&text).unwrap();
    assert_eq!(doc.pipelines[0].name, "orders");
}

#[test]
fn standalone_with_the_example_config_accepts_events() {
    let data = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_instream"))
            .current_dir(repo())
            .args(["standalone", "--config", "examples/standalone.toml"])
            .env("INSTREAM__INGEST__LISTEN", format!("127.0.0.1:{port}"))
            .env("INSTREAM__ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
            .env("INSTREAM__ARCHIVE__ROOT", data.path().join("archive"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let body = r#"{"customer_id":"c1","ts":"2024-05-01T12:00:00Z","amount":5}"#;
    let started = Instant::now();
    let accepted = loop {
        if let Ok(text) = post(port, "/v1/pipelines/orders/events", body) {
            if text.contains("accepted") {
                break text;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "standalone did not accept events within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(accepted.contains(r#""accepted":1"#), "{accepted}");
    child.terminate().unwrap();
    let status = child
        .wait_exit(Duration::from_secs(20))
        .expect("exit within 20 s of SIGTERM");
    assert!(status.success(), "{status}");
}
