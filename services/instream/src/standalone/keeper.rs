//! Standalone's reader of the topics no stage reads — `<pipeline>.dlq` and `<pipeline>.quality`
//! — which copies every record to `<standalone.data_dir>/topics/<topic>.jsonl` as it comes and
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
use instream_pipeline::{topics, Catalog};
use instream_stage::Subscription;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The keeper's service name (its group is `<kafka.group_prefix>-keeper`).
pub const SERVICE: &str = "keeper";

/// The topics the keeper copies: every pipeline's dead letters and quality records.
fn side_topics(catalog: &Catalog) -> Vec<String> {
    catalog
        .iter()
        .flat_map(|p| [topics::dead_letter(&p.name), topics::quality(&p.name)])
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

pub async fn run(
    config: Config,
    mut catalog: watch::Receiver<Arc<Catalog>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let dir = config.standalone.data_dir.join("topics");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut subscription = Subscription::new(&config, SERVICE, &mut catalog, side_topics)?;
    // Written in the enricher's transactions when it uses them.
    let transactional = config.enricher_transactional();
    let mut continuity = Continuity::new(SERVICE, &config.kafka, move |_| transactional);
    let mut files: HashMap<String, std::io::BufWriter<std::fs::File>> = HashMap::new();
    let mut batch = Vec::new();
    loop {
        let consumer = subscription.consumer();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            received = recv_batch(consumer, 5_000, Duration::from_millis(200), &mut batch) => received?,
        }
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
