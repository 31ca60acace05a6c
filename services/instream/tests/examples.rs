//! The example files the README points at stay valid, and `instream standalone` serves with
//! the example config.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use instream_testkit::ChildGuard;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A minimal HTTP/1.1 request over a plain socket (no HTTP client needed for a few).
fn request(port: u16, method: &str, path: &str, body: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

fn post(port: u16, path: &str, body: &str) -> std::io::Result<String> {
    request(port, "POST", path, body)
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
    let spawned = Instant::now();
    let mut child = ChildGuard::new(
        Command::new(env!("CARGO_BIN_EXE_instream"))
            .current_dir(repo())
            .args(["standalone", "--config", "examples/standalone.toml"])
            // Ports of its own choosing (the other tests here start servers too), read back
            // from the state file it writes.
            .env("INSTREAM__INGEST__LISTEN", "127.0.0.1:0")
            .env("INSTREAM__QUERY_API__LISTEN", "127.0.0.1:0")
            .env("INSTREAM__ADMIN__LISTEN", "127.0.0.1:0")
            .env("INSTREAM__ARCHIVE__ROOT", data.path().join("archive"))
            .env("INSTREAM__STANDALONE__DATA_DIR", data.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The process says when every component is ready: "instream standalone: ready in 0.12s".
    let stderr = child.0.stderr.take().expect("piped stderr");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    // Its log, shown if it does not stop cleanly.
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = log.clone();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("ready in ") {
                let _ = ready_tx.send(());
            }
            kept.lock().unwrap().push(line);
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("standalone reports readiness");
    // From spawning the process (config loading included) to every component ready.
    let ready_in = spawned.elapsed();
    assert!(
        ready_in < Duration::from_secs(2),
        "standalone must be ready within 2 s of starting, took {ready_in:?}"
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.path().join("standalone.json")).unwrap())
            .unwrap();
    let port_of = |key: &str| -> u16 {
        let addr: std::net::SocketAddr = state[key].as_str().expect(key).parse().unwrap();
        addr.port()
    };
    let (port, query_port) = (port_of("ingest"), port_of("query"));
    let body = r#"{"customer_id":"c1","ts":"2024-05-01T12:00:00Z","amount":5}"#;
    let accepted = post(port, "/v1/pipelines/orders/events", body).unwrap();
    assert!(accepted.contains(r#""accepted":1"#), "{accepted}");
    // The README's query, as written there (standalone serves query-api without a key).
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let query = "/v1/pipelines/orders/aggregates/per_minute?key=c1&from=2024-05-01T12:00:00Z&to=2024-05-01T13:00:00Z&limit=100";
    assert!(
        readme.contains(&format!("localhost:8081{query}")),
        "the README's query example changed: update this test"
    );
    let mut window = String::new();
    instream_testkit::wait_until("the README's window", Duration::from_secs(30), || {
        window = request(query_port, "GET", query, "").unwrap_or_default();
        window.contains(r#""count":1"#)
    })
    .unwrap_or_else(|e| panic!("{e}: {window}"));
    assert!(window.contains(r#""sum_amount":5"#), "{window}");
    // Both APIs serve the OpenAPI documents of docs/openapi.
    for (api_port, file) in [(port, "ingest.json"), (query_port, "query-api.json")] {
        let answer = request(api_port, "GET", "/openapi.json", "").unwrap();
        let served: serde_json::Value =
            serde_json::from_str(answer.split("\r\n\r\n").nth(1).expect("a body")).unwrap();
        let committed: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(repo().join("docs/openapi").join(file)).unwrap(),
        )
        .unwrap();
        assert_eq!(served, committed, "{file}");
    }
    child.terminate().unwrap();
    let status = child
        .wait_exit(Duration::from_secs(20))
        .expect("exit within 20 s of SIGTERM");
    let _ = reader.join();
    assert!(
        status.success(),
        "{status}; its log:\n{}",
        log.lock().unwrap().join("\n")
    );
}

#[test]
fn demo_without_a_terminal_runs_prints_its_summary_and_exits_0() {
    let data = tempfile::tempdir().unwrap();
    let mut child = ChildGuard::new(
        Command::new(env!("CARGO_BIN_EXE_instream"))
            .args(["demo", "--duration", "3s", "--rate", "1000", "--data-dir"])
            .arg(data.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let status = child
        .wait_exit(Duration::from_secs(90))
        .expect("the demo ends by itself");
    let mut summary = String::new();
    std::io::Read::read_to_string(
        &mut child.0.stdout.take().expect("piped stdout"),
        &mut summary,
    )
    .unwrap();
    assert!(status.success(), "{status}\n{summary}");
    // No terminal: no live view (no cursor movement), only the summary.
    assert!(!summary.contains('\x1b'), "{summary}");
    assert!(
        summary.contains("every accepted bid is in the aggregates or the dead-letter topic"),
        "{summary}"
    );
    let accepted: u64 = summary
        .lines()
        .find_map(|l| l.strip_prefix("  bids accepted by ingest        : "))
        .and_then(|n| n.trim().parse().ok())
        .expect("the summary names the accepted count");
    assert!(
        accepted >= 2_000,
        "about 1,000 bids/s for 3 s, got {accepted}"
    );
    assert!(data.path().join("archive/bids").is_dir());
    // The aggregates are readable over query-api.
    let from_api: i64 = summary
        .lines()
        .find_map(|l| l.strip_prefix("  query-api, auction 1000        : "))
        .and_then(|l| l.split(' ').next()?.parse().ok())
        .expect("the summary shows what query-api answered");
    assert!(from_api > 0, "{summary}");
}

#[test]
fn ctrl_c_stops_the_demo_early_with_its_summary() {
    let data = tempfile::tempdir().unwrap();
    let mut child = ChildGuard::new(
        Command::new(env!("CARGO_BIN_EXE_instream"))
            .args(["demo", "--duration", "10m", "--rate", "500", "--data-dir"])
            .arg(data.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Interrupt once it is sending (the demo announces that on stderr).
    let stderr = child.0.stderr.take().expect("piped stderr");
    let mut lines = std::io::BufReader::new(stderr).lines();
    let started = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains("instream demo: started"));
    assert!(started, "the demo did not start");
    std::thread::spawn(move || for _ in lines {});
    let interrupted = Instant::now();
    let status = Command::new("kill")
        .args(["-INT", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let status = child
        .wait_exit(Duration::from_secs(90))
        .expect("the demo stops after Ctrl-C");
    let mut summary = String::new();
    std::io::Read::read_to_string(&mut child.0.stdout.take().unwrap(), &mut summary).unwrap();
    assert!(status.success(), "{status}\n{summary}");
    assert!(
        interrupted.elapsed() < Duration::from_secs(60),
        "a 10-minute demo stopped early"
    );
    assert!(summary.contains("instream demo summary"), "{summary}");
    assert!(summary.contains("every accepted bid"), "{summary}");
}

#[test]
fn schema_apply_creates_the_local_store_and_names_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store/aggregates.redb");
    let applied = Command::new(env!("CARGO_BIN_EXE_instream"))
        .args(["schema", "apply"])
        .env("INSTREAM__STORE__BACKEND", "local")
        .env("INSTREAM__STORE__PATH", &path)
        .output()
        .unwrap();
    assert!(applied.status.success(), "{applied:?}");
    assert!(path.is_file());
    let refused = Command::new(env!("CARGO_BIN_EXE_instream"))
        .args(["schema", "apply"])
        .env("INSTREAM__STORE__BACKEND", "local")
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("store.path"));
}
