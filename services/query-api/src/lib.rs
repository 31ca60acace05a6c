//! instream-query-api: windowed aggregates over HTTP, read from the [`AggregateStore`] the
//! aggregator writes.
//!
//! `GET /v1/pipelines/{pipeline}/aggregates/{aggregation}?key=K&from=T1&to=T2&limit=N&page_token=P`
//! answers the windows of group `K` whose start lies in `[T1, T2)` (RFC 3339 or epoch
//! milliseconds; the last 24 hours by default), oldest first, `limit` per page, with a
//! `next_page_token` while more remain. Requests carry `Authorization: Bearer <key>`; keys are
//! configured as SHA-256 digests and compared in constant time. `/readyz` follows the store.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use instream_coord::ServiceContext;
use instream_core::config::QueryApiConfig;
use instream_pipeline::Catalog;
use instream_store::{AggregateQuery, AggregateStore, WindowAggregate};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

mod audit_check;
mod ledger;

const SERVICE: instream_core::Service = instream_core::Service::QueryApi;
/// How often the store is pinged for `/readyz`.
const STORE_PROBE_INTERVAL: Duration = Duration::from_secs(5);
const DAY_MILLIS: i64 = 24 * 3600 * 1000;

#[derive(Debug, thiserror::Error)]
pub enum QueryApiError {
    #[error("query_api: no API key is configured (query_api.api_key_sha256) and anonymous access is off (query_api.allow_anonymous)")]
    NoKeys,
    #[error("query_api.listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] instream_http::tls::TlsError),
    #[error("query-api server: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Store(#[from] instream_store::StoreError),
    #[error(transparent)]
    Definitions(#[from] instream_pipeline::DefinitionError),
}

struct AppState {
    store: Arc<dyn AggregateStore>,
    /// The pipelines and aggregations that exist (an unknown one is a 404, not an empty page).
    catalog: watch::Receiver<Arc<Catalog>>,
    config: QueryApiConfig,
    /// Decoded digests of the accepted keys.
    keys: Vec<[u8; 32]>,
}

/// A bound query-api, not yet serving.
pub struct QueryApi {
    listener: tokio::net::TcpListener,
    /// Set with `query_api.tls`: connections are served over TLS.
    tls: Option<instream_http::tls::TlsAcceptor>,
    router: Router,
    limits: instream_http::Limits,
}

impl QueryApi {
    /// Checks the keys, binds the listener and starts watching the store's health.
    pub async fn start(
        ctx: &ServiceContext,
        store: Arc<dyn AggregateStore>,
        catalog: watch::Receiver<Arc<Catalog>>,
    ) -> Result<QueryApi, QueryApiError> {
        let (config, health, tasks) = (&ctx.config, &ctx.health, &ctx.tasks);
        let cfg = &config.query_api;
        let keys: Vec<[u8; 32]> = cfg
            .api_key_sha256
            .iter()
            .filter_map(|hex| instream_core::auth::decode_digest(hex))
            .collect();
        if keys.is_empty() && !cfg.allow_anonymous {
            return Err(QueryApiError::NoKeys);
        }
        // `/readyz` says whether queries can be answered.
        let probed = store.clone();
        tasks.spawn(
            "query-api store probe",
            health.register("query-api.store").probe(
                STORE_PROBE_INTERVAL,
                tasks.token(),
                move || {
                    let store = probed.clone();
                    async move { store.ping().await }
                },
            ),
        );
        if !cfg.audit_every.is_zero() {
            tasks.spawn(
                "periodic audit",
                audit_check::run(
                    config.clone(),
                    ctx.coordinator.clone(),
                    store.clone(),
                    catalog.clone(),
                    tasks.token(),
                ),
            );
        }
        let state = Arc::new(AppState {
            store,
            catalog,
            config: cfg.clone(),
            keys,
        });
        let router = Router::new()
            .route(
                "/v1/pipelines/{pipeline}/aggregates/{aggregation}",
                get(aggregates),
            )
            .route("/v1/pipelines/{pipeline}/ledger", get(ledger::ledger))
            .route("/openapi.json", get(openapi))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| QueryApiError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let tls = cfg
            .tls
            .as_ref()
            .map(|files| {
                instream_http::tls::acceptor("query_api", &files.cert_file, &files.key_file)
            })
            .transpose()?;
        Ok(QueryApi {
            listener,
            tls,
            router,
            limits: instream_http::Limits {
                max_connections: cfg.max_connections,
                header_read_timeout: cfg.header_read_timeout,
            },
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), QueryApiError> {
        tracing::info!(addr = %self.local_addr().map_err(QueryApiError::Serve)?, "query-api listening");
        instream_http::serve(
            instream_http::Server("query_api"),
            self.listener,
            self.tls,
            self.router,
            self.limits,
            shutdown,
        )
        .await;
        Ok(())
    }
}

/// The service: the store `config.store` names, then serve until shutdown.
pub async fn run(ctx: ServiceContext) -> Result<(), QueryApiError> {
    let store = instream_store::build(&ctx.config.store).await?;
    run_with_store(ctx, store).await
}

/// With a given store (standalone mode shares the aggregator's embedded store).
pub async fn run_with_store(
    ctx: ServiceContext,
    store: Arc<dyn AggregateStore>,
) -> Result<(), QueryApiError> {
    let catalog = instream_coord::definition_source(&ctx.config)
        .subscribe(ctx.shutdown.clone())
        .await?;
    QueryApi::start(&ctx, store, catalog)
        .await?
        .serve(ctx.shutdown)
        .await
}

#[derive(Default)]
struct Params {
    key: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<usize>,
    page_token: Option<String>,
}

impl Params {
    /// Parses a query string strictly: every name known, every value valid UTF-8 once
    /// percent-decoded (a `%FF` is refused, not turned into U+FFFD), no name twice.
    fn parse(query: Option<&str>) -> Result<Params, Refusal> {
        let bad = |message: String| failure(StatusCode::BAD_REQUEST, "bad_query", message);
        let mut params = Params::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |text: &str| {
                let spaced = text.replace('+', " ");
                percent_encoding::percent_decode_str(&spaced)
                    .decode_utf8()
                    .map(|v| v.into_owned())
                    .map_err(|_| bad(format!("`{}` is not UTF-8 once decoded", shown(pair))))
            };
            let (name, value) = (decode(name)?, decode(value)?);
            let slot = match name.as_str() {
                "key" => &mut params.key,
                "from" => &mut params.from,
                "to" => &mut params.to,
                "page_token" => &mut params.page_token,
                "limit" => {
                    if params.limit.is_some() {
                        return Err(bad("`limit` is given twice".into()));
                    }
                    params.limit = Some(value.parse().map_err(|_| {
                        bad(format!(
                            "`limit` must be a whole number, got `{}`",
                            shown(&value)
                        ))
                    })?);
                    continue;
                }
                // Anything else (a cache-buster) is not ours to judge.
                _ => continue,
            };
            if slot.is_some() {
                return Err(bad(format!("`{name}` is given twice")));
            }
            *slot = Some(value);
        }
        Ok(params)
    }
}

#[derive(Serialize)]
struct Window {
    window_start: String,
    window_end: String,
    count: i64,
    values: serde_json::Map<String, serde_json::Value>,
    definition_version: i64,
    /// The watermark passed the window's end plus its allowed lateness: it will not change.
    #[serde(rename = "final")]
    is_final: bool,
}

#[derive(Serialize)]
struct Page {
    pipeline: String,
    aggregation: String,
    key: String,
    windows: Vec<Window>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_page_token: Option<String>,
}

#[derive(Serialize)]
struct Failure {
    error: &'static str,
    message: String,
}

/// A refused request: its status, a stable error code and a precise message.
struct Refusal {
    status: StatusCode,
    error: &'static str,
    message: String,
}

fn failure(status: StatusCode, error: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        error,
        message: message.into(),
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(Failure {
                error: self.error,
                message: self.message,
            }),
        )
            .into_response();
        let extra = match self.status {
            StatusCode::UNAUTHORIZED => Some((header::WWW_AUTHENTICATE, "Bearer")),
            StatusCode::SERVICE_UNAVAILABLE => Some((header::RETRY_AFTER, "1")),
            _ => None,
        };
        if let Some((name, value)) = extra {
            response
                .headers_mut()
                .insert(name, header::HeaderValue::from_static(value));
        }
        response
    }
}

/// Whether the request carries an accepted key.
fn authorized(state: &AppState, headers: &HeaderMap) -> Result<(), Refusal> {
    if state.keys.is_empty() && state.config.allow_anonymous {
        return Ok(());
    }
    let Some(key) = instream_core::auth::bearer(headers) else {
        return Err(failure(
            StatusCode::UNAUTHORIZED,
            "missing_api_key",
            "send `Authorization: Bearer <api key>`",
        ));
    };
    match instream_core::auth::find_key(&state.keys, key) {
        Some(_) => Ok(()),
        None => Err(failure(
            StatusCode::FORBIDDEN,
            "unknown_api_key",
            "the API key is not accepted",
        )),
    }
}

fn parse_time(name: &str, value: &str) -> Result<i64, Refusal> {
    if let Ok(millis) = value.parse::<i64>() {
        return Ok(millis);
    }
    instream_event::parse_event_time(&serde_json::Value::String(value.to_owned())).map_err(|_| {
        failure(
            StatusCode::BAD_REQUEST,
            "bad_time",
            format!(
                "`{name}` must be RFC 3339 or epoch milliseconds, got `{}`",
                shown(value)
            ),
        )
    })
}

async fn aggregates(
    State(state): State<Arc<AppState>>,
    // Raw: a name is `[a-z0-9_-]`, so an escape (even one that does not decode, `%FF`) names
    // nothing, and is answered after the key is checked, like any unknown name.
    uri: axum::http::Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    // `/v1/pipelines/{pipeline}/aggregates/{aggregation}`, as sent.
    let mut segments = uri.path().split('/').skip(3).step_by(2);
    let (pipeline, aggregation) = (
        segments.next().unwrap_or_default().to_owned(),
        segments.next().unwrap_or_default().to_owned(),
    );
    let started = Instant::now();
    let response = respond(answer(&state, pipeline, aggregation, query, &headers).await);
    metrics::histogram!("instream_query_latency_seconds", "service" => SERVICE.as_str())
        .record(started.elapsed().as_secs_f64());
    response
}

/// The JSON answer, or the refusal (counted by its error code); every answer counted by its
/// status.
fn respond<T: Serialize>(answered: Result<T, Refusal>) -> Response {
    let response = match answered {
        Ok(body) => Json(body).into_response(),
        Err(refusal) => {
            metrics::counter!("instream_query_refused_total", "error" => refusal.error)
                .increment(1);
            refusal.into_response()
        }
    };
    instream_core::events::http_request_answered(SERVICE, response.status().as_u16());
    response
}

/// `name` as a message may quote it: at most 64 characters.
fn shown(name: &str) -> String {
    let cut: String = name.chars().take(64).collect();
    if cut.len() < name.len() {
        format!("{cut}…")
    } else {
        cut
    }
}

async fn answer(
    state: &AppState,
    pipeline: String,
    aggregation: String,
    query: Option<String>,
    headers: &HeaderMap,
) -> Result<Page, Refusal> {
    // The key first: a client without one learns nothing, not even what it got wrong.
    authorized(state, headers)?;
    let group_parts = group_parts(state, &pipeline, &aggregation)?;
    let params = Params::parse(query.as_deref())?;
    let key = group_key(params.key.as_deref(), &aggregation, group_parts)?;
    let (from, to, limit) = range_and_limit(state, &params)?;
    // One more than asked: whether another page follows.
    let query = AggregateQuery {
        pipeline: pipeline.clone(),
        aggregation: aggregation.clone(),
        group_key: key.clone(),
        from,
        to,
        limit: limit + 1,
    };
    let mut rows: Vec<WindowAggregate> = match state.store.query(&query).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(error = %e, "store query failed");
            return Err(failure(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the aggregate store did not answer; retry",
            ));
        }
    };
    let next_page_token = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|w| (w.window_start + 1).to_string())
    } else {
        None
    };
    let windows = rows
        .into_iter()
        .map(|w| Window {
            window_start: instream_event::format_rfc3339_millis(w.window_start),
            window_end: instream_event::format_rfc3339_millis(w.window_end),
            count: w.count,
            values: w.values,
            definition_version: w.definition_version,
            is_final: w.is_final,
        })
        .collect();
    Ok(Page {
        pipeline,
        aggregation,
        key,
        windows,
        next_page_token,
    })
}

/// How many group-by fields `aggregation` of `pipeline` has; unknown names refused (404).
fn group_parts(state: &AppState, pipeline: &str, aggregation: &str) -> Result<usize, Refusal> {
    let known = {
        let catalog = state.catalog.borrow();
        catalog.get(pipeline).map(|def| {
            def.aggregations
                .iter()
                .find(|a| a.name == aggregation)
                .map(|a| a.group_by.len())
        })
    };
    match known {
        None => Err(failure(
            StatusCode::NOT_FOUND,
            "unknown_pipeline",
            format!("no pipeline named `{}`", shown(pipeline)),
        )),
        Some(None) => Err(failure(
            StatusCode::NOT_FOUND,
            "unknown_aggregation",
            format!(
                "pipeline `{pipeline}` has no aggregation named `{}`",
                shown(aggregation)
            ),
        )),
        Some(Some(parts)) => Ok(parts),
    }
}

/// The `key` parameter as the store keeps it: required, and for several group-by fields a
/// JSON array of that many values, normalised.
fn group_key(key: Option<&str>, aggregation: &str, group_parts: usize) -> Result<String, Refusal> {
    let Some(mut key) = key.filter(|k| !k.is_empty()).map(str::to_owned) else {
        return Err(failure(
            StatusCode::BAD_REQUEST,
            "missing_key",
            "`key` (the group: the partition key, or for several group-by fields their values as a JSON array, e.g. `[\"c1\",\"gold\"]`) is required",
        ));
    };
    if group_parts > 1 {
        // Written as the client likes (spaces, `1.0`), looked up as stored.
        key = instream_event::normalize_group_key(&key, group_parts).ok_or_else(|| {
            failure(
                StatusCode::BAD_REQUEST,
                "bad_key",
                format!(
                    "`{aggregation}` groups by {group_parts} fields: `key` must be a JSON array of \
                     {group_parts} values (e.g. `[\"c1\",\"gold\"]`), got `{}`",
                    shown(&key)
                ),
            )
        })?;
    }
    Ok(key)
}

/// The window starts asked for (`[from, to)`: the last day by default, from the page token
/// on) and the page size, each checked.
fn range_and_limit(state: &AppState, params: &Params) -> Result<(i64, i64, usize), Refusal> {
    let now = instream_event::now_millis();
    let to = match &params.to {
        Some(v) => parse_time("to", v)?,
        None => now.saturating_add(1),
    };
    let mut from = match &params.from {
        Some(v) => parse_time("from", v)?,
        None => to.saturating_sub(DAY_MILLIS),
    };
    if let Some(token) = &params.page_token {
        match token.parse::<i64>() {
            Ok(next) if next >= from => from = next,
            _ => {
                return Err(failure(
                    StatusCode::BAD_REQUEST,
                    "bad_page_token",
                    "`page_token` must be a value a previous page returned",
                ))
            }
        }
    }
    if from >= to {
        return Err(failure(
            StatusCode::BAD_REQUEST,
            "empty_range",
            "`from` must be before `to`",
        ));
    }
    let limit = params.limit.unwrap_or(state.config.default_page_size);
    if limit == 0 || limit > state.config.max_page_size {
        return Err(failure(
            StatusCode::BAD_REQUEST,
            "bad_limit",
            format!("`limit` must be 1..={}", state.config.max_page_size),
        ));
    }
    Ok((from, to, limit))
}

/// This API's OpenAPI document (docs/openapi/query-api.json; a test checks it against the
/// handlers).
pub const OPENAPI: &str = include_str!("../../../docs/openapi/query-api.json");

async fn openapi() -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
}
