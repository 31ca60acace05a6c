//! The admin HTTP server every service runs on its own port, and the readiness registry.
//!
//! `/healthz` answers 200 while the process serves HTTP at all (liveness). `/readyz` answers
//! 200 only while every registered component says it can do its work — its dependencies are
//! reachable — and 503 with the reasons otherwise. Partition assignment is deliberately not
//! part of readiness: an instance without partitions after a rebalance is healthy (docs/guarantees.md).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::telemetry::metrics_handle;

/// The readiness registry of a process: components register, and `/readyz` reads them all.
#[derive(Clone, Default)]
pub struct Health {
    components: Arc<RwLock<BTreeMap<String, Readiness>>>,
}

/// One component's readiness, held by the component and flipped as its dependencies come and go.
#[derive(Clone)]
pub struct Readiness {
    name: Arc<str>,
    ready: Arc<AtomicBool>,
    reason: Arc<Mutex<String>>,
}

#[derive(Debug, Serialize)]
pub struct ComponentStatus {
    pub name: String,
    pub ready: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

impl Health {
    /// Registers a component, not ready until it says so.
    pub fn register(&self, name: &str) -> Readiness {
        let readiness = Readiness {
            name: name.into(),
            ready: Arc::new(AtomicBool::new(false)),
            reason: Arc::new(Mutex::new("starting".into())),
        };
        readiness.publish(false);
        let mut components = self
            .components
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        components.insert(name.to_owned(), readiness.clone());
        readiness
    }

    /// Ready when at least one component is registered and every one is ready (nothing
    /// registered yet means still starting).
    pub fn is_ready(&self) -> bool {
        let report = self.report();
        !report.is_empty() && report.iter().all(|c| c.ready)
    }

    pub fn report(&self) -> Vec<ComponentStatus> {
        let components = self
            .components
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        components
            .values()
            .map(|r| ComponentStatus {
                name: r.name.to_string(),
                ready: r.is_ready(),
                reason: r.reason(),
            })
            .collect()
    }
}

impl Readiness {
    pub fn set_ready(&self) {
        if !self.ready.swap(true, Ordering::AcqRel) {
            tracing::info!(component = %self.name, "ready");
        }
        self.set_reason(String::new());
        self.publish(true);
    }

    /// Marks the component not ready, with a reason shown on `/readyz` (never a secret).
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        let reason = reason.into();
        if self.ready.swap(false, Ordering::AcqRel) {
            tracing::warn!(component = %self.name, %reason, "not ready");
        }
        self.set_reason(reason);
        self.publish(false);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn reason(&self) -> String {
        self.reason
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn set_reason(&self, reason: String) {
        *self
            .reason
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = reason;
    }

    /// Keeps this component saying whether a backend answers: `check` now and then every
    /// `every`, until `stop` (an idle stage still reports a backend going away). Spawned
    /// through the service's [`Tasks`](crate::Tasks).
    pub async fn probe<F, Fut, E>(
        self,
        every: std::time::Duration,
        stop: CancellationToken,
        mut check: F,
    ) -> Result<(), std::convert::Infallible>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        loop {
            match check().await {
                Ok(()) => self.set_ready(),
                Err(error) => self.set_not_ready(error.to_string()),
            }
            if stop
                .run_until_cancelled(tokio::time::sleep(every))
                .await
                .is_none()
            {
                return Ok(());
            }
        }
    }

    fn publish(&self, ready: bool) {
        metrics::gauge!("instream_component_ready", "component" => self.name.to_string())
            .set(if ready { 1.0 } else { 0.0 });
    }
}

/// A bound admin server; [`AdminServer::serve`] runs it until shutdown.
pub struct AdminServer {
    listener: TcpListener,
    health: Health,
    limits: instream_http::Limits,
}

impl AdminServer {
    /// Binds `addr` with the default limits.
    pub async fn bind(addr: SocketAddr, health: Health) -> std::io::Result<AdminServer> {
        let config = crate::config::AdminConfig {
            listen: addr,
            ..Default::default()
        };
        Self::from_config(&config, health).await
    }

    /// Binds `admin.listen` with `admin`'s limits.
    pub async fn from_config(
        config: &crate::config::AdminConfig,
        health: Health,
    ) -> std::io::Result<AdminServer> {
        // The recorder must exist before any service task starts: a metric handle taken
        // before it (`let gauge = gauge!(…)` kept for the task's life) is a no-op forever.
        // Installing it when `serve` first runs raced with the service task spawned next.
        metrics_handle();
        let listener = TcpListener::bind(config.listen).await?;
        Ok(AdminServer {
            listener,
            health,
            limits: instream_http::Limits {
                max_connections: config.max_connections,
                header_read_timeout: config.header_read_timeout,
            },
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn serve(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let app = Router::new()
            .route("/metrics", get(render_metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .with_state(self.health);
        instream_http::serve(
            instream_http::Server("admin"),
            self.listener,
            None,
            app,
            self.limits,
            shutdown,
        )
        .await;
        Ok(())
    }
}

async fn render_metrics() -> impl IntoResponse {
    let handle = metrics_handle();
    handle.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
}

async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    let status = if health.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(health.report()))
}
