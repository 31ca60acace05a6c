//! `instream archive verify`: the archive read back, checked for gaps and overlaps of offsets.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Subcommand;
use instream_core::config::Config;

use crate::output::{emit, emit_json, table, Output};

#[derive(Subcommand)]
pub enum ArchiveCommand {
    /// Reads every file of a pipeline back and reports, per partition, the offsets covered,
    /// any gap or overlap between files, and records per hour. Exits 1 when it finds a gap,
    /// an overlap or a file that is not what its name says.
    Verify {
        #[arg(long, short, env = "INSTREAM_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long)]
        pipeline: String,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
}

pub async fn archive(command: ArchiveCommand) -> anyhow::Result<()> {
    let ArchiveCommand::Verify {
        config,
        pipeline,
        output,
    } = command;
    let config = Config::load(config.as_deref())?;
    let archive = instream_archive::build(&config.archive)?;
    let report = instream_archiver::verify(archive.as_ref(), &pipeline)
        .await
        .with_context(|| format!("reading the archive of `{pipeline}`"))?;
    match output {
        Output::Json => emit_json(&serde_json::to_value(&report)?)?,
        Output::Table => {
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
            emit(&text)?;
        }
    }
    if !report.is_clean() {
        bail!("the archive of `{pipeline}` has gaps, overlaps or bad files (listed above)");
    }
    Ok(())
}
