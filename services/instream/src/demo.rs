//! `instream demo`: the standalone platform driven by a generated auction stream (bids keyed
//! by bidder, enriched with the bidder's city from reference data), then a summary that checks
//! every accepted event reached the aggregates and the archive.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use instream_core::config::Config;
use tokio_util::sync::CancellationToken;

use crate::standalone::Standalone;

const PIPELINE: &str = "bids";
const BIDDERS: usize = 500;
const CITIES: [&str; 6] = ["Oslo", "Lisbon", "Austin", "Kyiv", "Osaka", "Lagos"];

const DEFINITIONS: &str = r#"
[[pipelines]]
name = "bids"
key_field = "bidder"
time_field = "ts"
required_fields = ["auction", "price"]
partitions = 4

[[pipelines.enrichments]]
name = "person"
key_template = "person:{bidder}"
fields = { city = "bidder_city", name = "bidder_name" }

[[pipelines.aggregations]]
name = "bids_per_10s"
window = { kind = "tumbling", size = "10s" }

[[pipelines.aggregations]]
name = "bids_per_city_minute"
group_by = ["key", "enrichment.bidder_city"]
window = { kind = "tumbling", size = "1m" }
"#;

fn demo_config(data: &Path) -> anyhow::Result<Config> {
    std::fs::create_dir_all(data)?;
    let definitions = data.join("definitions.toml");
    std::fs::write(&definitions, DEFINITIONS)?;
    let seed = data.join("people.jsonl");
    let mut people = String::new();
    for b in 0..BIDDERS {
        people.push_str(&serde_json::to_string(&serde_json::json!({
            "key": format!("person:p{b}"),
            "fields": {"name": format!("Person {b}"), "city": CITIES[b % CITIES.len()]},
        }))?);
        people.push('\n');
    }
    std::fs::write(&seed, people)?;
    let archive = data.join("archive");
    // A fresh archive per run: the embedded broker starts empty, so offsets start at 0 again.
    let _ = std::fs::remove_dir_all(&archive);
    let text = format!(
        r#"
[telemetry]
log_format = "pretty"
log_level = "warn"
[admin]
listen = "127.0.0.1:0"
[shutdown]
drain_timeout = "5s"
[kafka]
broker = "embedded"
replication_factor = 1
session_timeout = "6s"
commit_interval = "500ms"
[kafka.consumer]
"fetch.wait.max.ms" = "10"
"fetch.queue.backoff.ms" = "10"
[definitions]
source = "file"
path = "{definitions}"
[refdata]
backend = "memory"
seed_file = "{seed}"
[store]
backend = "embedded"
[archive]
backend = "local"
root = "{archive}"
[ingest]
listen = "127.0.0.1:0"
[aggregator]
flush_interval = "500ms"
[archiver]
roll_max_age = "2s"
"#,
        definitions = definitions.display(),
        seed = seed.display(),
        archive = archive.display(),
    );
    Ok(Config::from_toml(&text)?)
}

/// A small deterministic generator (xorshift), so runs are comparable.
struct Bids {
    state: u64,
    next_id: u64,
}

impl Bids {
    fn next(&mut self) -> serde_json::Value {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.next_id += 1;
        let r = self.state;
        serde_json::json!({
            "bid_id": self.next_id,
            "auction": 1000 + r % 97,
            "bidder": format!("p{}", (r >> 8) % BIDDERS as u64),
            "price": 1 + (r >> 20) % 5000,
            "ts": instream_event::now_millis(),
        })
    }
}

pub async fn run(duration: Duration, rate: u32, data: &Path) -> anyhow::Result<()> {
    let config = demo_config(data)?;
    let token = CancellationToken::new();
    let platform = Standalone::start(config, token.clone()).await?;
    let drain = Duration::from_secs(15);
    eprintln!(
        "instream demo: ingest http://{}/v1/pipelines/{PIPELINE}/events, metrics http://{}/metrics; \
         sending ~{rate} events/s for {duration:?}",
        platform.ingest_addr, platform.admin_addr
    );
    let url = format!(
        "http://{}/v1/pipelines/{PIPELINE}/events",
        platform.ingest_addr
    );
    let http = reqwest::Client::new();
    let mut bids = Bids {
        state: 0x9E37_79B9_7F4A_7C15,
        next_id: 0,
    };
    let started = Instant::now();
    let tick = Duration::from_millis(100);
    let per_tick = (rate as usize / 10).max(1);
    let mut accepted = 0u64;
    let mut batches = 0u64;
    let mut next_report = Duration::from_secs(5);
    while started.elapsed() < duration && !token.is_cancelled() {
        let body: Vec<serde_json::Value> = (0..per_tick).map(|_| bids.next()).collect();
        let answer = http
            .post(&url)
            .header("idempotency-key", format!("demo-{batches}"))
            .json(&body)
            .send()
            .await
            .context("posting to ingest")?;
        batches += 1;
        let status = answer.status();
        let json: serde_json::Value = answer.json().await.unwrap_or_default();
        if status.is_success() {
            accepted += json["accepted"].as_u64().unwrap_or(0);
        } else {
            eprintln!("instream demo: ingest answered {status}: {json}");
        }
        if started.elapsed() >= next_report {
            eprintln!(
                "instream demo: {:>3}s  {accepted} events accepted",
                next_report.as_secs()
            );
            next_report += Duration::from_secs(5);
        }
        tokio::time::sleep(tick).await;
    }

    // Wait until the stages caught up with what ingest accepted, then summarise.
    let store = platform
        .embedded_store
        .clone()
        .context("the demo uses the embedded store")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let aggregated = loop {
        let counted: i64 = store
            .all()
            .iter()
            .filter(|w| w.aggregation == "bids_per_10s")
            .map(|w| w.count)
            .sum();
        if counted as u64 >= accepted || Instant::now() > deadline {
            break counted as u64;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let archived = loop {
        let mut records = 0u64;
        for f in platform.archive.list(PIPELINE).await? {
            let bytes = platform.archive.get(&f.path).await?;
            records += zstd_lines(&bytes).context("reading an archive file")?;
        }
        if records >= accepted || Instant::now() > deadline {
            break records;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut cities: BTreeMap<String, i64> = BTreeMap::new();
    for w in store
        .all()
        .iter()
        .filter(|w| w.aggregation == "bids_per_city_minute")
    {
        let city = w.group_key.rsplit('|').next().unwrap_or("?").to_owned();
        *cities.entry(city).or_default() += w.count;
    }
    token.cancel();
    platform.supervisor.wait(drain).await?;

    println!(
        "instream demo summary ({:.1}s)",
        started.elapsed().as_secs_f64()
    );
    println!("  events accepted by ingest : {accepted}");
    println!("  events in the aggregates  : {aggregated}");
    println!("  events in the archive     : {archived}");
    println!("  bids per bidder city      : {cities:?}");
    if aggregated != accepted || archived != accepted {
        bail!("the stages did not account for every accepted event");
    }
    println!("  the aggregates and the archive each hold exactly the accepted events");
    Ok(())
}

/// Counts the lines of a zstd JSON-lines file.
fn zstd_lines(bytes: &[u8]) -> std::io::Result<u64> {
    use std::io::Read;
    let mut text = Vec::new();
    zstd::stream::read::Decoder::new(bytes)?.read_to_end(&mut text)?;
    Ok(text.iter().filter(|&&b| b == b'\n').count() as u64)
}
