//! instream-ingest: the front door. Producers POST JSON events over HTTP; each is validated
//! against its pipeline's definition, given its envelope (event id, key, event and ingest
//! time) and written to `<pipeline>.raw`, keyed by the partition key so one key's events stay
//! in order.
//!
//! Guarantee: a 200 answer means every accepted event was acknowledged by the broker
//! (`acks=all`, idempotent producer). Anything else — 503 with Retry-After when the broker is
//! slow or away — means "send the same request again": event ids are derived
//! deterministically (Idempotency-Key and index, or content), so a retry repeats ids and the
//! aggregator drops the repeats.

mod body;
mod handler;
mod keys;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::post;
use axum::Router;
use instream_core::Service;
use instream_kafka::Producer;
use instream_pipeline::Catalog;
use instream_stage::ServiceContext;
use instream_stage::Stage;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Kafka(#[from] instream_kafka::KafkaError),
    #[error(transparent)]
    Stage(#[from] instream_stage::StageError),
    #[error("serving HTTP: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Tls(#[from] instream_http::tls::TlsError),
    #[error("ingest: no API key is configured (ingest.api_keys) and anonymous access is off (ingest.allow_anonymous)")]
    NoKeys,
}

pub(crate) struct AppState {
    pub config: instream_core::config::IngestConfig,
    pub producer: Producer,
    pub catalog: watch::Receiver<Arc<Catalog>>,
    /// Events waiting for the broker, over all requests: back-pressure bound.
    pub in_flight_events: Semaphore,
    /// Requests being handled.
    pub in_flight_requests: Semaphore,
    /// Requests being handled, per client.
    pub clients: handler::Clients,
    pub keys: keys::ApiKeys,
    /// Standalone mode: what the topics hold unread; a request is admitted only if its
    /// pipeline's raw topic (and every other) has room (see `instream_core::backlog`).
    pub backlog: Option<instream_core::backlog::Backlog>,
    /// Each pipeline's compiled JSON Schema, per definition version.
    schemas: std::sync::Mutex<instream_pipeline::SchemaCache>,
}

impl AppState {
    /// The pipeline's compiled schema, compiled once per definition version.
    pub fn schema_of(
        &self,
        def: &instream_pipeline::PipelineDefinition,
    ) -> Option<Arc<jsonschema::Validator>> {
        self.schemas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(def)
    }
}

/// A bound ingest server, ready to serve.
pub struct Ingest {
    /// The handlers' producer, watched for a failure for good.
    producer: Producer,
    listener: TcpListener,
    /// Set with `ingest.tls`: connections are served over TLS.
    tls: Option<tokio_rustls::TlsAcceptor>,
    max_connections: usize,
    header_read_timeout: std::time::Duration,
    router: Router,
    _stage: Stage,
}

impl Ingest {
    /// Loads definitions, creates topics and the producer, and binds the HTTP listener.
    pub async fn start(ctx: &ServiceContext) -> Result<Ingest, IngestError> {
        let config = &ctx.config;
        let keys = keys::ApiKeys::from_config(&config.ingest).ok_or(IngestError::NoKeys)?;
        let tls = config
            .ingest
            .tls
            .as_ref()
            .map(|files| instream_http::tls::acceptor("ingest", &files.cert_file, &files.key_file))
            .transpose()?;
        if config.ingest.allow_anonymous {
            tracing::warn!("ingest accepts events without an API key (ingest.allow_anonymous)");
        }
        let stage = Stage::start(Service::Ingest, ctx).await?;
        let producer = instream_kafka::producer(&config.kafka, Service::Ingest.as_str())?;
        let limits = &config.ingest;
        let state = Arc::new(AppState {
            config: limits.clone(),
            backlog: config.kafka.backlog.clone(),
            producer,
            catalog: stage.catalog.clone(),
            in_flight_events: Semaphore::new(limits.max_in_flight_events),
            in_flight_requests: Semaphore::new(limits.max_in_flight_requests),
            clients: Default::default(),
            keys,
            schemas: Default::default(),
        });
        let router = Router::new()
            .route(
                "/v1/pipelines/{pipeline}/events",
                post(handler::post_events),
            )
            // The handler reads the body itself, within the limit, answering 413 in JSON.
            .layer(DefaultBodyLimit::disable())
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                handler::admit,
            ))
            // Outside `admit`: the API's description needs no key.
            .route("/openapi.json", axum::routing::get(openapi))
            .with_state(state.clone());
        let producer = state.producer.clone();
        let listener =
            TcpListener::bind(limits.listen)
                .await
                .map_err(|source| IngestError::Bind {
                    addr: limits.listen,
                    source,
                })?;
        if let Ok(bound) = listener.local_addr() {
            let scheme = if tls.is_some() { "https" } else { "http" };
            stage.registration.update(|info| {
                info.ports.insert("http".into(), bound.port());
                info.http = Some(bound.to_string());
                info.scheme = Some(scheme.into());
            });
        }
        Ok(Ingest {
            producer,
            listener,
            tls,
            max_connections: limits.max_connections,
            header_read_timeout: limits.header_read_timeout,
            router,
            _stage: stage,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown`, then finishes the requests in flight (their events are
    /// acknowledged or answered 503) and returns.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), IngestError> {
        let addr = self.local_addr().map_err(IngestError::Serve)?;
        let scheme = if self.tls.is_some() { "HTTPS" } else { "HTTP" };
        tracing::info!(%addr, scheme, "ingest listening");
        let limits = instream_http::Limits {
            max_connections: self.max_connections,
            header_read_timeout: self.header_read_timeout,
        };
        // Every answer would be 503 from a producer failed for good: stop (draining the
        // requests in flight) so that the process is restarted with a new one.
        let stop = shutdown.child_token();
        let serving = instream_http::serve(
            instream_http::Server("ingest"),
            self.listener,
            self.tls,
            self.router,
            limits,
            stop.clone(),
        );
        let mut serving = std::pin::pin!(serving);
        tokio::select! {
            () = &mut serving => Ok(()),
            error = instream_kafka::client::failed_for_good_watch(&self.producer) => {
                tracing::error!(%error, "the kafka producer failed for good; stopping");
                stop.cancel();
                serving.await;
                Err(IngestError::Kafka(error))
            }
        }
    }
}

/// The service: start, then serve until shutdown.
pub async fn run(ctx: ServiceContext) -> Result<(), IngestError> {
    Ingest::start(&ctx).await?.serve(ctx.shutdown).await
}

/// This API's OpenAPI document (docs/openapi/ingest.json; a test checks it against the
/// handlers).
pub const OPENAPI: &str = include_str!("../../../docs/openapi/ingest.json");

async fn openapi() -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
}
