//! The whole pipeline as separate processes, end to end: `instream-ingest`,
//! `instream-enricher`, `instream-aggregator` and `instream-archiver` (release builds) on one
//! broker, with Redis for the reference data. Events are posted to ingest as NDJSON (Nexmark
//! bids keyed by auction, each enriched with its bidder, counted and summed per auction and
//! hour, archived as JSON lines) as fast as the connections go, or at `--rate`. Prints one
//! JSON line: per stage the events/s (from the first post to the stage's last event) and the
//! events per CPU-second of its process, the broker's and this generator's CPU apart; latency
//! quantiles (ingest's answers as the client saw them; accepted → enriched and accepted →
//! visible in the store from the stages' histograms, to their bucket bounds); and the counts:
//! every stage's count and the windows' sum in the store must equal what ingest accepted,
//! otherwise it exits 1. It is also the sizing tool of docs/runbook.md ("Sizing").
//!
//! ```sh
//! cargo build --release -p instream-ingest -p instream-enricher -p instream-aggregator \
//!   -p instream-archiver -p instream-integration-tests --bins --example pipeline
//! TANSU=/path/to/tansu target/release/examples/pipeline [--events 1000000] [--rate 100000]
//!   [--connections 4] [--batch 2000] [--partitions 4] [--repartitioned 1] [--prefill 1]
//!   [--definitions pipelines.toml] [--events-file events.ndjson] [--refdata refdata.ndjson]
//! ```
//! `--repartitioned 1` adds a second aggregation grouped by the bidder's city (not the key),
//! which the aggregator repartitions through `bench.by-per_city_hour`.
//!
//! A job of your own: `--definitions pipelines.toml` (the services' definitions file; its first
//! pipeline is driven, its topics created with its partitions), `--events-file events.ndjson`
//! (one event per line, posted in requests of `--batch` lines; `--events` is then the file's
//! line count) and `--refdata refdata.ndjson` (lines `{"key": "person:1", "value": {...}}`:
//! an object is written as a Redis hash of its fields, anything else as a string). Every
//! stage's count must still equal what ingest accepted; the windows' sums in the store are
//! printed, and compared with it only for the built-in job (a filter, a late event or an
//! event outside every window rightly leaves them short).
//! `--prefill 1` starts the enricher, aggregator and archiver only once every event is on the
//! raw topic (a backlog to catch up with); their events/s and CPU are then counted from their
//! start, and the end-to-end figure is the slower of ingest and the stages.
//! `TANSU` is a tansu 0.6 binary (started with memory storage); or `INSTREAM_BENCH_KAFKA=host:port`.
//! tansu has no transactions, so the enricher runs with `delivery = "at_least_once"`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use instream_testkit::{cpu_seconds, metric_sum, spawn_bench_service, ChildGuard};

mod job;

use job::{bodies, file_bodies, job, options, seed_refdata};

type Error = Box<dyn std::error::Error + Send + Sync>;

const PIPELINE: &str = "bench";
const AGGREGATION: &str = "per_auction_hour";
const BY_CITY: &str = "per_city_hour";
const BIDDERS: usize = 10_000;
const STAGES: [&str; 4] = ["ingest", "enricher", "aggregator", "archiver"];

/// A client that gives up on an admin endpoint after 10 s (a hung one must not hang the run).
fn admin_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default()
}

struct Service {
    name: &'static str,
    process: ChildGuard,
    admin: u16,
}

impl Service {
    async fn metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.admin);
        match admin_client().get(url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// The records the stage is done with: ingest's accepted events, the archiver's records
    /// in whole files, the aggregator's in the store, the enricher's events by every outcome.
    /// `copies`: how many topics the aggregator reads each event from (the enriched one, and
    /// one per repartitioned aggregation).
    async fn done(&self, copies: usize) -> f64 {
        let text = self.metrics().await;
        let filter = format!("service=\"{}\"", self.name);
        match self.name {
            // Records made durable in the store (each read once per topic: a repartitioned
            // event twice, on the enriched topic and on its repartition topic).
            "aggregator" => {
                metric_sum(
                    &text,
                    "instream_stage_latency_seconds_count{",
                    "stage=\"aggregator_visible\"",
                )
                .0 / copies as f64
            }
            "ingest" => metric_sum(&text, "instream_events_total{", "outcome=\"accepted\"").0,
            // Counted when its file is whole.
            "archiver" => metric_sum(&text, "instream_archive_records_total{", "").0,
            _ => metric_sum(&text, "instream_events_total{", &filter).0,
        }
    }
}

/// Waits until each stage of `services` has its partitions assigned (`partitions` of every
/// topic it reads; the aggregator reads `copies` topics), so that the run measures work and
/// not the consumer groups forming. (It did not remove the slow first answers of ingest:
/// those wait for its producer's first round trips, see where the events are made.)
async fn wait_assigned(services: &[Service], partitions: i32, copies: usize) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(60);
    for s in services.iter().filter(|s| s.name != "ingest") {
        let topics = if s.name == "aggregator" { copies } else { 1 };
        let want = f64::from(partitions) * topics as f64;
        while metric_sum(&s.metrics().await, "instream_assigned_partitions{", "").0 < want {
            if Instant::now() > deadline {
                return Err(
                    format!("{} not assigned {want} partitions within 60 s", s.name).into(),
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Starts the services `names`, each in a folder of its own under `dir` (ingest listening on
/// `http`), and waits until every one is ready.
async fn start_services(
    dir: &Path,
    (bootstrap, redis, definitions): (&str, &str, &str),
    http: u16,
    names: &[&'static str],
) -> Result<Vec<Service>, Error> {
    let consumer = "[kafka.consumer]\n\"fetch.wait.max.ms\" = \"10\"\n";
    let sections = |name: &str, folder: &Path| match name {
        "ingest" => {
            format!("[ingest]\nlisten = \"127.0.0.1:{http}\"\nallow_anonymous = true\n")
        }
        "enricher" => format!(
            "{consumer}[refdata]\nbackend = \"redis\"\nredis_url = \"{redis}\"\n\
             [enricher]\ndelivery = \"at_least_once\"\n"
        ),
        "aggregator" => format!(
            "{consumer}[store]\nbackend = \"local\"\npath = \"{}\"\n",
            folder.join("store.redb").display()
        ),
        _ => format!(
            "{consumer}[archive]\nbackend = \"local\"\nroot = \"{}\"\n\
             [archiver]\nroll_max_age = \"1s\"\n",
            folder.join("archive").display()
        ),
    };
    let mut services = Vec::new();
    for &name in names {
        let folder = dir.join(name);
        std::fs::create_dir_all(&folder)?;
        let (process, admin) = spawn_bench_service(
            &format!("instream-{name}"),
            &folder,
            bootstrap,
            definitions,
            &sections(name, &folder),
        )?;
        services.push(Service {
            name,
            process,
            admin,
        });
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    for s in &services {
        let ready = format!("http://127.0.0.1:{}/readyz", s.admin);
        while !matches!(admin_client().get(&ready).send().await, Ok(r) if r.status() == 200) {
            if Instant::now() > deadline {
                return Err(format!("{} not ready within 120 s", s.name).into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(services)
}

#[derive(Default)]
struct Posted {
    accepted: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
    refused: Mutex<BTreeMap<String, u64>>,
}

/// Posts every body once over `connections` connections, each request `interval` after the
/// last one of its connection when given (latency then counted from its scheduled start).
async fn post_all(
    url: String,
    bodies: Vec<bytes::Bytes>,
    connections: usize,
    interval: Option<Duration>,
) -> Arc<Posted> {
    let posted = Arc::new(Posted::default());
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for w in 0..connections {
        let (url, bodies, next, posted) =
            (url.clone(), bodies.clone(), next.clone(), posted.clone());
        workers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut n = 0u32;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(body) = bodies.get(i) else { return };
                let scheduled = match interval {
                    Some(every) => {
                        let at = start + every.mul_f64(n as f64 + w as f64 / connections as f64);
                        tokio::time::sleep_until(at.into()).await;
                        at
                    }
                    None => Instant::now(),
                };
                n += 1;
                let answer = client
                    .post(&url)
                    .header("content-type", "application/x-ndjson")
                    .body(body.clone())
                    .send()
                    .await;
                let took = scheduled.elapsed().as_micros() as u64;
                let status = match answer {
                    Ok(r) if r.status().is_success() => {
                        let json: serde_json::Value = r.json().await.unwrap_or_default();
                        let accepted = json["accepted"].as_u64().unwrap_or(0);
                        posted.accepted.fetch_add(accepted, Ordering::Relaxed);
                        None
                    }
                    Ok(r) => Some(r.status().as_u16().to_string()),
                    Err(e) => Some(format!("error: {e}")),
                };
                if let Some(status) = status {
                    *posted.refused.lock().unwrap().entry(status).or_default() += 1;
                }
                posted.latencies_us.lock().unwrap().push(took);
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    posted
}

/// The upper bound of the bucket holding quantile `q` of histogram `metric` with `filter`
/// among its labels (Prometheus exposition), in seconds; `None` without observations.
fn bucket_quantile(text: &str, metric: &str, filter: &str, q: f64) -> Option<f64> {
    let prefix = format!("{metric}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(filter))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, count)| *count >= q * total)
        .map(|(le, _)| *le)
}

/// The counts of `aggregation`'s windows in the aggregator's local store (the aggregator
/// stopped).
async fn windows_sum(store: &Path, pipeline: &str, aggregation: &str) -> Result<i64, Error> {
    let config = instream_core::config::Config::from_toml(&format!(
        "[store]\nbackend = \"local\"\npath = \"{}\"\n",
        store.display()
    ))?;
    let store = instream_store::build(&config.store).await?;
    let windows = store
        .windows_between(pipeline, aggregation, i64::MIN, i64::MAX)
        .await?;
    Ok(windows.iter().map(|w| w.count).sum())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let o = options()?;
    let job = job(&o)?;
    let pipeline = job.pipeline.name.clone();
    let dir = tempfile::tempdir()?;
    let (bootstrap, broker) = instream_testkit::bench_broker()?;
    let redis = instream_testkit::RedisServer::start()?;
    match &o.refdata {
        Some(path) => {
            seed_refdata(&redis.url(), path).await?;
        }
        None if job.builtin => {
            instream_testkit::seed_bidders(&redis.url(), BIDDERS, |b| format!("City {}", b % 50))
                .await?
        }
        None => {}
    }
    let kinds: Vec<String> = instream_pipeline::topics::of_pipeline(&job.pipeline)
        .into_iter()
        .map(|topic| topic[pipeline.len() + 1..].to_owned())
        .collect();
    let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
    instream_testkit::bench_topics(&bootstrap, &pipeline, &kinds, job.pipeline.partitions).await?;
    let copies = 1 + job
        .pipeline
        .aggregations
        .iter()
        .filter(|a| a.repartitioned())
        .count();
    let http = instream_testkit::free_port()?;
    let redis_url = redis.url();
    let servers = (
        bootstrap.as_str(),
        redis_url.as_str(),
        job.definitions.as_str(),
    );
    // With --prefill 1 the stages start once every event is on the raw topic.
    let first = if o.prefill { &STAGES[..1] } else { &STAGES[..] };
    let mut services = start_services(dir.path(), servers, http, first).await?;
    wait_assigned(&services, job.pipeline.partitions, copies).await?;
    // Made once the services are up, as before this option existed: the producers' first
    // requests to the broker (metadata, idempotence) take up to ~1 s, and posts arriving in
    // that time would measure the start-up, not the work.
    let (bodies, events) = match &o.events_file {
        Some(path) => file_bodies(path, o.batch)?,
        None => {
            // Event times across the end of the hour before last, half of them on each side:
            // its window closes during the run (a window close is part of the work measured).
            let hour = 3_600_000;
            let boundary = (instream_event::now_millis() - hour).div_euclid(hour) * hour;
            let first = boundary - (o.events.min(3_600_000) / 2) as i64;
            (bodies(o.events, o.batch, first), o.events)
        }
    };
    let mut pids: Vec<(&str, u32)> = services
        .iter()
        .map(|s| (s.name, s.process.0.id()))
        .collect();
    if let Some(b) = &broker {
        pids.push(("broker", b.0.id()));
    }
    pids.push(("generator", std::process::id()));
    let mut cpu_before: Vec<f64> = pids.iter().map(|(_, pid)| cpu_seconds(*pid)).collect();
    let mut started = Instant::now();
    let url = format!("http://127.0.0.1:{http}/v1/pipelines/{pipeline}/events");
    let interval = o
        .rate
        .map(|r| Duration::from_secs_f64(o.batch as f64 * o.connections as f64 / r));
    let mut posting = Some(tokio::spawn(post_all(url, bodies, o.connections, interval)));
    // Each stage's last event: when its count reached what ingest accepted.
    let mut finished: BTreeMap<&str, f64> = BTreeMap::new();
    let mut posted = None;
    if o.prefill {
        let p = posting.take().ok_or("posting")?.await?;
        finished.insert("ingest", started.elapsed().as_secs_f64());
        posted = Some(p);
        let stages = start_services(dir.path(), servers, http, &STAGES[1..]).await?;
        wait_assigned(&stages, job.pipeline.partitions, copies).await?;
        // In the order of STAGES, after ingest; their CPU and time counted from here.
        let started_pids: Vec<(&str, u32)> =
            stages.iter().map(|s| (s.name, s.process.0.id())).collect();
        cpu_before.splice(1..1, started_pids.iter().map(|(_, pid)| cpu_seconds(*pid)));
        pids.splice(1..1, started_pids);
        services.extend(stages);
        started = Instant::now();
    }
    // Fifteen minutes, or twice the time the rate asks for.
    let paced = o.rate.map_or(0.0, |r| events as f64 / r * 2.0);
    let deadline = started + Duration::from_secs_f64(paced.max(900.0));
    // A stage that is neither done nor moving for a minute is stuck: say where, not hang.
    let mut progress: BTreeMap<&str, (f64, Instant)> = BTreeMap::new();
    loop {
        if posting.as_ref().is_some_and(|p| p.is_finished()) {
            let p = posting.take().ok_or("posting")?.await?;
            finished.insert("ingest", started.elapsed().as_secs_f64());
            posted = Some(p);
        }
        if let Some(p) = &posted {
            let accepted = p.accepted.load(Ordering::Relaxed) as f64;
            for s in &services[1..] {
                if finished.contains_key(s.name) {
                    continue;
                }
                let done = s.done(copies).await;
                if done >= accepted {
                    finished.insert(s.name, started.elapsed().as_secs_f64());
                    continue;
                }
                let (last, since) = progress.entry(s.name).or_insert((done, Instant::now()));
                if done > *last {
                    (*last, *since) = (done, Instant::now());
                } else if since.elapsed() > Duration::from_secs(60) {
                    return Err(format!(
                        "{} stalled: {done} of {accepted} events for 60 s (done: {finished:?})",
                        s.name
                    )
                    .into());
                }
            }
            if finished.len() == STAGES.len() {
                break;
            }
        }
        for s in &mut services {
            if s.process.exited() {
                return Err(format!("{} exited during the run", s.name).into());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("stages not done in time: done {finished:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let posting = posted.ok_or("posting did not finish")?;
    let refused = posting.refused.lock().unwrap().clone();
    if !refused.is_empty() {
        // A refused batch may be partly written (answered 503 after the broker took some):
        // the counts below would not be comparable. Measure at a rate ingest takes whole.
        return Err(format!(
            "ingest refused requests ({refused:?}): the run measures only what was taken whole; \
             try a lower --rate or more --connections"
        )
        .into());
    }
    let cpu_after: Vec<f64> = pids.iter().map(|(_, pid)| cpu_seconds(*pid)).collect();
    let accepted = posting.accepted.load(Ordering::Relaxed);
    let mut counts = BTreeMap::new();
    let mut texts = BTreeMap::new();
    for s in &services {
        counts.insert(s.name, s.done(copies).await as u64);
        texts.insert(s.name, s.metrics().await);
    }
    for s in &mut services {
        s.process.terminate()?;
        let status = s.process.wait_exit(Duration::from_secs(60))?;
        if !status.success() {
            return Err(format!("{} stopped with {status}", s.name).into());
        }
    }
    let store = dir.path().join("aggregator").join("store.redb");
    let mut in_store = BTreeMap::new();
    for a in &job.pipeline.aggregations {
        in_store.insert(
            a.name.as_str(),
            windows_sum(&store, &pipeline, &a.name).await?,
        );
    }

    let mut stages = serde_json::Map::new();
    for (i, (name, _)) in pids.iter().enumerate() {
        let cpu = cpu_after[i] - cpu_before[i];
        let mut stage = serde_json::json!({ "cpu_seconds": (cpu * 100.0).round() / 100.0 });
        if let Some(seconds) = finished.get(name) {
            stage["events_per_s"] = serde_json::json!((accepted as f64 / seconds).round());
            stage["events_per_cpu_second"] =
                serde_json::json!((accepted as f64 / cpu.max(0.001)).round());
        }
        stages.insert((*name).to_owned(), stage);
    }
    let mut latencies = std::mem::take(&mut *posting.latencies_us.lock().unwrap());
    latencies.sort_unstable();
    let ms = |sorted: &[u64], p| (instream_testkit::percentile_ms(sorted, p) * 10.0).round() / 10.0;
    let stage_latency = |service: &str, stage: &str, q: f64| {
        bucket_quantile(
            &texts[service],
            "instream_stage_latency_seconds",
            &format!("stage=\"{stage}\""),
            q,
        )
    };
    let lost_or_doubled = STAGES
        .iter()
        .any(|s| counts.get(s).copied() != Some(accepted))
        || (job.builtin && in_store.values().any(|n| *n != accepted as i64));
    let pipeline_cpu: f64 = (0..4).map(|i| cpu_after[i] - cpu_before[i]).sum();
    println!(
        "{}",
        serde_json::json!({
            "pipeline": pipeline,
            "events_posted": events,
            "accepted": accepted,

            "rate": o.rate,
            "connections": o.connections,
            "batch": o.batch,
            "partitions": job.pipeline.partitions,
            "seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            "end_to_end_events_per_s": (accepted as f64 / finished.values().fold(0.0, |a: f64, b| a.max(*b))).round(),
            "enricher_and_aggregator_events_per_cpu_second": (accepted as f64 / (
                (cpu_after[1] - cpu_before[1]) + (cpu_after[2] - cpu_before[2])).max(0.001)).round(),
            "four_services_events_per_cpu_second": (accepted as f64 / pipeline_cpu.max(0.001)).round(),
            "stages": stages,
            "latency": {
                "ingest_answer_ms": {
                    "p50": ms(&latencies, 0.5),
                    "p99": ms(&latencies, 0.99),
                    "max": ms(&latencies, 1.0),
                },
                "accepted_to_enriched_bucket_s": {
                    "p50": stage_latency("enricher", "enricher", 0.5),
                    "p99": stage_latency("enricher", "enricher", 0.99),
                },
                "accepted_to_store_bucket_s": {
                    "p50": stage_latency("aggregator", "aggregator_visible", 0.5),
                    "p99": stage_latency("aggregator", "aggregator_visible", 0.99),
                },
                "window_close_to_store_bucket_s": {
                    "p99": bucket_quantile(&texts["aggregator"], "instream_window_close_delay_seconds", "", 0.99),
                },
            },
            "counts": { "stages": counts, "windows_sum_in_store": in_store },
            "repartitioned_aggregations": copies - 1,
            "prefilled": o.prefill,
            "lost_or_doubled": lost_or_doubled,
        })
    );
    drop(broker);
    if lost_or_doubled {
        return Err(
            "a stage's count or the store's windows differ from what ingest accepted".into(),
        );
    }
    Ok(())
}
