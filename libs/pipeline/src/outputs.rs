//! Where an aggregation's results go besides the store: a Kafka results topic, or a webhook
//! notified when a window's value meets a condition — and their checks at `pipeline apply`.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{Emit, FilterOp, Function, PipelineDefinition, Window};
use crate::validate::valid_name;

/// A destination for an aggregation's results.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Output {
    /// Every value written for a window, as a JSON record on
    /// `<pipeline>.results.<aggregation>`, keyed by the group.
    Kafka {
        /// The aggregation whose results go there.
        aggregation: String,
    },
    /// An HTTP(S) POST of a window's result when it meets a condition.
    Webhook(Box<WebhookOutput>),
}

/// A notification sent when a window's result meets a condition: once per window, signed,
/// retried, dead-lettered when the receiver keeps refusing (docs/pipelines.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookOutput {
    /// Names the output in metrics, dead letters and the notification id: 1-64 of
    /// `[a-z0-9_-]`, unique in the pipeline.
    pub name: String,
    /// The aggregation whose windows are watched.
    pub aggregation: String,
    /// `https://…` (or `http://…`, e.g. to a sidecar). No credentials in it: receivers check
    /// the signature instead.
    pub url: String,
    /// Which values are judged: `final` (once the window is final) or `early` (the first
    /// value written that meets the condition, open or not).
    #[serde(default)]
    pub on: NotifyOn,
    /// The condition; without one every window of the aggregation is notified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Condition>,
    /// How long one attempt may take.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts after the first before the notification is dead-lettered.
    #[serde(default = "default_retries")]
    pub retries: u32,
}

/// Which window values a webhook judges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyOn {
    /// The window's final value only.
    #[default]
    Final,
    /// The first value written (early or final) that meets the condition.
    Early,
}

/// `field op value`, e.g. `{ field = "count", op = "gt", value = 100 }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// `count`, or the name of one of the aggregation's values (`sum_amount`, `max_price`, …).
    pub field: String,
    /// `eq`, `ne`, `gt`, `gte`, `lt` or `lte`, as in an aggregation's filter.
    pub op: FilterOp,
    pub value: serde_json::Number,
}

impl Condition {
    /// Whether a window with this count and these values meets the condition; a value that
    /// is missing or not a number never does.
    pub fn holds(&self, count: i64, values: &serde_json::Map<String, serde_json::Value>) -> bool {
        let actual = if self.field == "count" {
            Some(count as f64)
        } else {
            values.get(&self.field).and_then(serde_json::Value::as_f64)
        };
        let (Some(actual), Some(wanted)) = (actual, self.value.as_f64()) else {
            return false;
        };
        actual
            .partial_cmp(&wanted)
            .is_some_and(|ordering| self.op.holds(ordering))
    }
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `100` and `100.0` are one condition (it is part of a notification's id).
        match self.value.as_f64() {
            Some(v) if v.fract() == 0.0 && v.abs() < 9e15 => {
                write!(f, "{} {} {}", self.field, self.op.symbol(), v as i64)
            }
            Some(v) => write!(f, "{} {} {v}", self.field, self.op.symbol()),
            None => write!(f, "{} {} {}", self.field, self.op.symbol(), self.value),
        }
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_retries() -> u32 {
    5
}

/// Longest a webhook attempt may take: a slow receiver holds a sender slot that long.
const MAX_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_WEBHOOK_RETRIES: u32 = 20;

impl PipelineDefinition {
    /// Whether `aggregation`'s results also go to its Kafka results topic.
    pub fn kafka_output(&self, aggregation: &str) -> bool {
        self.outputs
            .iter()
            .any(|o| matches!(o, Output::Kafka { aggregation: a } if a == aggregation))
    }

    /// The webhooks watching `aggregation`.
    pub fn webhooks_of<'a>(
        &'a self,
        aggregation: &'a str,
    ) -> impl Iterator<Item = &'a WebhookOutput> + 'a {
        self.outputs.iter().filter_map(move |o| match o {
            Output::Webhook(w) if w.aggregation == aggregation => Some(&**w),
            _ => None,
        })
    }

    /// The webhook named `name` as it is now, or, removed since, as the version that made a
    /// window had it (its notifications are still sent, as a removed Kafka output's results
    /// are).
    pub fn webhook(&self, name: &str, made_by: u64) -> Option<&WebhookOutput> {
        self.outputs
            .iter()
            .chain(
                self.version_def(made_by)
                    .map(|d| d.outputs.iter())
                    .into_iter()
                    .flatten(),
            )
            .find_map(|o| match o {
                Output::Webhook(w) if w.name == name => Some(&**w),
                _ => None,
            })
    }

    /// Every problem of the outputs, each with its field.
    pub(crate) fn output_problems(&self, problem: &mut dyn FnMut(String, String)) {
        let mut kafka = BTreeSet::new();
        let mut webhooks = BTreeSet::new();
        for (i, output) in self.outputs.iter().enumerate() {
            let aggregation = match output {
                Output::Kafka { aggregation } => aggregation,
                Output::Webhook(w) => &w.aggregation,
            };
            let Some(agg) = self.aggregations.iter().find(|a| a.name == *aggregation) else {
                problem(
                    format!("outputs[{i}].aggregation"),
                    format!("`{aggregation}` is not an aggregation of this pipeline"),
                );
                continue;
            };
            match output {
                Output::Kafka { aggregation } => {
                    if !valid_name(aggregation) {
                        problem(
                            format!("outputs[{i}].aggregation"),
                            format!(
                                "`{aggregation}` must be 1-64 of [a-z0-9_-] to name the topic `{}.results.<name>`",
                                self.name
                            ),
                        );
                    }
                    if !kafka.insert(aggregation.as_str()) {
                        problem(
                            format!("outputs[{i}]"),
                            format!("a Kafka output for `{aggregation}` is there twice"),
                        );
                    }
                }
                Output::Webhook(w) => {
                    // The webhook's name in every reason: a definition may have several.
                    let named = |reason: String| format!("webhook `{}`: {reason}", w.name);
                    if !valid_name(&w.name) {
                        problem(
                            format!("outputs[{i}].name"),
                            named("must be 1-64 of [a-z0-9_-]".into()),
                        );
                    } else if !webhooks.insert(w.name.as_str()) {
                        problem(
                            format!("outputs[{i}].name"),
                            named(format!("a webhook named `{}` is there twice", w.name)),
                        );
                    }
                    if let Err(reason) = check_url(&w.url) {
                        problem(format!("outputs[{i}].url"), named(reason));
                    }
                    if w.timeout.is_zero() || w.timeout > MAX_WEBHOOK_TIMEOUT {
                        problem(
                            format!("outputs[{i}].timeout"),
                            named(format!(
                                "must be more than 0s and at most {MAX_WEBHOOK_TIMEOUT:?}"
                            )),
                        );
                    }
                    if w.retries > MAX_WEBHOOK_RETRIES {
                        problem(
                            format!("outputs[{i}].retries"),
                            named(format!("must be at most {MAX_WEBHOOK_RETRIES}")),
                        );
                    }
                    if w.on == NotifyOn::Early && agg.emit == Emit::Final {
                        problem(format!("outputs[{i}].on"), named(format!(
                                "`early` never sees an early value: `{aggregation}` has emit = \"final\""
                            )));
                    }
                    if w.on == NotifyOn::Early && matches!(agg.window, Window::Session { .. }) {
                        // A session's start moves when an earlier event joins it: the window
                        // notified early would be another window once final.
                        problem(format!("outputs[{i}].on"), named(format!(
                                "`early` is not for session windows (`{aggregation}`): a session's start, part of its identity, can still move; use `final`"
                            )));
                    }
                    if let Some(when) = &w.when {
                        let numeric = when.field == "count"
                            || agg.functions.iter().any(|f| {
                                f.output_name() == when.field
                                    && !matches!(f, Function::Quantiles { .. })
                            });
                        if !numeric {
                            let names: Vec<String> = std::iter::once("count".to_owned())
                                .chain(
                                    agg.functions
                                        .iter()
                                        .filter(|f| !matches!(f, Function::Quantiles { .. }))
                                        .map(Function::output_name),
                                )
                                .collect();
                            problem(
                                format!("outputs[{i}].when.field"),
                                named(format!(
                                    "`{}` is not a number `{aggregation}` writes (one of: {})",
                                    when.field,
                                    names.join(", ")
                                )),
                            );
                        }
                    }
                }
            }
        }
    }
}

/// An absolute http(s) URL with a host, no credentials, no fragment, and not a link-local
/// address (a cloud's instance metadata service). The text is not echoed: it may hold a token.
fn check_url(text: &str) -> Result<(), String> {
    let url = url::Url::parse(text).map_err(|e| format!("is not an absolute URL ({e})"))?;
    if !matches!(url.scheme(), "https" | "http") {
        return Err(format!("scheme `{}` is not https or http", url.scheme()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        // The definition is stored in ZooKeeper and printed by `pipeline get`.
        return Err(
            "holds credentials: receivers check the signature header instead (docs/pipelines.md)"
                .into(),
        );
    }
    if url.fragment().is_some() {
        return Err("has a #fragment, which is never sent".into());
    }
    let forbidden = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_link_local() || ip.is_unspecified() || ip.is_broadcast(),
        Some(url::Host::Ipv6(ip)) => ip.is_unspecified() || (ip.segments()[0] & 0xffc0) == 0xfe80,
        _ => false,
    };
    if forbidden {
        return Err(
            "names a link-local or unspecified address (a cloud metadata service is one): not a webhook receiver"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::parse_document;

    const PIPELINE: &str = r#"
[[pipelines]]
name = "orders"
key_field = "account_id"
time_field = "ts"

[[pipelines.aggregations]]
name = "per_minute"
window = { kind = "tumbling", size = "1m" }
functions = [{ fn = "sum", field = "payload.amount" }, { fn = "quantiles", field = "payload.amount" }]

[[pipelines.aggregations]]
name = "final_only"
window = { kind = "tumbling", size = "1m" }
emit = "final"
"#;

    const HOOK: &str = r#"
[[pipelines.outputs]]
kind = "webhook"
name = "big"
aggregation = "per_minute"
url = "https://hooks.example.com/instream"
when = { field = "sum_amount", op = "gt", value = 100 }
"#;

    #[test]
    fn a_webhook_parses_with_safe_defaults_and_judges_its_condition() {
        let doc = parse_document(&format!("{PIPELINE}{HOOK}")).unwrap();
        let hooks: Vec<_> = doc.pipelines[0].webhooks_of("per_minute").collect();
        assert_eq!(hooks.len(), 1);
        let hook = hooks[0];
        assert_eq!(hook.on, super::NotifyOn::Final);
        assert_eq!(hook.timeout, std::time::Duration::from_secs(5));
        assert_eq!(hook.retries, 5);
        let when = hook.when.as_ref().unwrap();
        assert_eq!(when.to_string(), "sum_amount > 100");
        let values = |v: serde_json::Value| v.as_object().unwrap().clone();
        assert!(when.holds(1, &values(serde_json::json!({"sum_amount": 100.5}))));
        assert!(!when.holds(1, &values(serde_json::json!({"sum_amount": 100}))));
        assert!(!when.holds(1, &values(serde_json::json!({"sum_amount": null}))));
        assert!(!when.holds(1, &values(serde_json::json!({}))));
        // A webhook makes no topic.
        assert!(!crate::topics::of_pipeline(&doc.pipelines[0])
            .iter()
            .any(|t| t.contains("results")));
    }

    #[test]
    fn a_bad_webhook_is_refused_naming_the_output_and_the_reason() {
        let hook = |replace: &str, with: &str| HOOK.replace(replace, with);
        for (outputs, named) in [
            (
                hook("per_minute", "nope"),
                "outputs[0].aggregation: `nope` is not an aggregation",
            ),
            (hook("\"big\"", "\"Big One\""), "outputs[0].name: webhook `Big One`: must be 1-64"),
            (format!("{HOOK}{HOOK}"), "outputs[1].name: webhook `big`: a webhook named `big` is there twice"),
            (hook("https://hooks.example.com/instream", "ftp://x/y"), "outputs[0].url: webhook `big`: scheme `ftp`"),
            (hook("https://hooks.example.com/instream", "hooks/instream"), "outputs[0].url: webhook `big`: is not an absolute URL"),
            (hook("https://hooks.example.com/instream", "http://169.254.169.254/latest"), "outputs[0].url: webhook `big`: names a link-local"),
            (hook("https://hooks.example.com/instream", "https://h.example.com/#x"), "outputs[0].url: webhook `big`: has a #fragment"),
            (
                hook("https://hooks.example.com", "https://me:pw@hooks.example.com"),
                "outputs[0].url: webhook `big`: holds credentials",
            ),
            (hook("sum_amount", "quantiles_amount"), "outputs[0].when.field: webhook `big`: `quantiles_amount` is not a number `per_minute` writes (one of: count, sum_amount)"),
            (hook("op = \"gt\"", "op = \"ge\""), "unknown variant `ge`"),
            (format!("{HOOK}timeout = \"0s\"\n"), "outputs[0].timeout: webhook `big`: must be more than 0s"),
            (format!("{HOOK}retries = 99\n"), "outputs[0].retries: webhook `big`: must be at most 20"),
            (format!("{HOOK}secret = \"x\"\n"), "unknown field `secret`"),
        ] {
            let err = parse_document(&format!("{PIPELINE}{outputs}"))
                .map(|_| String::new())
                .unwrap_or_else(|e| e.to_string());
            assert!(err.contains(named), "{outputs}: {err}");
        }
        let early_on_final = HOOK.replace("per_minute", "final_only").replace(
            "when = { field = \"sum_amount\", op = \"gt\", value = 100 }",
            "on = \"early\"",
        );
        let err = parse_document(&format!("{PIPELINE}{early_on_final}")).unwrap_err();
        assert!(
            err.to_string()
                .contains("outputs[0].on: webhook `big`: `early` never sees an early value"),
            "{err}"
        );
    }
}
