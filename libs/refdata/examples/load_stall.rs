//! Does loading a big reference-data version stall enrichment? Lookups run as the enricher
//! makes them (batches of 2,000 keys through the local cache, a tenth of them evicted first so
//! they go to Redis) before, during and after `load_file` writes a new version of ROWS rows
//! (default 1,000,000) to the same Redis and switches the pointer; the enricher's store
//! follows the switch by pub/sub. Prints, per phase, lookups per second and the p99 and
//! longest batch, and fails if any lookup did not find its record (a switch must never show
//! a half-loaded version).
//!
//! ```sh
//! cargo run --release -p instream-refdata --example load_stall -- 1000000
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use instream_core::config::RefDataConfig;
use instream_pipeline::RecordShape;
use instream_refdata::versions::version_prefix;
use instream_refdata::{CacheSettings, CachedRefStore, Found, RedisRefStore, RefStore};

const BATCH: usize = 2_000;
const BIDDERS: usize = 10_000;

/// Batch times of one phase.
#[derive(Default)]
struct Phase {
    batches: Vec<Duration>,
    wall: Duration,
}

impl Phase {
    fn report(&mut self) -> serde_json::Value {
        self.batches.sort();
        let at = |q: f64| {
            let i = ((self.batches.len() as f64 - 1.0) * q).round() as usize;
            self.batches
                .get(i)
                .map_or(0.0, |d| (d.as_secs_f64() * 1e4).round() / 10.0)
        };
        serde_json::json!({
            "lookups_per_s": ((self.batches.len() * BATCH) as f64 / self.wall.as_secs_f64()).round(),
            "batch_ms_p50": at(0.5),
            "batch_ms_p99": at(0.99),
            "batch_ms_max": at(1.0),
            "batches": self.batches.len(),
        })
    }
}

fn write_csv(path: &std::path::Path, rows: usize) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "id,name,city,state")?;
    for i in 0..rows {
        writeln!(out, "{i},Bidder {i},Portland,OR")?;
    }
    out.flush()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rows: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let redis = instream_testkit::RedisServer::start()?;
    let dir = tempfile::tempdir()?;
    let doc = instream_pipeline::parse_document(instream_testkit::BIDS_PIPELINE)?;
    let rule = doc.pipelines[0].enrichments[0].clone();
    let config = RefDataConfig {
        redis_url: redis.url(),
        ..RefDataConfig::default()
    };
    let timeout = config.timeout;
    let connection = redis::Client::open(redis.url())?
        .get_connection_manager()
        .await?;
    let key_fields = vec!["id".to_owned()];

    // Version 1: the bidders the lookups ask for.
    let small = dir.path().join("v1.csv");
    write_csv(&small, BIDDERS)?;
    instream_refdata::load::load_file(
        connection.clone(),
        timeout,
        "bids",
        &rule,
        &key_fields,
        &small,
        &instream_core::Progress::silent(),
    )
    .await?;
    let big = dir.path().join("v2.csv");
    write_csv(&big, rows.max(BIDDERS))?;

    let store = RedisRefStore::connect(&config).await?;
    store.track(&[("bids".into(), "bidder".into())]).await?;
    let store: Arc<dyn RefStore> = Arc::new(store);
    let cached = CachedRefStore::new(
        store.clone(),
        &CacheSettings {
            max_bytes: 256 << 20,
            ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(60),
        },
    );
    let first = store
        .version("bids", "bidder")
        .ok_or("version 1 not seen")?;

    let mut round = 0usize;
    let mut misses = 0usize;
    let lookups_batch = |round: usize| -> Vec<(String, RecordShape)> {
        let prefix = store
            .version("bids", "bidder")
            .map_or_else(String::new, |v| version_prefix("bids", "bidder", v));
        (0..BATCH)
            .map(|i| {
                let bidder = (round * BATCH + i) * 7919 % BIDDERS;
                (format!("{prefix}person:{bidder}"), RecordShape::Hash)
            })
            .collect()
    };
    let run_batch = async |round: usize, misses: &mut usize| -> Result<Duration, String> {
        let lookups = lookups_batch(round);
        let cold: Vec<_> = lookups.iter().step_by(10).cloned().collect();
        cached.invalidate(&cold);
        let started = Instant::now();
        let answers = cached
            .lookup_many(&lookups)
            .await
            .map_err(|e| e.to_string())?;
        let took = started.elapsed();
        *misses += answers
            .iter()
            .filter(|a| !matches!(***a, Found::Record(_)))
            .count();
        Ok(took)
    };

    let mut before = Phase::default();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        before.batches.push(run_batch(round, &mut misses).await?);
        round += 1;
    }
    before.wall = started.elapsed();

    let load = tokio::spawn({
        let rule = rule.clone();
        let key_fields = key_fields.clone();
        let big = big.clone();
        async move {
            let started = Instant::now();
            let report = instream_refdata::load::load_file(
                connection,
                timeout,
                "bids",
                &rule,
                &key_fields,
                &big,
                &instream_core::Progress::silent(),
            )
            .await;
            (report, started.elapsed())
        }
    });
    let mut during = Phase::default();
    let started = Instant::now();
    while !load.is_finished() {
        during.batches.push(run_batch(round, &mut misses).await?);
        round += 1;
    }
    during.wall = started.elapsed();
    let (report, load_took) = load.await?;
    let report = report?;

    let mut after = Phase::default();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        after.batches.push(run_batch(round, &mut misses).await?);
        round += 1;
    }
    after.wall = started.elapsed();
    let now = store.version("bids", "bidder");

    println!(
        "{}",
        serde_json::json!({
            "rows": report.records,
            "load_seconds": (load_took.as_secs_f64() * 10.0).round() / 10.0,
            "version_before": first,
            "version_after": now,
            "before": before.report(),
            "during_load": during.report(),
            "after": after.report(),
            "lookups_not_found": misses,
        })
    );
    if misses > 0 {
        return Err(format!("{misses} lookups did not find their record").into());
    }
    if now != Some(report.version) {
        return Err("the store did not follow the switch to the new version".into());
    }
    Ok(())
}
