//! Operator commands on the control plane and the stores: `pipeline apply|get|list|diff`,
//! `topics create`, `status`, `query` and `refdata load`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use instream_core::config::{Config, RefDataBackend};
use instream_pipeline::{topics, Catalog, PipelineDefinition};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::output::{emit, emit_json, table, Output};

#[derive(Subcommand)]
pub enum PipelineCommand {
    /// Validates pipeline definitions (a TOML or JSON file) and stores them in ZooKeeper,
    /// where every running service picks them up without a restart.
    Apply {
        #[command(flatten)]
        config: crate::ConfigArg,
        /// The definitions file: `[[pipelines]]` tables.
        file: PathBuf,
        #[command(flatten)]
        output: crate::output::OutputArg,
    },
    /// Prints one stored definition (TOML that `pipeline apply` takes back, or JSON).
    Get {
        #[command(flatten)]
        config: crate::ConfigArg,
        name: String,
        #[command(flatten)]
        output: crate::output::OutputArg,
    },
    /// Lists the stored definitions.
    List {
        #[command(flatten)]
        config: crate::ConfigArg,
        #[command(flatten)]
        output: crate::output::OutputArg,
    },
    /// Checks a definitions file as `apply` would, without ZooKeeper: for CI on definitions
    /// kept in Git. Exits non-zero naming the first invalid pipeline and key.
    Validate {
        /// The definitions file: `[[pipelines]]` tables.
        file: PathBuf,
        #[command(flatten)]
        output: crate::output::OutputArg,
    },
    /// Shows what `pipeline apply FILE` would change: per pipeline new, changed or unchanged,
    /// with a line diff of each change. Stores nothing.
    Diff {
        #[command(flatten)]
        config: crate::ConfigArg,
        file: PathBuf,
        #[command(flatten)]
        output: crate::output::OutputArg,
    },
}

#[derive(Subcommand)]
pub enum TopicsCommand {
    /// Creates a pipeline's raw, enriched and dead-letter topics if they are missing (existing
    /// topics are left as they are). Services do this at start too, with the config's defaults.
    Create {
        #[command(flatten)]
        config: crate::ConfigArg,
        #[arg(long)]
        pipeline: String,
        /// Partitions (default: the definition's `partitions`).
        #[arg(long)]
        partitions: Option<i32>,
        /// Replication factor (default: `kafka.replication_factor`).
        #[arg(long)]
        replication: Option<i32>,
        /// Retention, e.g. `7d` (default: `kafka.retention`).
        #[arg(long, value_parser = humantime::parse_duration)]
        retention: Option<Duration>,
        #[command(flatten)]
        output: crate::output::OutputArg,
    },
}

#[derive(Subcommand)]
pub enum RefdataCommand {
    /// Loads a CSV (header row) or JSON-lines file as a new version of one enrichment rule's
    /// reference data in Redis, then switches the rule to it in one step; running enrichers
    /// follow within moments. The previous version is kept for enrichers still on it; older
    /// ones expire ten minutes later.
    Load {
        #[command(flatten)]
        config: crate::ConfigArg,
        /// The records: `.csv` or `.jsonl`.
        file: PathBuf,
        #[arg(long)]
        pipeline: String,
        /// The enrichment rule (its key template and Redis shape decide the keys).
        #[arg(long)]
        rule: String,
        /// The record field that fills the rule's key template; once per template field, in
        /// order (`--key-field code` for `airport:{origin}`).
        #[arg(long = "key-field", required = true)]
        key_fields: Vec<String>,
        #[command(flatten)]
        output: crate::output::OutputArg,
    },
}

/// The definitions the config's source holds now (ZooKeeper or the file).
pub(crate) async fn current_catalog(config: &Config) -> anyhow::Result<Arc<Catalog>> {
    let stop = CancellationToken::new();
    let catalog = instream_coord::definition_source(config)
        .subscribe(stop.clone())
        .await
        .context("reading the pipeline definitions")?;
    stop.cancel();
    let current = catalog.borrow().clone();
    Ok(current)
}

fn definition_of(catalog: &Catalog, name: &str) -> anyhow::Result<Arc<PipelineDefinition>> {
    match catalog.get(name) {
        Some(def) => Ok(def.clone()),
        None => {
            let known: Vec<&str> = catalog.iter().map(|d| d.name.as_str()).collect();
            bail!("no pipeline `{name}` (defined: {})", known.join(", "))
        }
    }
}

fn as_toml(def: &PipelineDefinition) -> anyhow::Result<String> {
    /// The shape `pipeline apply` reads.
    #[derive(serde::Serialize)]
    struct Document<'a> {
        pipelines: [&'a PipelineDefinition; 1],
    }
    toml::to_string(&Document { pipelines: [def] }).context("printing the definition as TOML")
}

fn pretty(def: &PipelineDefinition) -> String {
    serde_json::to_string_pretty(def).unwrap_or_default() + "\n"
}

/// The definitions in `file`, and what ZooKeeper holds now by name (or why it does not parse).
fn read_document(file: &std::path::Path) -> anyhow::Result<instream_pipeline::DefinitionsDocument> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    instream_pipeline::parse_document(&text).with_context(|| format!("{}", file.display()))
}

async fn file_and_stored(
    config: &Config,
    file: &std::path::Path,
) -> anyhow::Result<(
    instream_pipeline::DefinitionsDocument,
    BTreeMap<String, Result<PipelineDefinition, String>>,
)> {
    let document = read_document(file)?;
    let stored = instream_coord::stored_definitions(&config.zookeeper)
        .await?
        .into_iter()
        .map(|s| (s.name, s.definition))
        .collect();
    Ok((document, stored))
}

/// How long after an apply a new version takes over at the earliest by default: ZooKeeper
/// watches reach every service well within it.
const TAKE_OVER_MARGIN_MS: i64 = 10_000;
/// The latest a new version may take over: a year after the apply.
const MAX_TAKE_OVER_MS: i64 = 366 * 24 * 3600 * 1000;

pub async fn pipeline(command: PipelineCommand) -> anyhow::Result<()> {
    match command {
        PipelineCommand::Apply {
            config,
            file,
            output,
        } => apply(config.as_deref(), &file, output.output).await,
        PipelineCommand::Validate { file, output } => validate(&file, output.output),
        PipelineCommand::Get {
            config,
            name,
            output,
        } => get(config.as_deref(), &name, output.output).await,
        PipelineCommand::List { config, output } => list(config.as_deref(), output.output).await,
        PipelineCommand::Diff {
            config,
            file,
            output,
        } => diff(config.as_deref(), &file, output.output).await,
    }
}

/// `pipeline apply`: every definition of the file checked against what is stored, then each
/// new or changed one stored.
async fn apply(config: Option<&Path>, file: &Path, output: Output) -> anyhow::Result<()> {
    let config = Config::load(config)?;
    let (document, stored) = file_and_stored(&config, file).await?;
    // All or nothing: every definition is checked against what is stored before any
    // is written. One stored exactly as in the file is left alone.
    // A new version of a stored one is stamped with the event time it takes over at
    // and keeps the versions before it (docs/pipelines.md).
    let mut plan = Vec::new();
    let mut refused = Vec::new();
    let now = instream_event::now_millis();
    for def in &document.pipelines {
        match stored.get(&def.name) {
            Some(Ok(old)) if old.same_content(def) => plan.push((old.clone(), false)),
            Some(Ok(old)) if old.version >= def.version => refused.push(format!(
                "`{}`: version {} is not above the stored version {}",
                def.name, def.version, old.version
            )),
            Some(Ok(old)) => {
                // Every aggregator must have the new version before it reads an event
                // of the new windows: events may run `max_time_ahead` ahead of
                // their ingest time, and the watches take a moment.
                let ahead = old.max_time_ahead.max(def.max_time_ahead).as_millis() as i64;
                let earliest = now + ahead + TAKE_OVER_MARGIN_MS;
                match def.effective_from {
                    Some(t) if t < earliest => refused.push(format!(
                        "`{}`: effective_from {} is too soon: events up to \
                         max_time_ahead ({ahead} ms) ahead of now may be counted \
                         under the stored version already; use {} or later",
                        def.name,
                        instream_event::format_rfc3339_millis(t),
                        instream_event::format_rfc3339_millis(earliest),
                    )),
                    Some(t) if t > now + MAX_TAKE_OVER_MS => refused.push(format!(
                        "`{}`: effective_from {} is more than a year away",
                        def.name,
                        instream_event::format_rfc3339_millis(t),
                    )),
                    _ => {
                        let next = def.succeeding(old, earliest);
                        match next.validate() {
                            Ok(()) => plan.push((next, true)),
                            Err(e) => refused.push(e.to_string()),
                        }
                    }
                }
            }
            _ => plan.push((def.clone(), true)),
        }
    }
    if !refused.is_empty() {
        bail!("nothing stored: {}", refused.join("; "));
    }
    let mut report = Vec::new();
    let mut text = String::new();
    for (def, write) in plan {
        if write {
            instream_coord::publish_definition(&config.zookeeper, &def).await?;
        }
        let outcome = if write { "stored" } else { "unchanged" };
        let from = def
            .effective_from
            .map(instream_event::format_rfc3339_millis);
        let takes_over = from
            .as_ref()
            .map(|t| format!(", its windows from {t}"))
            .unwrap_or_default();
        text.push_str(&format!(
            "pipeline `{}` version {} {outcome}{takes_over}\n",
            def.name, def.version
        ));
        report.push(json!({"pipeline": def.name, "version": def.version,
            "outcome": outcome, "effective_from": from}));
    }
    match output {
        Output::Table => emit(&text),
        Output::Json => emit_json(&json!(report)),
    }
}

/// `pipeline validate`: the file's definitions checked, nothing stored.
fn validate(file: &Path, output: Output) -> anyhow::Result<()> {
    let document = read_document(file)?;
    let mut text = String::new();
    for def in &document.pipelines {
        text.push_str(&format!(
            "pipeline `{}` version {} valid\n",
            def.name, def.version
        ));
    }
    match output {
        Output::Table => emit(&text),
        Output::Json => emit_json(&json!(document
            .pipelines
            .iter()
            .map(|d| json!({"pipeline": d.name, "version": d.version, "valid": true}))
            .collect::<Vec<_>>())),
    }
}

/// `pipeline get`: one stored definition, as `apply` takes it back.
async fn get(config: Option<&Path>, name: &str, output: Output) -> anyhow::Result<()> {
    let config = Config::load(config)?;
    let stored = instream_coord::stored_definitions(&config.zookeeper).await?;
    let Some(found) = stored.into_iter().find(|s| s.name == name) else {
        bail!("no pipeline `{name}` is stored in ZooKeeper");
    };
    let def = found
        .definition
        .map_err(|e| anyhow::anyhow!("the stored `{name}` is invalid: {e}"))?;
    match output {
        // What `apply` takes back: the stamps (`effective_from`, the versions kept)
        // are the stored version's, not the next one's.
        Output::Table => emit(&as_toml(&def.unstamped())?),
        Output::Json => emit_json(&serde_json::to_value(&def)?),
    }
}

/// `pipeline list`: every stored definition, the invalid ones named.
async fn list(config: Option<&Path>, output: Output) -> anyhow::Result<()> {
    let config = Config::load(config)?;
    let stored = instream_coord::stored_definitions(&config.zookeeper).await?;
    match output {
        Output::Json => emit_json(&json!(stored
            .iter()
            .map(|s| match &s.definition {
                Ok(d) => json!({"name": s.name, "version": d.version,
                    "partitions": d.partitions, "enrichments": d.enrichments.len(),
                    "aggregations": d.aggregations.len(), "modified_ms": s.modified_ms}),
                Err(e) => json!({"name": s.name, "invalid": e, "modified_ms": s.modified_ms}),
            })
            .collect::<Vec<_>>())),
        Output::Table => {
            let rows: Vec<Vec<String>> = stored
                .iter()
                .map(|s| {
                    let modified = instream_event::format_rfc3339_millis(s.modified_ms);
                    match &s.definition {
                        Ok(d) => vec![
                            s.name.clone(),
                            d.version.to_string(),
                            d.partitions.to_string(),
                            d.enrichments.len().to_string(),
                            d.aggregations.len().to_string(),
                            modified,
                        ],
                        Err(e) => vec![
                            s.name.clone(),
                            format!("INVALID: {e}"),
                            String::new(),
                            String::new(),
                            String::new(),
                            modified,
                        ],
                    }
                })
                .collect();
            emit(&table(
                &[
                    "PIPELINE",
                    "VERSION",
                    "PARTITIONS",
                    "ENRICHMENTS",
                    "AGGREGATIONS",
                    "STORED",
                ],
                &rows,
            ))
        }
    }
}

/// `pipeline diff`: what `apply` would change, as unified diffs.
async fn diff(config: Option<&Path>, file: &Path, output: Output) -> anyhow::Result<()> {
    let config = Config::load(config)?;
    let (document, stored) = file_and_stored(&config, file).await?;
    let mut report = Vec::new();
    let mut text = String::new();
    for def in &document.pipelines {
        let new = pretty(def);
        let (state, old) = match stored.get(&def.name) {
            None => ("new", String::new()),
            Some(Ok(old)) if old.same_content(def) => ("unchanged", pretty(old)),
            Some(Ok(old)) => ("changed", pretty(&old.unstamped())),
            Some(Err(_)) => ("replaces an invalid stored definition", String::new()),
        };
        let diff = similar::TextDiff::from_lines(&old, &new)
            .unified_diff()
            .context_radius(3)
            .header(
                &format!("stored/{}", def.name),
                &format!("file/{}", def.name),
            )
            .to_string();
        text.push_str(&format!("pipeline `{}`: {state}\n", def.name));
        if state != "unchanged" {
            text.push_str(&diff);
        }
        report.push(json!({"pipeline": def.name, "state": state, "diff": diff}));
    }
    match output {
        Output::Table => emit(&text),
        Output::Json => emit_json(&json!(report)),
    }
}

pub async fn topics_create(command: TopicsCommand) -> anyhow::Result<()> {
    let TopicsCommand::Create {
        config,
        pipeline,
        partitions,
        replication,
        retention,
        output,
    } = command;
    let config = Config::load(config.as_deref())?;
    let catalog = current_catalog(&config).await?;
    let def = definition_of(&catalog, &pipeline)?;
    let partitions = partitions.unwrap_or(def.partitions);
    if partitions < 1 {
        bail!("--partitions must be at least 1");
    }
    let replication = replication.unwrap_or(config.kafka.replication_factor);
    if replication < 1 {
        bail!("--replication must be at least 1");
    }
    let retention = retention.unwrap_or(config.kafka.retention);
    let specs: Vec<instream_kafka::admin::TopicSpec> = [
        topics::raw(&pipeline),
        topics::enriched(&pipeline),
        topics::dead_letter(&pipeline),
    ]
    .into_iter()
    .map(|name| instream_kafka::admin::TopicSpec { name, partitions })
    .collect();
    let outcomes =
        instream_kafka::admin::create_topics(&config.kafka, &specs, replication, retention)
            .await
            .with_context(|| format!("creating the topics of `{pipeline}`"))?;
    match output.output {
        Output::Json => emit_json(&json!(outcomes
            .iter()
            .map(
                |(t, o)| json!({"topic": t, "outcome": o.as_str(), "partitions": partitions,
                "replication": replication, "retention_ms": retention.as_millis() as u64})
            )
            .collect::<Vec<_>>())),
        Output::Table => {
            let rows: Vec<Vec<String>> = outcomes
                .iter()
                .map(|(t, o)| {
                    let note = match o {
                        instream_kafka::admin::TopicOutcome::Created => format!(
                            "created: {partitions} partitions, replication {replication}, retention {}",
                            humantime::format_duration(retention)
                        ),
                        instream_kafka::admin::TopicOutcome::Existed => {
                            "existed (left as it is)".to_owned()
                        }
                    };
                    vec![t.clone(), note]
                })
                .collect();
            emit(&table(&["TOPIC", "OUTCOME"], &rows))
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub async fn query(
    config: Option<PathBuf>,
    pipeline: String,
    aggregation: String,
    key: String,
    from: Option<i64>,
    to: Option<i64>,
    limit: usize,
    output: Output,
) -> anyhow::Result<()> {
    let config = Config::load(config.as_deref())?;
    let store = instream_store::build(&config.store)
        .await
        .context("opening the aggregate store")?;
    let windows = store
        .query(&instream_store::AggregateQuery {
            pipeline: pipeline.clone(),
            aggregation: aggregation.clone(),
            group_key: key.clone(),
            from: from.unwrap_or(i64::MIN),
            to: to.unwrap_or(i64::MAX),
            limit,
        })
        .await
        .with_context(|| format!("querying `{pipeline}`/`{aggregation}` for key `{key}`"))?;
    match output {
        Output::Json => emit_json(&json!(windows)),
        Output::Table => {
            let rows: Vec<Vec<String>> = windows
                .iter()
                .map(|w| {
                    vec![
                        instream_event::format_rfc3339_millis(w.window_start),
                        instream_event::format_rfc3339_millis(w.window_end),
                        w.count.to_string(),
                        serde_json::Value::Object(w.values.clone()).to_string(),
                        w.definition_version.to_string(),
                        if w.is_final { "yes" } else { "no" }.to_owned(),
                    ]
                })
                .collect();
            emit(&table(
                &[
                    "WINDOW START",
                    "WINDOW END",
                    "COUNT",
                    "VALUES",
                    "DEFINITION",
                    "FINAL",
                ],
                &rows,
            ))
        }
    }
}

pub async fn refdata(command: RefdataCommand) -> anyhow::Result<()> {
    let RefdataCommand::Load {
        config,
        file,
        pipeline,
        rule,
        key_fields,
        output,
    } = command;
    let config = Config::load(config.as_deref())?;
    if config.refdata.backend != RefDataBackend::Redis {
        bail!("refdata load writes to Redis; this config's refdata.backend is not `redis`");
    }
    let catalog = current_catalog(&config).await?;
    let def = definition_of(&catalog, &pipeline)?;
    let Some(rule_def) = def.enrichments.iter().find(|r| r.name == rule) else {
        let known: Vec<&str> = def.enrichments.iter().map(|r| r.name.as_str()).collect();
        bail!(
            "pipeline `{pipeline}` has no enrichment rule `{rule}` (rules: {})",
            known.join(", ")
        );
    };
    let store = instream_refdata::RedisRefStore::connect(&config.refdata)
        .await
        .context("connecting to Redis")?;
    let started = std::time::Instant::now();
    let progress = instream_core::Progress::on_stderr("refdata load", "records", None);
    let report = store
        .load_file(&pipeline, rule_def, &key_fields, &file, &progress)
        .await?;
    progress.finish();
    let took = started.elapsed();
    match output.output {
        Output::Json => emit_json(&json!({
            "pipeline": pipeline, "rule": rule, "version": report.version,
            "previous": report.previous, "records": report.records, "switched": report.switched,
            "retired_keys": report.retired, "seconds": took.as_secs_f64(),
        })),
        Output::Table => emit(&format!(
            "loaded {} records of `{pipeline}`/`{rule}` as version {} in {:.1}s (previous: {}){}; {} keys of older versions expire in {}\n",
            report.records,
            report.version,
            took.as_secs_f64(),
            report.previous.map_or("none".into(), |v| v.to_string()),
            if report.switched { "" } else { "; NOT switched: a later load switched first" },
            report.retired,
            humantime::format_duration(instream_refdata::load::RETIRED_VERSION_GRACE),
        )),
    }
}
