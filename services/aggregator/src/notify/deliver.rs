//! Sending notifications: one task owns the queue and keeps at most
//! `aggregator.webhook_concurrency` in flight, so a slow or unreachable receiver costs
//! bounded memory and never holds up aggregation. Each notification is retried with back-off
//! (5xx, 408, 429, timeouts, connection errors), then dead-lettered with the last failure
//! in the reason; either end counts as done and leaves the partition's checkpoint.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use instream_core::config::{AggregatorConfig, Secret};
use instream_core::retry::Backoff;
use instream_core::ServiceContext;
use instream_kafka::{DeadLetter, DeadLetterCode, DeadLetters};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::Notification;
use crate::partitions::Source;

/// Header carrying the notification's deterministic id: a receiver drops a repeat by it.
pub const ID_HEADER: &str = "x-instream-notification-id";
/// Header carrying `sha256=<hex HMAC-SHA256 of the body under aggregator.webhook_secret>`.
pub const SIGNATURE_HEADER: &str = "x-instream-signature";

/// Pauses between attempts at one notification.
const RETRY: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));

/// Why webhooks cannot be sent at all.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("aggregator.webhook_tls_ca_file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("webhook HTTP client: {0}")]
    Client(String),
}

/// The aggregator's handle on the sending task.
pub(crate) struct Notifier {
    commands: mpsc::UnboundedSender<Command>,
    done: Arc<Mutex<HashSet<String>>>,
    /// The partitions last told to the task (their notifications are sent, others dropped).
    owned: Vec<Source>,
}

enum Command {
    Send(Source, Notification),
    /// Only these partitions are owned now: the rest's notifications are their new owner's.
    Keep(Vec<Source>),
}

impl Notifier {
    /// Starts the sending task under the service's supervisor.
    pub(crate) fn start(ctx: &ServiceContext, dead: DeadLetters) -> Result<Self, NotifyError> {
        let config = &ctx.config.aggregator;
        let (commands, receiver) = mpsc::unbounded_channel();
        let done: Arc<Mutex<HashSet<String>>> = Arc::default();
        let sender = Sender {
            client: http_client(config)?,
            secret: config.webhook_secret.clone(),
            dead,
            stop: ctx.shutdown.clone(),
        };
        let queue = Queue {
            max_pending: config.webhook_max_pending,
            concurrency: config.webhook_concurrency,
            done: done.clone(),
        };
        ctx.tasks.spawn_infallible(
            "webhook notifications",
            queue.run(Arc::new(sender), receiver),
        );
        Ok(Self {
            commands,
            done,
            owned: Vec::new(),
        })
    }

    /// A notifier whose notifications go nowhere (a flush tested alone).
    #[cfg(test)]
    pub(crate) fn detached() -> Self {
        let (commands, _) = mpsc::unbounded_channel();
        Self {
            commands,
            done: Arc::default(),
            owned: Vec::new(),
        }
    }

    /// Hands notifications of `source` to the sending task.
    pub(crate) fn send(&self, source: &Source, notifications: Vec<Notification>) {
        for notification in notifications {
            // The task ends only at shutdown: what it did not take stays in the checkpoint.
            let _ = self
                .commands
                .send(Command::Send(source.clone(), notification));
        }
    }

    /// Tells the task which partitions this instance owns, when that changed.
    pub(crate) fn keep_only<'a>(&mut self, sources: impl Iterator<Item = &'a Source>) {
        let mut owned: Vec<Source> = sources.cloned().collect();
        owned.sort();
        if owned != self.owned {
            self.owned = owned.clone();
            let _ = self.commands.send(Command::Keep(owned));
        }
    }

    /// The ids of notifications done (received, or dead-lettered) since the last call.
    pub(crate) fn take_done(&self) -> HashSet<String> {
        std::mem::take(&mut *self.done.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

fn http_client(config: &AggregatorConfig) -> Result<reqwest::Client, NotifyError> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        // A redirect would send the signed body somewhere the definition does not name.
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("instream/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &config.webhook_tls_ca_file {
        let ca_error = |reason: String| NotifyError::CaFile {
            path: path.display().to_string(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
        let certificates =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ca_error(describe(&e)))?;
        if certificates.is_empty() {
            return Err(ca_error("holds no PEM certificate".into()));
        }
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder
        .build()
        .map_err(|e| NotifyError::Client(describe(&e)))
}

/// The queue of notifications to send and those in flight.
struct Queue {
    max_pending: usize,
    concurrency: usize,
    done: Arc<Mutex<HashSet<String>>>,
}

impl Queue {
    async fn run(self, sender: Arc<Sender>, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut waiting: VecDeque<(Source, Notification)> = VecDeque::new();
        let mut flight: JoinSet<Option<String>> = JoinSet::new();
        let mut flying: Vec<(Source, AbortHandle)> = Vec::new();
        let pending = metrics::gauge!("instream_notifications_pending");
        loop {
            while flight.len() < self.concurrency {
                let Some((source, notification)) = waiting.pop_front() else {
                    break;
                };
                let handle = flight.spawn(sender.clone().deliver(notification));
                flying.push((source, handle));
            }
            pending.set((waiting.len() + flight.len()) as f64);
            tokio::select! {
                _ = sender.stop.cancelled() => break,
                command = commands.recv() => match command {
                    None => break,
                    Some(Command::Send(source, notification)) => {
                        if waiting.len() + flight.len() >= self.max_pending {
                            let reason = format!(
                                "not sent: more than aggregator.webhook_max_pending ({}) notifications are waiting for their receivers",
                                self.max_pending
                            );
                            let handle = flight.spawn(sender.clone().give_up(notification, reason));
                            flying.push((source, handle));
                        } else {
                            waiting.push_back((source, notification));
                        }
                    }
                    Some(Command::Keep(owned)) => {
                        waiting.retain(|(source, _)| owned.contains(source));
                        for (source, handle) in &flying {
                            if !owned.contains(source) {
                                handle.abort();
                            }
                        }
                    }
                },
                Some(joined) = flight.join_next(), if !flight.is_empty() => {
                    match joined {
                        Ok(Some(id)) => {
                            self.done.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
                        }
                        Ok(None) => {} // stopping: it stays owed
                        Err(e) if e.is_panic() => {
                            // It stays owed: the next owner of its partition sends it again.
                            tracing::error!(task = "webhook delivery", "task panicked");
                            metrics::counter!("instream_task_panics_total", "task" => "webhook delivery").increment(1);
                        }
                        Err(_) => {} // aborted: its partition went to another instance
                    }
                    flying.retain(|(_, handle)| !handle.is_finished());
                }
            }
        }
        flight.abort_all();
    }
}

/// What sends one notification.
struct Sender {
    client: reqwest::Client,
    secret: Option<Secret>,
    dead: DeadLetters,
    stop: CancellationToken,
}

/// One failed attempt.
struct Failure {
    /// The metric label: `status`, `timeout` or `connect`.
    kind: &'static str,
    text: String,
    retry: bool,
}

impl Sender {
    /// Sends until the receiver answers 2xx or the retries are spent (then dead-letters):
    /// the id once done, `None` when stopping first.
    async fn deliver(self: Arc<Self>, n: Notification) -> Option<String> {
        let Some(secret) = &self.secret else {
            let reason = "not sent: aggregator.webhook_secret is not set (give \
                INSTREAM__AGGREGATOR__WEBHOOK_SECRET or aggregator.webhook_secret_file)";
            return self.give_up(n, reason.into()).await;
        };
        let signature = sign(secret, &n.body);
        let timeout = Duration::from_millis(n.timeout_ms);
        let mut pauses = RETRY.pauses();
        let mut attempts = 0;
        let why = loop {
            attempts += 1;
            let started = Instant::now();
            let answer = self
                .client
                .post(&n.url)
                .timeout(timeout)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(ID_HEADER, &n.id)
                .header(SIGNATURE_HEADER, &signature)
                .body(n.body.clone())
                .send()
                .await;
            let failure = match answer {
                Ok(response) if response.status().is_success() => {
                    metrics::histogram!("instream_notification_latency_seconds", "pipeline" => n.pipeline.clone(), "output" => n.output.clone())
                        .record(started.elapsed().as_secs_f64());
                    metrics::counter!("instream_notifications_sent_total", "pipeline" => n.pipeline.clone(), "output" => n.output.clone())
                        .increment(1);
                    return Some(n.id);
                }
                Ok(response) => {
                    let status = response.status();
                    Failure {
                        kind: "status",
                        text: format!("HTTP {status}"),
                        // The receiver refused this notification itself: sending it again
                        // changes nothing.
                        retry: status.is_server_error()
                            || status == reqwest::StatusCode::REQUEST_TIMEOUT
                            || status == reqwest::StatusCode::TOO_MANY_REQUESTS,
                    }
                }
                Err(e) if e.is_timeout() => Failure {
                    kind: "timeout",
                    text: format!("no answer within {timeout:?}"),
                    retry: true,
                },
                Err(e) => Failure {
                    kind: "connect",
                    // Its text would carry the URL, query and all.
                    text: describe(&e.without_url()),
                    retry: true,
                },
            };
            metrics::counter!("instream_notification_attempt_failures_total", "pipeline" => n.pipeline.clone(), "output" => n.output.clone(), "reason" => failure.kind)
                .increment(1);
            tracing::warn!(
                pipeline = %n.pipeline,
                output = %n.output,
                id = %n.id,
                attempt = attempts,
                failure = %failure.text,
                "webhook attempt failed"
            );
            if !failure.retry || attempts > n.retries {
                break failure.text;
            }
            if !pauses.sleep(&self.stop).await {
                return None;
            }
        };
        let reason = format!(
            "webhook `{}` POST {} failed after {attempts} attempt(s): {why}",
            n.output,
            without_query(&n.url)
        );
        self.give_up(n, reason).await
    }

    /// Dead-letters a notification, retrying until the broker has it: the id once it does.
    async fn give_up(self: Arc<Self>, n: Notification, reason: String) -> Option<String> {
        let topic = instream_pipeline::topics::dead_letter(&n.pipeline);
        let letter = DeadLetter {
            topic: &topic,
            pipeline: &n.pipeline,
            key: Some(n.id.as_bytes()),
            payload: &n.body,
            code: DeadLetterCode::WebhookFailed,
            reason: &reason,
            origin: None,
        };
        let mut pauses = Backoff::BACKEND.pauses();
        loop {
            let delivered = match self.dead.publish(&letter).await {
                Ok(delivery) => instream_kafka::client::all_delivered_unless(
                    self.dead.producer(),
                    [delivery],
                    &self.stop,
                )
                .await
                .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match delivered {
                Ok(true) => break,
                Ok(false) => return None,
                Err(e) => {
                    tracing::warn!(pipeline = %n.pipeline, output = %n.output, error = %e, "webhook dead letter not taken; retrying");
                    if !pauses.sleep(&self.stop).await {
                        return None;
                    }
                }
            }
        }
        tracing::error!(pipeline = %n.pipeline, output = %n.output, id = %n.id, reason = %reason, "webhook notification dead-lettered");
        metrics::counter!("instream_notifications_failed_total", "pipeline" => n.pipeline.clone(), "output" => n.output.clone())
            .increment(1);
        Some(n.id)
    }
}

/// `sha256=<hex>` of the body under the secret.
fn sign(secret: &Secret, body: &[u8]) -> String {
    // HMAC takes a key of any length: this cannot fail.
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret.expose().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC keys have no length limit"));
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut text = String::with_capacity(7 + 64);
    text.push_str("sha256=");
    for byte in digest {
        text.push_str(&format!("{byte:02x}"));
    }
    text
}

/// A URL for a log or a dead letter: its query (where a token may hide) left out.
fn without_query(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            parsed.set_query(None);
            parsed.set_fragment(None);
            parsed.to_string()
        }
        Err(_) => "(unparsable URL)".into(),
    }
}

/// An error with its causes (reqwest's own text alone says only "error sending request"),
/// without the URL.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let next = c.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_hmac_sha256_of_the_body_in_hex() {
        // RFC 4231, test case 2.
        let secret = Secret::new("Jefe");
        assert_eq!(
            sign(&secret, b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_url_in_a_reason_loses_its_query() {
        assert_eq!(
            without_query("https://hooks.example.com/in?token=s3cret#x"),
            "https://hooks.example.com/in"
        );
    }
}
