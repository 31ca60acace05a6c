//! Webhook notifications: a window's result, sent as a signed HTTP(S) POST when it meets a
//! webhook output's condition (the seed's "notifications from events" case).
//!
//! A notification is made when the aggregator writes the window value it judges, kept in the
//! checkpoint of the partition that wrote it until the receiver answers 2xx or, after the
//! retries, the dead-letter topic has it — so a crash loses none. Its id is deterministic
//! (pipeline, aggregation, group, window, webhook and its condition, definition version): the
//! same notification sent again after a crash carries the same `X-Instream-Notification-Id`,
//! and a receiver drops the repeat (docs/pipelines.md).

mod deliver;

use instream_pipeline::{NotifyOn, WebhookOutput};
use instream_store::WindowAggregate;
use serde::{Deserialize, Serialize};

pub(crate) use deliver::{Notifier, NotifyError};

use crate::partitions::{Partitions, Source};

/// At the start of a flush: notifications done leave their partitions' checkpoints, and
/// those of partitions restored since the last flush are handed to the sender (a restored one
/// is owed by the checkpoint; the receiver drops a repeat). Only with the assignment restored:
/// between a revoke and the restore the states are gone, and telling the sender would abort
/// every delivery.
pub(crate) fn before_flush(notifier: &mut Notifier, partitions: &mut Partitions) {
    let done = notifier.take_done();
    if !done.is_empty() {
        for state in partitions.states.values_mut() {
            state.notifications_done(&done);
        }
    }
    if partitions.restored_generation.is_some() {
        notifier.keep_only(partitions.states.keys());
        for (source, state) in partitions.states.iter_mut() {
            notifier.send(source, state.owed_notifications());
        }
    }
}

/// After the windows are written: the notifications their values owe, handed to the sender;
/// the deliveries of those a partition had no room for, dead-lettered.
pub(crate) async fn after_write<'d>(
    notifier: &Notifier,
    partitions: &mut Partitions,
    rows: &[WindowAggregate],
    written_by: Vec<(Source, std::ops::Range<usize>)>,
    def_of: impl Fn(&str) -> Option<&'d instream_pipeline::PipelineDefinition> + Copy,
) -> Result<Vec<instream_kafka::Delivery>, NotifyError> {
    let mut refused = Vec::new();
    for (source, range) in written_by {
        if let Some(state) = partitions.states.get_mut(&source) {
            let (made, no_room) = state.notify(&rows[range], def_of, notifier.max_pending());
            notifier.send(&source, made);
            refused.extend(no_room);
        }
    }
    if refused.is_empty() {
        return Ok(Vec::new());
    }
    notifier.refuse(refused).await
}

/// Header carrying the notification's deterministic id: a receiver drops a repeat by it.
pub const ID_HEADER: &str = "x-instream-notification-id";
/// Header carrying the Unix time (seconds) the attempt was signed at.
pub const TIMESTAMP_HEADER: &str = "x-instream-timestamp";
/// Header carrying `sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">` under
/// `aggregator.webhook_secret`.
pub const SIGNATURE_HEADER: &str = "x-instream-signature";

/// One notification owed: which webhook it is for and what it says. Where it goes (URL,
/// timeout, retries) is read from the definition when it is sent, so a fixed URL reaches
/// notifications already waiting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// Deterministic (see the module documentation), a UUID.
    pub id: String,
    pub pipeline: String,
    /// The webhook output's name.
    pub output: String,
    /// The definition version that made the window (where a removed webhook is found).
    pub version: u64,
    /// The JSON body, as signed and sent.
    pub body: Vec<u8>,
}

/// What a receiver gets.
#[derive(Serialize)]
struct Body<'a> {
    id: &'a str,
    pipeline: &'a str,
    aggregation: &'a str,
    output: &'a str,
    /// `count > 100`, or null when the webhook has no condition.
    condition: Option<String>,
    on: NotifyOn,
    group: &'a str,
    window_start: String,
    window_end: String,
    count: i64,
    values: &'a serde_json::Map<String, serde_json::Value>,
    #[serde(rename = "final")]
    is_final: bool,
    definition_version: i64,
}

/// What identifies a webhook's judgement: its name, what it judges and its condition.
fn hook_identity(hook: &WebhookOutput) -> String {
    let on = match hook.on {
        NotifyOn::Final => "final",
        NotifyOn::Early => "early",
    };
    let when = hook
        .when
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    format!("{}\u{1f}{on}\u{1f}{when}", hook.name)
}

/// A hash of [`hook_identity`]: a changed condition is a new webhook for a window.
pub(crate) fn hook_hash(hook: &WebhookOutput) -> u128 {
    xxhash_rust::xxh3::xxh3_128(hook_identity(hook).as_bytes())
}

/// The notification id of `row` under `hook`: the same inputs always give the same UUID.
fn id_of(row: &WindowAggregate, hook: &WebhookOutput) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for part in [
        row.pipeline.as_str(),
        row.aggregation.as_str(),
        row.group_key.as_str(),
        &hook_identity(hook),
    ] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(&row.window_start.to_le_bytes());
    h.update(&row.definition_version.to_le_bytes());
    uuid::Uuid::new_v8(h.digest128().to_be_bytes()).to_string()
}

/// The notification `hook` sends for `row`.
pub(crate) fn make(row: &WindowAggregate, hook: &WebhookOutput) -> Notification {
    let id = id_of(row, hook);
    let body = Body {
        id: &id,
        pipeline: &row.pipeline,
        aggregation: &row.aggregation,
        output: &hook.name,
        condition: hook.when.as_ref().map(ToString::to_string),
        on: hook.on,
        group: &row.group_key,
        window_start: instream_event::format_rfc3339_millis(row.window_start),
        window_end: instream_event::format_rfc3339_millis(row.window_end),
        count: row.count,
        values: &row.values,
        is_final: row.is_final,
        definition_version: row.definition_version,
    };
    Notification {
        // Strings, numbers and a JSON map: serializing cannot fail.
        body: serde_json::to_vec(&body).unwrap_or_default(),
        id,
        pipeline: row.pipeline.clone(),
        output: hook.name.clone(),
        version: u64::try_from(row.definition_version).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook() -> WebhookOutput {
        toml::from_str(
            r#"
name = "big"
aggregation = "per_minute"
url = "https://hooks.example.com/x"
when = { field = "count", op = "gt", value = 2 }
"#,
        )
        .unwrap()
    }

    fn row(group: &str, start: i64) -> WindowAggregate {
        WindowAggregate {
            pipeline: "orders".into(),
            aggregation: "per_minute".into(),
            group_key: group.into(),
            window_start: start,
            window_end: start + 60_000,
            definition_version: 1,
            count: 3,
            values: Default::default(),
            is_final: true,
        }
    }

    #[test]
    fn a_notification_id_depends_on_the_window_and_the_webhook_only() {
        let hook = hook();
        let first = make(&row("a", 0), &hook);
        let mut later = row("a", 0);
        later.count = 7; // a replay may carry another value for the same window
        assert_eq!(first.id, make(&later, &hook).id);
        assert_ne!(first.id, make(&row("b", 0), &hook).id);
        assert_ne!(first.id, make(&row("a", 60_000), &hook).id);
        let mut stricter = hook.clone();
        stricter.when.as_mut().unwrap().value = 5.into();
        assert_ne!(first.id, make(&row("a", 0), &stricter).id);
        let body: serde_json::Value = serde_json::from_slice(&first.body).unwrap();
        assert_eq!(body["id"], first.id.as_str());
        assert_eq!(body["condition"], "count > 2");
        assert_eq!(body["on"], "final");
        assert_eq!(body["final"], true);
        assert_eq!(body["window_start"], "1970-01-01T00:00:00Z");
    }
}

#[cfg(test)]
mod documented {
    /// docs/openapi/query-api.json's `Notification` lists exactly the keys of the body.
    #[test]
    fn the_openapi_document_describes_the_body_the_aggregator_sends() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/openapi/query-api.json"
        );
        let document: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let schema = &document["components"]["schemas"]["Notification"];
        let mut documented: Vec<&str> = schema["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut required: Vec<&str> = schema["required"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        let hook: instream_pipeline::WebhookOutput =
            toml::from_str("name = \"h\"\naggregation = \"a\"\nurl = \"https://x.example/\"")
                .unwrap();
        let row = instream_store::WindowAggregate {
            pipeline: "p".into(),
            aggregation: "a".into(),
            group_key: "g".into(),
            window_start: 0,
            window_end: 1,
            definition_version: 1,
            count: 1,
            values: Default::default(),
            is_final: true,
        };
        let body: serde_json::Value =
            serde_json::from_slice(&super::make(&row, &hook).body).unwrap();
        let mut sent: Vec<&str> = body
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        sent.sort();
        documented.sort();
        required.sort();
        assert_eq!(documented, sent);
        assert_eq!(required, sent);
    }
}
