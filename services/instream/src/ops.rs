//! Operator commands on the broker: `offsets reset` (replay from a time) and `dlq tail` /
//! `dlq redrive`.

use std::collections::HashMap;

use anyhow::Context;
use clap::Subcommand;
use instream_kafka::ops::{self, StoredDeadLetter};
use instream_pipeline::topics;

use crate::output::{emit, Output};

#[derive(Subcommand)]
pub enum OffsetsCommand {
    /// Moves a consumer group's committed offsets on one topic to the first record at or after
    /// a time, so the service re-reads from there. Stop the group's service first (scale it
    /// to zero): a live member would overwrite the new offsets. Prints the plan; commits it
    /// only with --execute.
    Reset {
        #[command(flatten)]
        config: crate::ConfigArg,
        /// The consumer group: `<kafka.group_prefix>-<service>`, e.g. `instream-aggregator`.
        #[arg(long)]
        group: String,
        /// The topic the group reads, e.g. `orders.raw` (enricher, archiver) or
        /// `orders.enriched` (aggregator).
        #[arg(long)]
        topic: String,
        /// RFC 3339 time, e.g. `2026-11-25T10:00:00Z` or `2026-11-25T11:00:00+01:00`. Records
        /// are found by their broker timestamp: when they were written to the topic.
        #[arg(long, value_parser = parse_time)]
        to_datetime: i64,
        /// Commit the plan (without it, only print it).
        #[arg(long)]
        execute: bool,
        /// Allow moving a partition forward, past records the group has not read yet (they
        /// would never be processed).
        #[arg(long)]
        allow_skip: bool,
        #[command(flatten)]
        output: crate::output::OutputArg,
    },
}

#[derive(Subcommand)]
pub enum DlqCommand {
    /// Prints a pipeline's dead letters: where they came from, the reason, the record.
    Tail {
        #[command(flatten)]
        config: crate::ConfigArg,
        #[arg(long)]
        pipeline: String,
        /// Only the newest N (all when absent).
        #[arg(long)]
        limit: Option<usize>,
        /// Only dead letters with this code (e.g. `too_late`, `webhook_failed`).
        #[arg(long)]
        code: Option<String>,
        #[command(flatten)]
        output: crate::output::OutputArg,
    },
    /// Writes dead letters back to the pipeline's raw topic (same key, so the same partition),
    /// marked `instream.redriven.from`, once the cause is fixed (e.g. the missing reference
    /// data is loaded). Prints what it would send; sends only with --execute.
    Redrive {
        #[command(flatten)]
        config: crate::ConfigArg,
        #[arg(long)]
        pipeline: String,
        /// Only dead letters with this code (e.g. `enrich_miss`). `decode_error` records are
        /// sent back only when asked for by name: they are not instream events.
        #[arg(long)]
        code: Option<String>,
        /// Start of the dead-letter partition, `PARTITION:OFFSET`; repeat per partition. A
        /// previous redrive prints the values that continue after it.
        #[arg(long = "from-offset", value_parser = parse_partition_offset)]
        from: Vec<(i32, i64)>,
        #[arg(long)]
        execute: bool,
        #[command(flatten)]
        output: crate::output::OutputArg,
    },
}

pub fn parse_time(s: &str) -> Result<i64, String> {
    instream_event::parse_event_time(&serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("`{s}` is not an RFC 3339 time (e.g. 2026-11-25T10:00:00Z)"))
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
    use std::fmt::Write as _;
    let OffsetsCommand::Reset {
        config,
        group,
        topic,
        to_datetime,
        execute,
        allow_skip,
        output,
    } = command;
    let config = crate::standalone::state::cli_config(config.as_deref(), true)?;
    let plan = ops::plan_offset_reset(&config.kafka, &group, &topic, to_datetime)
        .await
        .with_context(|| format!("planning the reset of `{group}` on `{topic}`"))?;
    // Moving forward skips records the group never processed: that is loss, not replay.
    let skips: Vec<i32> = plan
        .iter()
        .filter(|r| r.committed.is_some_and(|c| r.target > c))
        .map(|r| r.partition)
        .collect();
    let refused = execute && !skips.is_empty() && !allow_skip;
    if execute && !refused {
        ops::apply_offset_reset(&config.kafka, &group, &topic, &plan)
            .await
            .with_context(|| {
                format!("committing offsets for `{group}` (is its service still running?)")
            })?;
    }
    let executed = execute && !refused;
    let mut text = String::new();
    match output.output {
        Output::Json => {
            let rows: Vec<_> = plan
                .iter()
                .map(|r| {
                    serde_json::json!({"partition": r.partition, "committed": r.committed,
                        "target": r.target, "skips_unread": skips.contains(&r.partition)})
                })
                .collect();
            let _ = writeln!(
                text,
                "{}",
                serde_json::json!({"group": group, "topic": topic, "executed": executed, "partitions": rows})
            );
        }
        Output::Table => {
            text = reset_table(&plan, &skips);
            if executed {
                let _ = writeln!(
                    text,
                    "committed for group `{group}`: start its service again to replay"
                );
            } else if !refused {
                let _ = writeln!(
                    text,
                    "dry run: add --execute to commit (with the group's service stopped)"
                );
            }
        }
    }
    emit(&text)?;
    if refused {
        anyhow::bail!(
            "partitions {skips:?} would move forward past records `{group}` has not read; \
             nothing committed (add --allow-skip to skip them on purpose)"
        );
    }
    Ok(())
}

/// An offset reset's plan, a row per partition; `skips`: those it moves past unread records.
fn reset_table(plan: &[ops::PartitionReset], skips: &[i32]) -> String {
    use std::fmt::Write as _;
    let mut text = String::new();
    let _ = writeln!(
        text,
        "{:>9}  {:>12}  {:>12}",
        "partition", "committed", "new offset"
    );
    for r in plan {
        let committed = r.committed.map_or("-".to_owned(), |c| c.to_string());
        let note = if skips.contains(&r.partition) {
            "  skips records not read yet"
        } else {
            ""
        };
        let _ = writeln!(
            text,
            "{:>9}  {committed:>12}  {:>12}{note}",
            r.partition, r.target
        );
    }
    text
}

pub async fn dlq(command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::Tail {
            config,
            pipeline,
            limit,
            code,
            output,
        } => dlq_tail(config, &pipeline, limit, code, output).await,
        DlqCommand::Redrive {
            config,
            pipeline,
            code,
            from,
            execute,
            output,
        } => dlq_redrive(config, &pipeline, code, from, execute, output).await,
    }
}

/// `instream dlq tail`: the newest dead letters of a pipeline, of one code or all.
async fn dlq_tail(
    config: crate::ConfigArg,
    pipeline: &str,
    limit: Option<usize>,
    code: Option<String>,
    output: crate::output::OutputArg,
) -> anyhow::Result<()> {
    let config = crate::standalone::state::cli_config(config.as_deref(), true)?;
    let topic = topics::dead_letter(pipeline);
    // With a code, the newest N of that code: everything is read, then filtered.
    let newest = limit
        .filter(|_| code.is_none())
        .map(|n| i64::try_from(n).unwrap_or(i64::MAX));
    let (mut letters, skipped) = ops::read_dead_letters(
        &config.kafka,
        &topic,
        HashMap::new(),
        newest,
        config.enricher_transactional(),
    )
    .await
    .with_context(|| format!("reading `{topic}`"))?;
    if let Some(code) = &code {
        letters.retain(|d| d.code == *code);
    }
    letters.sort_by_key(|d| (d.timestamp_millis, d.partition, d.offset));
    if let Some(n) = limit {
        let skip = letters.len().saturating_sub(n);
        letters.drain(..skip);
    }
    emit(&format_letters(&letters, output.output))?;
    crate::output::fail_on_skipped(&topic, &skipped)
}

/// `instream dlq redrive`: dead letters back to the raw topic (a dry run without `execute`).
async fn dlq_redrive(
    config: crate::ConfigArg,
    pipeline: &str,
    code: Option<String>,
    from: Vec<(i32, i64)>,
    execute: bool,
    output: crate::output::OutputArg,
) -> anyhow::Result<()> {
    let config = crate::standalone::state::cli_config(config.as_deref(), true)?;
    anyhow::ensure!(
        !(execute && config.kafka.broker == instream_core::config::BrokerMode::Embedded),
        "dlq redrive --execute cannot write into a running standalone: it bounds what its \
         topics hold by counting what its own services write (see the README); send the \
         events to its ingest instead (`dlq tail --output json` shows them)"
    );
    let dlq_topic = topics::dead_letter(pipeline);
    let raw = topics::raw(pipeline);
    let from: HashMap<i32, i64> = from.into_iter().collect();
    let (letters, skipped) = ops::read_dead_letters(
        &config.kafka,
        &dlq_topic,
        from.clone(),
        None,
        config.enricher_transactional(),
    )
    .await
    .with_context(|| format!("reading `{dlq_topic}`"))?;
    // Where the next redrive continues: after everything read now, and never before
    // where this one started.
    let mut next = from;
    for d in &letters {
        let n = next.entry(d.partition).or_insert(0);
        *n = (*n).max(d.offset + 1);
    }
    let plan = select_for_redrive(letters, code.as_deref(), &raw);
    let mut continue_from: Vec<(i32, i64)> = next.into_iter().collect();
    continue_from.sort();
    if let Output::Json = output.output {
        if execute {
            redrive(&config, &dlq_topic, &raw, &plan.send).await?;
        }
        crate::output::emit_json(&serde_json::json!({
            "executed": execute, "to": raw, "sent": if execute { plan.send.len() } else { 0 },
            "would_send": plan.send.len(), "left_alone": plan.left.len(),
            "continue_from": continue_from.iter()
                .map(|(p, o)| serde_json::json!({"partition": p, "offset": o}))
                .collect::<Vec<_>>(),
        }))?;
        return crate::output::fail_on_skipped(&dlq_topic, &skipped);
    }
    if execute {
        redrive(&config, &dlq_topic, &raw, &plan.send).await?;
    }
    emit(&redrive_summary(&plan, &raw, execute, &continue_from))?;
    crate::output::fail_on_skipped(&dlq_topic, &skipped)
}

/// What a redrive in text did, or would do; and where the next one continues.
fn redrive_summary(
    plan: &RedrivePlan,
    raw: &str,
    executed: bool,
    continue_from: &[(i32, i64)],
) -> String {
    use std::fmt::Write as _;
    let mut text = String::new();
    if !plan.left.is_empty() {
        let _ = writeln!(
            text,
            "{} dead letters are left alone (other codes, not from `{raw}`, or \
             `decode_error` not asked for by name; see `instream dlq tail`)",
            plan.left.len()
        );
    }
    if !executed {
        let _ = writeln!(
            text,
            "dry run: {} dead letters would go back to `{raw}`; add --execute",
            plan.send.len()
        );
        return text;
    }
    let _ = writeln!(text, "redrove {} dead letters to `{raw}`", plan.send.len());
    if !continue_from.is_empty() {
        let flags: Vec<String> = continue_from
            .iter()
            .map(|(p, o)| format!("--from-offset {p}:{o}"))
            .collect();
        let _ = writeln!(text, "to continue after these later: {}", flags.join(" "));
    }
    text
}

/// What a redrive sends, and what it leaves alone.
struct RedrivePlan {
    send: Vec<StoredDeadLetter>,
    left: Vec<StoredDeadLetter>,
}

/// Only records that came from the raw topic can go back there (what a later stage refused,
/// e.g. an event too late for its window, is not raw input); `decode_error` records only when
/// asked for by name (they are not instream events); and one raw record once, although the
/// enricher and the archiver may both have dead-lettered it.
fn select_for_redrive(
    letters: Vec<StoredDeadLetter>,
    code: Option<&str>,
    raw: &str,
) -> RedrivePlan {
    let mut seen = std::collections::HashSet::new();
    let mut plan = RedrivePlan {
        send: Vec::new(),
        left: Vec::new(),
    };
    for d in letters {
        let wanted = match code {
            Some(c) => d.code == c,
            None => d.code != instream_kafka::DeadLetterCode::DecodeError.as_str(),
        };
        let from_raw = d.origin_topic.as_deref() == Some(raw);
        let first = seen.insert((d.origin_partition, d.origin_offset));
        if wanted && from_raw && first {
            plan.send.push(d);
        } else if !(wanted && from_raw) {
            plan.left.push(d);
        }
    }
    plan
}

fn format_letters(letters: &[StoredDeadLetter], output: Output) -> String {
    use std::fmt::Write as _;
    let mut text = String::new();
    match output {
        Output::Json => {
            for d in letters {
                let payload: serde_json::Value = serde_json::from_slice(&d.payload)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&d.payload).into_owned().into());
                let _ = writeln!(
                    text,
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
            let _ = writeln!(
                text,
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
                let _ = writeln!(
                    text,
                    "{time:<24}  {:<9}  {:<18}  {origin:<24}  {}",
                    format!("{}:{}", d.partition, d.offset),
                    d.code,
                    d.reason
                );
            }
            if letters.is_empty() {
                let _ = writeln!(text, "(no dead letters)");
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_parsed_or_refused_precisely() {
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), Ok(1000));
        assert_eq!(parse_time("1970-01-01T01:00:01+01:00"), Ok(1000));
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
        assert_eq!(parse_partition_offset("3:120"), Ok((3, 120)));
        assert!(parse_partition_offset("3")
            .unwrap_err()
            .contains("PARTITION:OFFSET"));
    }
}

#[cfg(test)]
mod redrive_tests {
    use super::*;

    fn letter(offset: i64, code: &str, origin: &str, origin_offset: i64) -> StoredDeadLetter {
        StoredDeadLetter {
            partition: 0,
            offset,
            timestamp_millis: None,
            key: None,
            payload: Vec::new(),
            code: code.into(),
            reason: String::new(),
            service: String::new(),
            origin_topic: Some(origin.into()),
            origin_partition: Some(0),
            origin_offset: Some(origin_offset),
        }
    }

    #[test]
    fn redrive_sends_raw_origins_once_and_poison_only_by_name() {
        let letters = vec![
            letter(0, "enrich_miss", "p.raw", 5),
            letter(1, "decode_error", "p.raw", 6),
            letter(2, "decode_error", "p.raw", 6), // the archiver's copy of the same record
            letter(3, "unknown_pipeline", "p.enriched", 7),
        ];
        let plan = select_for_redrive(letters.clone(), None, "p.raw");
        let sent: Vec<i64> = plan.send.iter().map(|d| d.offset).collect();
        assert_eq!(sent, vec![0]);
        assert_eq!(plan.left.len(), 3);
        let plan = select_for_redrive(letters, Some("decode_error"), "p.raw");
        let sent: Vec<i64> = plan.send.iter().map(|d| d.offset).collect();
        assert_eq!(sent, vec![1], "one copy of the poison record, on request");
    }
}

/// Sends the dead letters back, reporting progress on stderr.
async fn redrive(
    config: &instream_core::Config,
    dlq_topic: &str,
    raw: &str,
    letters: &[ops::StoredDeadLetter],
) -> anyhow::Result<()> {
    let progress = instream_core::Progress::on_stderr(
        "dlq redrive",
        "dead letters",
        Some(letters.len() as u64),
    );
    ops::redrive(&config.kafka, dlq_topic, raw, letters, &progress)
        .await
        .with_context(|| format!("writing to `{raw}`"))?;
    progress.finish();
    Ok(())
}
