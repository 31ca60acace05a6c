//! The enricher through a real broker, against a plain consume→produce passthrough with the
//! same client settings in the same run: produce N raw Nexmark-shaped bids (~340 bytes,
//! 10,000 bidders in Redis), copy them raw→copy with a minimal loop in this process
//! (`recv_batch` + `send`, no decoding), then run the `instream-enricher` binary on them. For
//! each: events per second and per CPU-second of the process doing the work (user + system
//! time from /proc, from its first to its last event), as one JSON line.
//!
//! ```sh
//! cargo build --release -p instream-enricher --bin instream-enricher --example through_broker
//! TANSU=/path/to/tansu target/release/examples/through_broker 1000000
//! ```
//! `TANSU` is a tansu 0.6 binary (started with memory storage); or `INSTREAM_BENCH_KAFKA=host:port`.
//! tansu has no transactions, so the enricher runs with `delivery = "at_least_once"`.

use std::time::{Duration, Instant};

use instream_kafka::client::{self, recv_batch};
use rdkafka::producer::FutureRecord;

const PARTITIONS: i32 = 4;
const BIDDERS: usize = 10_000;
const BATCH: usize = 2_000;

async fn enriched(admin: u16) -> f64 {
    let Ok(response) = reqwest::get(format!("http://127.0.0.1:{admin}/metrics")).await else {
        return 0.0;
    };
    let text = response.text().await.unwrap_or_default();
    instream_testkit::metric_sum(&text, "instream_events_total", "service=\"enricher\"").0
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let events: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir()?;
    let (bootstrap, _broker) = instream_testkit::bench_broker()?;
    let redis = instream_testkit::RedisServer::start()?;
    instream_testkit::seed_bidders(&redis.url(), BIDDERS, |_| "Portland".into()).await?;
    let kafka = instream_testkit::bench_topics(
        &bootstrap,
        "bench",
        &["raw", "enriched", "dlq", "copy"],
        PARTITIONS,
    )
    .await?;

    let producer = client::producer(&kafka, "bench")?;
    let now = instream_event::now_millis();
    let mut pending = Vec::with_capacity(10_000);
    for i in 0..events {
        let auction = 1000 + i % 977;
        let envelope = format!(
            r#"{{"event_id":"bid-{i}","pipeline":"bench","key":"{auction}","event_time":{t},"ingest_time":{t},"payload":{{"auction":{auction},"bidder":{b},"price":{p},"channel":"channel-{c}","url":"https://www.nexmark.com/{auction}/item.htm?query=1&channel_id={c}","date_time":"2026-11-25T10:00:00.000Z","extra":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}}}"#,
            t = now + i as i64,
            b = (i * 7919) % BIDDERS,
            p = 100 + i % 9000,
            c = i % 50,
        );
        let key = auction.to_string();
        let record = FutureRecord::to("bench.raw")
            .key(key.as_bytes())
            .payload(envelope.as_bytes());
        pending.push(client::send(&producer, record).await?);
        if pending.len() == 10_000 {
            for d in pending.drain(..) {
                client::delivered(d).await?;
            }
        }
    }
    for d in pending.drain(..) {
        client::delivered(d).await?;
    }

    // The passthrough: the same consumer and producer settings as the enricher's (its
    // at-least-once producer is the gapless one), the same batch loop.
    let consumer = client::consumer(&kafka, "bench", "passthrough", &["bench.raw"])?;
    let copier = instream_kafka::gapless_producer(&kafka, "bench")?;
    let me = std::process::id();
    let mut batch = Vec::with_capacity(BATCH);
    let (mut copied, mut started, mut cpu_at_start) = (0usize, None, 0.0);
    while copied < events {
        recv_batch(&consumer, BATCH, Duration::from_millis(20), &mut batch).await?;
        if batch.is_empty() {
            continue;
        }
        if started.is_none() {
            started = Some((Instant::now(), batch.len()));
            cpu_at_start = instream_testkit::cpu_seconds(me);
        }
        let mut deliveries = Vec::with_capacity(batch.len());
        for r in &batch {
            let record = FutureRecord::to("bench.copy")
                .key(r.key.as_deref().unwrap_or_default())
                .payload(r.payload.as_slice());
            deliveries.push(client::send(&copier, record).await?);
        }
        for d in deliveries {
            client::delivered(d).await?;
        }
        client::complete(&consumer, &batch);
        copied += batch.len();
    }
    let (since, first) = started.ok_or("nothing copied")?;
    let pass_wall = since.elapsed().as_secs_f64();
    let pass_cpu = instream_testkit::cpu_seconds(me) - cpu_at_start;
    let pass_events = (events - first) as f64;
    drop(consumer);

    let (enricher, admin) = instream_testkit::spawn_bench_service(
        "instream-enricher",
        dir.path(),
        &bootstrap,
        &format!(
            r#"[[pipelines]]
name = "bench"
key_field = "auction"
time_field = "date_time"
partitions = {PARTITIONS}
[[pipelines.enrichments]]
name = "bidder"
key_template = "person:{{bidder}}"
fields = {{ name = "bidder_name", city = "bidder_city", state = "bidder_state" }}
"#
        ),
        &format!(
            r#"[refdata]
backend = "redis"
redis_url = "{}"
[enricher]
delivery = "at_least_once"
"#,
            redis.url()
        ),
    )?;
    let pid = enricher.0.id();
    let deadline = Instant::now() + Duration::from_secs(600);
    let (mut first_at, mut first_cpu) = (None, 0.0);
    loop {
        let n = enriched(admin).await;
        if first_at.is_none() && n > 0.0 {
            first_at = Some((Instant::now(), n));
            first_cpu = instream_testkit::cpu_seconds(pid);
        }
        if n >= events as f64 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("only {n} of {events} enriched in 10 minutes").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu = instream_testkit::cpu_seconds(pid) - first_cpu;
    let (since, then) = first_at.ok_or("nothing enriched")?;
    let measured = events as f64 - then;
    let wall = since.elapsed().as_secs_f64();
    let enrich_per_cpu = measured / cpu.max(0.001);
    let pass_per_cpu = pass_events / pass_cpu.max(0.001);
    println!(
        "{}",
        serde_json::json!({
            "events": events,
            "passthrough_events_per_s": (pass_events / pass_wall).round(),
            "passthrough_events_per_cpu_s": pass_per_cpu.round(),
            "enricher_events_per_s": (measured / wall).round(),
            "enricher_events_per_cpu_s": enrich_per_cpu.round(),
            "enricher_cpu_s": cpu,
            "enricher_vs_passthrough_per_cpu": (enrich_per_cpu / pass_per_cpu * 100.0).round() / 100.0,
        })
    );
    Ok(())
}
