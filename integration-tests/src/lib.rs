//! Tests across services against real servers (see `tests/`). This library holds what those
//! tests share.

/// A config for tests: every server on loopback, small timeouts, embedded store, local archive.
pub fn base_config_toml(bootstrap: &str) -> String {
    format!(
        r#"
[telemetry]
log_format = "pretty"
log_level = "warn"

[admin]
listen = "127.0.0.1:0"

[shutdown]
drain_timeout = "5s"

[kafka]
bootstrap_servers = "{bootstrap}"
replication_factor = 1
session_timeout = "6s"
commit_interval = "200ms"

[kafka.consumer]
"fetch.wait.max.ms" = "10"
"fetch.queue.backoff.ms" = "10"

[store]
backend = "embedded"
"#
    )
}
