//! The `main` of every service binary: arguments, config, logs, admin server, signals, and a
//! supervisor, so that each `instream-<service>` binary is three lines.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::admin::{AdminServer, Health};
use crate::config::Config;
use crate::shutdown::{shutdown_on_signal, Supervisor, Tasks};
use crate::telemetry;
pub use instream_config::Service;

#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The config file (TOML). Environment variables INSTREAM__SECTION__KEY override it.
    #[arg(long, short, env = "INSTREAM_CONFIG")]
    config: Option<PathBuf>,
}

/// What a service gets to run: its config, the readiness registry, the shutdown token, the
/// handle its tasks are spawned through, and its coordinator (`C`: registry, elections and
/// sources' progress; `instream_coord` names the type, which this crate cannot depend on).
pub struct ServiceContext<C = ()> {
    pub config: Config,
    pub health: Health,
    pub shutdown: CancellationToken,
    /// Where this process's admin server listens (for the service registry).
    pub admin_addr: std::net::SocketAddr,
    /// Every task of the service is spawned through this: one that fails stops the service.
    pub tasks: Tasks,
    /// Given by whatever runs the service, never found through a global: standalone hands
    /// every service it runs the one in-process coordinator.
    pub coordinator: C,
}

impl ServiceContext {
    /// A context whose tasks no supervisor waits on (a service run inside a test).
    pub fn new(
        config: Config,
        health: Health,
        shutdown: CancellationToken,
        admin_addr: std::net::SocketAddr,
    ) -> Self {
        Self {
            tasks: Tasks::detached(shutdown.clone()),
            config,
            health,
            shutdown,
            admin_addr,
            coordinator: (),
        }
    }
}

impl<C> ServiceContext<C> {
    /// This context with `coordinator` as its coordinator.
    pub fn with_coordinator<D>(self, coordinator: D) -> ServiceContext<D> {
        ServiceContext {
            config: self.config,
            health: self.health,
            shutdown: self.shutdown,
            admin_addr: self.admin_addr,
            tasks: self.tasks,
            coordinator,
        }
    }
}

/// Runs one service as a process. Exit codes: 0 after a clean shutdown, 1 when the service
/// failed, 2 when the config is invalid (the message names the key). `coordinator` makes the
/// service's coordinator from its validated config.
pub fn service_main<C, F, Fut, E>(
    service: Service,
    coordinator: impl FnOnce(&Config) -> C,
    run: F,
) -> ExitCode
where
    F: FnOnce(ServiceContext<C>) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + 'static,
{
    let args = Args::parse();
    crate::install_tls_provider();
    run_service(service, args.config.as_deref(), coordinator, run)
}

/// [`service_main`] with the config file already known (`instream run <service>` runs any
/// service from the one `instream` binary this way).
pub fn run_service<C, F, Fut, E>(
    service: Service,
    config: Option<&std::path::Path>,
    coordinator: impl FnOnce(&Config) -> C,
    run: F,
) -> ExitCode
where
    F: FnOnce(ServiceContext<C>) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + 'static,
{
    let config = match Config::load(config).and_then(|c| c.check_for(service).map(|()| c)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("instream-{service}: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_tracing(&config.telemetry);
    let coordinator = coordinator(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("instream-{service}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let token = CancellationToken::new();
        shutdown_on_signal(token.clone());
        let health = Health::default();
        let admin = AdminServer::from_config(&config.admin, health.clone())
            .await
            .map_err(|e| format!("admin server on {}: {e}", config.admin.listen))?;
        let admin_addr = admin.local_addr().map_err(|e| e.to_string())?;
        tracing::info!(%service, admin = %admin_addr, "starting");
        let drain = config.shutdown.drain_timeout;
        let mut supervisor = Supervisor::new(token.clone());
        supervisor.spawn("admin", admin.serve(token.clone()));
        let tasks = supervisor.tasks();
        supervisor.spawn(
            service.as_str(),
            run(ServiceContext {
                config,
                health,
                shutdown: token,
                admin_addr,
                tasks,
                coordinator,
            }),
        );
        // The admin server stops at once; the service gets the drain time, plus a margin for
        // its final commit.
        supervisor
            .wait(drain + Duration::from_secs(2))
            .await
            .map_err(|e| e.to_string())
    });
    // Kafka clients flush on drop; leave them a moment without blocking forever.
    runtime.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(()) => {
            tracing::info!(%service, "stopped cleanly");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(%service, error = %e, "stopped with an error");
            eprintln!("instream-{service}: {e}");
            ExitCode::FAILURE
        }
    }
}
