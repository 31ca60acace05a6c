//! `instream demo`: the standalone platform driven by a Nexmark-shaped auction stream through
//! the HTTP ingest, with a live view while it runs (when stdout is a terminal) and a summary
//! that checks every accepted event reached the aggregates (or the dead-letter topic) and the
//! archive.

mod nexmark;
mod view;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use instream_core::config::Config;
use instream_store::EmbeddedStore;
use tokio_util::sync::CancellationToken;

use crate::standalone::Standalone;
use view::{Frame, Totals};

const PIPELINE: &str = "bids";
const HOT_AGGREGATION: &str = "bids_per_auction_10s";
const CATEGORY_AGGREGATION: &str = "bids_per_auction_category_1m";

/// Bids keyed by auction (so one auction's bids stay in order, as Nexmark's hot-items query
/// needs), enriched with the auction (its category must exist: an unknown auction is
/// dead-lettered) and the bidder (city and state; a miss passes through unenriched).
const DEFINITIONS: &str = r#"
[[pipelines]]
name = "bids"
key_field = "auction"
time_field = "date_time"
required_fields = ["bidder", "price"]
partitions = 4

[[pipelines.enrichments]]
name = "auction"
key_template = "auction:{auction}"
fields = { category = "category", seller = "seller" }
on_miss = "dead_letter"

[[pipelines.enrichments]]
name = "bidder"
key_template = "person:{bidder}"
fields = { city = "bidder_city", state = "bidder_state" }

[[pipelines.aggregations]]
name = "bids_per_auction_10s"
window = { kind = "tumbling", size = "10s" }

[[pipelines.aggregations]]
name = "bids_per_auction_category_1m"
group_by = ["key", "enrichment.category"]
window = { kind = "tumbling", size = "1m" }
"#;

/// Marks a directory the demo created, so that a later run clears only what it wrote.
const MARKER: &str = ".instream-demo";

fn demo_config(data: &Path) -> anyhow::Result<Config> {
    use instream_core::config::{
        ArchiveBackend, BrokerMode, DefinitionSourceKind, RefDataBackend, StoreBackend,
    };
    std::fs::create_dir_all(data)
        .with_context(|| format!("creating the demo's directory {}", data.display()))?;
    let definitions = data.join("definitions.toml");
    std::fs::write(&definitions, DEFINITIONS)?;
    let seed = data.join("reference-data.jsonl");
    std::fs::write(&seed, nexmark::reference_data())?;
    let archive = fresh_archive(data)?;

    let mut config = Config::default();
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.admin.listen = local;
    config.ingest.listen = local;
    config.ingest.allow_anonymous = true;
    config.shutdown.drain_timeout = Duration::from_secs(5);
    config.kafka.broker = BrokerMode::Embedded;
    config.kafka.replication_factor = 1;
    config.kafka.session_timeout = Duration::from_secs(6);
    config.kafka.commit_interval = Duration::from_millis(500);
    config.kafka.statistics_interval = Duration::from_secs(1);
    // The embedded broker answers fetches at once; short waits keep the demo's latency low.
    for (k, v) in [
        ("fetch.wait.max.ms", "10"),
        ("fetch.queue.backoff.ms", "10"),
    ] {
        config.kafka.consumer.insert(k.into(), v.into());
    }
    config.definitions.source = DefinitionSourceKind::File;
    config.definitions.path = Some(definitions);
    config.refdata.backend = RefDataBackend::Memory;
    config.refdata.seed_file = Some(seed);
    config.store.backend = StoreBackend::Embedded;
    config.archive.backend = ArchiveBackend::Local;
    config.archive.root = archive.to_string_lossy().into_owned();
    config.standalone.data_dir = data.to_path_buf();
    // Each demo starts from an empty archive (see `fresh_archive`).
    config.standalone.archive_per_run = false;
    config.aggregator.flush_interval = Duration::from_millis(500);
    config.archiver.roll_max_age = Duration::from_secs(2);
    config.query_api.listen = local;
    config.query_api.allow_anonymous = true;
    config.validate()?;
    Ok(config)
}

/// A fresh archive directory per run (the embedded broker starts empty, so offsets start at 0
/// again). Only a directory an earlier demo created — it holds the marker — is removed.
fn fresh_archive(data: &Path) -> anyhow::Result<std::path::PathBuf> {
    let archive = data.join("archive");
    if archive.exists() {
        if !archive.join(MARKER).exists() {
            bail!(
                "{} exists and was not made by the demo; choose another --data-dir",
                archive.display()
            );
        }
        std::fs::remove_dir_all(&archive)
            .with_context(|| format!("clearing the last run's {}", archive.display()))?;
    }
    std::fs::create_dir_all(&archive)?;
    std::fs::write(
        archive.join(MARKER),
        "made by `instream demo`; removed by its next run\n",
    )?;
    Ok(archive)
}

/// What the sender saw: events ingest accepted, and the events it refused by reason code.
#[derive(Default)]
struct Sent {
    accepted: u64,
    refused: BTreeMap<String, u64>,
    /// Batches ingest did not accept even after retrying, by HTTP status.
    failed_batches: BTreeMap<u16, u64>,
}

pub async fn run(duration: Duration, rate: u32, data: &Path) -> anyhow::Result<()> {
    let config = demo_config(data)?;
    let token = CancellationToken::new();
    let started_at = Instant::now();
    let platform = Standalone::start_ready(config, token.clone(), Duration::from_secs(30)).await?;
    let startup = started_at.elapsed();
    let result = drive(&platform, duration, rate, data, startup).await;
    // Whatever happened, the services stop cleanly before the process ends.
    let stopped = platform
        .stop(Duration::from_secs(15), Duration::from_secs(15))
        .await;
    let summary = result?;
    stopped?;
    print!("{summary}");
    if !summary.ends_with(EXACT) {
        bail!("the stages did not account for every accepted event");
    }
    Ok(())
}

const EXACT: &str =
    "  every accepted bid is in the aggregates or the dead-letter topic, and in the archive\n";

/// Sends the stream, shows the view, waits for the stages to catch up, and returns the summary.
async fn drive(
    platform: &Standalone,
    duration: Duration,
    rate: u32,
    data: &Path,
    startup: Duration,
) -> anyhow::Result<String> {
    let store = platform
        .embedded_store
        .clone()
        .context("the demo uses the embedded store")?;
    let live = std::io::stdout().is_terminal();
    let stop = stop_on_ctrl_c()?;
    announce(platform, startup, rate, duration, live);

    let metrics_url = format!("http://{}/metrics", platform.admin_addr);
    let http = reqwest::Client::new();
    let sender = tokio::spawn(send_bids(
        http.clone(),
        format!(
            "http://{}/v1/pipelines/{PIPELINE}/events",
            platform.ingest_addr
        ),
        rate,
        duration,
        stop.clone(),
    ));

    let started = Instant::now();
    let shown = Shown {
        store: &store,
        http: &http,
        metrics_url: &metrics_url,
        duration,
        live,
    };
    shown.progress(&sender, &stop, started).await;
    stop.cancel();
    let sent = sender.await.context("the sender task")??;

    let (aggregated, archive, totals) =
        catch_up(platform, &store, &http, &metrics_url, sent.accepted).await?;
    let categories = per_category(&store);

    let counted = Counted {
        sent: &sent,
        aggregated,
        archive: &archive,
        totals: &totals,
        categories: &categories,
    };
    counted
        .summary(platform, &http, data, started.elapsed(), startup)
        .await
}

/// Says where the demo's endpoints are and what it sends.
fn announce(platform: &Standalone, startup: Duration, rate: u32, duration: Duration, live: bool) {
    let query = platform
        .query_addr
        .map(|a| {
            format!(
                ", aggregates http://{a}/v1/pipelines/{PIPELINE}/aggregates/{HOT_AGGREGATION}?key=1000"
            )
        })
        .unwrap_or_default();
    let progress = if live {
        ""
    } else {
        " (no terminal: progress every 5 s)"
    };
    eprintln!(
        "instream demo: started in {:.2}s; ingest http://{}/v1/pipelines/{PIPELINE}/events, \
         metrics http://{}/metrics{query}; ~{rate} bids/s for {duration:?}{progress}",
        startup.as_secs_f64(),
        platform.ingest_addr,
        platform.admin_addr,
    );
}

/// The bids counted per category, over every window of the category aggregation.
fn per_category(store: &EmbeddedStore) -> BTreeMap<String, i64> {
    let mut categories: BTreeMap<String, i64> = BTreeMap::new();
    store.for_each(|w| {
        if w.aggregation == CATEGORY_AGGREGATION {
            // The group of (key, category): a JSON array of the two.
            let category = serde_json::from_str::<Vec<Option<String>>>(&w.group_key)
                .ok()
                .and_then(|parts| parts.last().cloned().flatten())
                .unwrap_or_else(|| "?".into());
            *categories.entry(category).or_default() += w.count;
        }
    });
    categories
}

/// The first Ctrl-C stops sending and goes on to the summary; a second one exits at once.
/// The handler is registered before the demo says it started, so no Ctrl-C falls between.
fn stop_on_ctrl_c() -> anyhow::Result<CancellationToken> {
    let stop = CancellationToken::new();
    let mut interrupts = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("listening for Ctrl-C")?;
    tokio::spawn({
        let stop = stop.clone();
        async move {
            if interrupts.recv().await.is_some() {
                eprintln!("\ninstream demo: stopping; Ctrl-C again to exit without a summary");
                stop.cancel();
                if interrupts.recv().await.is_some() {
                    std::process::exit(130);
                }
            }
        }
    });
    Ok(stop)
}

/// What the progress view reads.
struct Shown<'a> {
    store: &'a EmbeddedStore,
    http: &'a reqwest::Client,
    metrics_url: &'a str,
    duration: Duration,
    live: bool,
}

impl Shown<'_> {
    /// Redraws the view every second (a line every 5 s without a terminal) while `sender` runs.
    async fn progress<T>(
        &self,
        sender: &tokio::task::JoinHandle<T>,
        stop: &CancellationToken,
        started: Instant,
    ) {
        let (store, http, metrics_url, duration, live) = (
            self.store,
            self.http,
            self.metrics_url,
            self.duration,
            self.live,
        );
        let mut before = Totals::default();
        let mut last = Instant::now();
        let mut next_line = Duration::from_secs(5);
        if live {
            print!("\x1b[2J");
        }
        while !sender.is_finished() {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.cancelled() => {}
            }
            let Ok(now) = scrape(http, metrics_url).await else {
                continue;
            };
            let elapsed = started.elapsed();
            if live {
                let top = top_of_current_window(store);
                let frame = Frame {
                    elapsed,
                    duration,
                    now: &now,
                    before: &before,
                    interval: last.elapsed(),
                    top: &top,
                    top_title: "hot auctions, current 10 s window (bids)",
                }
                .render();
                let mut stdout = std::io::stdout().lock();
                let _ = stdout.write_all(view::redraw(&frame).as_bytes());
                let _ = stdout.flush();
            } else if elapsed >= next_line {
                eprintln!(
                    "instream demo: {:>4}s  ingest {:.0}, enriched {:.0}, aggregated {:.0}, archived {:.0}, dead letters {:.0}",
                    next_line.as_secs(),
                    now.ingested,
                    now.enriched,
                    now.aggregated,
                    now.archived,
                    now.dead_letters
                );
                next_line += Duration::from_secs(5);
            }
            before = now;
            last = Instant::now();
            if stop.is_cancelled() {
                break;
            }
        }
    }
}

/// Waits (a minute at most) until every accepted bid is either counted in the aggregates or
/// dead-lettered by the enricher, and every one is archived.
async fn catch_up(
    platform: &Standalone,
    store: &EmbeddedStore,
    http: &reqwest::Client,
    metrics_url: &str,
    accepted: u64,
) -> anyhow::Result<(u64, Archived, Totals)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    Ok(loop {
        let aggregated = count_in(store, HOT_AGGREGATION);
        let archive = archived(platform).await?;
        let totals = scrape(http, metrics_url).await.unwrap_or_default();
        let caught_up =
            aggregated + totals.dead_letters as u64 >= accepted && archive.distinct_ids >= accepted;
        if caught_up || Instant::now() > deadline {
            break (aggregated, archive, totals);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    })
}

/// What the stages made of the bids sent.
struct Counted<'a> {
    sent: &'a Sent,
    aggregated: u64,
    archive: &'a Archived,
    totals: &'a Totals,
    categories: &'a BTreeMap<String, i64>,
}

impl Counted<'_> {
    /// The summary's lines; it ends with [`EXACT`] when every accepted bid is accounted for.
    async fn summary(
        &self,
        platform: &Standalone,
        http: &reqwest::Client,
        data: &Path,
        took: Duration,
        startup: Duration,
    ) -> anyhow::Result<String> {
        use std::fmt::Write as _;
        let (sent, aggregated, archive, totals, categories) = (
            self.sent,
            self.aggregated,
            self.archive,
            self.totals,
            self.categories,
        );
        let dead = totals.dead_letters as u64;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "instream demo summary ({:.1}s, started in {:.2}s)",
            took.as_secs_f64(),
            startup.as_secs_f64()
        );
        let _ = writeln!(out, "  bids accepted by ingest        : {}", sent.accepted);
        let _ = writeln!(out, "  bids refused by ingest         : {:?}", sent.refused);
        if !sent.failed_batches.is_empty() {
            let _ = writeln!(
                out,
                "  batches that failed, by status : {:?}",
                sent.failed_batches
            );
        }
        let _ = writeln!(out, "  bids in the aggregates         : {aggregated}");
        let _ = writeln!(out, "  bids dead-lettered (no auction): {dead}");
        let _ = writeln!(
            out,
            "  bids in the archive            : {} ({} distinct event ids)",
            archive.records, archive.distinct_ids
        );
        let _ = writeln!(
            out,
            "  refdata hit ratio              : {:.2}% of {:.0} lookups",
            100.0 * totals.lookups_found / totals.lookups.max(1.0),
            totals.lookups
        );
        let _ = writeln!(out, "  bids per auction category      : {categories:?}");
        if let Some(addr) = platform.query_addr {
            out.push_str(&hot_auction(http, addr).await?);
        }
        let _ = writeln!(
            out,
            "  archive                        : {}",
            data.join("archive").display()
        );
        // The archive keeps raw input as received: a batch retried after a 503 that had been
        // partly written holds repeats there (same event ids), which the aggregates dropped.
        if archive.records > archive.distinct_ids {
            let _ = writeln!(
                out,
                "  repeats in the archive         : {} (retried batches; dropped before the aggregates)",
                archive.records - archive.distinct_ids
            );
        }
        let exact = aggregated + dead == sent.accepted && archive.distinct_ids == sent.accepted;
        if exact {
            out.push_str(EXACT);
        }
        Ok(out)
    }
}

/// The hottest auction's windows, read back from query-api the way a dashboard would: the
/// summary's line.
async fn hot_auction(http: &reqwest::Client, addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let url = format!(
        "http://{addr}/v1/pipelines/{PIPELINE}/aggregates/{HOT_AGGREGATION}?key=1000&from=0"
    );
    let page: serde_json::Value = http.get(&url).send().await?.json().await?;
    let windows = page["windows"].as_array().map_or(0, Vec::len);
    let bids: i64 = page["windows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["count"].as_i64())
        .sum();
    Ok(format!(
        "  query-api, auction 1000        : {bids} bids in {windows} windows ({url})\n"
    ))
}

/// Posts bids in batches every 100 ms at `rate` per second until `duration` or `stop`.
async fn send_bids(
    http: reqwest::Client,
    url: String,
    rate: u32,
    duration: Duration,
    stop: CancellationToken,
) -> anyhow::Result<Sent> {
    let mut bids = nexmark::Bids::default();
    let mut sent = Sent::default();
    let per_tick = (rate as usize / 10).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut batch = 0u64;
    while started.elapsed() < duration {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        let now = instream_event::now_millis();
        let body: Vec<serde_json::Value> = (0..per_tick).map(|_| bids.next_bid(now)).collect();
        // A batch answered 503 (overload) is sent again after Retry-After with the same
        // Idempotency-Key, so its events keep their ids and are counted once.
        let key = format!("demo-{batch}");
        batch += 1;
        let mut attempt = 0;
        let (status, json) = loop {
            attempt += 1;
            let answer = http
                .post(&url)
                .header("idempotency-key", &key)
                .json(&body)
                .send()
                .await
                .context("posting to ingest")?;
            let status = answer.status();
            let retry_after = answer
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1);
            let json: serde_json::Value = answer.json().await.unwrap_or_default();
            if status != reqwest::StatusCode::SERVICE_UNAVAILABLE || attempt >= 5 {
                break (status, json);
            }
            tokio::time::sleep(Duration::from_secs(retry_after)).await;
        };
        if !status.is_success() {
            eprintln!("instream demo: ingest answered {status}: {json}");
            *sent.failed_batches.entry(status.as_u16()).or_default() += 1;
            continue;
        }
        sent.accepted += json["accepted"].as_u64().unwrap_or(0);
        for refused in json["rejected"].as_array().into_iter().flatten() {
            let code = refused["code"].as_str().unwrap_or("?").to_owned();
            *sent.refused.entry(code).or_default() += 1;
        }
    }
    Ok(sent)
}

async fn scrape(http: &reqwest::Client, url: &str) -> anyhow::Result<Totals> {
    let text = http.get(url).send().await?.text().await?;
    Ok(Totals::from_exposition(&text)?)
}

fn count_in(store: &EmbeddedStore, aggregation: &str) -> u64 {
    let mut total = 0i64;
    store.for_each(|w| {
        if w.aggregation == aggregation {
            total += w.count;
        }
    });
    total.max(0) as u64
}

/// The ten busiest auctions of the newest 10-second window the store holds.
fn top_of_current_window(store: &EmbeddedStore) -> Vec<(String, i64)> {
    let mut newest = i64::MIN;
    store.for_each(|w| {
        if w.aggregation == HOT_AGGREGATION {
            newest = newest.max(w.window_start);
        }
    });
    let mut top: Vec<(String, i64)> = Vec::new();
    store.for_each(|w| {
        if w.aggregation == HOT_AGGREGATION && w.window_start == newest {
            top.push((format!("auction {}", w.group_key), w.count));
        }
    });
    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    top.truncate(10);
    top
}

/// What the archive holds: records, and how many distinct event ids among them.
struct Archived {
    records: u64,
    distinct_ids: u64,
}

async fn archived(platform: &Standalone) -> anyhow::Result<Archived> {
    use std::io::BufRead;
    let mut records = 0u64;
    let mut ids = std::collections::HashSet::new();
    for f in platform.archive.list(PIPELINE).await? {
        let bytes = platform.archive.get(&f.path).await?;
        let text = zstd::stream::decode_all(&bytes[..]).context("reading an archive file")?;
        for line in text.lines() {
            let line = line?;
            records += 1;
            let event = instream_event::decode(line.as_bytes())
                .with_context(|| format!("an archived line of {} is not an event", f.path))?;
            ids.insert(event.event_id);
        }
    }
    Ok(Archived {
        records,
        distinct_ids: ids.len() as u64,
    })
}
