//! `GET /v1/pipelines/{pipeline}/ledger?from=&to=`: the aggregator's audit ledger (its rows
//! for the hours of ingest time in `[from, to)`), for `instream audit` where it cannot open the
//! store itself (a standalone's in-process store).

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use instream_store::LedgerRow;
use serde::Serialize;

use crate::{authorized, failure, parse_time, respond, shown, AppState, Params, Refusal};

/// The longest range one request reads: a month of hours.
const MAX_HOURS: i64 = 31 * 24;
const HOUR_MILLIS: i64 = 3_600_000;

#[derive(Serialize)]
struct Ledger {
    pipeline: String,
    from: String,
    to: String,
    rows: Vec<LedgerRow>,
}

pub(crate) async fn ledger(
    State(state): State<Arc<AppState>>,
    uri: axum::http::Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    // `/v1/pipelines/{pipeline}/ledger`, as sent.
    let pipeline = uri.path().split('/').nth(3).unwrap_or_default().to_owned();
    respond(answer(&state, pipeline, query, &headers).await)
}

async fn answer(
    state: &AppState,
    pipeline: String,
    query: Option<String>,
    headers: &HeaderMap,
) -> Result<Ledger, Refusal> {
    authorized(state, headers)?;
    if state.catalog.borrow().get(&pipeline).is_none() {
        return Err(failure(
            StatusCode::NOT_FOUND,
            "unknown_pipeline",
            format!("no pipeline named `{}`", shown(&pipeline)),
        ));
    }
    let params = Params::parse(query.as_deref())?;
    let (Some(from), Some(to)) = (&params.from, &params.to) else {
        return Err(failure(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "`from` and `to` (RFC 3339 or epoch milliseconds) are required",
        ));
    };
    let (from, to) = (parse_time("from", from)?, parse_time("to", to)?);
    if from >= to {
        return Err(failure(
            StatusCode::BAD_REQUEST,
            "empty_range",
            "`from` must be before `to`",
        ));
    }
    if (to - from) / HOUR_MILLIS > MAX_HOURS {
        return Err(failure(
            StatusCode::BAD_REQUEST,
            "bad_query",
            format!("at most {MAX_HOURS} hours a request"),
        ));
    }
    let rows = state
        .store
        .load_ledger(&pipeline, from, to)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "ledger read failed");
            failure(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the aggregate store did not answer; retry",
            )
        })?;
    Ok(Ledger {
        pipeline,
        from: instream_event::format_rfc3339_millis(from),
        to: instream_event::format_rfc3339_millis(to),
        rows,
    })
}
