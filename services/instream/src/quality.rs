//! `instream quality report`: a pipeline's data-quality violations per rule per hour, read
//! from `<pipeline>.quality` (one record per violation, written by the enricher).

use anyhow::Context;
use clap::Subcommand;
use instream_pipeline::topics;
use instream_quality::{Report, ReportBuilder, ViolationRecord};

use crate::output::{emit, emit_json, table, Output};

#[derive(Subcommand)]
pub enum QualityCommand {
    /// Violations per rule per hour of ingest time between two times, each event and rule
    /// counted once (repeats after a crash are not counted again), with sampled offending
    /// events.
    Report {
        #[command(flatten)]
        config: crate::ConfigArg,
        #[arg(long)]
        pipeline: String,
        /// Start (RFC 3339), inclusive.
        #[arg(long, value_parser = crate::ops::parse_time)]
        from: i64,
        /// End (RFC 3339), exclusive.
        #[arg(long, value_parser = crate::ops::parse_time)]
        to: i64,
        /// Sampled offending events shown per rule.
        #[arg(long, default_value_t = 3)]
        samples: usize,
        #[command(flatten)]
        output: crate::output::OutputArg,
    },
}

pub async fn quality(command: QualityCommand) -> anyhow::Result<()> {
    let QualityCommand::Report {
        config,
        pipeline,
        from,
        to,
        samples,
        output,
    } = command;
    anyhow::ensure!(from < to, "--from must be before --to");
    let config = crate::standalone::state::cli_config(config.as_deref(), true)?;
    let topic = topics::quality(&pipeline);
    // A record is produced after its event was ingested; an hour's slack covers clocks that
    // disagree between hosts.
    let since = from.saturating_sub(3_600_000);
    let ((builder, _, unreadable), skipped) = instream_kafka::ops::scan_topic_since(
        &config.kafka,
        &topic,
        since,
        config.enricher_transactional(),
        (
            ReportBuilder::new(&pipeline, from, to, samples),
            None::<i32>,
            0usize,
        ),
        |(builder, partition, unreadable), p, payload| {
            if partition.is_some_and(|last| last != p) {
                builder.partition_done();
            }
            *partition = Some(p);
            match serde_json::from_slice::<ViolationRecord>(payload) {
                Ok(record) => builder.add(record),
                Err(_) => *unreadable += 1,
            }
        },
    )
    .await
    .with_context(|| format!("reading `{topic}`"))?;
    let report = builder.finish();
    if unreadable > 0 {
        eprintln!("warning: {unreadable} records of `{topic}` are not violation records; skipped");
    }
    match output.output {
        Output::Json => emit_json(&serde_json::to_value(&report)?)?,
        Output::Table => emit(&format_table(&report))?,
    }
    crate::output::fail_on_skipped(&topic, &skipped)
}

fn format_table(report: &Report) -> String {
    let mut text = format!(
        "pipeline {}, ingest time {} .. {}\n",
        report.pipeline, report.from, report.to
    );
    if report.rows.is_empty() {
        text.push_str("no violations\n");
        return text;
    }
    let rows: Vec<Vec<String>> = report
        .rows
        .iter()
        .map(|r| {
            vec![
                r.hour.clone(),
                r.rule.clone(),
                r.severity.as_str().to_owned(),
                r.action.as_str().to_owned(),
                r.violations.to_string(),
            ]
        })
        .collect();
    text.push_str(&table(
        &["hour", "rule", "severity", "action", "violations"],
        &rows,
    ));
    for (rule, samples) in &report.samples {
        text.push_str(&format!("\nsamples of `{rule}`:\n"));
        for s in samples {
            text.push_str(&format!(
                "  event {} (raw {}:{}): {}\n    {}\n",
                s.event_id,
                s.raw_partition,
                s.raw_offset,
                s.message,
                s.sample.as_ref().map_or("", |p| p.get())
            ));
        }
    }
    text
}
