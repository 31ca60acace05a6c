use std::path::Path;

/// The config sections a service process under test needs, as TOML: its admin port, the
/// broker with short group timeouts, the fetch settings that keep the embedded broker quick,
/// and definitions from a file. `statistics_interval` sets how often lag gauges update;
/// `max_fetch_bytes` keeps fetches small, so that a kill lands mid-stream. Append the
/// service's own sections.
pub fn process_config_toml(
    admin_port: u16,
    bootstrap: &str,
    definitions: &Path,
    statistics_interval: &str,
    max_fetch_bytes: u32,
) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:{admin_port}"
[shutdown]
drain_timeout = "5s"
[kafka]
bootstrap_servers = "{bootstrap}"
replication_factor = 1
session_timeout = "6s"
commit_interval = "100ms"
statistics_interval = "{statistics_interval}"
[kafka.consumer]
"fetch.wait.max.ms" = "10"
"fetch.queue.backoff.ms" = "10"
"max.partition.fetch.bytes" = "{max_fetch_bytes}"
[definitions]
source = "file"
path = "{definitions}"
"#,
        definitions = definitions.display(),
    )
}
