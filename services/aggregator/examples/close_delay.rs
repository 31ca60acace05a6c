//! How soon a window's results are in the store after it closes, under load: enriched events
//! produced in real time (event time = now) at a steady rate over 10,000 keys into a broker,
//! the `instream-aggregator` binary counting them per key and one-minute window (count + sum),
//! and, at the end, its `instream_window_close_delay_seconds` histogram (from the moment a
//! partition's watermark passed a window's end to the moment the window was written) as one
//! JSON line, with the aggregator's CPU time. The issue's goal: at 100,000 events/s with
//! 10,000 active keys per one-minute window, within 1 s of the close.
//!
//! ```sh
//! cargo build --release -p instream-aggregator --bin instream-aggregator --example close_delay
//! TANSU=/path/to/tansu target/release/examples/close_delay --rate 100000 --seconds 150
//! ```
//! `TANSU` is a tansu 0.6 binary (started here with memory storage); or give a running broker
//! with `INSTREAM_BENCH_KAFKA=host:port`.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

const PARTITIONS: i32 = 4;
const KEYS: usize = 10_000;
const HISTOGRAM: &str = "instream_window_close_delay_seconds";

fn arg(name: &str, default: u64) -> Result<u64, Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(args.get(i + 1).ok_or("a value after the flag")?.parse()?),
        None => Ok(default),
    }
}

/// Produces `rate` events per second for `seconds`, paced per millisecond; returns how many.
fn produce(bootstrap: &str, rate: u64, seconds: u64) -> Result<u64, String> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "2000000")
        .create()
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let total = rate * seconds;
    let mut sent = 0u64;
    let mut envelope = String::with_capacity(512);
    while sent < total {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        if sent >= due {
            std::thread::sleep(Duration::from_micros(500));
            producer.poll(Duration::ZERO);
            continue;
        }
        let now = instream_event::now_millis();
        for i in sent..due.min(total) {
            let key = format!("auction-{}", (i as usize * 7_919) % KEYS);
            envelope.clear();
            use std::fmt::Write as _;
            let _ = write!(
                envelope,
                r#"{{"event_id":"e{i}","pipeline":"bench","key":"{key}","event_time":{now},"ingest_time":{now},"payload":{{"auction":"{key}","bidder":"person-{}","price":{},"channel":"Google"}},"enrichment":{{"category":"books","bidder_city":"Seattle"}}}}"#,
                i % 5_000,
                i % 10_000,
            );
            let mut record = BaseRecord::to("bench.enriched")
                .key(&key)
                .payload(&envelope);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((e, back)) => {
                        if !matches!(
                            e.rdkafka_error_code(),
                            Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                        ) {
                            return Err(e.to_string());
                        }
                        producer.poll(Duration::from_millis(1));
                        record = back;
                    }
                }
            }
        }
        sent = due.min(total);
        producer.poll(Duration::ZERO);
    }
    producer
        .flush(Duration::from_secs(30))
        .map_err(|e| e.to_string())?;
    Ok(sent)
}

async fn metrics(admin: u16) -> String {
    match reqwest::get(format!("http://127.0.0.1:{admin}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rate = arg("--rate", 100_000)?;
    let seconds = arg("--seconds", 150)?;
    let dir = tempfile::tempdir()?;
    let (bootstrap, _broker) = instream_testkit::bench_broker()?;
    instream_testkit::bench_topics(
        &bootstrap,
        "bench",
        &["raw", "enriched", "dlq", "quality"],
        PARTITIONS,
    )
    .await?;

    let (aggregator, admin) = instream_testkit::spawn_bench_aggregator(
        dir.path(),
        &bootstrap,
        &format!(
            r#"[[pipelines]]
name = "bench"
key_field = "auction"
time_field = "t"
partitions = {PARTITIONS}
max_out_of_orderness = "2s"
[[pipelines.aggregations]]
name = "per_minute"
window = {{ kind = "tumbling", size = "1m" }}
allowed_lateness = "5s"
functions = [{{ fn = "sum", field = "payload.price" }}]
"#
        ),
    )?;
    let pid = aggregator.0.id();
    let cpu_before = instream_testkit::cpu_seconds(pid);

    let producer = {
        let bootstrap = bootstrap.clone();
        std::thread::spawn(move || produce(&bootstrap, rate, seconds))
    };
    let started = Instant::now();
    let produced = tokio::task::spawn_blocking(move || producer.join())
        .await?
        .map_err(|_| "the producer panicked")??;
    let produce_wall = started.elapsed().as_secs_f64();
    // Everything counted, then one flush more for the windows the last events closed.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = metrics(admin).await;
        let counted =
            instream_testkit::metric_sum(&text, "instream_events_total", "service=\"aggregator\"")
                .0;
        if counted >= produced as f64 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("only {counted} of {produced} counted").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cpu = instream_testkit::cpu_seconds(pid) - cpu_before;
    let text = metrics(admin).await;
    let bucket = |le: &str| {
        instream_testkit::metric_sum(
            &text,
            &format!("{HISTOGRAM}_bucket"),
            &format!("le=\"{le}\""),
        )
        .0
    };
    let windows = instream_testkit::metric_sum(&text, &format!("{HISTOGRAM}_count"), "").0;
    let sum = instream_testkit::metric_sum(&text, &format!("{HISTOGRAM}_sum"), "").0;
    let share = |le: &str| {
        if windows > 0.0 {
            bucket(le) / windows
        } else {
            0.0
        }
    };
    println!(
        "{}",
        serde_json::json!({
            "rate_asked": rate,
            "events": produced,
            "events_per_s": (produced as f64 / produce_wall).round(),
            "keys": KEYS,
            "windows_closed_and_written": windows,
            "mean_close_delay_s": if windows > 0.0 { sum / windows } else { 0.0 },
            "within_0_5_s": share("0.5"),
            "within_1_s": share("1"),
            "within_2_5_s": share("2.5"),
            "aggregator_cpu_s": cpu,
            "aggregator_cores": cpu / produce_wall,
        })
    );
    Ok(())
}
