//! Topic creation. Configs are set explicitly at creation: some Kafka-protocol brokers report
//! configs that were never set as absent, and retention must never be left to a broker default.

use std::collections::HashSet;
use std::time::Duration;

use instream_core::config::KafkaConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::metadata::Metadata;

use crate::error::KafkaError;

/// A topic instream needs.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
}

/// Creates the topics that do not exist yet. Existing topics are left as they are (their
/// partition count is not changed: that would move keys between partitions).
pub async fn ensure_topics(cfg: &KafkaConfig, topics: &[TopicSpec]) -> Result<(), KafkaError> {
    create_topics(cfg, topics, cfg.replication_factor, cfg.retention)
        .await
        .map(|_| ())
}

/// What `create_topics` did with one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicOutcome {
    Created,
    /// It existed already and was left as it is.
    Existed,
}

impl TopicOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            TopicOutcome::Created => "created",
            TopicOutcome::Existed => "existed",
        }
    }
}

/// Creates the missing topics with `replication` and `retention`; says per topic what it did.
pub async fn create_topics(
    cfg: &KafkaConfig,
    topics: &[TopicSpec],
    replication: i32,
    retention: Duration,
) -> Result<Vec<(String, TopicOutcome)>, KafkaError> {
    if topics.is_empty() {
        return Ok(Vec::new());
    }
    let c = crate::client::connection_config(cfg, &Default::default());
    let existing = existing_topics(c.clone()).await?;
    let mut outcomes: Vec<(String, TopicOutcome)> = topics
        .iter()
        .filter(|t| existing.contains(&t.name))
        .map(|t| (t.name.clone(), TopicOutcome::Existed))
        .collect();
    let missing: Vec<&TopicSpec> = topics
        .iter()
        .filter(|t| !existing.contains(&t.name))
        .collect();
    if missing.is_empty() {
        return Ok(outcomes);
    }
    let admin: AdminClient<DefaultClientContext> = c.create().map_err(KafkaError::Config)?;
    let retention = retention.as_millis().to_string();
    let new: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|t| {
            NewTopic::new(&t.name, t.partitions, TopicReplication::Fixed(replication))
                .set("retention.ms", &retention)
        })
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(30)))
        .request_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new, &options)
        .await
        .map_err(|e| KafkaError::Admin(format!("creating topics: {e}")))?;
    for result in results {
        match result {
            Ok(name) => {
                tracing::info!(topic = %name, "topic created");
                outcomes.push((name, TopicOutcome::Created));
            }
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                outcomes.push((name, TopicOutcome::Existed))
            }
            Err((name, code)) => {
                return Err(KafkaError::Admin(format!(
                    "creating topic `{name}`: {code}"
                )))
            }
        }
    }
    Ok(outcomes)
}

/// The names of all topics, from a metadata request that never auto-creates one. Asking
/// first also spares brokers without a CreateTopics API (the embedded one) a request they
/// would not answer.
async fn existing_topics(c: ClientConfig) -> Result<HashSet<String>, KafkaError> {
    let probe = Probe::new(c)?;
    tokio::task::spawn_blocking(move || {
        let metadata = probe
            .metadata(Duration::from_secs(30))
            .map_err(|e| match e {
                ProbeError::Refused(cause) => KafkaError::Refused(cause),
                ProbeError::Unanswered(cause) => {
                    KafkaError::Admin(format!("listing topics: {cause}"))
                }
            })?;
        Ok(metadata
            .topics()
            .iter()
            .map(|t| t.name().to_owned())
            .collect())
    })
    .await
    .map_err(|e| KafkaError::Admin(format!("listing topics: {e}")))?
}

/// Remembers the last error librdkafka reported, and whether it was one that trying again
/// with the same settings is not expected to mend: a failed TLS handshake or SASL
/// authentication. Such errors arrive as client events, apart from the request that failed on
/// them (which only times out).
#[derive(Default)]
struct RefusalWatch {
    last: std::sync::Mutex<Option<(bool, String)>>,
}

impl ClientContext for RefusalWatch {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        let refusal = match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::SSL | RDKafkaErrorCode::Authentication) => true,
            // The server ended TLS with an alert (a certificate it requires or refuses): in
            // TLS 1.3 that comes after the client's side of the handshake, as a transport
            // error. Alert 0 is an orderly close, not a refusal.
            Some(RDKafkaErrorCode::BrokerTransportFailure) => {
                reason.contains("SSL alert number") && !reason.contains("SSL alert number 0")
            }
            _ => false,
        };
        tracing::debug!(%error, reason, refusal, "kafka broker probe");
        if let Ok(mut last) = self.last.lock() {
            // A refusal is not overwritten by the transport noise that follows it.
            if refusal || !last.as_ref().is_some_and(|(r, _)| *r) {
                *last = Some((refusal, reason.to_owned()));
            }
        }
    }
}

impl ConsumerContext for RefusalWatch {}

enum ProbeError {
    /// The cluster refused this client (TLS or authentication): the cause, as librdkafka
    /// gave it.
    Refused(String),
    /// No answer in time (or an error answer), with the last error librdkafka reported.
    Unanswered(String),
}

/// A client that only asks for metadata, telling a refusal from an unreachable cluster.
struct Probe {
    consumer: BaseConsumer<RefusalWatch>,
}

impl Probe {
    fn new(mut c: ClientConfig) -> Result<Probe, KafkaError> {
        c.set("allow.auto.create.topics", "false");
        let consumer = c
            .create_with_context(RefusalWatch::default())
            .map_err(KafkaError::Config)?;
        Ok(Probe { consumer })
    }

    /// Blocks up to `timeout`.
    fn metadata(&self, timeout: Duration) -> Result<Metadata, ProbeError> {
        let answer = self.consumer.fetch_metadata(None, timeout);
        // Serves the client's pending events (one per poll): the refusal, if there was one.
        for _ in 0..16 {
            if self.consumer.poll(Duration::from_millis(10)).is_none() {
                break;
            }
        }
        let last = self
            .consumer
            .context()
            .last
            .lock()
            .ok()
            .and_then(|mut r| r.take());
        match (answer, last) {
            (Ok(metadata), _) => Ok(metadata),
            (Err(_), Some((true, cause))) => Err(ProbeError::Refused(cause)),
            (Err(e), Some((false, cause))) => Err(ProbeError::Unanswered(format!("{e} ({cause})"))),
            (Err(e), None) => Err(ProbeError::Unanswered(e.to_string())),
        }
    }
}

/// How long refusals must last, with no successful answer between them, before the probe
/// gives up: a
/// wrong password or authority stays refused, while an identity provider's blip (OAUTHBEARER
/// token fetches fail as authentication errors) or a user still being created does not.
/// Before the first answer this is short, so a misconfigured deployment fails at once; after
/// it, long, so that only lasting refusals (a rotated secret, which the process reads at
/// start) restart the process.
const REFUSED_FOR_BEFORE_FIRST_ANSWER: Duration = Duration::from_secs(15);
const REFUSED_FOR_AFTER_AN_ANSWER: Duration = Duration::from_secs(300);
/// librdkafka reports a repeated error once and then at most every 30 s (backing off between
/// attempts), so rounds with no event after a refusal are the same refusal; a refusal not seen
/// again for this long has ended (an outage that follows a blip is an outage).
const REFUSAL_FORGOTTEN_AFTER: Duration = Duration::from_secs(45);

/// Since when, and why, the cluster has refused this client, with no answer since.
#[derive(Default)]
struct Refusal {
    /// (first seen, last seen, cause)
    current: Option<(std::time::Instant, std::time::Instant, String)>,
}

impl Refusal {
    fn answered(&mut self) {
        self.current = None;
    }

    fn refused(&mut self, now: std::time::Instant, cause: String) {
        let since = self.current.as_ref().map_or(now, |c| c.0);
        self.current = Some((since, now, cause));
    }

    /// A round with no answer and no refusal: the refusal that still stands, if any.
    fn unanswered(&mut self, now: std::time::Instant) -> Option<&str> {
        if self
            .current
            .as_ref()
            .is_some_and(|c| now.duration_since(c.1) >= REFUSAL_FORGOTTEN_AFTER)
        {
            self.current = None;
        }
        self.current.as_ref().map(|c| c.2.as_str())
    }

    /// The cause, once refusals have lasted past the patience that applies.
    fn lasted(&self, now: std::time::Instant, answered_once: bool) -> Option<&str> {
        let patience = if answered_once {
            REFUSED_FOR_AFTER_AN_ANSWER
        } else {
            REFUSED_FOR_BEFORE_FIRST_ANSWER
        };
        self.current
            .as_ref()
            .filter(|c| now.duration_since(c.0) >= patience)
            .map(|c| c.2.as_str())
    }
}

/// The raw, enriched, dead-letter and quality-record topics of every pipeline, and the
/// repartition topics of its aggregations not grouped by the key, with the pipeline's
/// partition count. Every service ensures them at start, so start order does not matter.
pub async fn ensure_pipeline_topics<'a>(
    cfg: &KafkaConfig,
    pipelines: impl IntoIterator<Item = &'a instream_pipeline::PipelineDefinition>,
) -> Result<(), KafkaError> {
    use instream_pipeline::topics;
    let specs: Vec<TopicSpec> = pipelines
        .into_iter()
        .flat_map(|p| {
            topics::of_pipeline(p).into_iter().map(|name| TopicSpec {
                name,
                partitions: p.partitions,
            })
        })
        .collect();
    ensure_topics(cfg, &specs).await
}

/// Keeps `readiness` in step with whether the cluster answers a metadata request, checking
/// every `interval` until `shutdown`.
pub async fn watch_broker(
    cfg: KafkaConfig,
    readiness: instream_core::Readiness,
    interval: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), KafkaError> {
    let probe =
        Probe::new(crate::client::connection_config(&cfg, &Default::default())).map_err(|e| {
            readiness.set_not_ready(format!("kafka client: {e}"));
            KafkaError::Admin(format!("the broker probe's client: {e}"))
        })?;
    let probe = std::sync::Arc::new(probe);
    let mut answered_once = false;
    let mut refused = Refusal::default();
    loop {
        let asking = probe.clone();
        let answer = tokio::task::spawn_blocking(move || {
            asking.metadata(Duration::from_secs(5)).map(|_| ())
        })
        .await;
        let now = std::time::Instant::now();
        match answer {
            Ok(Ok(())) => {
                answered_once = true;
                refused.answered();
                readiness.set_ready();
            }
            Ok(Err(ProbeError::Refused(cause))) => {
                tracing::error!(%cause, "kafka refused the connection");
                readiness.set_not_ready(format!("kafka refused the connection: {cause}"));
                refused.refused(now, cause);
            }
            Ok(Err(ProbeError::Unanswered(cause))) => match refused.unanswered(now) {
                Some(refusal) => {
                    readiness.set_not_ready(format!("kafka refused the connection: {refusal}"))
                }
                None => readiness.set_not_ready(format!("kafka unreachable: {cause}")),
            },
            Err(e) => readiness.set_not_ready(format!("kafka probe failed: {e}")),
        }
        if let Some(cause) = refused.lasted(now, answered_once) {
            return Err(KafkaError::Refused(cause.to_owned()));
        }
        if shutdown
            .run_until_cancelled(tokio::time::sleep(interval))
            .await
            .is_none()
        {
            return Ok(());
        }
    }
}

/// Ensures the topics of every pipeline now and whenever the definitions change, until
/// `shutdown`. Failures are logged and retried at the next change or after a minute.
pub async fn keep_pipeline_topics(
    cfg: KafkaConfig,
    mut catalog: tokio::sync::watch::Receiver<std::sync::Arc<instream_pipeline::Catalog>>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        let current = catalog.borrow_and_update().clone();
        if let Err(error) = ensure_pipeline_topics(&cfg, current.iter().map(|p| p.as_ref())).await {
            tracing::warn!(%error, "ensuring pipeline topics failed; will retry");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = catalog.changed() => if changed.is_err() {
                // The source stopped sending: nothing will change any more.
                shutdown.cancelled().await;
                return;
            },
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_refusal_stands_through_silent_rounds_but_an_outage_after_a_blip_is_an_outage() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // A wrong password before any answer: refused, then silent rounds, then it lasted.
        let mut refusal = Refusal::default();
        refusal.refused(t0, "SASL authentication error".into());
        assert_eq!(
            refusal.unanswered(at(10)),
            Some("SASL authentication error")
        );
        assert_eq!(refusal.lasted(at(10), false), None);
        assert_eq!(
            refusal.lasted(at(16), false),
            Some("SASL authentication error")
        );
        // After an answer, a blip then a long outage: forgotten, never lasting.
        let mut blip = Refusal::default();
        blip.refused(t0, "token fetch failed".into());
        assert_eq!(blip.unanswered(at(46)), None);
        assert_eq!(blip.lasted(at(400), true), None);
        // A refusal seen again and again after an answer stops the process after 5 minutes.
        let mut rotated = Refusal::default();
        for s in (0..=300).step_by(30) {
            rotated.refused(at(s), "SASL authentication error".into());
        }
        assert_eq!(
            rotated.lasted(at(300), true),
            Some("SASL authentication error")
        );
        rotated.answered();
        assert_eq!(rotated.lasted(at(301), true), None);
    }
}
