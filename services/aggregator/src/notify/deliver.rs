//! Sending notifications: one task owns the queue. At most `aggregator.webhook_concurrency`
//! attempts are in flight, at most half of them (rounded up) for one webhook, taken from the
//! webhooks in turn, so one slow or unreachable receiver never holds up the others; an attempt
//! to retry waits for its time outside the slots. A notification is retried with back-off
//! (5xx, 408, 429, timeouts, connection errors; `Retry-After` honoured up to 5 minutes), then
//! dead-lettered with the last failure in the reason; either end counts as done and leaves the
//! partition's checkpoint. A repeat of a notification already queued (a partition restored
//! again after a rebalance hands over what it owes) is dropped by its id.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use instream_core::config::{AggregatorConfig, Secret};
use instream_core::retry::Backoff;
use instream_kafka::Delivery;
use instream_kafka::{DeadLetter, DeadLetterCode, DeadLetters};
use instream_pipeline::Catalog;
use instream_stage::ServiceContext;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::{Notification, ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use crate::partitions::Source;

/// Pauses between attempts at one notification (before jitter).
const RETRY: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
/// The longest a receiver's `Retry-After` is honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Why webhooks cannot be sent at all.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("aggregator.webhook_tls_ca_file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("webhook HTTP client: {0}")]
    Client(String),
    #[error(transparent)]
    Kafka(#[from] instream_kafka::KafkaError),
}

/// The aggregator's handle on the sending task.
pub(crate) struct Notifier {
    commands: mpsc::UnboundedSender<Command>,
    done: Arc<Mutex<HashSet<String>>>,
    catalog: Arc<RwLock<Arc<Catalog>>>,
    dead: Option<DeadLetters>,
    /// Most notifications one partition keeps waiting.
    max_pending: usize,
    /// Whether notifications can be signed (and so sent).
    has_secret: bool,
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
        let catalog: Arc<RwLock<Arc<Catalog>>> = Arc::default();
        let sender = Sender {
            client: http_client(config)?,
            secret: config.webhook_secret.clone(),
            dead: dead.clone(),
            catalog: catalog.clone(),
            stop: ctx.shutdown.clone(),
        };
        let concurrency = config.webhook_concurrency.max(1);
        let queue = Queue {
            concurrency,
            per_webhook: concurrency.div_ceil(2),
            done: done.clone(),
        };
        ctx.tasks.spawn_infallible(
            "webhook notifications",
            queue.run(Arc::new(sender), receiver),
        );
        Ok(Self {
            commands,
            done,
            catalog,
            dead: Some(dead),
            max_pending: config.webhook_max_pending,
            has_secret: config.webhook_secret.is_some(),
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
            catalog: Arc::default(),
            dead: None,
            max_pending: usize::MAX,
            has_secret: false,
            owned: Vec::new(),
        }
    }

    /// Most notifications one partition keeps waiting (`aggregator.webhook_max_pending`).
    pub(crate) fn max_pending(&self) -> usize {
        self.max_pending
    }

    /// The definitions notifications are sent by (URL, timeout and retries of each webhook).
    pub(crate) fn follow(&self, catalog: &Arc<Catalog>) {
        let mut current = self.catalog.write().unwrap_or_else(|p| p.into_inner());
        if Arc::ptr_eq(&current, catalog) {
            return;
        }
        *current = catalog.clone();
        if self.has_secret {
            return;
        }
        // Said once per definition change, not per notification (each is dead-lettered too).
        for def in catalog.iter() {
            let webhooks = def
                .outputs
                .iter()
                .filter(|o| matches!(o, instream_pipeline::Output::Webhook(_)))
                .count();
            if webhooks > 0 {
                tracing::error!(pipeline = %def.name, webhooks, "the pipeline has webhook outputs but aggregator.webhook_secret is not set: their notifications are dead-lettered unsent");
            }
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

    /// Dead-letters notifications a partition had no room for; the flush waits for the
    /// deliveries before the checkpoint that holds them as notified.
    pub(crate) async fn refuse(
        &self,
        notifications: Vec<Notification>,
    ) -> Result<Vec<Delivery>, NotifyError> {
        let Some(dead) = &self.dead else {
            return Ok(Vec::new());
        };
        let reason = format!(
            "not sent: more than aggregator.webhook_max_pending ({}) notifications of its partition were waiting for their receivers",
            self.max_pending
        );
        let mut deliveries = Vec::new();
        for n in &notifications {
            deliveries.push(dead.publish(&dead_letter(n, &reason, &topic_of(n))).await?);
            count_failed(n, &reason);
        }
        Ok(deliveries)
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

/// One notification in the queue.
struct Item {
    source: Source,
    n: Notification,
    /// Attempts made so far.
    attempts: u32,
    not_before: Instant,
}

impl Item {
    /// The webhook it goes to: its turn and its share of the slots.
    fn webhook(&self) -> (String, String) {
        (self.n.pipeline.clone(), self.n.output.clone())
    }
}

/// How one task at a notification ended.
enum Ended {
    /// Taken by its receiver, or dead-lettered.
    Done(String),
    /// To be tried again at `not_before`.
    Again(Item),
    /// Stopping: it stays owed.
    Stopped,
}

/// The queue of notifications to send and those in flight.
struct Queue {
    concurrency: usize,
    per_webhook: usize,
    done: Arc<Mutex<HashSet<String>>>,
}

/// The queue's state while it runs.
#[derive(Default)]
struct Lanes {
    /// Ready to be tried, per webhook.
    ready: BTreeMap<(String, String), VecDeque<Item>>,
    /// Waiting for their next attempt's time.
    later: Vec<Item>,
    /// Every id ready, later or in flight: a repeat is dropped.
    ids: HashSet<String>,
    /// In flight per webhook.
    busy: HashMap<(String, String), usize>,
    /// The task at each notification in flight.
    flying: HashMap<tokio::task::Id, (Source, Notification, AbortHandle)>,
    /// The webhook served last (turns go round).
    last: Option<(String, String)>,
    /// The partitions owned, as last told (`None`: not told yet).
    owned: Option<Vec<Source>>,
}

impl Queue {
    async fn run(self, sender: Arc<Sender>, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut lanes = Lanes::default();
        let mut flight: JoinSet<Ended> = JoinSet::new();
        let pending = metrics::gauge!("instream_notifications_pending");
        loop {
            let now = Instant::now();
            let (due, later): (Vec<Item>, Vec<Item>) = std::mem::take(&mut lanes.later)
                .into_iter()
                .partition(|item| item.not_before <= now);
            lanes.later = later;
            for item in due {
                lanes
                    .ready
                    .entry(item.webhook())
                    .or_default()
                    .push_back(item);
            }
            self.start_ready(&mut lanes, &mut flight, &sender);
            pending.set(lanes.ids.len() as f64);
            let next_due = lanes.later.iter().map(|item| item.not_before).min();
            tokio::select! {
                _ = sender.stop.cancelled() => break,
                command = commands.recv() => match command {
                    None => break,
                    Some(Command::Send(source, n)) => {
                        if lanes.ids.insert(n.id.clone()) {
                            let item = Item { source, n, attempts: 0, not_before: now };
                            lanes.ready.entry(item.webhook()).or_default().push_back(item);
                        }
                    }
                    Some(Command::Keep(owned)) => lanes.keep_only(&owned),
                },
                Some(joined) = flight.join_next_with_id(), if !flight.is_empty() => {
                    let id = match &joined {
                        Ok((id, _)) => *id,
                        Err(e) => e.id(),
                    };
                    let Some((source, n, _)) = lanes.flying.remove(&id) else {
                        continue;
                    };
                    let webhook = (n.pipeline.clone(), n.output.clone());
                    if let Some(busy) = lanes.busy.get_mut(&webhook) {
                        *busy = busy.saturating_sub(1);
                    }
                    match joined {
                        Ok((_, Ended::Done(done))) => {
                            lanes.ids.remove(&done);
                            self.done.lock().unwrap_or_else(|p| p.into_inner()).insert(done);
                        }
                        Ok((_, Ended::Again(item))) => lanes.again(item),
                        Ok((_, Ended::Stopped)) => {}
                        Err(e) if e.is_panic() => {
                            instream_core::events::task_panicked("webhook delivery", e, "its notification goes to the dead letters");
                            tracing::error!(id = %n.id, "the notification of a panicked delivery goes to the dead letters");
                            let reason = "not sent: its delivery task panicked (a bug: see the aggregator's log)".to_owned();
                            let (giving_up, letter) = (sender.clone(), n.clone());
                            let item = Item { source, n, attempts: 0, not_before: Instant::now() };
                            lanes.spawn(&mut flight, item, async move { giving_up.give_up(letter, reason).await });
                        }
                        // Aborted: its partition went to another instance (its id was let go
                        // then, so that a restore handing it over again is not taken for a
                        // repeat).
                        Err(_) => {}
                    }
                }
                _ = tokio::time::sleep_until(next_due.unwrap_or(now).into()), if next_due.is_some() => {}
            }
        }
        flight.abort_all();
    }

    /// Starts attempts while slots are free, one webhook after the other.
    fn start_ready(&self, lanes: &mut Lanes, flight: &mut JoinSet<Ended>, sender: &Arc<Sender>) {
        while flight.len() < self.concurrency {
            let mut order: Vec<(String, String)> = lanes
                .ready
                .iter()
                .filter(|(webhook, items)| {
                    !items.is_empty()
                        && lanes.busy.get(*webhook).copied().unwrap_or(0) < self.per_webhook
                })
                .map(|(webhook, _)| webhook.clone())
                .collect();
            if order.is_empty() {
                return;
            }
            // The first webhook after the one served last, in name order.
            let at = lanes
                .last
                .as_ref()
                .and_then(|last| order.iter().position(|w| w > last))
                .unwrap_or(0);
            let webhook = order.swap_remove(at);
            let Some(item) = lanes.ready.get_mut(&webhook).and_then(VecDeque::pop_front) else {
                return;
            };
            lanes.last = Some(webhook);
            let attempt = sender.clone().attempt(item.n.clone(), item.attempts);
            lanes.spawn(flight, item, attempt);
        }
    }
}

impl Lanes {
    fn spawn(
        &mut self,
        flight: &mut JoinSet<Ended>,
        item: Item,
        task: impl std::future::Future<Output = Attempted> + Send + 'static,
    ) {
        *self.busy.entry(item.webhook()).or_default() += 1;
        let Item {
            source,
            n,
            attempts,
            ..
        } = item;
        let again_source = source.clone();
        let again_n = n.clone();
        let handle = flight.spawn(async move {
            match task.await {
                Attempted::Done(id) => Ended::Done(id),
                Attempted::Stopped => Ended::Stopped,
                Attempted::Again(pause) => Ended::Again(Item {
                    source: again_source,
                    n: again_n,
                    attempts: attempts + 1,
                    not_before: Instant::now() + pause,
                }),
            }
        });
        self.flying.insert(handle.id(), (source, n, handle));
    }

    /// Drops what the partitions no longer owned owe: their new owner sends it.
    fn keep_only(&mut self, owned: &[Source]) {
        let ids = &mut self.ids;
        for items in self.ready.values_mut() {
            items.retain(|item| owned.contains(&item.source) || !ids.remove(&item.n.id));
        }
        self.later
            .retain(|item| owned.contains(&item.source) || !ids.remove(&item.n.id));
        for (source, n, handle) in self.flying.values() {
            if !owned.contains(source) {
                handle.abort();
                ids.remove(&n.id);
            }
        }
        self.owned = Some(owned.to_vec());
    }

    /// A notification to try again later, if its partition is still owned here (an attempt
    /// that ended before its abort took effect).
    fn again(&mut self, item: Item) {
        let owned = self
            .owned
            .as_ref()
            .is_none_or(|owned| owned.contains(&item.source));
        if owned {
            self.later.push(item);
        }
    }
}

/// How one attempt ended.
enum Attempted {
    Done(String),
    /// Try again after this pause.
    Again(Duration),
    Stopped,
}

/// What sends notifications.
struct Sender {
    client: reqwest::Client,
    secret: Option<Secret>,
    dead: DeadLetters,
    catalog: Arc<RwLock<Arc<Catalog>>>,
    stop: CancellationToken,
}

/// One failed attempt.
struct Failure {
    /// The metric label: `status`, `timeout` or `connect`.
    kind: &'static str,
    text: String,
    retry: bool,
    retry_after: Option<Duration>,
}

impl Failure {
    /// What an answer says: `Ok` when the receiver took the notification.
    fn of(answer: reqwest::Result<reqwest::Response>, timeout: Duration) -> Result<(), Failure> {
        let response = match answer {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => response,
            Err(e) if e.is_timeout() => {
                return Err(Failure {
                    kind: "timeout",
                    text: format!("no answer within {timeout:?}"),
                    retry: true,
                    retry_after: None,
                })
            }
            Err(e) => {
                return Err(Failure {
                    kind: "connect",
                    // Its text would carry the URL, query and all.
                    text: describe(&e.without_url()),
                    retry: true,
                    retry_after: None,
                });
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
        Err(Failure {
            kind: "status",
            text: format!("HTTP {status}"),
            // Any other answer is the receiver refusing this notification itself: sending it
            // again changes nothing.
            retry: status.is_server_error()
                || status == reqwest::StatusCode::REQUEST_TIMEOUT
                || status == reqwest::StatusCode::TOO_MANY_REQUESTS,
            retry_after,
        })
    }

    /// The pause before attempt `attempts + 1`: the back-off's, up to a quarter more (so that
    /// retries to a recovering receiver spread out), or the receiver's `Retry-After`.
    fn pause(&self, id: &str, attempts: u32) -> Duration {
        let mut pauses = RETRY.pauses();
        let mut wait = pauses.next_pause();
        for _ in 1..attempts {
            wait = pauses.next_pause();
        }
        let spread = xxhash_rust::xxh3::xxh3_64(format!("{id}{attempts}").as_bytes()) % 250;
        wait += wait * spread as u32 / 1_000;
        wait.max(self.retry_after.unwrap_or_default())
    }
}

impl Sender {
    /// One attempt at a notification (`attempts` made before): done when its receiver takes
    /// it or it is dead-lettered, again after a pause when a retry may mend the failure.
    async fn attempt(self: Arc<Self>, n: Notification, attempts: u32) -> Attempted {
        let hook = {
            let catalog = self.catalog.read().unwrap_or_else(|p| p.into_inner());
            catalog
                .get(&n.pipeline)
                .and_then(|def| def.webhook(&n.output, n.version))
                .map(|w| (w.url.clone(), w.timeout, w.retries))
        };
        let Some((url, timeout, retries)) = hook else {
            let reason = format!(
                "not sent: webhook `{}` is no longer in the definition of `{}`",
                n.output, n.pipeline
            );
            return self.give_up(n, reason).await;
        };
        let Some(secret) = &self.secret else {
            let reason = "not sent: aggregator.webhook_secret is not set (give \
                INSTREAM__AGGREGATOR__WEBHOOK_SECRET or aggregator.webhook_secret_file)";
            return self.give_up(n, reason.into()).await;
        };
        let timestamp = (instream_event::now_millis() / 1_000).to_string();
        let signature = sign(secret, &timestamp, &n.body);
        let started = Instant::now();
        let answer = self
            .client
            .post(&url)
            .timeout(timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(ID_HEADER, &n.id)
            .header(TIMESTAMP_HEADER, &timestamp)
            .header(SIGNATURE_HEADER, &signature)
            .body(n.body.clone())
            .send()
            .await;
        let Err(failure) = Failure::of(answer, timeout) else {
            metrics::histogram!("instream_notification_latency_seconds", "pipeline" => n.pipeline.clone(), "output" => n.output.clone())
                .record(started.elapsed().as_secs_f64());
            metrics::counter!("instream_notifications_sent_total", "pipeline" => n.pipeline.clone(), "output" => n.output.clone())
                .increment(1);
            return Attempted::Done(n.id);
        };
        let attempts = attempts + 1;
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
        if failure.retry && attempts <= retries {
            return Attempted::Again(failure.pause(&n.id, attempts));
        }
        let reason = format!(
            "webhook `{}` POST {} failed after {attempts} attempt(s): {}",
            n.output,
            host_of(&url),
            failure.text
        );
        self.give_up(n, reason).await
    }

    /// Dead-letters a notification, retrying until the broker has it: done once it does.
    async fn give_up(&self, n: Notification, reason: String) -> Attempted {
        let topic = topic_of(&n);
        let letter = dead_letter(&n, &reason, &topic);
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
                Ok(false) => return Attempted::Stopped,
                Err(e) => {
                    tracing::warn!(pipeline = %n.pipeline, output = %n.output, error = %e, "webhook dead letter not taken; retrying");
                    if !pauses.sleep(&self.stop).await {
                        return Attempted::Stopped;
                    }
                }
            }
        }
        tracing::error!(pipeline = %n.pipeline, output = %n.output, id = %n.id, reason = %reason, "webhook notification dead-lettered");
        count_failed(&n, &reason);
        Attempted::Done(n.id)
    }
}

fn topic_of(n: &Notification) -> String {
    instream_pipeline::topics::dead_letter(&n.pipeline)
}

/// A notification's dead letter: its body, keyed by its id.
fn dead_letter<'a>(n: &'a Notification, reason: &'a str, topic: &'a str) -> DeadLetter<'a> {
    DeadLetter {
        topic,
        pipeline: &n.pipeline,
        key: Some(n.id.as_bytes()),
        payload: &n.body,
        code: DeadLetterCode::WebhookFailed,
        reason,
        origin: None,
    }
}

fn count_failed(n: &Notification, _reason: &str) {
    metrics::counter!("instream_notifications_failed_total", "pipeline" => n.pipeline.clone(), "output" => n.output.clone())
        .increment(1);
}

/// `sha256=<hex>` of `<timestamp>.<body>` under the secret.
fn sign(secret: &Secret, timestamp: &str, body: &[u8]) -> String {
    // HMAC takes a key of any length: this cannot fail.
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret.expose().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC keys have no length limit"));
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut text = String::with_capacity(7 + 64);
    text.push_str("sha256=");
    for byte in digest {
        text.push_str(&format!("{byte:02x}"));
    }
    text
}

/// A URL for a log or a dead letter: its scheme and host only (tokens hide in paths and
/// queries, e.g. a chat service's incoming-webhook URL).
fn host_of(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(parsed) => match (parsed.host_str(), parsed.port()) {
            (Some(host), Some(port)) => format!("{}://{host}:{port}/…", parsed.scheme()),
            (Some(host), None) => format!("{}://{host}/…", parsed.scheme()),
            _ => "(a URL without a host)".into(),
        },
        Err(_) => "(an unparsable URL)".into(),
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
    fn the_signature_is_the_hmac_sha256_of_the_timestamp_and_the_body_in_hex() {
        // As Python's `hmac.new(b"Jefe", b'1700000000.{"id":1}', hashlib.sha256).hexdigest()`.
        let secret = Secret::new("Jefe");
        assert_eq!(
            sign(&secret, "1700000000", br#"{"id":1}"#),
            "sha256=05b728475104591e6ba9301ccd86c0f18c79ea7330ef9b9869435607a745d2bf"
        );
    }

    fn item(partition: i32, id: &str) -> Item {
        Item {
            source: ("p.enriched".into(), partition),
            n: Notification {
                id: id.into(),
                pipeline: "p".into(),
                output: "hook".into(),
                version: 1,
                body: Vec::new(),
            },
            attempts: 0,
            not_before: Instant::now(),
        }
    }

    /// A partition revoked lets go of what it owed — queued, waiting to retry or in flight —
    /// so that its next owner's hand-over (here, or elsewhere) is not taken for a repeat; an
    /// attempt that ended just before the revoke is not retried here.
    #[tokio::test]
    async fn a_revoked_partition_lets_go_of_its_notifications() {
        let mut lanes = Lanes::default();
        let mut flight = JoinSet::new();
        for (partition, id) in [(0, "a"), (1, "b")] {
            let queued = item(partition, id);
            lanes.ids.insert(queued.n.id.clone());
            lanes
                .ready
                .entry(queued.webhook())
                .or_default()
                .push_back(queued);
        }
        let later = item(1, "c");
        lanes.ids.insert("c".into());
        lanes.later.push(later);
        let flying = item(1, "d");
        lanes.ids.insert("d".into());
        lanes.spawn(&mut flight, flying, std::future::pending());
        lanes.keep_only(&[("p.enriched".into(), 0)]);
        let mut ids: Vec<_> = lanes.ids.iter().cloned().collect();
        ids.sort();
        assert_eq!(ids, ["a"]);
        assert!(lanes.later.is_empty());
        assert!(flight
            .join_next()
            .await
            .is_some_and(|joined| joined.is_err_and(|e| e.is_cancelled())));
        lanes.again(item(1, "e"));
        assert!(lanes.later.is_empty(), "not owned here any more");
        lanes.again(item(0, "f"));
        assert_eq!(lanes.later.len(), 1);
    }

    #[test]
    fn retries_back_off_doubling_to_30_s_spread_by_up_to_a_quarter_or_as_the_receiver_asks() {
        let failure = |retry_after: Option<u64>| Failure {
            kind: "status",
            text: String::new(),
            retry: true,
            retry_after: retry_after.map(Duration::from_secs),
        };
        for (attempts, base_ms) in [(1, 500), (2, 1_000), (3, 2_000), (8, 30_000), (20, 30_000)] {
            let pause = failure(None).pause("id", attempts);
            let base = Duration::from_millis(base_ms);
            assert!(
                pause >= base && pause <= base + base / 4,
                "{attempts}: {pause:?}"
            );
            assert_eq!(
                pause,
                failure(None).pause("id", attempts),
                "the same for one id"
            );
        }
        assert_eq!(failure(Some(120)).pause("id", 1), Duration::from_secs(120));
    }

    #[test]
    fn a_url_in_a_reason_keeps_its_host_only() {
        assert_eq!(
            host_of("https://hooks.example.com/services/T0/B0/s3cret?token=x#y"),
            "https://hooks.example.com/…"
        );
        assert_eq!(
            host_of("http://127.0.0.1:8080/in"),
            "http://127.0.0.1:8080/…"
        );
    }
}
