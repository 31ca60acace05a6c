//! What the benchmarks share: a broker to run against, the CPU time
//! of the process under measurement, and the enrichment benchmarks' pipeline.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::process::{free_port, ChildGuard, TestkitError};

/// The enrichment benchmarks' pipeline: Nexmark bids keyed by auction, each enriched with its
/// bidder (`person:{bidder}`: name, city, state).
pub const BIDS_PIPELINE: &str = r#"
[[pipelines]]
name = "bids"
key_field = "auction"
time_field = "date_time"

[[pipelines.enrichments]]
name = "bidder"
key_template = "person:{bidder}"
fields = { name = "bidder_name", city = "bidder_city", state = "bidder_state" }
"#;

/// The client settings of a benchmark against `bootstrap`, once the topics
/// `<pipeline>.<kind>` of `kinds` exist there with `partitions` partitions each.
pub async fn bench_topics(
    bootstrap: &str,
    pipeline: &str,
    kinds: &[&str],
    partitions: i32,
) -> Result<instream_core::config::KafkaConfig, TestkitError> {
    let kafka = instream_core::config::KafkaConfig {
        bootstrap_servers: bootstrap.to_owned(),
        replication_factor: 1,
        ..Default::default()
    };
    let topics: Vec<instream_kafka::admin::TopicSpec> = kinds
        .iter()
        .map(|kind| instream_kafka::admin::TopicSpec {
            name: format!("{pipeline}.{kind}"),
            partitions,
        })
        .collect();
    instream_kafka::admin::ensure_topics(&kafka, &topics)
        .await
        .map_err(|e| TestkitError::Broker(e.to_string()))?;
    Ok(kafka)
}

/// The broker of a benchmark: `INSTREAM_BENCH_KAFKA=host:port` when set, else a tansu 0.6
/// started here (`TANSU` names its binary, `tansu` by default) with memory storage, or the
/// storage `TANSU_STORAGE` names. Memory storage needs tansu built with its `dynostore`
/// feature (`cargo install tansu --version 0.6.0 --features dynostore`); a default build
/// refuses `memory://`. Returns the bootstrap address and the broker's process, which is
/// killed on drop.
pub fn bench_broker() -> Result<(String, Option<ChildGuard>), TestkitError> {
    if let Ok(bootstrap) = std::env::var("INSTREAM_BENCH_KAFKA") {
        return Ok((bootstrap, None));
    }
    let tansu = std::env::var("TANSU").unwrap_or_else(|_| "tansu".into());
    let port = free_port()?;
    let url = format!("tcp://127.0.0.1:{port}");
    let child = Command::new(&tansu)
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args([
            "--storage-engine",
            &std::env::var("TANSU_STORAGE").unwrap_or_else(|_| "memory://tansu/".into()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| TestkitError::Spawn {
            program: tansu,
            source,
        })?;
    let guard = ChildGuard::new(child);
    crate::process::wait_until("tansu to listen", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })?;
    Ok((format!("127.0.0.1:{port}"), Some(guard)))
}

/// User + system CPU seconds a process has used so far (from /proc).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name and state.
    (ticks(11) + ticks(12)) / 100.0
}

/// Starts the service binary `name` that sits next to the running benchmark example
/// (`target/release/examples/x` → `target/release/<name>`) with `--config config`, its stderr
/// shown; killed on drop.
pub fn spawn_release_binary(
    name: &str,
    config: &std::path::Path,
) -> Result<ChildGuard, TestkitError> {
    let binary = std::env::current_exe()?
        .parent()
        .and_then(|examples| examples.parent())
        .map(|release| release.join(name))
        .ok_or_else(|| std::io::Error::other("no target directory above the example"))?;
    Command::new(&binary)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map(ChildGuard::new)
        .map_err(|source| TestkitError::Spawn {
            program: format!("{} (build it with --release first)", binary.display()),
            source,
        })
}

/// Starts the release service `binary` next to the running example on `bootstrap`, with the
/// pipelines of `definitions` (TOML) read from a file in `dir` and `sections` (TOML: the
/// service's own tables, `[kafka.consumer]` properties, …) added to its config. Returns the
/// process and its admin port.
pub fn spawn_bench_service(
    binary: &str,
    dir: &std::path::Path,
    bootstrap: &str,
    definitions: &str,
    sections: &str,
) -> Result<(ChildGuard, u16), TestkitError> {
    let definitions_path = dir.join("definitions.toml");
    std::fs::write(&definitions_path, definitions)?;
    let admin = free_port()?;
    let config = dir.join("instream.toml");
    std::fs::write(
        &config,
        format!(
            r#"[telemetry]
log_level = "warn"
[admin]
listen = "127.0.0.1:{admin}"
[kafka]
bootstrap_servers = "{bootstrap}"
replication_factor = 1
[definitions]
source = "file"
path = "{}"
{sections}"#,
            definitions_path.display(),
        ),
    )?;
    Ok((spawn_release_binary(binary, &config)?, admin))
}

/// [`spawn_bench_service`] for `instream-aggregator`: short consumer fetch waits, its windows
/// in a local store in `dir`, batches of 10,000.
pub fn spawn_bench_aggregator(
    dir: &std::path::Path,
    bootstrap: &str,
    definitions: &str,
) -> Result<(ChildGuard, u16), TestkitError> {
    let sections = format!(
        r#"[kafka.consumer]
"fetch.wait.max.ms" = "10"
"fetch.queue.backoff.ms" = "10"
[store]
backend = "local"
path = "{}"
[aggregator]
batch_size = 10000
"#,
        dir.join("store.redb").display()
    );
    spawn_bench_service(
        "instream-aggregator",
        dir,
        bootstrap,
        definitions,
        &sections,
    )
}

/// Writes `bidders` bidder records (`person:<n>`: name, city, state), the reference data of
/// [`BIDS_PIPELINE`], to the Redis at `url`, in one pipeline; `city` names bidder n's city.
pub async fn seed_bidders(
    url: &str,
    bidders: usize,
    city: impl Fn(usize) -> String,
) -> Result<(), TestkitError> {
    let failed = |e: redis::RedisError| TestkitError::Redis(e.to_string());
    let client = redis::Client::open(url).map_err(failed)?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(failed)?;
    let mut pipe = redis::pipe();
    for b in 0..bidders {
        pipe.cmd("HSET")
            .arg(format!("person:{b}"))
            .arg("name")
            .arg(format!("Bidder {b}"))
            .arg("city")
            .arg(city(b))
            .arg("state")
            .arg("OR")
            .ignore();
    }
    pipe.query_async::<()>(&mut conn).await.map_err(failed)
}

/// The `p` quantile (0..=1) of latencies in microseconds, sorted, in milliseconds; 0 for none.
pub fn percentile_ms(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let i = ((sorted_us.len() as f64 * p).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    sorted_us[i] as f64 / 1000.0
}
