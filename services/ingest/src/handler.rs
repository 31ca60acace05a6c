use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use instream_event::Rejection;
use instream_kafka::{client, KafkaError};
use instream_pipeline::topics;
use rdkafka::producer::FutureRecord;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::body::{self, BodyError, Framing, ShapeLimits};
use crate::keys::Denied;
use crate::AppState;
use instream_pipeline::{envelope, IdSource};

const SERVICE: &str = "ingest";

/// What the envelope adds to an event's payload (id, key, times, pipeline, field names), at
/// most, for the standalone account.
const ENVELOPE_BYTES: usize = 256;

#[derive(Serialize)]
struct Refused {
    index: usize,
    code: &'static str,
    reason: String,
}

#[derive(Serialize)]
struct Answer {
    accepted: usize,
    rejected: Vec<Refused>,
}

#[derive(Serialize)]
struct Failure<'a> {
    error: &'a str,
    message: String,
}

fn count_request(status: StatusCode) {
    metrics::counter!("instream_http_requests_total", "service" => SERVICE, "status" => status.as_u16().to_string())
        .increment(1);
}

fn failure(status: StatusCode, error: &'static str, message: String) -> Response {
    count_request(status);
    metrics::counter!("instream_ingest_refused_total", "error" => error).increment(1);
    (status, Json(Failure { error, message })).into_response()
}

fn retry_later(state: &AppState, error: &'static str, message: String) -> Response {
    let status = StatusCode::SERVICE_UNAVAILABLE;
    count_request(status);
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
    match state.keys.authorize(request.headers(), &pipeline) {
        Ok(key) => {
            request.extensions_mut().insert(Caller(key));
        }
        Err(Denied::Unauthenticated(why)) => {
            let mut response = failure(StatusCode::UNAUTHORIZED, "unauthorized", why.into());
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return response;
        }
        Err(Denied::Forbidden(why)) => return failure(StatusCode::FORBIDDEN, "forbidden", why),
    }
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
        return failure(
            StatusCode::NOT_FOUND,
            "unknown_pipeline",
            format!("no pipeline named `{pipeline}`"),
        );
    };
    let limit = usize::try_from(state.config.max_body_bytes).unwrap_or(usize::MAX);
    let body = match body::read(body, limit).await {
        Ok(b) => b,
        Err(e @ BodyError::TooLarge { .. }) => {
            return failure(StatusCode::PAYLOAD_TOO_LARGE, e.code(), e.message())
        }
        Err(e) => return failure(StatusCode::BAD_REQUEST, e.code(), e.message()),
    };
    let body = match body::decode(&headers, body, limit) {
        Ok(b) => b,
        Err(e) => {
            let status = match e {
                BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                BodyError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                _ => StatusCode::BAD_REQUEST,
            };
            return failure(status, e.code(), e.message());
        }
    };
    // What this request holds in memory (decompressed, when it came compressed).
    let _bytes = InFlight::add(
        metrics::gauge!("instream_ingest_in_flight_bytes"),
        body.len() as f64,
    );
    let raws = match body::split(
        &body,
        Framing::of(&headers),
        state.config.max_events_per_request,
    ) {
        Ok(r) => r,
        Err(e @ BodyError::TooManyEvents { .. }) => {
            return failure(StatusCode::PAYLOAD_TOO_LARGE, e.code(), e.message())
        }
        Err(e) => return failure(StatusCode::BAD_REQUEST, e.code(), e.message()),
    };
    let idempotency_key = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(k)) if !k.is_empty() && k.len() <= 256 => Some(k),
        Some(_) => {
            return failure(
                StatusCode::BAD_REQUEST,
                "bad_idempotency_key",
                "Idempotency-Key must be 1-256 visible ASCII characters".into(),
            )
        }
    };
    let scoped =
        idempotency_key.map(|idem| scoped_idempotency_key(key.map(|k| k.name.as_str()), idem));
    let ids = IdSource {
        pipeline: &pipeline,
        idempotency_key: scoped.as_deref(),
    };
    let ingest_time = instream_event::now_millis();
    let mut events = Vec::with_capacity(raws.len());
    let mut rejected = Vec::new();
    let schema = state.schema_of(&def);
    let shape = ShapeLimits {
        max_depth: state.config.max_depth,
        max_string_bytes: state.config.max_string_bytes,
    };
    for (index, raw) in raws.iter().enumerate() {
        let checked = body::check_shape(raw, shape).and_then(|()| {
            serde_json::from_slice::<&RawValue>(raw)
                .map_err(|e| Rejection::new("malformed_json", e.to_string()))
        });
        match checked
            .and_then(|raw| envelope(&def, schema.as_deref(), raw, index, &ids, ingest_time))
        {
            Ok(e) => events.push(e),
            Err(r) => {
                metrics::counter!("instream_events_rejected_total", "service" => SERVICE, "pipeline" => pipeline.clone(), "code" => r.code)
                    .increment(1);
                rejected.push(Refused {
                    index,
                    code: r.code,
                    reason: r.message,
                });
            }
        }
    }
    if events.is_empty() {
        count_request(StatusCode::UNPROCESSABLE_ENTITY);
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(Answer {
                accepted: 0,
                rejected,
            }),
        )
            .into_response();
    }

    // Back-pressure: admit the events only if the in-flight bound has room for all of them.
    let permits = u32::try_from(events.len()).unwrap_or(u32::MAX);
    let Ok(_event_slots) = state.in_flight_events.try_acquire_many(permits) else {
        return retry_later(
            &state,
            "overloaded",
            "too many events waiting for the broker".into(),
        );
    };
    // Charged once admitted, so a request refused for overload costs its key nothing.
    if let Some(key) = key {
        if let Err(wait) = key.take(events.len()) {
            metrics::counter!("instream_ingest_rate_limited_total", "key" => key.name.clone())
                .increment(1);
            let status = StatusCode::TOO_MANY_REQUESTS;
            count_request(status);
            let retry_after = wait.as_secs_f64().ceil().max(1.0).to_string();
            return (
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
                .into_response();
        }
    }
    let topic = topics::raw(&pipeline);
    // Standalone: the embedded broker deletes what no stage read yet beyond 5 MB a
    // partition, so the events are admitted only while every topic has room for them.
    let _room = match &state.backlog {
        None => None,
        Some(backlog) => {
            let bytes = events
                .iter()
                .map(|e| {
                    instream_core::backlog::record_bytes(
                        e.key.len(),
                        e.payload.get().len() + ENVELOPE_BYTES,
                        0,
                    )
                })
                .sum();
            if bytes > backlog.budget() {
                return failure(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large_for_standalone",
                    format!(
                        "the request's events take about {bytes} bytes; standalone takes at \
                         most {} at once (standalone.max_unread_bytes): send smaller requests",
                        backlog.budget()
                    ),
                );
            }
            match backlog.try_reserve(&topic, bytes) {
                Ok(room) => Some(room),
                Err(full) => {
                    metrics::counter!("instream_ingest_refused_total", "error" => "backlog_full")
                        .increment(1);
                    return retry_later(
                        &state,
                        "backlog_full",
                        format!(
                            "`{}` holds {} bytes a stage has not read (at most {}): send the same \
                             request again later",
                            full.topic, full.unread, full.budget
                        ),
                    );
                }
            }
        }
    };
    let started = Instant::now();
    let mut deliveries = Vec::with_capacity(events.len());
    let mut buf = Vec::with_capacity(512);
    for event in &events {
        instream_event::encode_into(event, &mut buf);
        let record = FutureRecord::to(&topic)
            .key(event.key.as_bytes())
            .payload(buf.as_slice());
        match client::try_send(&state.producer, record) {
            Ok(d) => deliveries.push(d),
            Err(KafkaError::QueueFull) => {
                return retry_later(
                    &state,
                    "overloaded",
                    "the broker is not keeping up; send the same request again".into(),
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, pipeline, "produce failed");
                return retry_later(&state, "broker_unavailable", e.to_string());
            }
        }
    }
    let acknowledged = tokio::time::timeout(
        state.config.produce_timeout,
        futures::future::try_join_all(deliveries.into_iter().map(client::delivered)),
    )
    .await;
    match acknowledged {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, pipeline, "broker did not acknowledge");
            return retry_later(
                &state,
                "broker_unavailable",
                format!("not acknowledged by the broker ({e}); send the same request again"),
            );
        }
        Err(_) => {
            return retry_later(
                &state,
                "broker_timeout",
                format!(
                    "no acknowledgement within {:?}; send the same request again",
                    state.config.produce_timeout
                ),
            )
        }
    }
    let latency = started.elapsed().as_secs_f64();
    metrics::histogram!("instream_produce_latency_seconds", "service" => SERVICE).record(latency);
    metrics::histogram!("instream_stage_latency_seconds", "stage" => SERVICE).record(latency);
    metrics::counter!("instream_events_total", "service" => SERVICE, "pipeline" => pipeline.clone(), "outcome" => "accepted")
        .increment(events.len() as u64);
    count_request(StatusCode::OK);
    (
        StatusCode::OK,
        Json(Answer {
            accepted: events.len(),
            rejected,
        }),
    )
        .into_response()
}

/// An Idempotency-Key as seen by the id derivation: prefixed by the API key's name, so two
/// producers that happen to send the same Idempotency-Key get different event ids (else the
/// second one's events would be dropped downstream as repeats of the first's).
fn scoped_idempotency_key(caller: Option<&str>, key: &str) -> String {
    match caller {
        // A header value holds no NUL, so a name's end is never mistaken for a key's start.
        Some(name) => format!("{name}\0{key}"),
        None => key.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::scoped_idempotency_key;

    #[test]
    fn idempotency_keys_are_scoped_by_the_caller() {
        let a = scoped_idempotency_key(Some("shop"), "req-1");
        let b = scoped_idempotency_key(Some("crm"), "req-1");
        assert_ne!(a, b);
        assert_eq!(a, scoped_idempotency_key(Some("shop"), "req-1"));
        assert_eq!(scoped_idempotency_key(None, "req-1"), "req-1");
    }
}
