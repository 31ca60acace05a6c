//! `instream audit`: per hour of ingest time, what each stage made of every raw record, and
//! whether it balances. The counts come from the data itself, not from metrics: the raw topic
//! read over the range, each record then looked for among the enricher's outputs and dead
//! letters (by the origin they carry) and among the archive's offsets. See
//! docs/guarantees.md, "Auditing what happened".

use std::time::{Duration, Instant};

use anyhow::Context;
use instream_audit::{AuditReport, Ledger};
use instream_core::config::{BrokerMode, Config};
use instream_pipeline::topics;
use instream_store::LedgerRow;

use crate::output::{emit, emit_json, table, Output};

/// How often an unbalanced audit is made again while `--settle` lasts.
const SETTLE_EVERY: Duration = Duration::from_secs(5);

#[derive(clap::Args)]
pub struct AuditArgs {
    #[command(flatten)]
    config: crate::ConfigArg,
    #[arg(long)]
    pipeline: String,
    /// The first hour of ingest time (RFC 3339; widened to its hour).
    #[arg(long, value_parser = crate::ops::parse_time)]
    from: i64,
    /// The end of the range of ingest time (RFC 3339; widened to a whole hour).
    #[arg(long, value_parser = crate::ops::parse_time)]
    to: i64,
    /// How long to keep auditing again while something does not balance: time for records
    /// still in flight (`2m`). The exit code is non-zero if it still does not balance.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Leave the archive out (a deployment that does not archive this pipeline).
    #[arg(long)]
    no_archive: bool,
    #[command(flatten)]
    output: crate::output::OutputArg,
}

pub async fn audit(args: AuditArgs) -> anyhow::Result<()> {
    if args.to <= args.from {
        anyhow::bail!("--to must be after --from");
    }
    let config = crate::standalone::state::cli_config(
        args.config.as_deref(),
        // The embedded broker lives inside a running standalone.
        true,
    )?;
    let deadline = Instant::now() + args.settle;
    let report = loop {
        let report = collect(&config, &args).await?;
        let now = Instant::now();
        if report.balanced || now >= deadline {
            break report;
        }
        eprintln!(
            "{} differences; auditing again in {:?} (settling for {:?} more)",
            report.differences.len(),
            SETTLE_EVERY,
            deadline - now
        );
        tokio::time::sleep(SETTLE_EVERY.min(deadline - now)).await;
    };
    match args.output.output {
        Output::Json => emit_json(&serde_json::to_value(&report)?)?,
        Output::Table => emit(&as_table(&report))?,
    }
    if !report.balanced {
        anyhow::bail!(
            "the audit of `{}` does not balance: {} differences (above)",
            report.pipeline,
            report.differences.len()
        );
    }
    Ok(())
}

async fn collect(config: &Config, args: &AuditArgs) -> anyhow::Result<AuditReport> {
    let pipeline = &args.pipeline;
    let (mut ledger, mut notes) =
        instream_audit::read_topics(&config.kafka, pipeline, args.from, args.to).await?;
    if config.kafka.broker == BrokerMode::Embedded
        && config.store.backend != instream_core::config::StoreBackend::Embedded
    {
        // The embedded broker starts empty with each run, the store file does not.
        if let Some(run) =
            crate::standalone::state::RunState::read(&config.standalone.state_file())?
        {
            ledger.broker_started(run.started_at_ms);
        }
    }
    if !args.no_archive {
        read_archive(config, pipeline, &mut ledger, &mut notes).await?;
    }
    let def = crate::control::current_catalog(config)
        .await?
        .get(pipeline)
        .cloned()
        .with_context(|| format!("no pipeline `{pipeline}` is defined"))?;
    let aggregations = instream_audit::aggregations_of(&def);
    if aggregations.is_empty() {
        notes.push("the pipeline has no aggregation: the aggregator is not audited".into());
    } else {
        let (from, to) = ledger.range();
        let rows = aggregator_ledger(config, pipeline, from, to).await?;
        ledger.aggregator(&rows, aggregations, &topics::enriched(pipeline));
    }
    if config.kafka.broker == BrokerMode::Embedded {
        notes.push(
            "standalone: the embedded broker holds this run's records only (it starts empty)"
                .into(),
        );
    }
    let refusals = match ingest_refusals(config, pipeline).await {
        Ok(refusals) => Some(refusals),
        Err(why) => {
            notes.push(format!("ingest's refusals not shown: {why}"));
            None
        }
    };
    let mut report = instream_audit::report(pipeline, &ledger, !args.no_archive, notes);
    report.ingest_refusals = refusals;
    Ok(report)
}

/// The `/metrics` addresses of the ingest processes running now: the registry's (ZooKeeper),
/// or the running standalone's.
async fn ingest_admins(config: &Config) -> anyhow::Result<Vec<String>> {
    if config.kafka.broker == BrokerMode::Embedded {
        let run = crate::standalone::state::RunState::read(&config.standalone.state_file())?
            .filter(|_| crate::standalone::state::running(config))
            .context("no standalone runs")?;
        return Ok(vec![run.admin]);
    }
    if config.definitions.source != instream_core::config::DefinitionSourceKind::Zookeeper {
        anyhow::bail!("the registry lives in ZooKeeper, and this config does not use it");
    }
    let instances = instream_coord::coordinator(config)
        .instances()
        .await
        .context("reading the service registry")?;
    Ok(instances
        .iter()
        .filter(|i| i.service == instream_core::Service::Ingest.as_str())
        .map(|i| i.typed().admin)
        .filter(|a| !a.is_empty())
        .collect())
}

/// Ingest's refusals of `pipeline`'s events by code (`instream_events_rejected_total`), summed
/// over the ingest processes that answer.
async fn ingest_refusals(
    config: &Config,
    pipeline: &str,
) -> anyhow::Result<instream_audit::IngestRefusals> {
    let admins = ingest_admins(config).await?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let mut refusals = instream_audit::IngestRefusals {
        approximate: true,
        processes: admins.len(),
        ..Default::default()
    };
    for admin in admins {
        let Ok(answer) = client.get(format!("http://{admin}/metrics")).send().await else {
            continue;
        };
        let Ok(text) = answer.text().await else {
            continue;
        };
        let Ok(scrape) = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        else {
            continue;
        };
        refusals.answered += 1;
        for s in scrape.samples.iter().filter(|s| {
            s.metric == "instream_events_rejected_total"
                && s.labels.get("service") == Some("ingest")
                && s.labels.get("pipeline") == Some(pipeline)
        }) {
            if let prometheus_parse::Value::Counter(n) = s.value {
                let code = s.labels.get("code").unwrap_or("?").to_owned();
                *refusals.by_code.entry(code).or_default() += n as u64;
            }
        }
    }
    Ok(refusals)
}

/// The aggregator's ledger rows of the hours in `[from, to)`: from the store, or — when a
/// standalone runs with this config (its store is in its process, or a file it holds open) —
/// from its query API.
async fn aggregator_ledger(
    config: &Config,
    pipeline: &str,
    from: i64,
    to: i64,
) -> anyhow::Result<Vec<LedgerRow>> {
    let standalone = crate::standalone::state::RunState::read(&config.standalone.state_file())?
        .filter(|_| crate::standalone::state::running(config));
    let Some(run) = standalone else {
        if config.store.backend == instream_core::config::StoreBackend::Embedded {
            anyhow::bail!(
                "store.backend is `embedded`: the aggregator's ledger lives inside `instream \
                 standalone`, and none runs for this config"
            );
        }
        let store = instream_store::build(&config.store)
            .await
            .context("opening the aggregate store")?;
        return store
            .load_ledger(pipeline, from, to)
            .await
            .context("reading the aggregator's ledger");
    };
    let Some(query) = run.query else {
        anyhow::bail!(
            "the running standalone serves no query API ([query_api]): the aggregator's ledger \
             is read through it"
        );
    };
    let client = reqwest::Client::new();
    let mut rows = Vec::new();
    // The API answers at most a month of hours at a time.
    let month = 31 * 24 * instream_audit::HOUR_MS;
    let mut start = from;
    while start < to {
        let end = (start + month).min(to);
        let url = format!("http://{query}/v1/pipelines/{pipeline}/ledger?from={start}&to={end}");
        let mut request = client.get(&url);
        if let Ok(key) = std::env::var("INSTREAM_QUERY_API_KEY") {
            request = request.bearer_auth(key);
        }
        let answer = request
            .send()
            .await
            .with_context(|| format!("asking the standalone's query API ({query})"))?;
        let status = answer.status();
        let body: serde_json::Value = answer.json().await.context("reading the ledger")?;
        if !status.is_success() {
            anyhow::bail!("the query API answered {status}: {body}");
        }
        rows.extend(serde_json::from_value::<Vec<LedgerRow>>(
            body["rows"].clone(),
        )?);
        start = end;
    }
    Ok(rows)
}

/// Marks the raw offsets the archive answers for: each partition's offsets from its first to
/// its last file, less the gaps `archive verify` finds.
async fn read_archive(
    config: &Config,
    pipeline: &str,
    ledger: &mut Ledger,
    notes: &mut Vec<String>,
) -> anyhow::Result<()> {
    let archive = instream_archive::build(&config.archive)?;
    let progress = instream_core::Progress::on_stderr("audit: reading the archive", "files", None);
    let report = instream_archiver::verify(archive.as_ref(), pipeline, &progress)
        .await
        .with_context(|| format!("reading the archive of `{pipeline}`"))?;
    progress.finish();
    for problem in &report.problems {
        notes.push(format!("archive: {}: {}", problem.path, problem.problem));
    }
    let partitions: Vec<i32> = ledger.raw_partitions().map(|(p, ..)| p).collect();
    for p in partitions {
        match report.partitions.iter().find(|r| r.partition == p) {
            Some(files) => ledger.archived(p, |o| {
                o >= files.first_offset
                    && o <= files.last_offset
                    && !files.gaps.iter().any(|g| o >= g.first && o <= g.last)
            }),
            None => ledger.archived(p, |_| false),
        }
    }
    Ok(())
}

fn as_table(report: &AuditReport) -> String {
    let mut text = format!(
        "audit of `{}`, ingest time {} to {}\n",
        report.pipeline, report.from, report.to
    );
    text.push_str(&hours_table(report));
    let aggregations = aggregation_rows(report);
    if !aggregations.is_empty() {
        text.push('\n');
        text.push_str(&table(&["HOUR", "AGGREGATION", "RECORDS"], &aggregations));
    }
    for d in &report.differences {
        text.push_str(&format!(
            "DIFFERENCE {} {}: {} {}\n",
            d.hour, d.stage, d.size, d.what
        ));
    }
    if let Some(r) = &report.ingest_refusals {
        let codes: Vec<String> = r.by_code.iter().map(|(c, n)| format!("{c}:{n}")).collect();
        text.push_str(&format!(
            "ingest refused (approximate: since each of {} of {} ingest processes started, not \
             per hour): {}\n",
            r.answered,
            r.processes,
            if codes.is_empty() {
                "none".to_owned()
            } else {
                codes.join(" ")
            }
        ));
    }
    for note in &report.notes {
        text.push_str(&format!("note: {note}\n"));
    }
    text.push_str(if report.balanced {
        "balanced\n"
    } else {
        "NOT BALANCED\n"
    });
    text
}

/// A row per hour: what ingest wrote, the enricher did with it, and the archiver kept.
fn hours_table(report: &AuditReport) -> String {
    let rows: Vec<Vec<String>> = report
        .hours
        .iter()
        .map(|h| {
            let dead: Vec<String> = h
                .enricher
                .dead_lettered
                .iter()
                .map(|(code, n)| format!("{code}:{n}"))
                .collect();
            let (archived, unarchived) = match &h.archiver {
                Some(a) => (a.archived.to_string(), a.missing.to_string()),
                None => ("-".into(), "-".into()),
            };
            vec![
                h.hour.clone(),
                h.ingest.raw_records.to_string(),
                h.ingest.events.to_string(),
                h.ingest.resent_copies.to_string(),
                h.enricher.enriched.to_string(),
                if dead.is_empty() {
                    "0".into()
                } else {
                    dead.join(" ")
                },
                h.enricher.missing.to_string(),
                archived,
                unarchived,
            ]
        })
        .collect();
    table(
        &[
            "HOUR",
            "RAW",
            "EVENTS",
            "RESENT",
            "ENRICHED",
            "DEAD-LETTERED",
            "NOT ENRICHED",
            "ARCHIVED",
            "NOT ARCHIVED",
        ],
        &rows,
    )
}

/// Per hour, the enriched records the aggregator applied and, per aggregation, what became of
/// them.
fn aggregation_rows(report: &AuditReport) -> Vec<Vec<String>> {
    let mut aggregations = Vec::new();
    for h in &report.hours {
        let Some(agg) = &h.aggregator else { continue };
        aggregations.push(vec![
            h.hour.clone(),
            "(applied)".into(),
            format!("{} of {} enriched", agg.applied, agg.enriched_records),
        ]);
        for (name, outcomes) in &agg.aggregations {
            let said: Vec<String> = outcomes.iter().map(|(o, n)| format!("{o}:{n}")).collect();
            aggregations.push(vec![h.hour.clone(), name.clone(), said.join(" ")]);
        }
    }
    aggregations
}
