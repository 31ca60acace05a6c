//! What the CLI tests share: the `instream` binary run against the test's servers, and a
//! definitions file.

#![allow(dead_code)] // each test file uses its part

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

pub struct Env {
    pub zk: String,
    pub root: String,
    pub bootstrap: String,
    pub redis: Option<String>,
    pub store: Option<std::path::PathBuf>,
}

impl Env {
    /// The CLI against `zookeeper` (under a root of its own) and `broker`; no Redis, no store.
    pub fn new(
        zookeeper: &instream_testkit::ZooKeeperServer,
        broker: &instream_testkit::KafkaBroker,
    ) -> Env {
        Env {
            zk: zookeeper.connect_string(),
            root: format!("/{}", instream_testkit::unique("cli")),
            bootstrap: broker.bootstrap_servers(),
            redis: None,
            store: None,
        }
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_instream"));
        command
            .args(args)
            .env("INSTREAM__ZOOKEEPER__CONNECT", &self.zk)
            .env("INSTREAM__ZOOKEEPER__ROOT", &self.root)
            .env("INSTREAM__KAFKA__BOOTSTRAP_SERVERS", &self.bootstrap)
            .env("INSTREAM__TELEMETRY__LOG_LEVEL", "error");
        if let Some(redis) = &self.redis {
            command.env("INSTREAM__REFDATA__REDIS_URL", redis);
        }
        if let Some(store) = &self.store {
            command
                .env("INSTREAM__STORE__BACKEND", "local")
                .env("INSTREAM__STORE__PATH", store);
        }
        command.output().expect("runs instream")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "instream {args:?}: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let text = self.ok(args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
    }

    /// Runs a command that must fail; returns its one-line error.
    pub fn fails(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(!output.status.success(), "instream {args:?} succeeded");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "one line of error: {stderr}"
        );
        stderr
    }
}

pub fn definitions(dir: &Path, name: &str, version: u64, extra: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}-v{version}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
[[pipelines]]
name = "{name}"
version = {version}
key_field = "customer_id"
time_field = "ts"
partitions = 2
{extra}
[[pipelines.enrichments]]
name = "customer"
key_template = "customer:{{customer_id}}"

[[pipelines.aggregations]]
name = "per_minute"
window = {{ kind = "tumbling", size = "1m" }}
"#
        ),
    )
    .unwrap();
    path
}
