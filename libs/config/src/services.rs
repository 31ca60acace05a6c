//! Sections for the pipeline's services.

use std::net::SocketAddr;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use std::path::PathBuf;

use super::secret::{Secret, SecretSlot};
use super::Problems;

const MIB: u64 = 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// The HTTP listener for producers.
    pub listen: SocketAddr,
    /// Largest request body accepted, before and after decompression (gzip or zstd
    /// `Content-Encoding`): a compression bomb stops here.
    pub max_body_bytes: u64,
    /// Deepest nesting of objects and arrays in one event (the event object is level 1).
    pub max_depth: usize,
    /// Longest string (key or value) in one event, in bytes as sent.
    pub max_string_bytes: usize,
    /// Largest event, its envelope included (id, key, times): a larger one is refused by its
    /// index (`event_too_large`) and the rest of its request goes on. Well below
    /// `kafka.max_record_bytes`, so that what enrichment and headers add still fits.
    pub max_event_bytes: u64,
    /// Slowest a request body may arrive once it has had two seconds: a client trickling its
    /// body (holding a request slot while it does) is answered 408. 0: no minimum.
    pub min_body_bytes_per_second: u64,
    /// Requests one client (an API key, or an address when anonymous) may have in flight at
    /// once; more are answered 503 with Retry-After, so that one client cannot take every
    /// slot of `max_in_flight_requests`.
    pub max_in_flight_requests_per_client: usize,
    /// Most events in one request.
    pub max_events_per_request: usize,
    /// Requests handled at once; more are answered 503 before their body is read. With
    /// `max_body_bytes` it bounds the memory bodies take (64 × 10 MiB by default).
    pub max_in_flight_requests: usize,
    /// Events waiting for a broker acknowledgement at once, over all requests; past it the
    /// service answers 503 with Retry-After instead of queueing more.
    pub max_in_flight_events: usize,
    /// How long a request waits for the broker's acknowledgement before answering 503.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub produce_timeout: Duration,
    /// The longest a request may take, body upload included; past it the answer is 408.
    /// Must exceed `produce_timeout`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub request_timeout: Duration,
    /// The `Retry-After` given with 503 answers (overload, broker unreachable or slow).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub retry_after: Duration,
    /// Producers' API keys, sent as `Authorization: Bearer <key>`; each `{ name, sha256,
    /// pipelines, events_per_second }`: who holds it, the key's SHA-256 digest (64 hex digits,
    /// `printf %s "$KEY" | sha256sum`; keys themselves are never stored), the pipelines it may
    /// write to (empty: all), and its events per second (bursts of one second's worth, at least
    /// one full request; over it, 429 with Retry-After; 0: no limit).
    pub api_keys: Vec<IngestApiKey>,
    /// Accept events without a key (a laptop, the standalone demo). Without keys and without
    /// this, ingest refuses to start.
    pub allow_anonymous: bool,
    /// Connections held at once (idle keep-alive ones included); past it new ones wait in
    /// the kernel's backlog until one closes.
    pub max_connections: usize,
    /// Longest a client may take to send a request's headers (slow-loris); then the
    /// connection is closed. The body is bounded by `request_timeout`. It also closes a
    /// keep-alive connection idle this long: producers should keep their pools' idle timeout
    /// below it (a POST sent on a connection as it closes fails and is not retried by most
    /// clients).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub header_read_timeout: Duration,
    /// Serve HTTPS (TLS 1.2 and 1.3, rustls) with this certificate and key. Unset: plain HTTP,
    /// for TLS terminated in front (an ingress or a mesh). Read at start: restart to rotate.
    pub tls: Option<TlsFiles>,
}

/// A server certificate and its private key, PEM files.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The certificate chain, leaf first (PEM).
    pub cert_file: std::path::PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: std::path::PathBuf,
}

/// One producer's API key.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IngestApiKey {
    /// Who holds it: named in logs and in `instream_ingest_rate_limited_total{key}`.
    pub name: String,
    /// The key's SHA-256 digest, 64 hex digits: `printf %s "$KEY" | sha256sum`.
    pub sha256: String,
    /// The pipelines it may write to; empty: every pipeline.
    #[serde(default)]
    pub pipelines: Vec<String>,
    /// Events per second it may send, with bursts of one second's worth (at least one full
    /// request); past it the answer is 429 with Retry-After. 0: no limit.
    #[serde(default)]
    pub events_per_second: u32,
    /// Whose events these are: the scope of the event ids this key's producer gives (two
    /// producers' `event_id`s never make each other's events repeats) and of its
    /// `Idempotency-Key`s. Defaults to `name`; give the old key's producer to a new key when
    /// rotating keys, so that retries across the rotation are still recognised.
    #[serde(default)]
    pub producer: Option<String>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            max_body_bytes: 10 * MIB,
            max_depth: 32,
            max_string_bytes: 64 * 1024,
            max_event_bytes: 256 * 1024,
            min_body_bytes_per_second: 1024,
            max_in_flight_requests_per_client: 16,
            max_events_per_request: 10_000,
            max_in_flight_requests: 64,
            max_in_flight_events: 200_000,
            produce_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            retry_after: Duration::from_secs(1),
            api_keys: Vec::new(),
            allow_anonymous: false,
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            tls: None,
        }
    }
}

impl IngestConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        p.positive(self.max_body_bytes, "ingest.max_body_bytes");
        p.positive(self.max_connections as u64, "ingest.max_connections");
        p.non_zero_duration(self.header_read_timeout, "ingest.header_read_timeout");
        // serde_json refuses documents nested deeper than 128 levels whatever this says.
        p.check(
            (1..=100).contains(&self.max_depth),
            "ingest.max_depth",
            || "must be between 1 and 100".into(),
        );
        p.positive(self.max_string_bytes as u64, "ingest.max_string_bytes");
        p.positive(self.max_event_bytes, "ingest.max_event_bytes");
        p.positive(
            self.max_in_flight_requests_per_client as u64,
            "ingest.max_in_flight_requests_per_client",
        );
        let mut names = std::collections::BTreeSet::new();
        let mut digests = std::collections::BTreeSet::new();
        for (i, key) in self.api_keys.iter().enumerate() {
            let digest = crate::decode_digest(&key.sha256);
            p.check(
                digest.is_some(),
                &format!("ingest.api_keys[{i}].sha256"),
                || "must be a SHA-256 digest: 64 hex digits (not the key itself)".into(),
            );
            p.check(
                digest.is_none_or(|d| digests.insert(d)),
                &format!("ingest.api_keys[{i}].sha256"),
                || "the same key twice: one key, one name, one scope".into(),
            );
            p.check(
                !key.name.is_empty() && names.insert(key.name.as_str()),
                &format!("ingest.api_keys[{i}].name"),
                || format!("`{}` is empty or used twice", key.name),
            );
            p.check(
                key.producer
                    .as_ref()
                    .is_none_or(|name| !name.trim().is_empty()),
                &format!("ingest.api_keys[{i}].producer"),
                || "must not be empty (leave it out: the key's name)".into(),
            );
        }
        p.positive(
            self.max_events_per_request as u64,
            "ingest.max_events_per_request",
        );
        p.positive(
            self.max_in_flight_requests as u64,
            "ingest.max_in_flight_requests",
        );
        p.check(
            self.max_in_flight_events >= self.max_events_per_request,
            "ingest.max_in_flight_events",
            || {
                format!(
                    "must be at least ingest.max_events_per_request ({}), or a full request \
                     could never be admitted",
                    self.max_events_per_request
                )
            },
        );
        p.non_zero_duration(self.produce_timeout, "ingest.produce_timeout");
        p.check(
            self.request_timeout > self.produce_timeout,
            "ingest.request_timeout",
            || {
                format!(
                    "must be longer than ingest.produce_timeout ({:?})",
                    self.produce_timeout
                )
            },
        );
        p.check(
            self.retry_after >= Duration::from_secs(1),
            "ingest.retry_after",
            || "must be at least 1s (Retry-After is in whole seconds)".into(),
        );
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EnricherConfig {
    /// Most events looked up and produced as one batch.
    pub batch_size: usize,
    /// How long a batch waits to fill before it is processed anyway.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub batch_timeout: Duration,
    /// How a batch's outputs and its input offsets are made durable.
    pub delivery: EnricherDelivery,
    /// `transactional.id` of this instance (`transactional` delivery). Give each instance a
    /// stable one (a StatefulSet pod name): a restarted instance then aborts its predecessor's
    /// open transaction at once. Default: `<kafka.group_prefix>-enricher-<HOSTNAME>-<pid>` (the
    /// pid is 1 in a container, so that is the pod's name).
    pub transactional_id: Option<String>,
    /// `transaction.timeout.ms`: how long a dead instance's open transaction can hold back
    /// `read_committed` readers when no instance with its id returns.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub transaction_timeout: Duration,
    /// Most offending events kept as samples (their payload) per quality rule and minute by
    /// each enricher, on `<pipeline>.quality`; 0 keeps none. Every violation is recorded
    /// either way, without its payload.
    pub quality_samples_per_minute: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EnricherDelivery {
    /// `transactional` on a Kafka cluster; `at_least_once` on the embedded broker, which
    /// accepts the transactional protocol but neither stores the offsets sent in a transaction
    /// nor hides aborted ones. A Kafka-protocol broker without transactions (tansu) needs
    /// `at_least_once` set.
    Auto,
    /// Each batch is one Kafka transaction: its enriched records, its dead letters and its
    /// input offsets (sent with the consumer group's metadata, KIP-447, so a deposed member is
    /// fenced) commit together. Exactly once into the enriched topic for `read_committed`
    /// readers, on brokers with transactions.
    Transactional,
    /// Outputs are acknowledged, then offsets committed. After a crash some outputs are
    /// written again, carrying the same origin partition and offset headers, so the aggregator
    /// drops the repeats: the end result is exact only with one writer per input partition,
    /// which the consumer group gives except for a member deposed after missing its polls (it
    /// may still write one batch). For brokers without transactions.
    AtLeastOnce,
}

impl Default for EnricherConfig {
    fn default() -> Self {
        Self {
            batch_size: 2_000,
            batch_timeout: Duration::from_millis(20),
            delivery: EnricherDelivery::Auto,
            transactional_id: None,
            transaction_timeout: Duration::from_secs(10),
            quality_samples_per_minute: 10,
        }
    }
}

impl EnricherConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        p.positive(self.batch_size as u64, "enricher.batch_size");
        p.non_zero_duration(self.batch_timeout, "enricher.batch_timeout");
        p.check(
            self.transaction_timeout >= Duration::from_secs(1)
                && self.transaction_timeout <= Duration::from_secs(900),
            "enricher.transaction_timeout",
            || "must be between 1s and 15m (the broker's default maximum)".into(),
        );
        p.check(
            self.quality_samples_per_minute <= 10_000,
            "enricher.quality_samples_per_minute",
            || "must be at most 10000".into(),
        );
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AggregatorConfig {
    /// How often changed windows are written to the store, then each changed partition's
    /// checkpoint, and then offsets committed.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub flush_interval: Duration,
    /// Most events taken from the consumer between two looks at the clock.
    pub batch_size: usize,
    /// How long (in ingest time) an `event_id` is remembered: a repeat within it is dropped
    /// before it reaches a window. Client retries come within seconds. A restart reads this
    /// much of each partition again to rebuild the ids, so it bounds recovery time too.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub dedup_horizon: Duration,
    /// How often windows still open are written (early results, for dashboards); `0s` writes
    /// a window only once the watermark has passed its end (and again for each late event
    /// within the allowed lateness).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub early_results_every: Duration,
    /// Aggregations repartitioned by a group other than the key: their watermark follows the
    /// slowest enriched partition still sending, so one restarting instance does not make
    /// its partitions' events late; a partition silent for this long stops holding it back.
    /// Exact through a restart shorter than this; windows fed by a partition that went quiet
    /// close this much later. An enriched partition that has not sent anything yet holds it
    /// back this long from the first event. Not the pipeline's `idle_timeout`, which lets
    /// the windows of a partition that is read to its end and quiet close.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub repartition_idle_timeout: Duration,
    /// The key webhook notifications are signed with (HMAC-SHA256 of
    /// `<X-Instream-Timestamp>.<body>`, in `X-Instream-Signature`). From `INSTREAM__AGGREGATOR__WEBHOOK_SECRET` or
    /// `webhook_secret_file`; never logged. Without it a pipeline's webhooks are not sent:
    /// their notifications are dead-lettered, saying so.
    #[schemars(with = "Option<String>")]
    pub webhook_secret: Option<Secret>,
    /// A file holding `webhook_secret` (a mounted Secret), read at start.
    pub webhook_secret_file: Option<PathBuf>,
    /// PEM certificates of private CAs webhook receivers' certificates are trusted from, on
    /// top of the system's roots.
    pub webhook_tls_ca_file: Option<PathBuf>,
    /// Most notifications one input partition keeps waiting for their receivers (they are
    /// in its checkpoint until taken); one more is dead-lettered at once ("more than N were
    /// waiting"), so a receiver that is down for long costs bounded memory and checkpoint
    /// size (about 1 KB each) and never stops aggregation.
    pub webhook_max_pending: usize,
    /// Attempts in flight at once, over all webhooks; one webhook gets at most half of them
    /// (rounded up), so a slow receiver does not hold up the others.
    pub webhook_concurrency: usize,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_secs(1),
            batch_size: 5_000,
            dedup_horizon: Duration::from_secs(600),
            early_results_every: Duration::from_secs(1),
            repartition_idle_timeout: Duration::from_secs(300),
            webhook_secret: None,
            webhook_secret_file: None,
            webhook_tls_ca_file: None,
            webhook_max_pending: 2_000,
            webhook_concurrency: 8,
        }
    }
}

impl AggregatorConfig {
    pub(super) fn secret_slots(&mut self) -> [SecretSlot<'_>; 1] {
        [SecretSlot {
            key: "aggregator.webhook_secret",
            value: &mut self.webhook_secret,
            file: &self.webhook_secret_file,
        }]
    }

    pub(super) fn validate(&self, p: &mut Problems) {
        p.check(
            (1..=10_000).contains(&self.webhook_max_pending),
            "aggregator.webhook_max_pending",
            || "must be 1 to 10000: they are kept in the partition's checkpoint".into(),
        );
        p.check(
            (1..=256).contains(&self.webhook_concurrency),
            "aggregator.webhook_concurrency",
            || "must be 1 to 256".into(),
        );

        p.non_zero_duration(self.flush_interval, "aggregator.flush_interval");
        p.positive(self.batch_size as u64, "aggregator.batch_size");
        p.check(
            self.dedup_horizon <= Duration::from_secs(24 * 3600),
            "aggregator.dedup_horizon",
            || "must be at most 24h: a restart reads that much of each partition again".into(),
        );
        p.check(
            self.repartition_idle_timeout <= Duration::from_secs(24 * 3600),
            "aggregator.repartition_idle_timeout",
            || "must be at most 24h: windows wait that long for a silent partition".into(),
        );
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiverConfig {
    /// A file is closed once this many compressed bytes are written.
    pub roll_max_bytes: u64,
    /// A file is closed once this many records are in it.
    pub roll_max_records: u64,
    /// A file is closed this long after its first record.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub roll_max_age: Duration,
    /// zstd level of JSON-lines files (1 fast … 19 small).
    pub zstd_level: i32,
    /// Archive files written longer ago than this are deleted (by one elected archiver
    /// instance); `0s` keeps them forever. At least `kafka.retention`: a restarted archiver
    /// finds where it stopped from the newest files, which must outlive the records on the
    /// topic.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub retention: Duration,
    /// How often the elected archiver looks for files past `retention`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub retention_check_interval: Duration,
}

impl Default for ArchiverConfig {
    fn default() -> Self {
        Self {
            roll_max_bytes: 128 * MIB,
            roll_max_records: 5_000_000,
            roll_max_age: Duration::from_secs(600),
            zstd_level: 3,
            retention: Duration::from_secs(30 * 24 * 3600),
            retention_check_interval: Duration::from_secs(3600),
        }
    }
}

impl ArchiverConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        p.positive(self.roll_max_bytes, "archiver.roll_max_bytes");
        p.positive(self.roll_max_records, "archiver.roll_max_records");
        p.non_zero_duration(self.roll_max_age, "archiver.roll_max_age");
        p.non_zero_duration(
            self.retention_check_interval,
            "archiver.retention_check_interval",
        );
        p.check(
            (1..=19).contains(&self.zstd_level),
            "archiver.zstd_level",
            || format!("{} is outside 1..=19", self.zstd_level),
        );
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct QueryApiConfig {
    /// The HTTP listener of `GET /v1/pipelines/{pipeline}/aggregates/{aggregation}`.
    pub listen: SocketAddr,
    /// SHA-256 digests (hex) of the API keys accepted as `Authorization: Bearer <key>`; the
    /// keys themselves are never stored. `printf %s "$KEY" | sha256sum` makes one.
    pub api_key_sha256: Vec<String>,
    /// Serve without a key (a laptop, the standalone demo). Without keys and without this,
    /// query-api refuses to start.
    pub allow_anonymous: bool,
    /// Windows per page when the request does not say.
    pub default_page_size: usize,
    /// Most windows per page a request may ask for.
    pub max_page_size: usize,
    /// Connections held at once; idle ones are closed first when the limit nears.
    pub max_connections: usize,
    /// Longest a client may take to send a request's headers; also how long an idle
    /// keep-alive connection stays open.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub header_read_timeout: Duration,
    /// Serve HTTPS (TLS 1.2 and 1.3, rustls) with this certificate and key, as
    /// `ingest.tls`. Unset: plain HTTP, for TLS terminated in front. Read at start.
    pub tls: Option<TlsFiles>,
    /// How often the periodic audit runs (one query-api replica at a time, elected in
    /// ZooKeeper): it audits every pipeline's hours of ingest time that ended at least
    /// `audit_settle` ago, `audit_lookback` back, and sets
    /// `instream_audit_unbalanced_records{pipeline,stage}` (alert `InstreamAuditUnbalanced`;
    /// docs/guarantees.md, "Auditing what happened"). `0s` turns it off.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub audit_every: Duration,
    /// How far back the periodic audit's hours go (whole hours; each check reads them again).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub audit_lookback: Duration,
    /// How long after an hour ends the periodic audit checks it: time for its records to go
    /// through every stage (more than `archiver.roll_max_age` and the stages' usual lag).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub audit_settle: Duration,
    /// The periodic audit checks the archive too, by its file names (query-api then needs
    /// the archive's access).
    pub audit_archive: bool,
}

impl Default for QueryApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8081)),
            api_key_sha256: Vec::new(),
            allow_anonymous: false,
            default_page_size: 100,
            max_page_size: 1_000,
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            tls: None,
            audit_every: Duration::from_secs(5 * 60),
            audit_lookback: Duration::from_secs(3 * 3600),
            audit_settle: Duration::from_secs(15 * 60),
            audit_archive: true,
        }
    }
}

impl QueryApiConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        for (i, digest) in self.api_key_sha256.iter().enumerate() {
            p.check(
                digest.len() == 64 && digest.chars().all(|c| c.is_ascii_hexdigit()),
                &format!("query_api.api_key_sha256[{i}]"),
                || "must be a SHA-256 digest: 64 hex digits (not the key itself)".into(),
            );
        }
        p.positive(self.default_page_size as u64, "query_api.default_page_size");
        p.positive(self.max_connections as u64, "query_api.max_connections");
        p.non_zero_duration(self.header_read_timeout, "query_api.header_read_timeout");
        if !self.audit_every.is_zero() {
            p.check(
                self.audit_lookback >= Duration::from_secs(3600),
                "query_api.audit_lookback",
                || "must be at least 1h (whole hours are checked)".into(),
            );
            p.check(
                self.audit_lookback <= Duration::from_secs(7 * 24 * 3600),
                "query_api.audit_lookback",
                || "must be at most 7d (each check reads the hours again)".into(),
            );
            p.check(
                self.audit_every >= Duration::from_secs(10),
                "query_api.audit_every",
                || "must be at least 10s (or 0s for no check)".into(),
            );
        }
        p.check(
            self.default_page_size <= self.max_page_size,
            "query_api.default_page_size",
            || {
                format!(
                    "must not exceed query_api.max_page_size ({})",
                    self.max_page_size
                )
            },
        );
    }
}
