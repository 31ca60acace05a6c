//! Ingest's load generator: NDJSON batches of ~300-byte events posted over keep-alive
//! connections to the `instream-ingest` binary, which writes them to a broker on the same
//! machine. Two phases: as fast as the connections go (the most events per second ingest
//! accepts), then paced at 80% of the goal (or of the maximum, when that is lower) with
//! latency measured from each request's scheduled start (no coordinated omission). Prints one
//! JSON line per phase: accepted events/s, answers by status, request latency percentiles, and
//! the CPU seconds per second of ingest, the broker and this generator (from /proc).
//!
//! ```sh
//! cargo build --release -p instream-ingest --bin instream-ingest --example load
//! TANSU=/path/to/tansu target/release/examples/load [--connections 8] [--duration 20]
//! ```
//! `TANSU` is a tansu 0.6 binary (started with memory storage); or `INSTREAM_BENCH_KAFKA=host:port`.
//! `INGEST_URL=http://host:port` drives an ingest that is already running instead (pipeline
//! `bench`, anonymous) and reports no ingest CPU.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use instream_core::config::KafkaConfig;

const PIPELINE: &str = "bench";
const PARTITIONS: i32 = 6;
const GOAL_EVENTS_PER_S: f64 = 150_000.0;
/// Distinct request bodies cycled through (their events get content-derived ids).
const BODIES: usize = 32;

#[derive(Clone, Copy)]
struct Options {
    connections: usize,
    events_per_request: usize,
    duration: Duration,
    warmup: Duration,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        connections: 8,
        events_per_request: 1000,
        duration: Duration::from_secs(20),
        warmup: Duration::from_secs(3),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let value = pair.get(1).ok_or(format!("{} needs a value", pair[0]))?;
        let number: u64 = value.parse().map_err(|e| format!("{}: {e}", pair[0]))?;
        match pair[0].as_str() {
            "--connections" => o.connections = number.max(1) as usize,
            "--events-per-request" => o.events_per_request = number.max(1) as usize,
            "--duration" => o.duration = Duration::from_secs(number.max(1)),
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(o)
}

/// One NDJSON body of `n` events of about 300 bytes, distinct per `seed`.
fn body(seed: usize, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * 310);
    for i in 0..n {
        let k = seed * n + i;
        out.extend_from_slice(
            format!(
                r#"{{"account":"acct-{a:05}","ts":{t},"type":"purchase","amount":{amt}.{c:02},"currency":"EUR","sku":"sku-{s:06}","qty":{q},"channel":"web","session":"s-{k:010}","url":"https://shop.example.com/p/{s}?ref=campaign-{r}","agent":"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"}}"#,
                a = k % 10_000,
                t = 1_764_000_000_000u64 + k as u64,
                amt = k % 500,
                c = k % 100,
                s = (k * 7919) % 1_000_000,
                q = 1 + k % 5,
                r = k % 40,
            )
            .as_bytes(),
        );
        out.push(b'\n');
    }
    out
}

#[derive(Default)]
struct Tally {
    accepted: AtomicU64,
    /// Warm-up included: what the topic must hold at least.
    accepted_all: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
    statuses: Mutex<std::collections::BTreeMap<String, u64>>,
}

/// Posts bodies from `connections` workers until `end`, counting what was scheduled from
/// `start` on (before it: warm-up); `rate` = events per second over all workers, or as fast
/// as they go.
async fn phase(
    url: &str,
    bodies: &Arc<Vec<bytes::Bytes>>,
    o: &Options,
    rate: Option<f64>,
    (start, end): (Instant, Instant),
) -> Arc<Tally> {
    let tally = Arc::new(Tally::default());
    let mut workers = Vec::new();
    for w in 0..o.connections {
        let (url, bodies, tally) = (url.to_owned(), bodies.clone(), tally.clone());
        let per_worker_interval = rate.map(|r| {
            Duration::from_secs_f64(o.events_per_request as f64 * o.connections as f64 / r)
        });
        let offset = per_worker_interval.map(|i| i.mul_f64(w as f64 / o.connections as f64));
        workers.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()
                .expect("an HTTP client");
            let mut next = Instant::now() + offset.unwrap_or_default();
            let mut i = w;
            loop {
                if per_worker_interval.is_some() {
                    tokio::time::sleep_until(next.into()).await;
                }
                // Paced: latency from the scheduled start, so a slow answer that delays the
                // next request is counted against the server, not hidden.
                let scheduled = if per_worker_interval.is_some() {
                    next
                } else {
                    Instant::now()
                };
                if scheduled >= end {
                    return;
                }
                let answer = client
                    .post(&url)
                    .header("content-type", "application/x-ndjson")
                    .body(bodies[i % bodies.len()].clone())
                    .send()
                    .await;
                let finished = Instant::now();
                i += 1;
                if let Some(interval) = per_worker_interval {
                    next += interval;
                }
                let (status, accepted) = match answer {
                    Ok(r) => {
                        let status = r.status().as_u16().to_string();
                        let accepted = match r.json::<serde_json::Value>().await {
                            Ok(json) => json["accepted"].as_u64().unwrap_or(0),
                            Err(_) => 0,
                        };
                        (status, accepted)
                    }
                    Err(e) => (format!("error: {e}"), 0),
                };
                tally.accepted_all.fetch_add(accepted, Ordering::Relaxed);
                if scheduled < start {
                    continue;
                }
                tally.accepted.fetch_add(accepted, Ordering::Relaxed);
                *tally.statuses.lock().unwrap().entry(status).or_default() += 1;
                tally
                    .latencies_us
                    .lock()
                    .unwrap()
                    .push((finished - scheduled).as_micros() as u64);
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    tally
}

struct Cpu {
    pids: Vec<(&'static str, u32)>,
}

impl Cpu {
    fn sample(&self) -> Vec<f64> {
        self.pids
            .iter()
            .map(|(_, pid)| instream_testkit::cpu_seconds(*pid))
            .collect()
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let o = options()?;
    let dir = tempfile::tempdir()?;
    let mut pids = vec![("loadgen", std::process::id())];
    let mut _broker = None;
    let mut _ingest = None;
    let mut kafka_to_check = None;
    let url = match std::env::var("INGEST_URL") {
        Ok(url) => url,
        Err(_) => {
            let (bootstrap, broker) = instream_testkit::bench_broker()?;
            if let Some(b) = &broker {
                pids.push(("broker", b.0.id()));
            }
            _broker = broker;
            let kafka =
                instream_testkit::bench_topics(&bootstrap, PIPELINE, &["raw", "dlq"], PARTITIONS)
                    .await?;
            kafka_to_check = Some(kafka.clone());
            let definitions = dir.path().join("definitions.toml");
            std::fs::write(
                &definitions,
                format!("[[pipelines]]\nname = \"{PIPELINE}\"\nkey_field = \"account\"\ntime_field = \"ts\"\npartitions = {PARTITIONS}\n"),
            )?;
            let (admin, http) = (
                instream_testkit::free_port()?,
                instream_testkit::free_port()?,
            );
            let config = dir.path().join("instream.toml");
            std::fs::write(
                &config,
                format!(
                    "[telemetry]\nlog_level = \"warn\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
                     [kafka]\nbootstrap_servers = \"{bootstrap}\"\nreplication_factor = 1\n\
                     [definitions]\nsource = \"file\"\npath = \"{}\"\n\
                     [ingest]\nlisten = \"127.0.0.1:{http}\"\nallow_anonymous = true\n",
                    definitions.display()
                ),
            )?;
            let child = instream_testkit::spawn_release_binary("instream-ingest", &config)?;
            pids.push(("ingest", child.0.id()));
            _ingest = Some(child);
            let ready = format!("http://127.0.0.1:{admin}/readyz");
            let deadline = Instant::now() + Duration::from_secs(60);
            while !matches!(reqwest::get(&ready).await, Ok(r) if r.status() == 200) {
                if Instant::now() > deadline {
                    return Err("ingest not ready within 60 s".into());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            format!("http://127.0.0.1:{http}")
        }
    };
    let url = format!("{url}/v1/pipelines/{PIPELINE}/events");
    let bodies: Arc<Vec<bytes::Bytes>> = Arc::new(
        (0..BODIES)
            .map(|s| bytes::Bytes::from(body(s, o.events_per_request)))
            .collect(),
    );
    let event_bytes = bodies[0].len() / o.events_per_request;
    let cpu = Cpu { pids };

    let mut max_rate = 0.0;
    let mut accepted_total = 0u64;
    for name in ["max", "paced"] {
        let rate = (name == "paced").then(|| 0.8 * f64::min(GOAL_EVENTS_PER_S, max_rate));
        let start = Instant::now() + o.warmup;
        let end = start + o.duration;
        let load = tokio::spawn({
            let (url, bodies) = (url.clone(), bodies.clone());
            async move { phase(&url, &bodies, &o, rate, (start, end)).await }
        });
        tokio::time::sleep_until(start.into()).await;
        let before = cpu.sample();
        tokio::time::sleep_until(end.into()).await;
        let after = cpu.sample();
        let tally = load.await?;
        let seconds = o.duration.as_secs_f64();
        let accepted = tally.accepted.load(Ordering::Relaxed) as f64;
        accepted_total += tally.accepted_all.load(Ordering::Relaxed);
        let events_per_s = accepted / seconds;
        if name == "max" {
            max_rate = events_per_s;
        }
        let mut latencies = std::mem::take(&mut *tally.latencies_us.lock().unwrap());
        latencies.sort_unstable();
        let cpu_per_s: serde_json::Map<String, serde_json::Value> = cpu
            .pids
            .iter()
            .zip(before.iter().zip(&after))
            .map(|((what, _), (b, a))| {
                (
                    (*what).to_owned(),
                    serde_json::json!(((a - b) / seconds * 100.0).round() / 100.0),
                )
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "phase": name,
                "target_events_per_s": rate.map(f64::round),
                "connections": o.connections,
                "events_per_request": o.events_per_request,
                "event_bytes": event_bytes,
                "seconds": seconds,
                "accepted_events_per_s": events_per_s.round(),
                "answers": *tally.statuses.lock().unwrap(),
                "latency_ms": {
                    "p50": instream_testkit::percentile_ms(&latencies, 0.50),
                    "p90": instream_testkit::percentile_ms(&latencies, 0.90),
                    "p99": instream_testkit::percentile_ms(&latencies, 0.99),
                    "max": instream_testkit::percentile_ms(&latencies, 1.0),
                },
                "cpu_seconds_per_second": cpu_per_s,
            })
        );
    }
    // Every event an answer called accepted (warm-up included) must be on the topic. Read
    // back, not taken from the watermarks: tansu 0.6's high watermark leaves out the last
    // batch of a partition.
    if let Some(kafka) = kafka_to_check {
        let on_topic = tokio::task::spawn_blocking(move || count_records(&kafka)).await??;
        println!(
            "{}",
            serde_json::json!({"accepted_by_answers": accepted_total, "records_on_topic": on_topic})
        );
        if on_topic < accepted_total {
            return Err("fewer records on the topic than accepted".into());
        }
    }
    Ok(())
}

/// Reads `bench.raw` from the start until nothing arrives for 3 s; returns how many records.
fn count_records(kafka: &KafkaConfig) -> Result<u64, rdkafka::error::KafkaError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap_servers)
        .set("group.id", "bench-count")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(&format!("{PIPELINE}.raw"), p, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut count = 0;
    let mut idle_since = Instant::now();
    while idle_since.elapsed() < Duration::from_secs(3) {
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            message?;
            count += 1;
            idle_since = Instant::now();
        }
    }
    Ok(count)
}
