//! `instream`: the operator CLI, and every service in one process.

mod demo;
mod ops;
mod standalone;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use instream_core::config::Config;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "instream", version, about = "In-stream processing platform")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs every service in one process (embedded broker, store and archive by config).
    Standalone {
        /// Config file (TOML); INSTREAM__SECTION__KEY variables override it.
        #[arg(long, short, env = "INSTREAM_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Starts the standalone platform, drives it with a generated auction stream for a while,
    /// and prints a summary; exits non-zero if any accepted event is missing downstream.
    Demo {
        /// How long to send events (`30s`, `2m`).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Events per second to send.
        #[arg(long, default_value_t = 2000)]
        rate: u32,
        /// Where the demo keeps its definitions, reference data and archive.
        #[arg(long, default_value = "instream-demo-data")]
        data_dir: PathBuf,
    },
    /// Validates pipeline definitions (a TOML or JSON file) and stores them in ZooKeeper,
    /// where every running service picks them up without a restart.
    PipelineApply {
        #[arg(long, short, env = "INSTREAM_CONFIG")]
        config: Option<PathBuf>,
        /// The definitions file: `[[pipelines]]` tables.
        file: PathBuf,
    },
    /// The aggregate store's schema.
    #[command(subcommand)]
    Schema(SchemaCommand),
    /// Consumer-group offsets: replay from a point in time.
    #[command(subcommand)]
    Offsets(ops::OffsetsCommand),
    /// Dead letters: look at them, and send them back once the cause is fixed.
    #[command(subcommand)]
    Dlq(ops::DlqCommand),
    /// Prints the configuration reference (Markdown): every key, its type, default and
    /// meaning, generated from the config types (docs/configuration.md is this output).
    ConfigReference,
    /// Validates a config file and prints the effective config (defaults filled in, secrets
    /// masked).
    CheckConfig {
        #[arg(long, short, env = "INSTREAM_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum SchemaCommand {
    /// Creates the keyspace and tables of `store` (ScyllaDB/Cassandra, or the local file) if
    /// they are missing; changes nothing that exists. Services apply it at start too.
    Apply {
        #[arg(long, short, env = "INSTREAM_CONFIG")]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckConfig { config } => check_config(config),
        Command::Schema(SchemaCommand::Apply { config }) => {
            runtime().and_then(|rt| rt.block_on(schema_apply(config)))
        }
        Command::Offsets(c) => runtime().and_then(|rt| rt.block_on(ops::offsets(c))),
        Command::Dlq(c) => runtime().and_then(|rt| rt.block_on(ops::dlq(c))),
        Command::ConfigReference => {
            print!("{}", instream_core::config::reference_markdown());
            Ok(())
        }
        Command::PipelineApply { config, file } => {
            runtime().and_then(|rt| rt.block_on(pipeline_apply(config, file)))
        }
        Command::Standalone { config } => runtime().and_then(|rt| rt.block_on(standalone(config))),
        Command::Demo {
            duration,
            rate,
            data_dir,
        } => {
            // On a terminal the live view is redrawn in place; warnings would scroll it away.
            let live = std::io::IsTerminal::is_terminal(&std::io::stdout());
            instream_core::telemetry::init_tracing(&instream_core::config::TelemetryConfig {
                log_format: instream_core::config::LogFormat::Pretty,
                log_level: if live { "error" } else { "warn" }.into(),
            });
            runtime().and_then(|rt| rt.block_on(demo::run(duration, rate, &data_dir)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("instream: {e:#}");
            // As the service binaries: 2 for an invalid config, 1 for anything else.
            if e.downcast_ref::<instream_core::ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn check_config(path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(path.as_deref())?;
    print!(
        "{}",
        toml::to_string(&config.redacted()).context("printing the config")?
    );
    Ok(())
}

async fn standalone(path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(path.as_deref())?;
    instream_core::telemetry::init_tracing(&config.telemetry);
    let drain = config.shutdown.drain_timeout;
    let token = CancellationToken::new();
    instream_core::shutdown_on_signal(token.clone());
    let started = std::time::Instant::now();
    let platform =
        standalone::Standalone::start_ready(config, token, Duration::from_secs(60)).await?;
    eprintln!(
        "instream standalone: ready in {:.2}s; ingest on http://{}, admin on http://{}; Ctrl-C stops",
        started.elapsed().as_secs_f64(),
        platform.ingest_addr,
        platform.admin_addr
    );
    platform.supervisor.wait(drain).await?;
    Ok(())
}

async fn pipeline_apply(config: Option<PathBuf>, file: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(config.as_deref())?;
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let document = instream_pipeline::parse_document(&text)?;
    for definition in &document.pipelines {
        instream_coord::publish_definition(&config.zookeeper, definition).await?;
        println!(
            "pipeline `{}` version {} stored",
            definition.name, definition.version
        );
    }
    Ok(())
}

async fn schema_apply(path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(path.as_deref())?;
    let store = instream_store::build(&config.store).await?;
    store.ping().await?;
    println!(
        "schema of the {:?} store applied (keyspace `{}`)",
        config.store.backend, config.store.keyspace
    );
    Ok(())
}
