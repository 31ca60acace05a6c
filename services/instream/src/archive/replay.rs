//! `instream archive replay`: archived raw events accepted in a range, written again to a
//! topic for a downstream consumer that needs a backfill.

use anyhow::{bail, Context};
use instream_kafka::ops::Copy;
use instream_pipeline::topics;

use crate::output::{emit, emit_json, Output};

/// Records produced per round (each round waits for its acknowledgements).
const ROUND: usize = 5_000;

#[derive(clap::Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    config: crate::ConfigArg,
    #[arg(long)]
    pipeline: String,
    /// The first ingest time (RFC 3339).
    #[arg(long, value_parser = crate::ops::parse_time)]
    from: i64,
    /// The end of the ingest times (RFC 3339, exclusive).
    #[arg(long, value_parser = crate::ops::parse_time)]
    to: i64,
    /// Where the events go: a topic of your own, never one of a pipeline's.
    #[arg(long)]
    topic: String,
    /// Produce; without it, only count what would be produced.
    #[arg(long)]
    execute: bool,
    #[command(flatten)]
    output: crate::output::OutputArg,
}

/// The pipeline whose own topic `topic` is (raw, enriched, dead letters, quality,
/// repartition, results), if any: defined now, or named like one (an aggregation removed
/// since still has its topic).
fn is_pipeline_topic(catalog: &instream_pipeline::Catalog, topic: &str) -> Option<String> {
    catalog.iter().find_map(|def| {
        let named_like = topic
            .strip_prefix(&format!("{}.", def.name))
            .is_some_and(|rest| rest.starts_with("by-") || rest.starts_with("results."));
        (named_like || topics::of_pipeline(def).iter().any(|t| t == topic))
            .then(|| def.name.clone())
    })
}

pub async fn run(args: ReplayArgs) -> anyhow::Result<()> {
    if args.to <= args.from {
        bail!("--to must be after --from");
    }
    let config = crate::standalone::state::cli_config(args.config.as_deref(), args.execute)?;
    let catalog = crate::control::current_catalog(&config).await?;
    if let Some(owner) = is_pipeline_topic(&catalog, &args.topic) {
        bail!(
            "`{}` is a topic of pipeline `{owner}`: its stages would count the replayed events \
             again; replay to a topic of your own",
            args.topic
        );
    }
    let archive = instream_archive::build(&config.archive)?;
    let progress = instream_core::Progress::on_stderr("archive replay", "records", None);
    let raw = topics::raw(&args.pipeline);
    // Files are named by the hour of their layout time: the ones of the range, and an hour
    // either side (ingest and layout time may differ by the clock of the writer).
    let (first, last) = (
        super::recompute::hour_name(args.from - 3_600_000),
        super::recompute::hour_name(args.to + 3_600_000),
    );
    let (mut files, mut records, mut produced) = (0u64, 0u64, 0u64);
    for file in archive.list(&args.pipeline).await? {
        let (Some((partition, first_offset, _)), Some(hour)) = (
            instream_archiver::parse_file_name(&file.path),
            instream_archiver::hour_of(&file.path),
        ) else {
            continue;
        };
        if hour < first || hour > last {
            continue;
        }
        files += 1;
        let data = archive.get(&file.path).await?;
        let read = instream_archiver::read_records(&file.path, data, first_offset, &args.pipeline)
            .with_context(|| format!("reading {}", file.path))?;
        records += read.len() as u64;
        let events: Vec<(instream_event::Event, &instream_archiver::ArchivedRecord)> = read
            .iter()
            .filter_map(|r| instream_event::decode(&r.bytes).ok().map(|e| (e, r)))
            .filter(|(e, _)| (args.from..args.to).contains(&e.ingest_time))
            .collect();
        produced += events.len() as u64;
        if !args.execute {
            continue;
        }
        for round in events.chunks(ROUND) {
            let copies: Vec<Copy<'_>> = round
                .iter()
                .map(|(e, r)| Copy {
                    key: e.key.as_bytes(),
                    payload: &r.bytes,
                    from: format!("{raw}:{partition}:{}", r.offset),
                })
                .collect();
            instream_kafka::ops::produce_copies(&config.kafka, &args.topic, &copies, &progress)
                .await?;
        }
    }
    progress.finish();
    let summary = serde_json::json!({
        "pipeline": args.pipeline,
        "topic": args.topic,
        "executed": args.execute,
        "files": files,
        "records_read": records,
        "events_in_range": produced,
    });
    match args.output.output {
        Output::Json => emit_json(&summary)?,
        Output::Table => {
            emit(&format!(
            "{} {produced} events accepted in the range (of {records} records in {files} files) \
             {} `{}`\n",
            if args.execute { "Produced" } else { "Would produce" },
            if args.execute { "to" } else { "to (dry run; --execute produces)" },
            args.topic
        ))?
        }
    }
    Ok(())
}
