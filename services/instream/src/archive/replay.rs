//! `instream archive replay`: archived raw events accepted in a range, written again to a
//! topic for a downstream consumer that needs a backfill.

use anyhow::bail;
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

/// Produces (with a producer) the events of one partition's stream accepted in the range, in
/// rounds. Returns the records read and the events in the range.
async fn replay_partition(
    stream: &mut super::stream::PartitionStream<'_>,
    args: &ReplayArgs,
    producer: Option<&instream_kafka::client::Producer>,
    progress: &instream_core::Progress,
) -> anyhow::Result<(u64, u64)> {
    let (raw, partition) = (topics::raw(&args.pipeline), stream.partition);
    let (mut records, mut produced) = (0u64, 0u64);
    let mut round: Vec<(instream_event::Event, instream_archiver::ArchivedRecord)> = Vec::new();
    loop {
        let next = stream.next().await?;
        let done = next.is_none();
        if let Some(record) = next {
            records += 1;
            match instream_event::decode(&record.bytes) {
                Ok(e) if (args.from..args.to).contains(&e.ingest_time) => round.push((e, record)),
                Ok(_) => {}
                Err(e) => bail!("{raw}:{partition}:{} in the archive: {e}", record.offset),
            }
        }
        if round.len() >= ROUND || (done && !round.is_empty()) {
            produced += round.len() as u64;
            if let Some(producer) = producer {
                let copies: Vec<Copy<'_>> = round
                    .iter()
                    .map(|(e, r)| Copy {
                        key: e.key.as_bytes(),
                        payload: &r.bytes,
                        from: format!("{raw}:{partition}:{}", r.offset),
                    })
                    .collect();
                instream_kafka::ops::produce_copies(producer, &args.topic, &copies, progress)
                    .await?;
            }
            round.clear();
        }
        if done {
            return Ok((records, produced));
        }
    }
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
    let files = files_to_read(&args, &catalog, archive.as_ref()).await?;
    let producer = if args.execute {
        Some(instream_kafka::client::producer(
            &config.kafka,
            "instream-cli",
        )?)
    } else {
        None
    };
    let (mut files_read, mut records, mut produced) = (0u64, 0u64, 0u64);
    let mut gaps = Vec::new();
    for (partition, files) in files {
        // Each partition in offset order, so that one key's events keep their order.
        let mut stream = super::stream::PartitionStream::new(
            archive.as_ref(),
            &args.pipeline,
            files,
            instream_core::Progress::silent(),
        );
        let (read, in_range) =
            replay_partition(&mut stream, &args, producer.as_ref(), &progress).await?;
        (records, produced) = (records + read, produced + in_range);
        files_read += stream.files_read;
        gaps.extend(
            stream
                .gaps()
                .iter()
                .map(|g| format!("{partition}:{}-{}", g.first, g.last)),
        );
    }
    progress.finish();
    let summary = serde_json::json!({
        "pipeline": args.pipeline,
        "topic": args.topic,
        "executed": args.execute,
        "files": files_read,
        "records_read": records,
        "events_in_range": produced,
        "gaps": gaps,
    });
    match args.output.output {
        Output::Json => emit_json(&summary)?,
        Output::Table => {
            emit(&format!(
            "{} {produced} events accepted in the range (of {records} records in {files_read} files) \
             {} `{}`\n",
            if args.execute { "Produced" } else { "Would produce" },
            if args.execute { "to" } else { "to (dry run; --execute produces)" },
            args.topic
        ))?
        }
    }
    if !gaps.is_empty() {
        bail!(
            "the archive of `{}` has offsets in no file ({}): the backfill lacks them",
            args.pipeline,
            gaps.join(" ")
        );
    }
    Ok(())
}

/// The archive files a replay reads, per partition. Folders by ingest time: the range's hours,
/// and one either side (a file takes the hour of its first record). By event time, an event
/// accepted in the range can be in any folder (a late one in an old hour): all of them are
/// read.
async fn files_to_read(
    args: &ReplayArgs,
    catalog: &instream_pipeline::Catalog,
    archive: &dyn instream_archive::Archive,
) -> anyhow::Result<std::collections::BTreeMap<i32, Vec<super::stream::PartFile>>> {
    let by_event_time = catalog
        .get(&args.pipeline)
        .is_none_or(|def| def.archive.partition_by == instream_pipeline::ArchiveTime::EventTime);
    let (first, last) = (
        super::recompute::hour_name(args.from - 3_600_000),
        super::recompute::hour_name(args.to + 3_600_000),
    );
    super::stream::partition_files(archive, &args.pipeline, |hour| {
        by_event_time || (first.as_str()..=last.as_str()).contains(&hour)
    })
    .await
}
