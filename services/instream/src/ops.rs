//! Operator commands on the broker: `offsets reset` (replay from a time) and `dlq tail` /
//! `dlq redrive`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use instream_core::config::Config;
use instream_kafka::ops::{self, StoredDeadLetter};
use instream_pipeline::topics;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
pub enum OffsetsCommand {
    /// Moves a consumer group's committed offsets on one topic to the first record at or after
    /// a time, so the service re-reads from there. Stop the group's service first (scale it
    /// to zero): a live member would overwrite the new offsets. Prints the plan; commits it
    /// only with --execute.
    Reset {
        #[arg(long, short, env = "INSTREAM_CONFIG")]
        config: Option<PathBuf>,
        /// The consumer group: `<kafka.group_prefix>-<service>`, e.g. `instream-aggregator`.
        #[arg(long)]
        group: String,
        /// The topic the group reads, e.g. `orders.raw` (enricher, archiver) or
        /// `orders.enriched` (aggregator).
        #[arg(long)]
        topic: String,
        /// RFC 3339 time, e.g. `2026-11-25T10:00:00Z`.
        #[arg(long, value_parser = parse_time)]
        to_datetime: i64,
        /// Commit the plan (without it, only print it).
        #[arg(long)]
        execute: bool,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Subcommand)]
pub enum DlqCommand {
    /// Prints a pipeline's dead letters: where they came from, the reason, the record.
    Tail {
        #[arg(long, short, env = "INSTREAM_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long)]
        pipeline: String,
        /// Only the newest N (all when absent).
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Writes dead letters back to the pipeline's raw topic (same key, so the same partition),
    /// marked `instream.redriven.from`, once the cause is fixed (e.g. the missing reference
    /// data is loaded). Prints what it would send; sends only with --execute.
    Redrive {
        #[arg(long, short, env = "INSTREAM_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long)]
        pipeline: String,
        /// Only dead letters with this code (e.g. `enrich_miss`).
        #[arg(long)]
        code: Option<String>,
        /// Start of the dead-letter partition, `PARTITION:OFFSET`; repeat per partition. A
        /// previous redrive prints the values that continue after it.
        #[arg(long = "from-offset", value_parser = parse_partition_offset)]
        from: Vec<(i32, i64)>,
        #[arg(long)]
        execute: bool,
    },
}

fn parse_time(s: &str) -> Result<i64, String> {
    let t = humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("`{s}` is not an RFC 3339 time (2026-11-25T10:00:00Z): {e}"))?;
    let millis = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("`{s}` is before 1970"))?
        .as_millis();
    i64::try_from(millis).map_err(|_| format!("`{s}` is too far in the future"))
}

fn parse_partition_offset(s: &str) -> Result<(i32, i64), String> {
    let (p, o) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}`: expected PARTITION:OFFSET, e.g. 0:1234"))?;
    Ok((
        p.parse().map_err(|_| format!("`{p}` is not a partition"))?,
        o.parse().map_err(|_| format!("`{o}` is not an offset"))?,
    ))
}

pub async fn offsets(command: OffsetsCommand) -> anyhow::Result<()> {
    let OffsetsCommand::Reset {
        config,
        group,
        topic,
        to_datetime,
        execute,
        output,
    } = command;
    let config = Config::load(config.as_deref())?;
    let plan = ops::plan_offset_reset(&config.kafka, &group, &topic, to_datetime)
        .await
        .with_context(|| format!("planning the reset of `{group}` on `{topic}`"))?;
    if execute {
        ops::apply_offset_reset(&config.kafka, &group, &topic, &plan)
            .await
            .with_context(|| {
                format!("committing offsets for `{group}` (is its service still running?)")
            })?;
    }
    match output {
        Output::Json => {
            let rows: Vec<_> = plan
                .iter()
                .map(|r| {
                    serde_json::json!({"partition": r.partition, "committed": r.committed,
                        "target": r.target})
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({"group": group, "topic": topic, "executed": execute, "partitions": rows})
            );
        }
        Output::Table => {
            println!(
                "{:>9}  {:>12}  {:>12}",
                "partition", "committed", "new offset"
            );
            for r in &plan {
                let committed = r.committed.map_or("-".to_owned(), |c| c.to_string());
                println!("{:>9}  {committed:>12}  {:>12}", r.partition, r.target);
            }
            if execute {
                println!("committed for group `{group}`: start its service again to replay");
            } else {
                println!("dry run: add --execute to commit (with the group's service stopped)");
            }
        }
    }
    Ok(())
}

pub async fn dlq(command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::Tail {
            config,
            pipeline,
            limit,
            output,
        } => {
            let config = Config::load(config.as_deref())?;
            let topic = topics::dead_letter(&pipeline);
            let mut letters = ops::read_dead_letters(&config.kafka, &topic, HashMap::new())
                .await
                .with_context(|| format!("reading `{topic}`"))?;
            letters.sort_by_key(|d| d.timestamp_millis);
            if let Some(n) = limit {
                let skip = letters.len().saturating_sub(n);
                letters.drain(..skip);
            }
            print_letters(&letters, output);
            Ok(())
        }
        DlqCommand::Redrive {
            config,
            pipeline,
            code,
            from,
            execute,
        } => {
            let config = Config::load(config.as_deref())?;
            let dlq_topic = topics::dead_letter(&pipeline);
            let raw = topics::raw(&pipeline);
            let letters =
                ops::read_dead_letters(&config.kafka, &dlq_topic, from.into_iter().collect())
                    .await
                    .with_context(|| format!("reading `{dlq_topic}`"))?;
            let mut next: HashMap<i32, i64> = HashMap::new();
            for d in &letters {
                next.insert(d.partition, d.offset + 1);
            }
            let selected: Vec<StoredDeadLetter> = letters
                .into_iter()
                .filter(|d| code.as_deref().is_none_or(|c| d.code == c))
                .collect();
            // Only records that came from the raw topic can go back there: what a later stage
            // refused (e.g. an event too late for its window) is not raw input.
            let (redrivable, other): (Vec<_>, Vec<_>) = selected
                .into_iter()
                .partition(|d| d.origin_topic.as_deref() == Some(raw.as_str()));
            if !other.is_empty() {
                eprintln!(
                    "instream: {} dead letters did not come from `{raw}` and are left alone \
                     (see `instream dlq tail`)",
                    other.len()
                );
            }
            if execute {
                ops::redrive(&config.kafka, &dlq_topic, &raw, &redrivable)
                    .await
                    .with_context(|| format!("writing to `{raw}`"))?;
                println!("redrove {} dead letters to `{raw}`", redrivable.len());
            } else {
                println!(
                    "dry run: {} dead letters would go back to `{raw}`; add --execute",
                    redrivable.len()
                );
            }
            if redrivable.is_empty() && other.is_empty() && next.is_empty() {
                return Ok(());
            }
            let mut continue_from: Vec<(i32, i64)> = next.into_iter().collect();
            continue_from.sort();
            let flags: Vec<String> = continue_from
                .iter()
                .map(|(p, o)| format!("--from-offset {p}:{o}"))
                .collect();
            println!("to continue after these later: {}", flags.join(" "));
            Ok(())
        }
    }
}

fn print_letters(letters: &[StoredDeadLetter], output: Output) {
    match output {
        Output::Json => {
            for d in letters {
                let payload: serde_json::Value = serde_json::from_slice(&d.payload)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&d.payload).into_owned().into());
                println!(
                    "{}",
                    serde_json::json!({
                        "partition": d.partition, "offset": d.offset,
                        "timestamp": d.timestamp_millis.map(instream_event::format_rfc3339_millis),
                        "code": d.code, "reason": d.reason, "service": d.service,
                        "origin": {"topic": d.origin_topic, "partition": d.origin_partition,
                                   "offset": d.origin_offset},
                        "record": payload,
                    })
                );
            }
        }
        Output::Table => {
            println!(
                "{:<24}  {:<9}  {:<18}  {:<24}  reason",
                "time", "dlq", "code", "origin"
            );
            for d in letters {
                let time = d
                    .timestamp_millis
                    .map(instream_event::format_rfc3339_millis)
                    .unwrap_or_default();
                let origin = match (&d.origin_topic, d.origin_partition, d.origin_offset) {
                    (Some(t), Some(p), Some(o)) => format!("{t}:{p}:{o}"),
                    _ => "-".into(),
                };
                println!(
                    "{time:<24}  {:<9}  {:<18}  {origin:<24}  {}",
                    format!("{}:{}", d.partition, d.offset),
                    d.code,
                    d.reason
                );
            }
            if letters.is_empty() {
                println!("(no dead letters)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_parsed_or_refused_precisely() {
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), Ok(1000));
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
        assert_eq!(parse_partition_offset("3:120"), Ok((3, 120)));
        assert!(parse_partition_offset("3")
            .unwrap_err()
            .contains("PARTITION:OFFSET"));
    }
}
