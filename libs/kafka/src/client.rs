//! Producer and consumer construction with instream's safe defaults, and the small helpers the
//! stages share: batched receive, tracked commits, and produce with back-pressure.

use std::time::Duration;

use futures::StreamExt as _;
use instream_core::backlog::Backlog;
use instream_core::config::KafkaConfig;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::context::InstreamContext;
use crate::error::KafkaError;

pub type Consumer = StreamConsumer<InstreamContext>;

/// A producer of instream's (see [`producer`]): librdkafka's, with what instream counts
/// around it. Dereferences to rdkafka's producer for what is not wrapped (transactions).
#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer<InstreamContext>,
    service: std::sync::Arc<str>,
    /// Standalone mode: the account of unread bytes per topic (see
    /// [`instream_core::backlog`]).
    backlog: Option<Backlog>,
    /// `kafka.max_record_bytes`: the largest record the brokers take.
    max_record_bytes: usize,
}

impl std::ops::Deref for Producer {
    type Target = FutureProducer<InstreamContext>;

    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl Producer {
    /// The largest record the brokers take (`kafka.max_record_bytes`).
    pub fn max_record_bytes(&self) -> usize {
        self.max_record_bytes
    }

    /// The producer's fatal error, if it has failed for good (see [`failed_for_good_watch`]).
    pub fn fatal_error(&self) -> Option<(rdkafka::types::RDKafkaErrorCode, String)> {
        rdkafka::producer::Producer::client(&self.inner).fatal_error()
    }

    /// Standalone: waits while `record`'s topic is full (unless this service reads that
    /// topic itself), then returns what the record will count for once enqueued.
    async fn room_for(&self, record: &FutureRecord<'_, [u8], [u8]>) -> Option<u64> {
        let backlog = self.backlog.as_ref()?;
        backlog.room_for(&self.service, record.topic).await;
        Some(bytes_of(record))
    }

    /// Standalone: counts an enqueued record in the account.
    fn written(&self, topic: &str, bytes: Option<u64>) {
        if let (Some(backlog), Some(bytes)) = (&self.backlog, bytes) {
            backlog.written(topic, bytes);
        }
    }
}

/// What a record is counted for in the standalone account.
fn bytes_of(record: &FutureRecord<'_, [u8], [u8]>) -> u64 {
    let headers = record.headers.as_ref().map_or(0, |hs| {
        hs.iter()
            .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))
            .sum()
    });
    instream_core::backlog::record_bytes(
        record.key.map_or(0, <[u8]>::len),
        record.payload.map_or(0, <[u8]>::len),
        headers,
    )
}

/// A record to produce, as services build it (librdkafka's own type stays in this crate).
pub struct Outgoing<'a> {
    inner: FutureRecord<'a, [u8], [u8]>,
}

/// Resolves when the broker has acknowledged (or refused) a record sent with [`send`].
pub type Delivery = DeliveryFuture;

impl<'a> Outgoing<'a> {
    pub fn to(topic: &'a str) -> Self {
        Self {
            inner: FutureRecord::to(topic),
        }
    }

    pub fn key(mut self, key: &'a [u8]) -> Self {
        self.inner = self.inner.key(key);
        self
    }

    pub fn payload(mut self, payload: &'a [u8]) -> Self {
        self.inner = self.inner.payload(payload);
        self
    }

    /// Adds a header (the value is copied).
    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        let headers = self
            .inner
            .headers
            .take()
            .unwrap_or_else(|| rdkafka::message::OwnedHeaders::new_with_capacity(4));
        self.inner.headers = Some(headers.insert(rdkafka::message::Header {
            key: name,
            value: Some(value.as_ref()),
        }));
        self
    }
}

impl<'a> From<FutureRecord<'a, [u8], [u8]>> for Outgoing<'a> {
    fn from(inner: FutureRecord<'a, [u8], [u8]>) -> Self {
        Self { inner }
    }
}

/// A consumed record, copied out of librdkafka's buffer.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The consumer's assignment generation when this record was received.
    pub generation: u64,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// How every client of instream reaches the cluster: `bootstrap.servers`, `kafka.properties`
/// then `extra` (a client kind's own), and the named secrets (`kafka.sasl_password`, …; see
/// the config's `secret` module), which validation keeps out of the property maps.
pub(crate) fn connection_config(
    cfg: &KafkaConfig,
    extra: &std::collections::BTreeMap<String, String>,
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.bootstrap_servers);
    for (k, v) in cfg.properties.iter().chain(extra) {
        c.set(k, v);
    }
    for (property, secret) in cfg.secret_properties() {
        c.set(property, secret.expose());
    }
    c
}

/// Sets `key` unless the user's properties did. (Settings are never copied out of another
/// `ClientConfig` through `config_map`: it masks secrets, which librdkafka would then get.)
fn set_default(c: &mut ClientConfig, key: &str, value: &str) {
    if c.get(key).is_none() {
        c.set(key, value);
    }
}

fn base_config(
    cfg: &KafkaConfig,
    extra: &std::collections::BTreeMap<String, String>,
) -> ClientConfig {
    let mut c = connection_config(cfg, extra);
    let statistics = cfg.statistics_interval.as_millis().to_string();
    set_default(&mut c, "statistics.interval.ms", &statistics);
    c
}

/// Producer settings every producer of instream has: its defaults, then `kafka.properties`
/// and `kafka.producer` (which may tune them), then the guarantees, which are not negotiable
/// (validation refuses overrides of these keys): success only once every in-sync replica has
/// the record (`acks=all`), and a retried record never written twice (idempotence).
fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = base_config(cfg, &cfg.producer);
    set_default(&mut c, "linger.ms", "5");
    set_default(&mut c, "compression.type", "lz4");
    set_default(&mut c, "queue.buffering.max.messages", "500000");
    // The size every stage checks records against: one setting, not two that could differ.
    c.set("message.max.bytes", cfg.max_record_bytes.to_string());
    c.set("acks", "all");
    c.set("enable.idempotence", "true");
    c
}

fn create(c: &ClientConfig, cfg: &KafkaConfig, service: &str) -> Result<Producer, KafkaError> {
    let inner = c
        .create_with_context(InstreamContext::new(service, ""))
        .map_err(KafkaError::Config)?;
    Ok(Producer {
        inner,
        service: service.into(),
        backlog: cfg.backlog.clone(),
        max_record_bytes: usize::try_from(cfg.max_record_bytes).unwrap_or(usize::MAX),
    })
}

/// A producer with the guarantees of [`producer_config`].
pub fn producer(cfg: &KafkaConfig, service: &str) -> Result<Producer, KafkaError> {
    create(&producer_config(cfg), cfg, service)
}

/// A [`producer`] whose records of one partition reach the broker without gaps: for stages
/// whose outputs are de-duplicated downstream by origin offset (the highest counted per
/// origin partition), where a record lost behind a later one of the same partition would be
/// dropped as a repeat when written again. Delivery never times out (an unreachable broker
/// holds the batch back, as a Redis outage does), and a failure that could leave a gap stops
/// the producer for good (`enable.gapless.guarantee`): the stage exits and its restart reads
/// again from its last commit. `message.timeout.ms` (`delivery.timeout.ms`) and `retries`
/// given in `kafka.producer` do not apply.
pub fn gapless_producer(cfg: &KafkaConfig, service: &str) -> Result<Producer, KafkaError> {
    let mut c = producer_config(cfg);
    // A user's alias could win over the settings below (which of two names for one setting
    // applies depends on the order they are set in), so aliases go. Running out of retries
    // fails a record as retriable, which the gapless guarantee does not cover: the default
    // (no limit) stays.
    for alias in ["delivery.timeout.ms", "retries", "message.send.max.retries"] {
        c.remove(alias);
    }
    c.set("message.timeout.ms", "0");
    c.set("enable.gapless.guarantee", "true");
    if cfg.broker == instream_core::config::BrokerMode::Embedded {
        // librdkafka's mock cluster checks an idempotent producer's sequence numbers only
        // for transactional producers: with several requests in flight, a retried one could
        // land behind a later one, and the origin rule would drop what it holds.
        c.set("max.in.flight.requests.per.connection", "1");
    }
    create(&c, cfg, service)
}

/// A transactional producer (`transactional.id` = `id`): what it writes between
/// `begin_transaction` and `commit_transaction`, together with the consumer offsets sent into
/// the same transaction, becomes visible to `read_committed` readers all at once or not at
/// all. `transaction_timeout` bounds how long a dead instance's open transaction holds those
/// readers back when no instance with the same id comes to abort it.
pub fn transactional_producer(
    cfg: &KafkaConfig,
    service: &str,
    id: &str,
    transaction_timeout: std::time::Duration,
) -> Result<Producer, KafkaError> {
    let mut c = producer_config(cfg);
    c.set("transactional.id", id);
    c.set(
        "transaction.timeout.ms",
        transaction_timeout.as_millis().to_string(),
    );
    create(&c, cfg, service)
}

/// A group member that never commits on its own: offsets are committed by the service through
/// its [`OffsetTracker`](crate::OffsetTracker) once the records are durably handled. Reads only
/// committed transactional data.
pub fn consumer(
    cfg: &KafkaConfig,
    service: &str,
    group: &str,
    topics: &[impl AsRef<str>],
) -> Result<Consumer, KafkaError> {
    let mut c = base_config(cfg, &cfg.consumer);
    // Where a new group starts, and where librdkafka moves a position the broker no longer
    // holds: never in silence, as every stage checks each batch against the expected offsets
    // (`Continuity`) and counts any jump in instream_records_lost_total.
    set_default(&mut c, "auto.offset.reset", "earliest");
    set_default(&mut c, "isolation.level", "read_committed");
    let session_timeout = cfg.session_timeout.as_millis().to_string();
    set_default(&mut c, "session.timeout.ms", &session_timeout);
    // A subscribed topic created after the subscription (a definition adding a repartitioned
    // aggregation) is seen at the next metadata refresh: 10 s, not librdkafka's 5 minutes.
    set_default(&mut c, "topic.metadata.refresh.interval.ms", "10000");
    c.set("group.id", group);
    c.set("enable.auto.commit", "false");
    c.set("enable.auto.offset.store", "false");
    let consumer: Consumer = c
        .create_with_context(InstreamContext::new(service, group).with_backlog(cfg.backlog.clone()))
        .map_err(KafkaError::Config)?;
    let names: Vec<&str> = topics.iter().map(AsRef::as_ref).collect();
    consumer.subscribe(&names).map_err(KafkaError::Consume)?;
    Ok(consumer)
}

/// Consumer errors librdkafka recovers from by itself — a lost connection, a broker or a
/// coordinator moving, the group left after a long pause — are ridden out: the stage goes on
/// when the broker is back (its `/readyz` is false meanwhile). Any other (an authorization
/// refused, an offset reset refused, a fatal client error) stops the stage, so that it is
/// not stuck unseen.
fn is_transient(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        e,
        rdkafka::error::KafkaError::MessageConsumption(
            Code::BrokerTransportFailure
                | Code::AllBrokersDown
                | Code::Resolve
                | Code::OperationTimedOut
                | Code::PollExceeded
                | Code::RequestTimedOut
                | Code::NetworkException
                | Code::NotCoordinator
                | Code::CoordinatorNotAvailable
                | Code::LeaderNotAvailable
                | Code::NotLeaderForPartition
                | Code::PartitionEOF
        )
    )
}

/// Receives up to `max` records: waits up to `wait` for the first, then takes what arrives
/// before `wait` has passed. Each record is tracked for commit. Every record returned belongs
/// to the current assignment generation (`Record::generation`).
pub async fn recv_batch(
    consumer: &Consumer,
    max: usize,
    wait: Duration,
    out: &mut Vec<Record>,
) -> Result<(), KafkaError> {
    out.clear();
    let deadline = tokio::time::Instant::now() + wait;
    // One stream for the whole batch: `recv` makes one per record, and registers and
    // unregisters its waker under a mutex each time.
    let mut stream = consumer.stream();
    while out.len() < max {
        let msg = match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_elapsed) => break,
            // A consumer's stream never ends; were it to, the batch is what came before.
            Ok(None) => break,
            // A subscribed topic not created yet (a definition change races its creation):
            // librdkafka says so at each metadata refresh and picks it up once it exists.
            Ok(Some(Err(rdkafka::error::KafkaError::MessageConsumption(
                rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
            )))) => {
                tracing::warn!("a subscribed topic does not exist yet; consuming the others");
                continue;
            }
            Ok(Some(Err(e))) if is_transient(&e) && consumer.client().fatal_error().is_none() => {
                tracing::warn!(error = %e, "kafka consumer error; it reconnects by itself");
                metrics::counter!("instream_kafka_consume_errors_total").increment(1);
                continue;
            }
            Ok(Some(Err(e))) => return Err(KafkaError::Consume(e)),
            Ok(Some(Ok(m))) => m,
        };
        let headers = msg
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        out.push(Record {
            topic: msg.topic().to_owned(),
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().map(<[u8]>::to_vec),
            payload: msg.payload().unwrap_or_default().to_vec(),
            headers,
            generation: consumer.context().generation(),
        });
    }
    // Records received before a rebalance in this same call belong to partitions we may no
    // longer own; they are dropped here (never tracked, never handled) and read again from the
    // last commit by whoever owns the partition now.
    let generation = consumer.context().generation();
    out.retain(|r| r.generation == generation);
    consumer.context().count_received(out);
    let mut tracker = consumer.context().tracker();
    for r in out.iter() {
        tracker.track(&r.topic, r.partition, r.offset);
    }
    Ok(())
}

/// Marks records durably handled.
pub fn complete<'a>(consumer: &Consumer, records: impl IntoIterator<Item = &'a Record>) {
    let mut tracker = consumer.context().tracker();
    for r in records {
        tracker.complete(&r.topic, r.partition, r.offset);
    }
}

/// The consumer's offsets are committed only inside producer transactions
/// (`send_offsets_to_transaction`): it never commits on its own, not even on a revoke or when
/// it closes, where an older offset could land after a transaction's.
pub fn commit_only_in_transactions(consumer: &Consumer) {
    consumer.context().leave_commits_to_transactions();
}

/// The consumer's assignment generation now (see [`Record::generation`]).
pub fn generation(consumer: &Consumer) -> u64 {
    consumer.context().generation()
}

/// The partitions of the consumer's last assignment; unchanged between a revoke and the
/// assignment that follows it.
pub fn assigned_partitions(consumer: &Consumer) -> std::collections::HashSet<(String, i32)> {
    consumer.context().assignment()
}

/// The partitions of the assignment in force and its [`generation`], or `None` between a
/// revoke and the assignment that follows it.
pub fn current_assignment(
    consumer: &Consumer,
) -> Option<(u64, std::collections::HashSet<(String, i32)>)> {
    consumer.context().current_assignment()
}

/// Marks offsets of one partition durably handled (for stages that keep records' offsets
/// rather than the records).
pub fn complete_offsets(consumer: &Consumer, topic: &str, partition: i32, offsets: &[i64]) {
    let mut tracker = consumer.context().tracker();
    for offset in offsets {
        tracker.complete(topic, partition, *offset);
    }
}

/// Commits every offset the tracker allows. `sync` (shutdown) waits for the broker and
/// re-sends every committable offset, in case an earlier asynchronous commit failed.
pub fn commit(consumer: &Consumer, sync: bool) -> Result<(), KafkaError> {
    let ready = consumer.context().tracker().take_committable(sync);
    if ready.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, next) in &ready {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*next))
            .map_err(KafkaError::Commit)?;
    }
    let mode = if sync {
        CommitMode::Sync
    } else {
        CommitMode::Async
    };
    consumer.context().commit_sent();
    consumer.commit(&tpl, mode).map_err(KafkaError::Commit)
}

/// Enqueues a record, waiting while the producer's queue is full (back-pressure instead of
/// unbounded memory). The returned future resolves when the broker acknowledged the write.
pub async fn send<'a>(
    producer: &Producer,
    record: impl Into<Outgoing<'a>>,
) -> Result<DeliveryFuture, KafkaError> {
    let mut record = record.into().inner;
    let bytes = producer.room_for(&record).await;
    let topic = record.topic;
    loop {
        match producer.inner.send_result(record) {
            Ok(delivery) => {
                producer.written(topic, bytes);
                return Ok(delivery);
            }
            Err((
                rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                r,
            )) => {
                record = r;
                // librdkafka frees queue space as deliveries complete; give it a moment.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((e, _)) => return Err(failed_for_good(producer).unwrap_or(KafkaError::Produce(e))),
        }
    }
}

/// Enqueues a record, or fails at once with [`KafkaError::QueueFull`] when the producer's queue
/// is full (ingest answers 503 then, instead of holding the request).
pub fn try_send<'a>(
    producer: &Producer,
    record: impl Into<Outgoing<'a>>,
) -> Result<DeliveryFuture, KafkaError> {
    let record = record.into().inner;
    // Ingest's writes: admitted against the standalone account before (a reservation), so
    // only counted here, once enqueued.
    let bytes = producer.backlog.as_ref().map(|_| bytes_of(&record));
    let topic = record.topic;
    let delivery = producer
        .inner
        .send_result(record)
        .map_err(|(e, _)| match e {
            rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                KafkaError::QueueFull
            }
            e => KafkaError::Produce(e),
        })?;
    producer.written(topic, bytes);
    Ok(delivery)
}

/// The side outputs of a batch — dead letters, forwarded records, quality records — sent as
/// they are made and awaited together, once, before anything that covers the batch (its
/// offsets' commit, a checkpoint, a transaction's commit): one wait per batch, not one per
/// record.
#[derive(Default)]
pub struct BatchOutputs {
    deliveries: Vec<DeliveryFuture>,
}

impl BatchOutputs {
    pub fn push(&mut self, delivery: DeliveryFuture) {
        self.deliveries.push(delivery);
    }

    pub fn len(&self) -> usize {
        self.deliveries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.deliveries.is_empty()
    }

    /// Waits until the broker has every output sent so far (see [`all_delivered_unless`]):
    /// `Ok(false)` when `stop` came first, and nothing may count as delivered.
    pub async fn delivered_unless(
        &mut self,
        producer: &Producer,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<bool, KafkaError> {
        all_delivered_unless(producer, self.deliveries.drain(..), stop).await
    }
}

/// Waits for every one of `deliveries`, in order, while watching `producer` and `stop`:
/// `Ok(false)` when `stop` came first (some may be on the broker, none may count as
/// delivered). A producer failed for good is an error even if a delivery is never answered,
/// which can happen to a record in flight when deliveries do not time out
/// ([`gapless_producer`]). One watcher for the whole batch: nothing per record.
pub async fn all_delivered_unless(
    producer: &Producer,
    deliveries: impl IntoIterator<Item = DeliveryFuture>,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<bool, KafkaError> {
    Ok(all_delivered_at(producer, deliveries, stop)
        .await?
        .is_some())
}

/// [`all_delivered_unless`] that also says where each record landed, (partition, offset) in
/// the order given; `None` when `stop` came first.
pub async fn all_delivered_at(
    producer: &Producer,
    deliveries: impl IntoIterator<Item = DeliveryFuture>,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<Option<Vec<(i32, i64)>>, KafkaError> {
    let all = async {
        let mut positions = Vec::new();
        for delivery in deliveries {
            positions.push(delivered(delivery).await?);
        }
        Ok::<_, KafkaError>(positions)
    };
    tokio::select! {
        // Deliveries first: all of them answered counts as delivered even if `stop` came too.
        biased;
        done = all => done
            .map(Some)
            .map_err(|e| failed_for_good(producer).unwrap_or(e)),
        _ = stop.cancelled() => Ok(None),
        error = failed_for_good_watch(producer) => Err(error),
    }
}

/// Resolves, with its error, once `producer` has failed for good (librdkafka's fatal error:
/// an idempotent producer raises it when it can no longer keep its order). A service that
/// writes only through it can do nothing more, and stops so that it is restarted with a
/// new one.
pub async fn failed_for_good_watch(producer: &Producer) -> KafkaError {
    let mut check = tokio::time::interval(Duration::from_secs(1));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        check.tick().await;
        if let Some(error) = failed_for_good(producer) {
            return error;
        }
    }
}

/// The producer's fatal error, if it has failed for good. Records it fails afterwards say
/// only "fatal" or "purged": the cause is the client's to tell. Not logged here: the caller
/// stops with it, and says so.
fn failed_for_good(producer: &Producer) -> Option<KafkaError> {
    let (code, reason) = producer.fatal_error()?;
    Some(KafkaError::ProducerFailed {
        code: format!("{code:?}"),
        reason,
    })
}

/// Waits for a delivery and turns its outcome into our error type: where it landed,
/// (partition, offset).
pub async fn delivered(delivery: DeliveryFuture) -> Result<(i32, i64), KafkaError> {
    match delivery.await {
        Ok(Ok(at)) => Ok((at.partition, at.offset)),
        Ok(Err((e, _))) => Err(KafkaError::Produce(e)),
        Err(_canceled) => Err(KafkaError::Produce(rdkafka::error::KafkaError::Canceled)),
    }
}

#[cfg(test)]
mod tests {
    /// What librdkafka was built with: TLS, the SASL mechanisms, OIDC (through libcurl) and
    /// zstd, which secured clusters and the docs rely on.
    #[test]
    fn librdkafka_is_built_with_tls_sasl_oidc_and_zstd() {
        let native = rdkafka::ClientConfig::new()
            .create_native_config()
            .expect("a native config");
        let features = native.get("builtin.features").expect("builtin.features");
        for feature in [
            "ssl",
            "sasl_plain",
            "sasl_scram",
            "sasl_oauthbearer",
            "http",
            "oidc",
            "zstd",
        ] {
            assert!(
                features.split(',').any(|f| f == feature),
                "librdkafka lacks {feature}: {features}"
            );
        }
    }
}
