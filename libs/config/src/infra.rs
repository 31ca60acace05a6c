//! Sections for the process itself and the servers around the pipeline.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::secret::{Secret, SecretSlot};
use super::Problems;

pub(super) const DAY: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One JSON object per line: for log shippers.
    Json,
    /// Human-readable: for a terminal.
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Log line format.
    pub log_format: LogFormat,
    /// A `tracing` filter (`info`, `instream=debug,rdkafka=warn`); `RUST_LOG` overrides it.
    pub log_level: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Json,
            log_level: "info".into(),
        }
    }
}

impl TelemetryConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        p.non_empty(&self.log_level, "telemetry.log_level");
        p.check(
            tracing_subscriber::EnvFilter::try_new(&self.log_level).is_ok(),
            "telemetry.log_level",
            || {
                format!(
                    "`{}` is not a tracing filter (e.g. `info`, `instream=debug,warn`)",
                    self.log_level
                )
            },
        );
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Where `/metrics`, `/healthz` and `/readyz` are served. Each service process has its own;
    /// port 0 picks a free port (tests).
    pub listen: SocketAddr,
    /// Connections held at once (scrapers and probes need few); idle ones are closed first
    /// when the limit nears.
    pub max_connections: usize,
    /// Longest a client may take to send a request's headers; also how long an idle
    /// keep-alive connection stays open.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub header_read_timeout: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 9464)),
            max_connections: 128,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

impl AdminConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        p.positive(self.max_connections as u64, "admin.max_connections");
        p.non_zero_duration(self.header_read_timeout, "admin.header_read_timeout");
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// After SIGTERM: how long in-flight work may take to finish and commit before the process
    /// exits anyway. Must stay below `kafka.session_timeout`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(20),
        }
    }
}

impl ShutdownConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        p.non_zero_duration(self.drain_timeout, "shutdown.drain_timeout");
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BrokerMode {
    /// A Kafka cluster at `bootstrap_servers`.
    External,
    /// librdkafka's in-process Kafka-protocol broker; only `instream standalone` starts it, and
    /// it keeps nothing across a restart.
    Embedded,
}

/// What a consuming stage does once it found records it can no longer read (below the log
/// start after retention or a broker's cap, or skipped by the broker): they are counted in
/// `instream_records_lost_total` and logged as an ERROR with the range either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnRecordsLost {
    /// Go on with the next record: the rest of the stream stays current (the lost range
    /// cannot be read again whatever the stage does; repair from the archive).
    #[default]
    Continue,
    /// Stop the stage before it handles (or commits) anything after the gap; it stops again
    /// after each restart until an operator moves the group's offsets past the gap.
    Stop,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// External or embedded broker.
    pub broker: BrokerMode,
    /// `host:port[,host:port…]` of the cluster (external mode).
    pub bootstrap_servers: String,
    /// Consumer group ids are `<group_prefix>-<service>`.
    pub group_prefix: String,
    /// librdkafka properties for every client (producers, consumers, admin), passed through
    /// unchanged: TLS, SASL, `client.id`, tuning.
    pub properties: Properties,
    /// librdkafka properties for producers only (over `properties`).
    pub producer: Properties,
    /// librdkafka properties for consumers only (over `properties`).
    pub consumer: Properties,
    /// The SASL password (librdkafka's `sasl.password`, for PLAIN and SCRAM; the user is
    /// `properties."sasl.username"`). Give it as `INSTREAM__KAFKA__SASL_PASSWORD` or through
    /// `sasl_password_file`; never logged, masked by `check-config`.
    pub sasl_password: Option<Secret>,
    /// A file holding `sasl_password` (a mounted Secret), read at start.
    pub sasl_password_file: Option<PathBuf>,
    /// The password of the client's private key (`ssl.key.password`, for mutual TLS with an
    /// encrypted `ssl.key.location`).
    pub ssl_key_password: Option<Secret>,
    /// A file holding `ssl_key_password`, read at start.
    pub ssl_key_password_file: Option<PathBuf>,
    /// The OAUTHBEARER OIDC client secret (`sasl.oauthbearer.client.secret`, with
    /// `sasl.oauthbearer.method = "oidc"`).
    pub sasl_oauthbearer_client_secret: Option<Secret>,
    /// A file holding `sasl_oauthbearer_client_secret`, read at start.
    pub sasl_oauthbearer_client_secret_file: Option<PathBuf>,
    /// Consumer group session timeout: a member silent this long loses its partitions.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub session_timeout: Duration,
    /// How often consumers commit what is durably handled.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub commit_interval: Duration,
    /// How often librdkafka reports statistics (consumer lag gauges come from them).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub statistics_interval: Duration,
    /// Replication factor of the topics instream creates.
    pub replication_factor: i32,
    /// `retention.ms` of the raw, enriched and dead-letter topics (30 days by default, as in
    /// the blueprint). Set explicitly at creation: some brokers report unset configs as absent.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub retention: Duration,
    /// Largest record instream writes (the brokers' `message.max.bytes` must allow it; set as
    /// the producers' `message.max.bytes`). A stage whose output would be larger
    /// dead-letters the event instead (its payload cut short in the dead letter).
    pub max_record_bytes: u64,
    /// What a consuming stage does after it counted records it can no longer read
    /// (`instream_records_lost_total`): `continue` or `stop` (see docs/guarantees.md).
    pub on_records_lost: OnRecordsLost,
    /// Standalone mode only, set by `instream standalone` (never from a file): the account of
    /// unread bytes per topic that keeps every topic within what the embedded broker keeps.
    #[serde(skip)]
    #[schemars(skip)]
    pub backlog: Option<crate::backlog::Backlog>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            broker: BrokerMode::External,
            bootstrap_servers: "127.0.0.1:9092".into(),
            group_prefix: "instream".into(),
            properties: Properties::default(),
            producer: Properties::default(),
            consumer: Properties::default(),
            sasl_password: None,
            sasl_password_file: None,
            ssl_key_password: None,
            ssl_key_password_file: None,
            sasl_oauthbearer_client_secret: None,
            sasl_oauthbearer_client_secret_file: None,
            session_timeout: Duration::from_secs(45),
            commit_interval: Duration::from_secs(1),
            statistics_interval: Duration::from_secs(5),
            replication_factor: 3,
            retention: 30 * DAY,
            max_record_bytes: 1_000_000,
            on_records_lost: OnRecordsLost::Continue,
            backlog: None,
        }
    }
}

/// librdkafka properties by name. `{:?}` masks the values of secret-looking names (passwords,
/// keys, tokens), as `check-config` does.
#[derive(Clone, Default, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(transparent)]
pub struct Properties(pub BTreeMap<String, String>);

/// Values may be written as numbers or booleans (`"linger.ms" = 5`, as YAML and Terraform
/// write them): librdkafka takes every value as text.
impl<'de> Deserialize<'de> for Properties {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Scalar {
            Text(String),
            Integer(i64),
            Number(f64),
            Flag(bool),
        }
        let map = BTreeMap::<String, Scalar>::deserialize(deserializer)?;
        Ok(Properties(
            map.into_iter()
                .map(|(k, v)| {
                    let text = match v {
                        Scalar::Text(t) => t,
                        Scalar::Integer(i) => i.to_string(),
                        Scalar::Number(n) => n.to_string(),
                        Scalar::Flag(b) => b.to_string(),
                    };
                    (k, text)
                })
                .collect(),
        ))
    }
}

impl std::ops::Deref for Properties {
    type Target = BTreeMap<String, String>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Properties {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl<'a> IntoIterator for &'a Properties {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl Properties {
    /// Whether a property's value is a secret: masked in `{:?}` and by `check-config`.
    pub fn is_secret(name: &str) -> bool {
        let n = name.to_lowercase();
        [
            "password",
            "passphrase",
            "secret",
            "jaas",
            "key.pem",
            "token",
            "oauthbearer.config",
        ]
        .iter()
        .any(|s| n.contains(s))
    }

    /// A copy with secret values replaced by `***`.
    pub fn masked(&self) -> Properties {
        Properties(
            self.0
                .iter()
                .map(|(k, v)| {
                    let v = if Self::is_secret(k) {
                        "***".to_owned()
                    } else {
                        v.clone()
                    };
                    (k.clone(), v)
                })
                .collect(),
        )
    }
}

impl std::fmt::Debug for Properties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.masked().0.iter()).finish()
    }
}

/// The librdkafka properties instream's named secret keys set (see [`super::secret`]).
const KAFKA_SECRET_PROPERTIES: [(&str, &str); 3] = [
    ("sasl.password", "kafka.sasl_password"),
    ("ssl.key.password", "kafka.ssl_key_password"),
    (
        "sasl.oauthbearer.client.secret",
        "kafka.sasl_oauthbearer_client_secret",
    ),
];

impl KafkaConfig {
    /// The secrets to hand librdkafka, by property name: every client sets them over
    /// `properties`.
    pub fn secret_properties(&self) -> impl Iterator<Item = (&'static str, &Secret)> {
        [
            &self.sasl_password,
            &self.ssl_key_password,
            &self.sasl_oauthbearer_client_secret,
        ]
        .into_iter()
        .zip(KAFKA_SECRET_PROPERTIES)
        .filter_map(|(secret, (property, _))| secret.as_ref().map(|s| (property, s)))
    }

    pub(super) fn secret_slots(&mut self) -> [SecretSlot<'_>; 3] {
        [
            SecretSlot {
                key: "kafka.sasl_password",
                value: &mut self.sasl_password,
                file: &self.sasl_password_file,
            },
            SecretSlot {
                key: "kafka.ssl_key_password",
                value: &mut self.ssl_key_password,
                file: &self.ssl_key_password_file,
            },
            SecretSlot {
                key: "kafka.sasl_oauthbearer_client_secret",
                value: &mut self.sasl_oauthbearer_client_secret,
                file: &self.sasl_oauthbearer_client_secret_file,
            },
        ]
    }

    pub(super) fn validate(&self, p: &mut Problems) {
        if self.broker == BrokerMode::External {
            p.non_empty(&self.bootstrap_servers, "kafka.bootstrap_servers");
        }
        p.non_empty(&self.group_prefix, "kafka.group_prefix");
        p.check(
            self.session_timeout >= Duration::from_secs(1),
            "kafka.session_timeout",
            || "must be at least 1s".into(),
        );
        p.non_zero_duration(self.commit_interval, "kafka.commit_interval");
        p.check(
            self.replication_factor >= 1,
            "kafka.replication_factor",
            || "must be at least 1".into(),
        );
        p.non_zero_duration(self.retention, "kafka.retention");
        p.check(
            (64 * 1024..=100_000_000).contains(&self.max_record_bytes),
            "kafka.max_record_bytes",
            || "must be between 65536 and 100000000".into(),
        );
        for (section, props) in [
            ("properties", &self.properties),
            ("producer", &self.producer),
            ("consumer", &self.consumer),
        ] {
            for name in props.keys() {
                // These carry instream's delivery guarantees; overriding them would break them.
                let guarded = [
                    "enable.auto.commit",
                    "enable.auto.offset.store",
                    "acks",
                    "request.required.acks",
                    "enable.idempotence",
                ];
                p.check(
                    !guarded.contains(&name.as_str()),
                    &format!("kafka.{section}.{name}"),
                    || "is set by instream to keep its delivery guarantees".into(),
                );
            }
            for (property, key) in KAFKA_SECRET_PROPERTIES {
                p.check(
                    !props.contains_key(property),
                    &format!("kafka.{section}.{property}"),
                    || {
                        format!(
                            "give it as {key} (or {key}_file, or the environment variable \
                             INSTREAM__{}): secrets are never needed in the config file",
                            key.to_uppercase().replace('.', "__")
                        )
                    },
                );
            }
            p.check(
                !props.contains_key("message.max.bytes"),
                &format!("kafka.{section}.message.max.bytes"),
                || {
                    "set kafka.max_record_bytes instead: every stage checks records against it"
                        .into()
                },
            );
            // Stages drop what they received before a rebalance and rely on every partition
            // being re-fetched from its commit afterwards: true of eager assignment only.
            for (name, value) in props {
                let incremental = (name == "partition.assignment.strategy"
                    && value.contains("cooperative"))
                    || (name == "group.protocol" && value.trim() == "consumer");
                p.check(
                    !incremental,
                    &format!("kafka.{section}.{name}"),
                    || format!("`{value}` means incremental rebalancing, which instream's stages do not support yet"),
                );
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ZooKeeperConfig {
    /// `host:port[,host:port…]` of the ensemble.
    pub connect: String,
    /// Every instream znode lives below this path.
    pub root: String,
    /// ZooKeeper session timeout: ephemeral nodes (registry, leadership) vanish this long after
    /// a process dies.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub session_timeout: Duration,
    /// `user:password` for ZooKeeper's `digest` scheme. When set, every znode instream creates
    /// is readable and writable by that identity only (`creator_all`); when unset, znodes are
    /// open to anyone who can reach the ensemble. Give it as `INSTREAM__ZOOKEEPER__AUTH` or
    /// through `auth_file`; never logged.
    pub auth: Option<Secret>,
    /// A file holding `auth`, read at start.
    pub auth_file: Option<PathBuf>,
    /// TLS to the ensemble (its `secureClientPort`, or a TLS proxy in front of it): every
    /// host of `connect` is reached over TLS, its certificate checked against `ca_file`
    /// (required); `cert_file` and `key_file` for mutual TLS.
    pub tls: Option<super::ClientTls>,
}

impl Default for ZooKeeperConfig {
    fn default() -> Self {
        Self {
            connect: "127.0.0.1:2181".into(),
            root: "/instream".into(),
            session_timeout: Duration::from_secs(10),
            auth: None,
            auth_file: None,
            tls: None,
        }
    }
}

impl ZooKeeperConfig {
    pub(super) fn secret_slots(&mut self) -> [SecretSlot<'_>; 1] {
        [SecretSlot {
            key: "zookeeper.auth",
            value: &mut self.auth,
            file: &self.auth_file,
        }]
    }

    pub(super) fn validate(&self, p: &mut Problems) {
        p.non_empty(&self.connect, "zookeeper.connect");
        p.check(
            self.root.starts_with('/') && (self.root.len() == 1 || !self.root.ends_with('/')),
            "zookeeper.root",
            || {
                format!(
                    "`{}` must be an absolute path without a trailing `/`",
                    self.root
                )
            },
        );
        p.non_zero_duration(self.session_timeout, "zookeeper.session_timeout");
        p.check(!self.connect.contains('/'), "zookeeper.connect", || {
            "must be `host:port[,host:port…]`; the chroot is `zookeeper.root`".into()
        });
        if let Some(tls) = &self.tls {
            tls.validate("zookeeper", p);
            p.check(tls.ca_file.is_some(), "zookeeper.tls.ca_file", || {
                "TLS to ZooKeeper needs the authority that signed its certificate (PEM)".into()
            });
            // Read at every connect: a file missing is refused at start, not retried for ever.
            for (key, file) in [
                ("zookeeper.tls.ca_file", &tls.ca_file),
                ("zookeeper.tls.cert_file", &tls.cert_file),
                ("zookeeper.tls.key_file", &tls.key_file),
            ] {
                if let Some(path) = file {
                    p.check(path.is_file(), key, || {
                        format!("{} is not a readable file", path.display())
                    });
                }
            }
        }
        if let Some(auth) = &self.auth {
            p.check(
                auth.expose()
                    .split_once(':')
                    .is_some_and(|(user, password)| !user.is_empty() && !password.is_empty()),
                "zookeeper.auth",
                || "must be `user:password`".into(),
            );
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DefinitionSourceKind {
    /// A TOML or JSON file at `definitions.path`.
    File,
    /// Znodes under `<zookeeper.root>/pipelines`, watched and hot-reloaded.
    Zookeeper,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DefinitionsConfig {
    /// Where pipeline definitions come from.
    pub source: DefinitionSourceKind,
    /// The definitions file (`source = "file"`).
    pub path: Option<PathBuf>,
}

impl Default for DefinitionsConfig {
    fn default() -> Self {
        Self {
            source: DefinitionSourceKind::Zookeeper,
            path: None,
        }
    }
}

impl DefinitionsConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        p.check(
            self.source != DefinitionSourceKind::File || self.path.is_some(),
            "definitions.path",
            || "is required when definitions.source = \"file\"".into(),
        );
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RefDataBackend {
    /// A Redis server at `refdata.redis_url`.
    Redis,
    /// An in-process map loaded from `refdata.seed_file` (standalone mode).
    Memory,
}

#[derive(Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RefDataConfig {
    /// Where reference records are looked up.
    pub backend: RefDataBackend,
    /// `redis://[user:password@]host:port[/db]` (an ACL user and password go here;
    /// `rediss://` for TLS). In `sentinel` mode only its scheme, user, password and database
    /// are used, for the master the sentinels name. Never logged.
    pub redis_url: String,
    /// How Redis is deployed.
    pub redis_mode: RedisMode,
    /// `sentinel`: the sentinels, `redis[s]://[user:password@]host:port` (all with the same
    /// scheme, user and password); `cluster`: some of the cluster's nodes
    /// (`redis[s]://[user:password@]host:port`), the rest are discovered.
    pub redis_nodes: Vec<String>,
    /// `sentinel`: the name of the monitored master.
    pub sentinel_master: String,
    /// How long one Redis round trip may take before it is retried.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub timeout: Duration,
    /// JSON lines `{"key": "...", "fields": {...}}` loaded into the memory backend at start.
    pub seed_file: Option<PathBuf>,
    /// How often the version pointers of `instream refdata load` are read again, in case a
    /// switch announcement was missed (they normally take effect at once).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub version_check_interval: Duration,
    /// Memory bound of the enricher's local cache of reference records (estimated bytes of
    /// keys and records); `0` turns the cache off (every lookup goes to Redis).
    pub cache_max_bytes: u64,
    /// How long a found record is served from the local cache. Records loaded with
    /// `instream refdata load` never change under their versioned key, so this bounds only
    /// how stale data written to Redis by other tools may be.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub cache_ttl: Duration,
    /// How long "no such record" is served from the local cache (negative caching).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String", extend("format" = "duration"))]
    pub cache_negative_ttl: Duration,
    /// PEM certificate(s) of the authority that signed the Redis servers' certificates, for
    /// `rediss://` URLs when it is not in the system's trust store (every mode; in sentinel
    /// mode for the sentinels and the data nodes).
    pub tls_ca_file: Option<PathBuf>,
    /// The Redis password for the data nodes' URLs that give none of their own (the user, if
    /// any, stays in the URL; in sentinel mode `redis_url`, in cluster mode every node):
    /// `INSTREAM__REFDATA__REDIS_PASSWORD` or `redis_password_file`, so the URLs hold no
    /// secret. Never logged.
    pub redis_password: Option<Secret>,
    /// A file holding `redis_password`, read at start.
    pub redis_password_file: Option<PathBuf>,
    /// `sentinel` mode: the sentinels' password (`requirepass` on the sentinels), for
    /// sentinel URLs that give none. Unset: `redis_password`, as most deployments share one.
    pub sentinel_password: Option<Secret>,
    /// A file holding `sentinel_password`, read at start.
    pub sentinel_password_file: Option<PathBuf>,
}

/// By hand: the URLs may hold a password.
impl std::fmt::Debug for RefDataConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefDataConfig")
            .field("backend", &self.backend)
            .field("redis_url", &super::redact_url(&self.redis_url))
            .field("redis_mode", &self.redis_mode)
            .field(
                "redis_nodes",
                &self
                    .redis_nodes
                    .iter()
                    .map(|u| super::redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("sentinel_master", &self.sentinel_master)
            .field("timeout", &self.timeout)
            .field("seed_file", &self.seed_file)
            .field("version_check_interval", &self.version_check_interval)
            .field("cache_max_bytes", &self.cache_max_bytes)
            .field("cache_ttl", &self.cache_ttl)
            .field("cache_negative_ttl", &self.cache_negative_ttl)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("redis_password", &self.redis_password)
            .field("redis_password_file", &self.redis_password_file)
            .field("sentinel_password", &self.sentinel_password)
            .field("sentinel_password_file", &self.sentinel_password_file)
            .finish()
    }
}

impl Default for RefDataConfig {
    fn default() -> Self {
        Self {
            backend: RefDataBackend::Redis,
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_mode: RedisMode::Standalone,
            redis_nodes: Vec::new(),
            sentinel_master: "mymaster".into(),
            timeout: Duration::from_secs(2),
            seed_file: None,
            version_check_interval: Duration::from_secs(5),
            cache_max_bytes: 256 * 1024 * 1024,
            cache_ttl: Duration::from_secs(60),
            cache_negative_ttl: Duration::from_secs(5),
            tls_ca_file: None,
            redis_password: None,
            redis_password_file: None,
            sentinel_password: None,
            sentinel_password_file: None,
        }
    }
}

impl RefDataConfig {
    pub(super) fn secret_slots(&mut self) -> [SecretSlot<'_>; 2] {
        [
            SecretSlot {
                key: "refdata.redis_password",
                value: &mut self.redis_password,
                file: &self.redis_password_file,
            },
            SecretSlot {
                key: "refdata.sentinel_password",
                value: &mut self.sentinel_password,
                file: &self.sentinel_password_file,
            },
        ]
    }

    pub(super) fn validate(&self, p: &mut Problems) {
        if self.backend == RefDataBackend::Redis {
            let scheme_ok = |url: &str| url.starts_with("redis://") || url.starts_with("rediss://");
            p.check(scheme_ok(&self.redis_url), "refdata.redis_url", || {
                "must start with redis:// (or rediss:// for TLS)".into()
            });
            if self.redis_mode != RedisMode::Standalone {
                p.check(
                    !self.redis_nodes.is_empty() && self.redis_nodes.iter().all(|n| scheme_ok(n)),
                    "refdata.redis_nodes",
                    || "sentinel and cluster modes need redis[s]://host:port nodes".into(),
                );
            }
            if self.redis_mode == RedisMode::Sentinel {
                let tls = self
                    .redis_nodes
                    .iter()
                    .filter(|n| n.starts_with("rediss://"))
                    .count();
                p.check(
                    tls == 0 || tls == self.redis_nodes.len(),
                    "refdata.redis_nodes",
                    || "sentinel mode needs the sentinels all redis:// or all rediss://".into(),
                );
            }
            if self.tls_ca_file.is_some() {
                // The URLs the mode connects to with the authority.
                let nodes_tls = || self.redis_nodes.iter().any(|u| u.starts_with("rediss://"));
                let url_tls = self.redis_url.starts_with("rediss://");
                let tls = match self.redis_mode {
                    RedisMode::Standalone => url_tls,
                    RedisMode::Cluster => nodes_tls(),
                    // The sentinels, the data nodes, or both.
                    RedisMode::Sentinel => url_tls || nodes_tls(),
                };
                p.check(tls, "refdata.tls_ca_file", || {
                    "is used only with rediss:// URLs".into()
                });
            }
        }
        p.non_zero_duration(self.timeout, "refdata.timeout");
        p.non_zero_duration(
            self.version_check_interval,
            "refdata.version_check_interval",
        );
        if self.cache_max_bytes > 0 {
            p.non_zero_duration(self.cache_ttl, "refdata.cache_ttl");
            p.non_zero_duration(self.cache_negative_ttl, "refdata.cache_negative_ttl");
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RedisMode {
    /// One server (or a proxy in front of several) at `refdata.redis_url`.
    Standalone,
    /// A master found through the sentinels in `refdata.redis_nodes`, followed across
    /// failovers.
    Sentinel,
    /// A Redis Cluster reached through `refdata.redis_nodes`; each lookup goes to its key's
    /// node.
    Cluster,
}
