//! `instream`: the operator CLI, and every service in one process.

mod archive;
mod audit;
mod control;
mod demo;
mod ops;
mod output;
mod quality;
mod standalone;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use instream_core::config::Config;
use tokio_util::sync::CancellationToken;

// mimalloc, as in the enricher's and the aggregator's own binaries: standalone and
// `instream run` carry their hot paths.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "instream", version, about = "In-stream processing platform")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs one service as this process, exactly as its own binary (`instream-<service>`)
    /// does: one image can hold every service.
    Run {
        #[arg(value_enum)]
        service: Service,
        #[command(flatten)]
        config: crate::ConfigArg,
    },
    /// Runs every service in one process (embedded broker, store and archive by config).
    Standalone {
        #[command(flatten)]
        config: crate::ConfigArg,
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
    /// Pipeline definitions in ZooKeeper: apply (validate and store), get, list, diff.
    #[command(subcommand)]
    Pipeline(control::PipelineCommand),
    /// A pipeline's Kafka topics.
    #[command(subcommand)]
    Topics(control::TopicsCommand),
    /// Reference data for enrichment.
    #[command(subcommand)]
    Refdata(control::RefdataCommand),
    /// The live topology: every registered instance (service, admin address, definition
    /// versions, assigned partitions) and each consumer group's lag.
    Status {
        #[command(flatten)]
        config: crate::ConfigArg,
        #[command(flatten)]
        output: output::OutputArg,
    },
    /// Reads one group's windows of an aggregation from the aggregate store.
    Query {
        #[command(flatten)]
        config: crate::ConfigArg,
        #[arg(long)]
        pipeline: String,
        #[arg(long)]
        aggregation: String,
        /// The group key: the event key; for several group-by fields their values as a JSON
        /// array (`'["c1","gold"]'`).
        #[arg(long)]
        key: String,
        /// Windows starting at or after this RFC 3339 time.
        #[arg(long, value_parser = ops::parse_time)]
        from: Option<i64>,
        /// Windows starting before this RFC 3339 time.
        #[arg(long, value_parser = ops::parse_time)]
        to: Option<i64>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        output: output::OutputArg,
    },
    /// The aggregate store's schema.
    #[command(subcommand)]
    Schema(SchemaCommand),
    /// Consumer-group offsets: replay from a point in time.
    #[command(subcommand)]
    Offsets(ops::OffsetsCommand),
    /// Data-quality rules: what they found.
    #[command(subcommand)]
    Quality(quality::QualityCommand),
    /// Dead letters: look at them, and send them back once the cause is fixed.
    #[command(subcommand)]
    Dlq(ops::DlqCommand),
    /// The archive of raw events: check it.
    #[command(subcommand)]
    Archive(archive::ArchiveCommand),
    /// Per hour of ingest time, what each stage made of every raw record (enriched,
    /// dead-lettered by code, archived) and whether it balances; every difference named with
    /// its hour, stage and size. Exits 1 when something does not balance after `--settle`.
    Audit(audit::AuditArgs),
    /// Prints a completion script for `shell`, e.g.
    /// `instream completions bash > /etc/bash_completion.d/instream`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Prints the configuration reference (Markdown): every key, its type, default and
    /// meaning, generated from the config types (docs/configuration.md is this output).
    ConfigReference,
    /// Validates a config file and prints the effective config (defaults filled in, secrets
    /// masked).
    CheckConfig {
        #[command(flatten)]
        config: crate::ConfigArg,
        /// Also make the checks these services make at start (an API key for ingest, …);
        /// repeat or separate with commas.
        #[arg(long, value_delimiter = ',')]
        service: Vec<Service>,
    },
}

/// The config file every command reads, declared once.
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct ConfigArg {
    /// Config file (TOML); INSTREAM__SECTION__KEY variables override it.
    #[arg(long, short, env = "INSTREAM_CONFIG")]
    config: Option<PathBuf>,
}

impl ConfigArg {
    pub(crate) fn as_deref(&self) -> Option<&std::path::Path> {
        self.config.as_deref()
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Service {
    Ingest,
    Enricher,
    Aggregator,
    Archiver,
    QueryApi,
    DbSource,
}

impl Service {
    fn named(self) -> instream_core::Service {
        use instream_core::Service as Named;
        match self {
            Service::Ingest => Named::Ingest,
            Service::Enricher => Named::Enricher,
            Service::Aggregator => Named::Aggregator,
            Service::Archiver => Named::Archiver,
            Service::QueryApi => Named::QueryApi,
            Service::DbSource => Named::DbSource,
        }
    }
}

/// Runs one service as this process (`instream run <service>`).
fn run_one(service: Service, config: Option<&std::path::Path>) -> ExitCode {
    use instream_coord::run_service;
    use instream_core::Service as Named;
    match service {
        Service::Ingest => run_service(Named::Ingest, config, instream_ingest::run),
        Service::Enricher => run_service(Named::Enricher, config, instream_enricher::run),
        Service::Aggregator => run_service(Named::Aggregator, config, instream_aggregator::run),
        Service::Archiver => run_service(Named::Archiver, config, instream_archiver::run),
        Service::QueryApi => run_service(Named::QueryApi, config, instream_query_api::run),
        Service::DbSource => run_service(Named::DbSource, config, instream_db_source::run),
    }
}

#[derive(Subcommand)]
enum SchemaCommand {
    /// Creates the keyspace and tables of `store` (ScyllaDB/Cassandra, or the local file) if
    /// they are missing; changes nothing that exists. Services apply it at start too.
    Apply {
        #[command(flatten)]
        config: crate::ConfigArg,
        #[command(flatten)]
        output: output::OutputArg,
    },
}

fn main() -> ExitCode {
    // Fail points (tests) come from FAILPOINTS; inert unless built with `fail/failpoints`.
    let _failpoints = fail::FailScenario::setup();
    instream_core::install_tls_provider();
    let cli = match parse_arguments() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    dispatch(cli.command)
}

/// The command line; `Err`: the exit code after `--help`, `--version` or a usage error (one
/// line on stderr).
fn parse_arguments() -> Result<Cli, ExitCode> {
    match Cli::try_parse() {
        Ok(cli) => Ok(cli),
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            Err(ExitCode::SUCCESS)
        }
        Err(e) => {
            // One line, like every other error; `--help` has the usage.
            let text = e.kind().to_string();
            let detail = e.to_string();
            let first = detail
                .lines()
                .next()
                .unwrap_or(&text)
                .trim_start_matches("error: ");
            eprintln!("instream: {first} (see --help)");
            Err(ExitCode::from(2))
        }
    }
}

/// Runs a command: a service (`run`) to its own exit code; any other on a runtime, its error
/// printed on one line.
fn dispatch(command: Command) -> ExitCode {
    let result = match command {
        Command::Run { service, config } => return run_one(service, config.as_deref()),
        Command::CheckConfig { config, service } => check_config(config.config, &service),
        Command::Schema(SchemaCommand::Apply { config, output }) => {
            block_on(schema_apply(config.config, output.output))
        }
        Command::Offsets(c) => block_on(ops::offsets(c)),
        Command::Dlq(c) => block_on(ops::dlq(c)),
        Command::Quality(c) => block_on(quality::quality(c)),
        Command::Archive(c) => block_on(archive::archive(c)),
        Command::Audit(args) => block_on(audit::audit(args)),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "instream",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::ConfigReference => {
            print!("{}", instream_core::config::reference_markdown());
            Ok(())
        }
        Command::Pipeline(c) => block_on(control::pipeline(c)),
        Command::Topics(c) => block_on(control::topics_create(c)),
        Command::Refdata(c) => block_on(control::refdata(c)),
        Command::Status { config, output } => {
            block_on(status::status(config.config, output.output))
        }
        Command::Query {
            config,
            pipeline,
            aggregation,
            key,
            from,
            to,
            limit,
            output,
        } => block_on(control::query(
            config.config,
            pipeline,
            aggregation,
            key,
            from,
            to,
            limit,
            output.output,
        )),
        Command::Standalone { config } => block_on(standalone(config.config)),
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
            block_on(demo::run(duration, rate, &data_dir))
        }
    };
    exit_code(result)
}

/// The exit code of a command's result, its error printed on one line.
fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, so scripts and logs keep it whole; a list of problems stays readable
            // as `… invalid: - a - b`.
            let text = format!("{e:#}");
            let line: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("instream: {}", line.join(" "));
            // As the service binaries: 2 for an invalid config, 1 for anything else.
            if e.downcast_ref::<instream_core::ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Runs `work` on a multi-threaded runtime. The runtime is then given five seconds to wind
/// down (librdkafka clients flush and close on drop) instead of as long as a client stuck on a
/// broker that is gone would hold the process.
fn block_on(work: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(work);
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
}

fn check_config(path: Option<PathBuf>, services: &[Service]) -> anyhow::Result<()> {
    let config = Config::load(path.as_deref())?;
    for service in services {
        config.check_for(service.named())?;
    }
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
    let stop_timeout = config.standalone.stop_timeout;
    let token = CancellationToken::new();
    // The first signal starts a clean stop (intake closed, topics read to their end, stages
    // drained); a second one exits at once.
    let stop = CancellationToken::new();
    instream_core::shutdown_on_signal(stop.clone());
    let started = std::time::Instant::now();
    let platform =
        standalone::Standalone::start_ready(config, token.clone(), Duration::from_secs(60)).await?;
    let broker = platform
        .run_state()
        .map(|run| format!("; embedded broker {} (run {})", run.broker, run.run))
        .unwrap_or_default();
    eprintln!(
        "instream standalone: ready in {:.2}s; ingest on http://{}, admin on http://{}{broker}; Ctrl-C stops",
        started.elapsed().as_secs_f64(),
        platform.ingest_addr,
        platform.admin_addr
    );
    tokio::select! {
        _ = stop.cancelled() => {}
        // A service failed: stop the rest.
        _ = token.cancelled() => {}
    }
    platform
        .stop(stop_timeout, drain + Duration::from_secs(2))
        .await
}

async fn schema_apply(path: Option<PathBuf>, output: output::Output) -> anyhow::Result<()> {
    let config = Config::load(path.as_deref())?;
    let store = instream_store::build(&config.store).await?;
    store.ping().await?;
    match output {
        output::Output::Json => output::emit_json(&serde_json::json!({
            "applied": true,
            "backend": format!("{:?}", config.store.backend).to_lowercase(),
            "keyspace": config.store.keyspace,
        })),
        output::Output::Table => output::emit(&format!(
            "schema of the {:?} store applied (keyspace `{}`)\n",
            config.store.backend, config.store.keyspace
        )),
    }
}
