//! `instream status`: the live topology from the registry, and each consumer group's lag.

use std::path::PathBuf;

use anyhow::{bail, Context};
use instream_core::config::Config;
use instream_pipeline::{topics, Catalog};
use serde_json::json;

use instream_coord::Instance;
use instream_kafka::ops::PartitionLag;

use crate::control::current_catalog;
use crate::output::{emit, emit_json, table, Output};

/// A running standalone, as the one instance of every service (its state file says where).
fn standalone_instance(config: &Config) -> anyhow::Result<Vec<instream_coord::Instance>> {
    let state = crate::standalone::state::RunState::read(&config.standalone.state_file())?
        .context("no standalone state file")?;
    Ok(vec![instream_coord::Instance {
        service: "standalone".into(),
        instance: format!("pid-{}", state.pid),
        info: json!({
            "admin": state.admin,
            "ingest": state.ingest,
            "broker": state.broker,
            "run": state.run,
        }),
    }])
}

/// The consumer groups of the services, with the topics each reads.
fn groups(config: &Config, catalog: &Catalog) -> Vec<(String, String)> {
    let prefix = &config.kafka.group_prefix;
    let mut out = Vec::new();
    for def in catalog.iter() {
        out.push((format!("{prefix}-enricher"), topics::raw(&def.name)));
        out.push((format!("{prefix}-archiver"), topics::raw(&def.name)));
        out.push((format!("{prefix}-aggregator"), topics::enriched(&def.name)));
    }
    out.sort();
    out
}

/// One consumer group's lag on one topic: per partition, or why it could not be read.
type GroupLag = (String, String, Result<Vec<PartitionLag>, String>);

pub async fn status(config: Option<PathBuf>, output: Output) -> anyhow::Result<()> {
    let config = crate::standalone::state::cli_config(config.as_deref(), true)?;
    let instances = if config.kafka.broker == instream_core::config::BrokerMode::Embedded {
        standalone_instance(&config)?
    } else {
        registered_instances(&config).await?
    };
    let catalog = current_catalog(&config).await?;
    let mut lags = Vec::new();
    for (group, topic) in groups(&config, &catalog) {
        // A pipeline whose topics are not created yet is a row saying so, not a failure.
        let lag = instream_kafka::ops::group_lag(&config.kafka, &group, &topic)
            .await
            .map_err(|e| e.to_string());
        lags.push((group, topic, lag));
    }
    match output {
        Output::Json => emit_json(&json!({
            "instances": instances,
            "lag": lags.iter().map(|(g, t, l)| match l {
                Ok(l) => json!({
                    "group": g, "topic": t, "lag": l.iter().map(|p| p.lag).sum::<i64>(),
                    "partitions": l.iter().map(|p| json!({"partition": p.partition,
                        "committed": p.committed, "end": p.end, "lag": p.lag})).collect::<Vec<_>>(),
                }),
                Err(e) => json!({"group": g, "topic": t, "error": e}),
            }).collect::<Vec<_>>(),
        })),
        Output::Table => {
            let mut text = instances_table(&instances);
            text.push('\n');
            text.push_str(&lags_table(&lags));
            emit(&text)
        }
    }
}

/// The instances in ZooKeeper's registry.
async fn registered_instances(config: &Config) -> anyhow::Result<Vec<Instance>> {
    if config.definitions.source != instream_core::config::DefinitionSourceKind::Zookeeper {
        bail!(
            "the registry lives in ZooKeeper; this config reads definitions from a file, so \
             its services keep their registry inside their own process: use the \
             deployment's config, or that process's /metrics"
        );
    }
    instream_coord::coordinator(config)
        .instances()
        .await
        .context("reading the service registry")
}

fn instances_table(instances: &[Instance]) -> String {
    let rows: Vec<Vec<String>> = instances
        .iter()
        .map(|i| {
            let info = i.typed();
            let definitions = info
                .definitions
                .iter()
                .map(|(p, v)| format!("{p}@{v}"))
                .collect::<Vec<_>>()
                .join(",");
            vec![
                i.service.clone(),
                i.instance.clone(),
                info.admin,
                info.version,
                definitions,
                info.partitions.join(","),
            ]
        })
        .collect();
    table(
        &[
            "SERVICE",
            "INSTANCE",
            "ADMIN",
            "VERSION",
            "DEFINITIONS",
            "PARTITIONS",
        ],
        &rows,
    )
}

fn lags_table(lags: &[GroupLag]) -> String {
    let rows: Vec<Vec<String>> = lags
        .iter()
        .map(|(g, t, l)| match l {
            Ok(l) => {
                let uncommitted = l.iter().filter(|p| p.committed.is_none()).count();
                vec![
                    g.clone(),
                    t.clone(),
                    l.iter().map(|p| p.lag).sum::<i64>().to_string(),
                    format!("{} ({uncommitted} never committed)", l.len()),
                ]
            }
            Err(e) => vec![
                g.clone(),
                t.clone(),
                "-".into(),
                format!("unavailable: {e}"),
            ],
        })
        .collect();
    table(&["GROUP", "TOPIC", "LAG", "PARTITIONS"], &rows)
}
