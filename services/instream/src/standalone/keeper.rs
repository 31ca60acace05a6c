//! Standalone's reader of the topics no stage reads — `<pipeline>.dlq` and `<pipeline>.quality`
//! — which copies every record to `<standalone.data_dir>/topics/run-<n>/<topic>.jsonl` as it
//! comes (the run's number: each run's broker numbers offsets from 0) and
//! only then commits it. The embedded broker deletes the oldest records of a partition beyond
//! 5 MB, read or not; these files keep what it deletes, and the standalone account counts this
//! reader like any stage, so nothing reaches the cap unread.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use instream_core::config::Config;
use instream_kafka::client::{self, recv_batch};
use instream_kafka::{Continuity, Record};
use instream_pipeline::{topics, Catalog, PipelineDefinition};
use instream_stage::Subscription;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The keeper's service name (its group is `<kafka.group_prefix>-keeper`).
pub const SERVICE: &str = "keeper";

/// How long the keeper goes on reading once everything else stopped.
const FINAL_READ: Duration = Duration::from_secs(10);

/// Whether the keeper copies `topic` of `def`: its dead letters and quality records, and its
/// enriched records when no aggregation reads them.
pub fn keeps(def: &PipelineDefinition, topic: &str) -> bool {
    *topic == topics::dead_letter(&def.name)
        || *topic == topics::quality(&def.name)
        || (def.aggregations.is_empty() && *topic == topics::enriched(&def.name))
}

/// The topics the keeper copies.
fn side_topics(catalog: &Catalog) -> Vec<String> {
    catalog
        .iter()
        .flat_map(|p| {
            topics::of_pipeline(p)
                .into_iter()
                .filter(|t| keeps(p, t))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// One line of a copy: the record with where it came from.
#[derive(serde::Serialize)]
struct Line<'a> {
    partition: i32,
    offset: i64,
    key: Option<std::borrow::Cow<'a, str>>,
    headers: HashMap<&'a str, std::borrow::Cow<'a, str>>,
    payload: std::borrow::Cow<'a, str>,
}

/// Copies until `last` is cancelled — which comes once every other task stopped — and then
/// on until it received everything written to its topics (the standalone account says what
/// was), for at most [`FINAL_READ`].
pub async fn run(
    config: Config,
    dir: PathBuf,
    mut catalog: watch::Receiver<Arc<Catalog>>,
    last: CancellationToken,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut subscription = Subscription::new(&config, SERVICE, &mut catalog, side_topics)?;
    // Written in the enricher's transactions when it uses them.
    let transactional = config.enricher_transactional();
    let mut continuity = Continuity::new(SERVICE, &config.kafka, move |_| transactional);
    let mut files: HashMap<String, std::io::BufWriter<std::fs::File>> = HashMap::new();
    let mut batch = Vec::new();
    let mut final_read: Option<tokio::time::Instant> = None;
    loop {
        let consumer = subscription.consumer();
        if last.is_cancelled() {
            let deadline =
                *final_read.get_or_insert_with(|| tokio::time::Instant::now() + FINAL_READ);
            let unread = side_topics(&catalog.borrow())
                .into_iter()
                .map(|t| config.kafka.backlog.as_ref().map_or(0, |b| b.unread(&t)))
                .sum::<u64>();
            if unread == 0 {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::error!(unread_bytes = unread, "stopping before every dead letter and quality record was copied: the rest is lost with the embedded broker");
                break;
            }
        }
        recv_batch(consumer, 5_000, Duration::from_millis(200), &mut batch).await?;
        continuity.check(consumer, &batch).await?;
        for record in &batch {
            let file = match files.get_mut(&record.topic) {
                Some(file) => file,
                None => {
                    let path: PathBuf = dir.join(format!("{}.jsonl", record.topic));
                    let file = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .with_context(|| format!("opening {}", path.display()))?;
                    files
                        .entry(record.topic.clone())
                        .or_insert(std::io::BufWriter::new(file))
                }
            };
            serde_json::to_writer(&mut *file, &line(record))?;
            file.write_all(b"\n")?;
        }
        for file in files.values_mut() {
            file.flush()?;
        }
        client::complete(consumer, &batch);
        client::commit(consumer, false)?;
        subscription.follow(&mut catalog)?;
    }
    client::commit(subscription.consumer(), true)?;
    Ok(())
}

fn line(record: &Record) -> Line<'_> {
    Line {
        partition: record.partition,
        offset: record.offset,
        key: record.key.as_deref().map(String::from_utf8_lossy),
        headers: record
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v)))
            .collect(),
        payload: String::from_utf8_lossy(&record.payload),
    }
}
