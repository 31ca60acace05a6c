//! Metrics that several services (or several places) write, each written here only, so a
//! name and its labels cannot drift apart between writers. The model is Vector's internal
//! events: one function per event, which counts it (and logs it, where that is part of it).
//! `metric_help` describes each of them for `/metrics`.

use metrics::{Histogram, SharedString};

use crate::Service;

/// `instream_events_total{service,pipeline,outcome}`: `n` events of `pipeline` that `service`
/// handled, by what became of them (`accepted`, `enriched`, `counted`, …).
pub fn events_handled(
    service: Service,
    pipeline: impl Into<SharedString>,
    outcome: &'static str,
    n: u64,
) {
    metrics::counter!(
        "instream_events_total",
        "service" => service.as_str(),
        "pipeline" => pipeline.into(),
        "outcome" => outcome
    )
    .increment(n);
}

/// `instream_stage_latency_seconds{stage}`: from an event's acceptance to the end of `stage`;
/// one value recorded per event.
pub fn stage_latency(stage: &'static str) -> Histogram {
    metrics::histogram!("instream_stage_latency_seconds", "stage" => stage)
}

/// `instream_http_requests_total{service,status}`: one answered request.
pub fn http_request_answered(service: Service, status: u16) {
    metrics::counter!(
        "instream_http_requests_total",
        "service" => service.as_str(),
        "status" => status.to_string()
    )
    .increment(1);
}

/// A task panicked: an ERROR line naming it, with the panic's message and what happens next
/// (`then`), and `instream_task_panics_total{task}` (the `InstreamTaskPanicked` alert).
pub fn task_panicked(task: impl Into<SharedString>, join: tokio::task::JoinError, then: &str) {
    let task = task.into();
    let message = match join.try_into_panic() {
        Ok(panic) => panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default(),
        Err(_) => String::new(),
    };
    tracing::error!(task = %task, panic = %message, then, "task panicked");
    metrics::counter!("instream_task_panics_total", "task" => task).increment(1);
}
