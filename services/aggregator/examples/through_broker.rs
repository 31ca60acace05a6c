//! The aggregator through a real broker: produce N enriched events, run the
//! `instream-aggregator` binary on them, and report events per second and per CPU-second of
//! the aggregator process (user + system time, from /proc, between its first and its last
//! counted event), as one JSON line.
//!
//! ```sh
//! cargo build --release -p instream-aggregator
//! TANSU=/path/to/tansu cargo run --release -p instream-aggregator --example through_broker -- 1000000
//! # half of the events 30 minutes behind the stream (dead-lettered as too late):
//! TANSU=/path/to/tansu cargo run --release -p instream-aggregator --example through_broker -- 1000000 50
//! ```
//! `TANSU` is a tansu 0.6 binary (started here with memory storage); or give a running broker
//! with `INSTREAM_BENCH_KAFKA=host:port`.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

const PARTITIONS: i32 = 4;
const KEYS: usize = 10_000;

async fn counted(admin: u16) -> f64 {
    let Ok(response) = reqwest::get(format!("http://127.0.0.1:{admin}/metrics")).await else {
        return 0.0;
    };
    let text = response.text().await.unwrap_or_default();
    instream_testkit::metric_sum(&text, "instream_events_total", "service=\"aggregator\"").0
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let events: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    // Percent of events placed 30 minutes behind the others: too late for their windows.
    let late_percent: usize = std::env::args()
        .nth(2)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(0);
    let dir = tempfile::tempdir()?;

    let (bootstrap, _broker) = instream_testkit::bench_broker()?;
    instream_testkit::bench_topics(&bootstrap, "bench", &["raw", "enriched", "dlq"], PARTITIONS)
        .await?;

    // About 300-byte enriched events, 10,000 keys, times spread over ten minutes.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let t0 = instream_event::now_millis() - 600_000;
    let produced = Instant::now();
    let mut pending = Vec::with_capacity(10_000);
    for i in 0..events {
        let key = format!("auction-{}", (i * 7_919) % KEYS);
        let envelope = format!(
            r#"{{"event_id":"e{i}","pipeline":"bench","key":"{key}","event_time":{},"ingest_time":{},"payload":{{"auction":"{key}","bidder":"person-{}","price":{},"channel":"Google","url":"https://www.nexmark.com/google/item.htm?query={}"}},"enrichment":{{"category":"books","seller":"person-{}","bidder_city":"Seattle"}}}}"#,
            t0 + (i as i64 * 600_000) / events as i64
                - if (i * 7) % 100 < late_percent {
                    1_800_000
                } else {
                    0
                },
            t0 + i as i64,
            i % 5_000,
            i % 10_000,
            i % 1_000,
            i % 700
        );
        pending.push(
            producer
                .send_result(
                    FutureRecord::to("bench.enriched")
                        .key(&key)
                        .payload(&envelope),
                )
                .map_err(|(e, _)| e)?,
        );
        if pending.len() == 10_000 {
            for d in pending.drain(..) {
                d.await?.map_err(|(e, _)| e)?;
            }
        }
    }
    for d in pending.drain(..) {
        d.await?.map_err(|(e, _)| e)?;
    }
    let produce_secs = produced.elapsed().as_secs_f64();

    let (aggregator, admin) = instream_testkit::spawn_bench_aggregator(
        dir.path(),
        &bootstrap,
        &format!(
            r#"[[pipelines]]
name = "bench"
key_field = "auction"
time_field = "t"
partitions = {PARTITIONS}
max_out_of_orderness = "10m"
[[pipelines.aggregations]]
name = "per_minute"
window = {{ kind = "tumbling", size = "1m" }}
functions = [{{ fn = "sum", field = "payload.price" }}]
"#
        ),
    )?;
    let pid = aggregator.0.id();
    let deadline = Instant::now() + Duration::from_secs(600);
    let (mut first_at, mut first_cpu) = (None, 0.0);
    loop {
        let n = counted(admin).await;
        if first_at.is_none() && n > 0.0 {
            first_at = Some((Instant::now(), n));
            first_cpu = instream_testkit::cpu_seconds(pid);
        }
        if n >= events as f64 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("only {n} of {events} counted in 10 minutes").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu = instream_testkit::cpu_seconds(pid) - first_cpu;
    let (since, counted_then) = first_at.ok_or("nothing counted")?;
    let measured = events as f64 - counted_then;
    let wall = since.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "events": events,
            "late_percent": late_percent,
            "produce_events_per_s": (events as f64 / produce_secs).round(),
            "aggregator_events_per_s": (measured / wall).round(),
            "aggregator_events_per_cpu_s": (measured / cpu.max(0.001)).round(),
            "aggregator_cpu_s": cpu,
            "wall_s": wall,
        })
    );
    Ok(())
}
