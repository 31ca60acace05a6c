//! What the ingest process tests share: the binary, its config, waiting for it.

#![allow(dead_code)] // each test file uses its part

use std::time::Duration;

use instream_testkit::{
    free_port, process_config_toml, spawn_service, unique, ChildGuard, KafkaBroker,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_instream-ingest");

/// A config for one pipeline (key `account`, time `ts`) with `ingest` settings added to the
/// `[ingest]` table; returns its path, the admin port and the HTTP port.
pub fn write_config(
    dir: &std::path::Path,
    bootstrap: &str,
    pipeline: &str,
    ingest: &str,
) -> (std::path::PathBuf, u16, u16) {
    let definitions = dir.join("definitions.toml");
    std::fs::write(
        &definitions,
        format!("[[pipelines]]\nname = \"{pipeline}\"\nkey_field = \"account\"\ntime_field = \"ts\"\npartitions = 2\n"),
    )
    .unwrap();
    let (admin, http) = (free_port().unwrap(), free_port().unwrap());
    let config = dir.join("instream.toml");
    std::fs::write(
        &config,
        format!(
            "{process}\n[telemetry]\nlog_format = \"json\"\n[ingest]\nlisten = \"127.0.0.1:{http}\"\n{ingest}\n",
            process = process_config_toml(admin, bootstrap, &definitions, "1s", 65_536),
        ),
    )
    .unwrap();
    (config, admin, http)
}

/// Waits until ingest's /metrics holds `line` (e.g. `instream_ingest_requests_in_flight 1`).
pub async fn wait_metric_line(admin: u16, line: &str, timeout: Duration) {
    let url = format!("http://127.0.0.1:{admin}/metrics");
    instream_testkit::wait_for(&format!("/metrics to show `{line}`"), timeout, || async {
        reqwest::get(&url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .contains(line)
    })
    .await;
}

pub async fn wait_ok(url: &str, timeout: Duration) {
    instream_testkit::wait_for(&format!("{url} to answer 200"), timeout, || async {
        reqwest::get(url).await.is_ok_and(|r| r.status() == 200)
    })
    .await;
}

/// An `instream-ingest` process, ready, for a pipeline of its own.
pub struct ReadyIngest {
    pub child: ChildGuard,
    pub admin: u16,
    pub http: u16,
    pub pipeline: String,
    _dir: tempfile::TempDir,
}

/// Creates a pipeline named after `prefix` (`partitions` partitions) on `broker` and starts
/// ingest for it with `ingest` settings; returns once `/readyz` answers 200.
pub async fn start_ready(
    broker: &KafkaBroker,
    prefix: &str,
    partitions: i32,
    ingest: &str,
) -> ReadyIngest {
    let pipeline = unique(prefix);
    broker
        .create_pipeline_topics(&pipeline, partitions)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (config, admin, http) =
        write_config(dir.path(), &broker.bootstrap_servers(), &pipeline, ingest);
    let child = spawn_service(BIN, &config).unwrap();
    wait_ok(
        &format!("http://127.0.0.1:{admin}/readyz"),
        Duration::from_secs(30),
    )
    .await;
    ReadyIngest {
        child,
        admin,
        http,
        pipeline,
        _dir: dir,
    }
}
