//! `instream archive`: `verify` reads the archive back and checks it for gaps and overlaps of
//! offsets; `recompute` rebuilds an aggregation's windows from it; `replay` re-produces its
//! events to a topic.

mod recompute;
mod replay;
mod stream;

use anyhow::{bail, Context};
use clap::Subcommand;
use instream_core::config::Config;

use crate::output::{emit, emit_json, table, Output};

#[derive(Subcommand)]
pub enum ArchiveCommand {
    /// Reads every file of a pipeline back and reports, per partition, the offsets covered,
    /// any gap or overlap between files, and records per hour; then compares with the
    /// archiver group's committed offsets and the topic's first offsets (when the broker
    /// answers), so offsets committed but in no file show too. Exits 1 when it finds a gap,
    /// an overlap, offsets committed but not archived, or a file that is not what its name
    /// says.
    Verify {
        #[command(flatten)]
        config: crate::ConfigArg,
        #[arg(long)]
        pipeline: String,
        #[command(flatten)]
        output: crate::output::OutputArg,
    },
    /// Rebuilds one aggregation's windows whose start lies in [--from, --to) from the
    /// archived raw events, enriched with the reference data as it is now, under the
    /// pipeline's definition version in effect now, and writes each window whole and final
    /// (replacing what the store holds; windows of another shape in the range are deleted).
    /// Windows still open in the live aggregator, or that the archive cannot close yet, are
    /// left and counted. Without --execute it only prints what it would rewrite. Sends no
    /// notification and no result. Safe to run again: the same archive gives the same
    /// windows.
    Recompute {
        #[command(flatten)]
        config: crate::ConfigArg,
        #[arg(long)]
        pipeline: String,
        #[arg(long)]
        aggregation: String,
        /// The first window start (RFC 3339).
        #[arg(long, value_parser = crate::ops::parse_time)]
        from: i64,
        /// The end of the window starts (RFC 3339, exclusive).
        #[arg(long, value_parser = crate::ops::parse_time)]
        to: i64,
        /// Write; without it, print what would be written.
        #[arg(long)]
        execute: bool,
        /// Write even where offsets within what is read are in no archive file (a range at
        /// the start of an archive cut by retention): those windows lack the missing records.
        #[arg(long)]
        accept_gaps: bool,
        #[command(flatten)]
        output: crate::output::OutputArg,
    },
    /// Re-produces the archived raw events accepted in [--from, --to) to --topic, ids, keys
    /// and headers kept, for a downstream consumer that needs a backfill. Never to a
    /// pipeline's own topics (the live stages would count them twice). Without --execute it
    /// only counts them.
    Replay(replay::ReplayArgs),
}

pub async fn archive(command: ArchiveCommand) -> anyhow::Result<()> {
    match command {
        ArchiveCommand::Verify {
            config,
            pipeline,
            output,
        } => verify(config.as_deref(), &pipeline, output.output).await,
        ArchiveCommand::Recompute {
            config,
            pipeline,
            aggregation,
            from,
            to,
            execute,
            accept_gaps,
            output,
        } => {
            let request = recompute::Request {
                pipeline,
                aggregation,
                from,
                to,
                execute,
                accept_gaps,
                progress: true,
            };
            recompute::run(config.as_deref(), &request, output.output).await
        }
        ArchiveCommand::Replay(args) => replay::run(args).await,
    }
}

/// `instream archive verify`: the archive's files read whole, compared with what the
/// archiver's group committed.
async fn verify(
    config: Option<&std::path::Path>,
    pipeline: &str,
    output: Output,
) -> anyhow::Result<()> {
    // The archive of a standalone's last run, whether it runs or not.
    let config = crate::standalone::state::cli_config(config, false)?;
    let archive = instream_archive::build(&config.archive)?;
    let progress = instream_core::Progress::on_stderr("archive verify", "files", None);
    let mut report = instream_archiver::verify(archive.as_ref(), pipeline, &progress)
        .await
        .with_context(|| format!("reading the archive of `{pipeline}`"))?;
    progress.finish();
    let compared = if config.kafka.broker == instream_core::config::BrokerMode::Embedded
        && !crate::standalone::state::running(&config)
    {
        Err(anyhow::anyhow!(
            "the standalone that wrote this archive is not running (its broker went with it)"
        ))
    } else {
        compare_with_commits(&config, pipeline, &mut report).await
    };
    match output {
        Output::Json => {
            let mut value = serde_json::to_value(&report)?;
            value["committed_offsets_compared"] = match &compared {
                Ok(()) => serde_json::Value::Bool(true),
                Err(e) => serde_json::Value::String(e.to_string()),
            };
            emit_json(&value)?
        }
        Output::Table => emit(&verify_table(&report, compared.err()))?,
    }
    if !report.is_clean() {
        bail!("the archive of `{pipeline}` has gaps, overlaps or bad files (listed above)");
    }
    Ok(())
}

/// `archive verify`'s report as tables: per partition, per hour, then the problems.
fn verify_table(
    report: &instream_archiver::VerifyReport,
    not_compared: Option<anyhow::Error>,
) -> String {
    let ranges = |r: &[instream_archiver::OffsetRange]| {
        r.iter()
            .map(|r| format!("{}-{}", r.first, r.last))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let rows: Vec<Vec<String>> = report
        .partitions
        .iter()
        .map(|p| {
            vec![
                p.partition.to_string(),
                p.files.to_string(),
                format!("{}-{}", p.first_offset, p.last_offset),
                p.records.to_string(),
                p.offsets_without_record.to_string(),
                ranges(&p.gaps),
                ranges(&p.overlaps),
            ]
        })
        .collect();
    let mut text = table(
        &[
            "PARTITION",
            "FILES",
            "OFFSETS",
            "RECORDS",
            "DEAD-LETTERED",
            "GAPS",
            "OVERLAPS",
        ],
        &rows,
    );
    let hours: Vec<Vec<String>> = report
        .records_per_hour
        .iter()
        .map(|(h, n)| vec![h.clone(), n.to_string()])
        .collect();
    text.push('\n');
    text.push_str(&table(&["HOUR", "RECORDS"], &hours));
    for p in &report.problems {
        text.push_str(&format!("\nproblem: {}: {}", p.path, p.problem));
    }
    if let Some(e) = not_compared {
        text.push_str(&format!("\ncommitted offsets not compared: {e}"));
    }
    text.push_str(&format!(
        "\n{} files, {} records: {}\n",
        report.files,
        report.records,
        if report.is_clean() {
            "no gap, no overlap"
        } else {
            "NOT CLEAN"
        }
    ));
    text
}

/// Adds to `report` what the archiver group committed without a file to show for it: offsets
/// between the topic's first offset (older ones are gone from the topic) and the committed
/// offset that no file answers for. Errs when the broker cannot be asked.
async fn compare_with_commits(
    config: &Config,
    pipeline: &str,
    report: &mut instream_archiver::VerifyReport,
) -> anyhow::Result<()> {
    let group = format!("{}-archiver", config.kafka.group_prefix);
    let topic = instream_pipeline::topics::raw(pipeline);
    let lags = instream_kafka::ops::group_lag(&config.kafka, &group, &topic).await?;
    for lag in lags {
        let Some(committed) = lag.committed else {
            continue;
        };
        let (low, _) =
            instream_kafka::ops::watermarks(&config.kafka, &topic, lag.partition).await?;
        let archived = report
            .partitions
            .iter()
            .find(|p| p.partition == lag.partition);
        // What should be in files: [low, committed). What is: [first_offset, last_offset].
        let (first, next) = archived.map_or((committed, committed), |p| {
            (p.first_offset, p.last_offset + 1)
        });
        let mut missing = Vec::new();
        if first > low && committed > low {
            missing.push((low, first.min(committed) - 1));
        }
        if committed > next {
            missing.push((next.max(low), committed - 1));
        }
        for (from, to) in missing.into_iter().filter(|(from, to)| from <= to) {
            report.problems.push(instream_archiver::FileProblem {
                path: format!("{topic}/{}", lag.partition),
                problem: format!("offsets {from}-{to} are committed by {group} but in no file"),
            });
        }
    }
    Ok(())
}
