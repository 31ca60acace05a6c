// The handler's steps return the response that refuses the request as their error: once per
// request, where boxing it would only move the allocation.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use instream_core::events::{events_handled, stage_latency};
use instream_core::Service;
use instream_event::{Event, Rejection};
use instream_kafka::{client, KafkaError, Outgoing};
use instream_pipeline::topics;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::body::{self, BodyError, Framing, ShapeLimits};
use crate::keys::Denied;
use crate::AppState;
use instream_pipeline::{envelope, IdSource};

const SERVICE: Service = Service::Ingest;

#[derive(Serialize)]
struct Refused {
    index: usize,
    code: &'static str,
    reason: String,
}

#[derive(Serialize)]
struct Answer {
    /// Events taken, repeats included.
    accepted: usize,
    /// Of them, how many repeat another event of the same request (the same id: identical
    /// events sent without `event_id` or `Idempotency-Key`): each is counted once.
    repeats: usize,
    rejected: Vec<Refused>,
}

#[derive(Serialize)]
struct Failure<'a> {
    error: &'a str,
    message: String,
}

/// `instream_events_rejected_total{service,pipeline,code}`: one event refused, by why.
fn count_rejected(pipeline: String, code: &'static str) {
    metrics::counter!("instream_events_rejected_total", "service" => SERVICE.as_str(), "pipeline" => pipeline, "code" => code)
        .increment(1);
}

fn count_request(status: StatusCode) {
    instream_core::events::http_request_answered(SERVICE, status.as_u16());
}

fn failure(status: StatusCode, error: &'static str, message: String) -> Response {
    count_request(status);
    metrics::counter!("instream_ingest_refused_total", "error" => error).increment(1);
    (status, Json(Failure { error, message })).into_response()
}

fn retry_later(state: &AppState, error: &'static str, message: String) -> Response {
    let status = StatusCode::SERVICE_UNAVAILABLE;
    count_request(status);
    metrics::counter!("instream_ingest_refused_total", "error" => error).increment(1);
    let retry_after = state.config.retry_after.as_secs().max(1).to_string();
    (
        status,
        [(header::RETRY_AFTER, retry_after)],
        Json(Failure { error, message }),
    )
        .into_response()
}

/// The key a request was admitted with (an index into the configured keys; `None`:
/// anonymous).
#[derive(Clone, Copy)]
pub struct Caller(Option<usize>);

/// Admits a request before its body is read: its API key first (a client without one holds
/// no slot and sends no body), then a slot, so that at most `max_in_flight_requests` bodies
/// (each at most `max_body_bytes`) are in memory at once; others get 503 at once.
pub async fn admit(
    State(state): State<Arc<AppState>>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let pipeline = request
        .uri()
        .path()
        .strip_prefix("/v1/pipelines/")
        .and_then(|rest| rest.strip_suffix("/events"))
        .unwrap_or("")
        .to_owned();
    // Before the pipeline is looked up, so a client without a key learns nothing of them.
    let caller = match identify_caller(&state, &mut request, &pipeline) {
        Ok(caller) => caller,
        Err(refused) => return refused,
    };
    // A name is `[a-z0-9_-]`: anything else (an escape such as `%6f`, which the route would
    // decode past the key's scope check) names no pipeline.
    if !instream_pipeline::valid_name(&pipeline) {
        return unknown_pipeline(&pipeline);
    }
    if let Some(refused) = refuse_declared_too_large(&state, request.headers()) {
        return refused;
    }
    let client = match caller {
        Some(key) => ClientId::Key(key),
        None => ClientId::Address(
            request
                .extensions()
                .get::<instream_http::Peer>()
                .map(|peer| client_network(peer.0.ip())),
        ),
    };
    let Some(_per_client) = state
        .clients
        .enter(client, state.config.max_in_flight_requests_per_client)
    else {
        return retry_later(
            &state,
            "client_overloaded",
            format!(
                "this client has {} requests in flight already (ingest.max_in_flight_requests_per_client)",
                state.config.max_in_flight_requests_per_client
            ),
        );
    };
    let Ok(_slot) = state.in_flight_requests.try_acquire() else {
        return retry_later(&state, "overloaded", "too many requests in flight".into());
    };
    let _counted = InFlight::enter();
    // A client that never finishes its body must not keep a slot forever.
    match tokio::time::timeout(state.config.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => failure(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request took longer than {:?}; send it again (event ids are stable)",
                state.config.request_timeout
            ),
        ),
    }
}

/// The caller's key (`None`: anonymous), also left in the request for the handler; `Err`: the
/// 401 or 403.
fn identify_caller(
    state: &AppState,
    request: &mut axum::extract::Request,
    pipeline: &str,
) -> Result<Option<usize>, Response> {
    match state.keys.authorize(request.headers(), pipeline) {
        Ok(key) => {
            request.extensions_mut().insert(Caller(key));
            Ok(key)
        }
        Err(Denied::Unauthenticated(why)) => {
            let mut response = failure(StatusCode::UNAUTHORIZED, "unauthorized", why.into());
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            Err(response)
        }
        Err(Denied::Forbidden(why)) => Err(failure(StatusCode::FORBIDDEN, "forbidden", why)),
    }
}

/// Larger than allowed by its own account: refused before a byte of it is read (and
/// before `100 Continue`, which is sent only once the body is read).
fn refuse_declared_too_large(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_none_or(|n| n <= state.config.max_body_bytes) {
        return None;
    }
    let e = BodyError::TooLarge {
        limit: usize::try_from(state.config.max_body_bytes).unwrap_or(usize::MAX),
    };
    // The body was not read: the connection closes after the answer, not reused with the
    // body still coming.
    let mut refused = failure(StatusCode::PAYLOAD_TOO_LARGE, e.code(), e.message());
    refused.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    Some(refused)
}

/// Who a request counts against for `ingest.max_in_flight_requests_per_client`: its API key,
/// or its address when anonymous.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientId {
    Key(usize),
    Address(Option<std::net::IpAddr>),
}

/// An anonymous client: its IPv4 address, or its IPv6 /64 (one host picks among many
/// addresses of its network).
fn client_network(ip: std::net::IpAddr) -> std::net::IpAddr {
    use std::net::{IpAddr, Ipv6Addr};
    match ip {
        // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; a /64 of
        // those would put every IPv4 client in one group.
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod client_network_tests {
    use super::client_network;

    #[test]
    fn ipv4_clients_of_a_dual_stack_listener_stay_apart() {
        let a = client_network("::ffff:10.0.0.1".parse().unwrap());
        let b = client_network("::ffff:10.0.0.2".parse().unwrap());
        assert_ne!(a, b);
        assert_eq!(a, "10.0.0.1".parse::<std::net::IpAddr>().unwrap());
        let c = client_network("2001:db8::1".parse().unwrap());
        let d = client_network("2001:db8::2".parse().unwrap());
        assert_eq!(c, d, "one /64 is one client");
    }
}

/// Requests in flight per client.
#[derive(Default)]
pub struct Clients(std::sync::Mutex<std::collections::HashMap<ClientId, usize>>);

/// A request counted for its client while it lives.
pub struct ClientSlot<'a>(&'a Clients, ClientId);

impl Clients {
    /// Counts a request of `client`, unless it has `max` in flight already.
    pub fn enter(&self, client: ClientId, max: usize) -> Option<ClientSlot<'_>> {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(client).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientSlot(self, client))
    }
}

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        let mut counts = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.1);
            }
        }
    }
}

/// Adds to a gauge for as long as it lives, also when the client goes away mid-request (the
/// future is dropped, and so is this): requests and body bytes in flight.
struct InFlight(metrics::Gauge, f64);

impl InFlight {
    fn enter() -> Self {
        Self::add(metrics::gauge!("instream_ingest_requests_in_flight"), 1.0)
    }

    fn add(gauge: metrics::Gauge, amount: f64) -> Self {
        gauge.increment(amount);
        InFlight(gauge, amount)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(self.1);
    }
}

/// `POST /v1/pipelines/{pipeline}/events`
pub async fn post_events(
    State(state): State<Arc<AppState>>,
    Path(pipeline): Path<String>,
    Extension(Caller(caller)): Extension<Caller>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let key = caller.map(|i| state.keys.get(i));
    let Some(def) = state.catalog.borrow().get(&pipeline).cloned() else {
        return unknown_pipeline(&pipeline);
    };
    let body = match read_body(&state, &headers, body).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    // What this request holds in memory (decompressed, when it came compressed).
    let _bytes = InFlight::add(
        metrics::gauge!("instream_ingest_in_flight_bytes"),
        body.len() as f64,
    );
    let raws = match split_body(&state, &headers, &body) {
        Ok(r) => r,
        Err(refused) => return refused,
    };
    let idempotency_key = match idempotency_key(&headers) {
        Ok(k) => k,
        Err(refused) => return refused,
    };
    let ids = IdSource {
        pipeline: &pipeline,
        producer: key.map_or("", |k| k.producer.as_str()),
        idempotency_key,
        key_binds_content: true,
    };
    let batch = build_events(&state, &def, &raws, &ids);
    if batch.events.is_empty() {
        return none_taken(key, raws.len(), batch.rejected);
    }
    let topic = topics::raw(&pipeline);
    let _room = match reserve_room(&state, &topic, &batch.events) {
        Ok(room) => room,
        Err(refused) => return refused,
    };
    // Back-pressure: admit the events only if the in-flight bound has room for all of them.
    let permits = u32::try_from(batch.events.len()).unwrap_or(u32::MAX);
    let Ok(_event_slots) = state.in_flight_events.try_acquire_many(permits) else {
        return retry_later(
            &state,
            "overloaded",
            "too many events waiting for the broker".into(),
        );
    };
    // Charged once admitted, so that a request refused for overload costs its key nothing;
    // every event of it, valid or not.
    if let Some(refused) = key.and_then(|k| charge(k, raws.len())) {
        return refused;
    }
    let started = Instant::now();
    let delivered = match produce(&state, &topic, &batch.events).await {
        Ok(outcomes) => outcomes,
        Err(refused) => return refused,
    };
    answer(&state, &pipeline, started, batch, delivered)
}

/// A 404 for a pipeline name that is not defined, echoing at most 64 characters of it.
fn unknown_pipeline(pipeline: &str) -> Response {
    let shown: String = pipeline.chars().take(64).collect();
    let more = if shown.len() < pipeline.len() {
        "…"
    } else {
        ""
    };
    failure(
        StatusCode::NOT_FOUND,
        "unknown_pipeline",
        format!("no pipeline named `{shown}{more}`"),
    )
}

/// The body, read within the limits (size, rate) and decompressed.
async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<axum::body::Bytes, Response> {
    let limit = usize::try_from(state.config.max_body_bytes).unwrap_or(usize::MAX);
    let body = match body::read(body, limit, state.config.min_body_bytes_per_second).await {
        Ok(b) => b,
        Err(e @ BodyError::TooLarge { .. }) => {
            return Err(failure(
                StatusCode::PAYLOAD_TOO_LARGE,
                e.code(),
                e.message(),
            ))
        }
        Err(e @ BodyError::TooSlow { .. }) => {
            return Err(failure(StatusCode::REQUEST_TIMEOUT, e.code(), e.message()))
        }
        Err(e) => return Err(failure(StatusCode::BAD_REQUEST, e.code(), e.message())),
    };
    body::decode(headers, body, limit).map_err(|e| {
        let status = match e {
            BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::BAD_REQUEST,
        };
        failure(status, e.code(), e.message())
    })
}

/// The request's `Idempotency-Key`: 1-256 visible ASCII characters (no space, no tab).
fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, Response> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => match std::str::from_utf8(v.as_bytes()) {
            Ok(k) if (1..=256).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()) => {
                Ok(Some(k))
            }
            _ => Err(failure(
                StatusCode::BAD_REQUEST,
                "bad_idempotency_key",
                "Idempotency-Key must be 1-256 visible ASCII characters".into(),
            )),
        },
    }
}

/// Each event's bytes; `Err`: the 413 for too many events, the 400 for a body not framed as
/// its `Content-Type` says.
fn split_body<'b>(
    state: &AppState,
    headers: &HeaderMap,
    body: &'b [u8],
) -> Result<Vec<&'b [u8]>, Response> {
    let framing = Framing::of(headers);
    body::split(body, framing, state.config.max_events_per_request).map_err(|e| {
        let status = match e {
            BodyError::TooManyEvents { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        failure(status, e.code(), e.message())
    })
}

/// The 422 of a request none of whose `events` was taken.
fn none_taken(
    key: Option<&crate::keys::ApiKey>,
    events: usize,
    rejected: Vec<Refused>,
) -> Response {
    // Refused events cost work too: charged to the key like taken ones (the answer stays
    // 422 even past the rate: sent again, they would be refused again).
    if let Some(key) = key {
        let _ = key.take(events);
    }
    count_request(StatusCode::UNPROCESSABLE_ENTITY);
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(Answer {
            accepted: 0,
            repeats: 0,
            rejected,
        }),
    )
        .into_response()
}

/// A request's events: those taken (with their index and encoded envelope), how many of them
/// repeat another of the same request (same id: identical events without an id), and those
/// refused.
struct Batch {
    events: Vec<(usize, Event, Vec<u8>)>,
    /// Each repeat's index, and the position in `events` of the event it repeats.
    repeats: Vec<(usize, usize)>,
    rejected: Vec<Refused>,
}

fn build_events(
    state: &AppState,
    def: &instream_pipeline::PipelineDefinition,
    raws: &[&[u8]],
    ids: &IdSource<'_>,
) -> Batch {
    let mut batch = Batch {
        events: Vec::with_capacity(raws.len()),
        repeats: Vec::new(),
        rejected: Vec::new(),
    };
    let ingest_time = instream_event::now_millis();
    let schema = state.schema_of(def);
    let shape = ShapeLimits {
        max_depth: state.config.max_depth,
        max_string_bytes: state.config.max_string_bytes,
    };
    let mut seen = std::collections::HashMap::with_capacity(raws.len());
    for (index, raw) in raws.iter().enumerate() {
        let built = body::check_shape(raw, shape)
            .and_then(|()| {
                serde_json::from_slice::<&RawValue>(raw)
                    .map_err(|e| Rejection::new("malformed_json", e.to_string()))
            })
            .and_then(|raw| envelope(def, schema.as_deref(), raw, index, ids, ingest_time))
            .and_then(|event| {
                let bytes = instream_event::encode(&event);
                if bytes.len() as u64 > state.config.max_event_bytes {
                    return Err(Rejection::new(
                        "event_too_large",
                        format!(
                            "the event takes {} bytes with its envelope; at most {} \
                             (ingest.max_event_bytes)",
                            bytes.len(),
                            state.config.max_event_bytes
                        ),
                    ));
                }
                Ok((event, bytes))
            });
        match built {
            Ok((event, bytes)) => match seen.get(&event.event_id) {
                Some(&first) => batch.repeats.push((index, first)),
                None => {
                    seen.insert(event.event_id.clone(), batch.events.len());
                    batch.events.push((index, event, bytes));
                }
            },
            Err(r) => {
                count_rejected(def.name.clone(), r.code);
                batch.rejected.push(Refused {
                    index,
                    code: r.code,
                    reason: r.message,
                });
            }
        }
    }
    batch
}

/// The answer to a request whose events were written, `started` when they were sent: the
/// counts and the events refused, or a 503 if any failure may pass when sent again.
fn answer(
    state: &AppState,
    pipeline: &str,
    started: Instant,
    mut batch: Batch,
    delivered: Vec<Result<(), KafkaError>>,
) -> Response {
    let mut accepted = 0;
    let mut transient = None;
    let mut refusals: Vec<Option<Refused>> = Vec::with_capacity(batch.events.len());
    for ((index, _, _), outcome) in batch.events.iter().zip(delivered) {
        refusals.push(match outcome {
            Ok(()) => {
                accepted += 1;
                None
            }
            // A record the broker will never take as it is: refused by its index.
            Err(e) if e.is_record_refused() => Some(refused_by_broker(*index, pipeline, &e)),
            // Anything else (the producer failed, a topic missing, the broker away) may pass
            // when sent again: the whole request is answered 503 below.
            Err(e) => {
                transient = Some(e);
                None
            }
        });
    }
    let repeats = share_fates(&mut batch, refusals, pipeline);
    if let Some(e) = transient {
        tracing::warn!(error = %e, pipeline, "broker did not acknowledge");
        // Written, but answered 503: the client sends them again (same ids).
        events_handled(
            SERVICE,
            pipeline.to_owned(),
            "written_then_retried",
            accepted as u64,
        );
        return retry_later(
            state,
            "broker_unavailable",
            format!("not acknowledged by the broker ({e}); send the same request again"),
        );
    }
    let latency = started.elapsed().as_secs_f64();
    metrics::histogram!("instream_produce_latency_seconds", "service" => SERVICE.as_str())
        .record(latency);
    stage_latency(SERVICE.as_str()).record(latency);
    events_handled(SERVICE, pipeline.to_owned(), "accepted", accepted as u64);
    events_handled(SERVICE, pipeline.to_owned(), "repeated", repeats as u64);
    batch.rejected.sort_by_key(|r| r.index);
    let status = if accepted == 0 {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    count_request(status);
    (
        status,
        Json(Answer {
            accepted: accepted + repeats,
            repeats,
            rejected: batch.rejected,
        }),
    )
        .into_response()
}

/// Moves the refusals of `batch.events` (by position, `None`: taken) to `batch.rejected`,
/// with each refused event's repeats; returns how many repeats were taken.
fn share_fates(batch: &mut Batch, refusals: Vec<Option<Refused>>, pipeline: &str) -> usize {
    // A repeat shares its first copy's fate.
    let mut repeats = 0;
    for (index, first) in &batch.repeats {
        match &refusals[*first] {
            None => repeats += 1,
            Some(refused) => {
                count_rejected(pipeline.to_owned(), refused.code);
                batch.rejected.push(Refused {
                    index: *index,
                    code: refused.code,
                    reason: refused.reason.clone(),
                })
            }
        }
    }
    batch.rejected.extend(refusals.into_iter().flatten());
    repeats
}

/// Takes `events` from the key's rate; the 429 when it must wait.
fn charge(key: &crate::keys::ApiKey, events: usize) -> Option<Response> {
    let wait = key.take(events).err()?;
    metrics::counter!("instream_ingest_rate_limited_total", "key" => key.name.clone()).increment(1);
    let status = StatusCode::TOO_MANY_REQUESTS;
    count_request(status);
    let retry_after = wait.as_secs_f64().ceil().max(1.0).to_string();
    Some(
        (
            status,
            [(header::RETRY_AFTER, retry_after)],
            Json(Failure {
                error: "rate_limited",
                message: format!(
                    "the key `{}` is over its events per second; send it again later",
                    key.name
                ),
            }),
        )
            .into_response(),
    )
}

/// Standalone: the embedded broker deletes what no stage read yet beyond 5 MB a partition,
/// so the events are admitted only while every topic has room for them.
fn reserve_room(
    state: &AppState,
    topic: &str,
    events: &[(usize, Event, Vec<u8>)],
) -> Result<Option<instream_core::backlog::Reservation>, Response> {
    let Some(backlog) = &state.backlog else {
        return Ok(None);
    };
    let bytes = events
        .iter()
        .map(|(_, e, encoded)| instream_core::backlog::record_bytes(e.key.len(), encoded.len(), 0))
        .sum();
    if bytes > backlog.budget() {
        return Err(failure(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large_for_standalone",
            format!(
                "the request's events take about {bytes} bytes; standalone takes at most {} at \
                 once (standalone.max_unread_bytes): send smaller requests",
                backlog.budget()
            ),
        ));
    }
    backlog.try_reserve(topic, bytes).map(Some).map_err(|full| {
        retry_later(
            state,
            "backlog_full",
            format!(
                "`{}` holds {} bytes a stage has not read (at most {}): send the same request \
                 again later",
                full.topic, full.unread, full.budget
            ),
        )
    })
}

/// Writes the events and waits for the broker's answer to each (within
/// `ingest.produce_timeout`). `Err`: the 503 when the producer's queue is full or the broker
/// did not answer in time.
async fn produce(
    state: &AppState,
    topic: &str,
    events: &[(usize, Event, Vec<u8>)],
) -> Result<Vec<Result<(), KafkaError>>, Response> {
    let mut deliveries = Vec::with_capacity(events.len());
    for (_, event, encoded) in events {
        let record = Outgoing::to(topic)
            .key(event.key.as_bytes())
            .payload(encoded.as_slice());
        match client::try_send(&state.producer, record) {
            Ok(d) => deliveries.push(d),
            Err(KafkaError::QueueFull) => {
                return Err(retry_later(
                    state,
                    "overloaded",
                    "the broker is not keeping up; send the same request again".into(),
                ))
            }
            Err(e) => {
                tracing::warn!(error = %e, topic, "produce failed");
                return Err(retry_later(state, "broker_unavailable", e.to_string()));
            }
        }
    }
    let answers = futures::future::join_all(
        deliveries
            .into_iter()
            .map(|d| async { client::delivered(d).await.map(|_| ()) }),
    );
    tokio::time::timeout(state.config.produce_timeout, answers)
        .await
        .map_err(|_| {
            retry_later(
                state,
                "broker_timeout",
                format!(
                    "no acknowledgement within {:?}; send the same request again",
                    state.config.produce_timeout
                ),
            )
        })
}

/// An event the broker refused for good (not to be sent again as it is).
fn refused_by_broker(index: usize, pipeline: &str, error: &KafkaError) -> Refused {
    let code = if error.is_record_too_large() {
        "event_too_large"
    } else {
        "refused_by_broker"
    };
    count_rejected(pipeline.to_owned(), code);
    Refused {
        index,
        code,
        reason: format!("the broker refused the event: {error}"),
    }
}
