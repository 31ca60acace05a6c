//! instream-config: the one configuration of an instream deployment, as data: every
//! service's sections, their defaults, validation and reference, with no I/O but reading the
//! file. Its own crate, so that a change to what services do at run time (`instream-core`)
//! does not rebuild what only reads settings (the store and archive clients).
//!
//! Layering, lowest first: the defaults written on each field below, then the TOML file given
//! with `--config` (or JSON, by its `.json` extension), then environment variables `INSTREAM__<SECTION>__<KEY>` (double
//! underscores; `INSTREAM__KAFKA__BOOTSTRAP_SERVERS=host:9092`). Unknown keys are errors, so a
//! typo never silently falls back to a default. After parsing, [`Config::validate`] checks
//! every section without I/O and reports every problem at once, each naming its key path.
//!
//! Every service reads the same file and uses its own sections, so one file (one ConfigMap)
//! configures a whole deployment.

mod archive;
pub mod backlog;
mod db_source;
mod infra;
mod reference;
mod secret;
mod service;
mod services;
mod standalone;
mod store;

use std::path::Path;
use std::time::Duration;

use figment::providers::{Format, Json, Serialized, Toml};
use figment::Figment;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use archive::*;
pub use db_source::*;
pub use infra::*;
pub use reference::reference_markdown;
pub use secret::{Secret, SecretFileError};
pub use service::Service;
pub use services::*;
pub use standalone::*;
pub use store::*;

/// The prefix of environment overrides. `INSTREAM_TEST_*` (one underscore) are test-harness
/// addresses and never reach the config.
pub const ENV_PREFIX: &str = "INSTREAM__";

#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Logs: format and level. Every process.
    pub telemetry: TelemetryConfig,
    /// The admin HTTP server (`/metrics`, `/healthz`, `/readyz`). Every process.
    pub admin: AdminConfig,
    /// Graceful shutdown after SIGTERM or Ctrl-C. Every process.
    pub shutdown: ShutdownConfig,
    /// The Kafka cluster (or the embedded broker) and the clients instream builds for it.
    pub kafka: KafkaConfig,
    /// The ZooKeeper ensemble: pipeline definitions and the service registry.
    pub zookeeper: ZooKeeperConfig,
    /// Where pipeline definitions come from.
    pub definitions: DefinitionsConfig,
    /// Reference data for enrichment: Redis, or in memory from a file. The enricher.
    pub refdata: RefDataConfig,
    /// Where windowed aggregates are written: ScyllaDB/Cassandra or embedded. The aggregator.
    pub store: StoreConfig,
    /// Where raw events are archived: HDFS or a local directory. The archiver.
    pub archive: ArchiveConfig,
    /// The HTTP ingest service.
    pub ingest: IngestConfig,
    /// The enricher service.
    pub enricher: EnricherConfig,
    /// The aggregator service.
    pub aggregator: AggregatorConfig,
    /// The archiver service.
    pub archiver: ArchiverConfig,
    /// The query-api service (reads the aggregate store over HTTP).
    pub query_api: QueryApiConfig,
    /// The db-source service: polls SQL tables into pipelines.
    pub db_source: DbSourceConfig,
    /// `instream standalone` (every service in one process on the embedded broker).
    pub standalone: StandaloneConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an environment variable could not be read or parsed; figment names the key.
    #[error("invalid config: {0}")]
    Parse(Box<figment::Error>),
    /// Values parsed but break a rule; every broken rule is listed.
    #[error("invalid config:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Invalid>),
}

/// One broken rule: the dotted key path and why its value is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub key: String,
    pub reason: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// Collects broken rules so that validation reports all of them, not just the first.
#[derive(Debug, Default)]
pub struct Problems(Vec<Invalid>);

impl Problems {
    pub fn add(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.0.push(Invalid {
            key: key.into(),
            reason: reason.into(),
        });
    }

    /// Records a problem unless `ok` holds.
    pub fn check(&mut self, ok: bool, key: &str, reason: impl FnOnce() -> String) {
        if !ok {
            self.add(key, reason());
        }
    }

    pub fn positive(&mut self, value: u64, key: &str) {
        self.check(value > 0, key, || "must be greater than 0".into());
    }

    pub fn non_zero_duration(&mut self, value: Duration, key: &str) {
        self.check(!value.is_zero(), key, || "must be longer than 0s".into());
    }

    pub fn non_empty(&mut self, value: &str, key: &str) {
        self.check(!value.trim().is_empty(), key, || "must not be empty".into());
    }

    pub fn into_result(self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(self.0))
        }
    }
}

impl Config {
    /// Loads defaults, then `file` (if any), then `INSTREAM__…` variables, and validates.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// As [`Config::load`], with the environment given explicitly (tests must not depend on the
    /// process environment).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut overrides: Vec<(String, String, bool)> = env
            .into_iter()
            .filter_map(|(name, raw)| {
                // INSTREAM__KAFKA__BOOTSTRAP_SERVERS -> kafka.bootstrap_servers
                let rest = name.strip_prefix(ENV_PREFIX)?;
                let key = rest.to_lowercase().replace("__", ".");
                // A secret is its text exactly: figment's value parsing would trim it, strip
                // quotes and read escapes.
                let raw_text = secret::SECRET_KEYS.contains(&key.as_str());
                Some((key, raw, raw_text))
            })
            .collect();
        // Values are typed the way figment types environment values ("4" an integer, "10s" a
        // string). A string field given digits (a password "123456") then fails to extract;
        // such a variable is retried as a plain string, once per variable.
        let mut first_errors: Vec<(String, figment::Error)> = Vec::new();
        // Ends: each pass returns, or turns one more variable into a string.
        loop {
            let mut figment = Figment::from(Serialized::defaults(Config::default()));
            if let Some(path) = file {
                // JSON by its extension: what a Helm chart renders from YAML values keeps
                // integers integers, which its TOML rendering does not.
                figment = if path.extension().is_some_and(|e| e == "json") {
                    figment.merge(Json::file_exact(path))
                } else {
                    figment.merge(Toml::file_exact(path))
                };
            }
            for (key, raw, as_string) in &overrides {
                let value: figment::value::Value = if *as_string {
                    raw.clone().into()
                } else {
                    match raw.parse() {
                        Ok(v) => v,
                        Err(never) => match never {},
                    }
                };
                figment = figment.merge(Serialized::default(key, value));
            }
            match figment.extract::<Config>() {
                Ok(mut config) => {
                    // Files first, so the rules see what they hold; a file that cannot be
                    // read is reported with every other problem.
                    let unreadable = config.read_secret_files();
                    config.validate_with(unreadable)?;
                    return Ok(config);
                }
                Err(error) => {
                    let path = error.path.join(".");
                    if let Some((_, first)) = first_errors.iter().find(|(p, _)| *p == path) {
                        // Neither typed nor as a string: the typed attempt's message is the
                        // one that explains (e.g. "invalid value -1").
                        return Err(ConfigError::Parse(Box::new(first.clone())));
                    }
                    let retry = overrides
                        .iter_mut()
                        .find(|(key, _, as_string)| !*as_string && *key == path);
                    match retry {
                        Some(entry) => {
                            entry.2 = true;
                            first_errors.push((path, error));
                        }
                        None => return Err(ConfigError::Parse(Box::new(error))),
                    }
                }
            }
        }
    }

    /// Parses a TOML document over the defaults and validates it (no environment).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let mut config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| ConfigError::Parse(Box::new(e)))?;
        let unreadable = config.read_secret_files();
        config.validate_with(unreadable)?;
        Ok(config)
    }

    /// Fills each secret given as `<key>_file` from its file (see [`secret`]); returns what
    /// could not be read.
    pub fn read_secret_files(&mut self) -> Vec<SecretFileError> {
        let mut unreadable = Vec::new();
        let _ = self.each_secret(|slot| {
            if let Err(e) = slot.read_file() {
                unreadable.push(e);
            }
            Ok(())
        });
        unreadable
    }

    fn each_secret(
        &mut self,
        mut f: impl FnMut(secret::SecretSlot<'_>) -> Result<(), SecretFileError>,
    ) -> Result<(), SecretFileError> {
        for slot in self.kafka.secret_slots() {
            f(slot)?;
        }
        for slot in self
            .zookeeper
            .secret_slots()
            .into_iter()
            .chain(self.refdata.secret_slots())
            .chain(self.store.secret_slots())
            .chain(self.db_source.secret_slots())
            .chain(self.aggregator.secret_slots())
        {
            f(slot)?;
        }
        Ok(())
    }

    /// Whether the enricher writes each batch as one Kafka transaction (`enricher.delivery`,
    /// `auto` resolved by `kafka.broker`).
    pub fn enricher_transactional(&self) -> bool {
        match self.enricher.delivery {
            EnricherDelivery::Transactional => true,
            EnricherDelivery::AtLeastOnce => false,
            EnricherDelivery::Auto => self.kafka.broker == BrokerMode::External,
        }
    }

    /// A copy fit to print or log: passwords (in URLs too) and secret-looking Kafka
    /// properties replaced by `***`.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        c.refdata.redis_url = redact_url(&c.refdata.redis_url);
        for node in &mut c.refdata.redis_nodes {
            *node = redact_url(node);
        }
        // Named secrets (`Secret`) print as `***` by themselves.
        c.db_source.url = redact_url(&c.db_source.url);
        for props in [
            &mut c.kafka.properties,
            &mut c.kafka.producer,
            &mut c.kafka.consumer,
        ] {
            *props = props.masked();
        }
        c
    }

    /// What `service` needs of the config beyond [`validate`](Self::validate) before it
    /// starts: checked by every service process at start (exit code 2) and by `instream
    /// check-config --service`, so a deployment can check a rendered config before it runs.
    pub fn check_for(&self, service: crate::Service) -> Result<(), ConfigError> {
        let mut p = Problems::default();
        match service {
            crate::Service::Ingest => p.check(
                !self.ingest.api_keys.is_empty() || self.ingest.allow_anonymous,
                "ingest.api_keys",
                || {
                    "ingest refuses to start without an API key (give at least one, or set \
                     ingest.allow_anonymous = true)"
                        .into()
                },
            ),
            crate::Service::QueryApi => p.check(
                !self.query_api.api_key_sha256.is_empty() || self.query_api.allow_anonymous,
                "query_api.api_key_sha256",
                || {
                    "query-api refuses to start without an API key (give at least one digest, \
                     or set query_api.allow_anonymous = true)"
                        .into()
                },
            ),
            crate::Service::Enricher
            | crate::Service::Aggregator
            | crate::Service::Archiver
            | crate::Service::DbSource => {}
        }
        if service != crate::Service::QueryApi {
            p.check(
                self.kafka.broker == BrokerMode::External,
                "kafka.broker",
                || {
                    format!(
                        "`embedded` runs only inside `instream standalone`; {service} needs a \
                         Kafka cluster (`external`)"
                    )
                },
            );
        }
        p.into_result()
    }

    /// Checks every rule of every section, without I/O.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_with(Vec::new())
    }

    /// [`validate`](Self::validate), reporting `unreadable` secret files with the rest.
    fn validate_with(&self, unreadable: Vec<SecretFileError>) -> Result<(), ConfigError> {
        let mut p = Problems::default();
        for e in unreadable {
            let key = match &e {
                SecretFileError::Unreadable { key, .. } => format!("{key}_file"),
                SecretFileError::Both(key) => (*key).to_owned(),
            };
            let text = e.to_string();
            let reason = text
                .strip_prefix(&format!("{key}: "))
                .or_else(|| text.strip_prefix(&format!("{key} ")))
                .unwrap_or(&text)
                .to_owned();
            p.add(&key, reason);
        }
        // The slots borrow mutably (to fill them from files); a copy keeps this `&self`.
        let _ = self.clone().each_secret(|slot| {
            slot.validate(&mut p);
            Ok(())
        });
        self.telemetry.validate(&mut p);
        self.admin.validate(&mut p);
        self.shutdown.validate(&mut p);
        self.kafka.validate(&mut p);
        p.check(
            self.query_api.audit_every.is_zero()
                || !self.query_api.audit_archive
                || self.query_api.audit_settle > self.archiver.roll_max_age,
            "query_api.audit_settle",
            || {
                format!(
                    "must be longer than archiver.roll_max_age ({:?}): the periodic audit would \
                     find the archiver's open files missing (or set query_api.audit_archive = \
                     false)",
                    self.archiver.roll_max_age
                )
            },
        );
        p.check(
            !(self.enricher.delivery == EnricherDelivery::Transactional
                && self.kafka.broker == BrokerMode::Embedded),
            "enricher.delivery",
            || {
                "`transactional` needs a Kafka cluster: the embedded broker neither stores the \
                 offsets sent in a transaction nor hides aborted ones (use `auto` or \
                 `at_least_once`)"
                    .into()
            },
        );
        p.check(
            self.archiver.retention.is_zero() || self.archiver.retention >= self.kafka.retention,
            "archiver.retention",
            || {
                format!(
                    "{} is shorter than kafka.retention ({}); a restarted archiver could write records again whose files retention deleted (`0s` keeps files forever)",
                    humantime_serde::re::humantime::format_duration(self.archiver.retention),
                    humantime_serde::re::humantime::format_duration(self.kafka.retention)
                )
            },
        );
        self.zookeeper.validate(&mut p);
        self.definitions.validate(&mut p);
        self.refdata.validate(&mut p);
        self.store.validate(&mut p);
        self.archive.validate(&mut p);
        self.ingest.validate(&mut p);
        self.enricher.validate(&mut p);
        self.aggregator.validate(&mut p);
        self.archiver.validate(&mut p);
        self.query_api.validate(&mut p);
        self.db_source.validate(&mut p);
        self.standalone.validate(&mut p);
        p.check(
            self.ingest.max_event_bytes * 2 <= self.kafka.max_record_bytes,
            "ingest.max_event_bytes",
            || {
                format!(
                    "must be at most half of kafka.max_record_bytes ({}): enrichment and \
                     headers add to an event on its way",
                    self.kafka.max_record_bytes
                )
            },
        );

        p.check(
            self.shutdown.drain_timeout < self.kafka.session_timeout,
            "shutdown.drain_timeout",
            || {
                format!(
                    "must be shorter than kafka.session_timeout ({:?}) so that a draining \
                     member is not expelled from its group while it commits",
                    self.kafka.session_timeout
                )
            },
        );
        p.into_result()
    }
}

/// `scheme://user:password@host` -> `scheme://user:***@host`, and `password=…` query
/// parameters (which the PostgreSQL client accepts) masked too.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // Credentials end at an `@`: a password may hold `@`, `/` or `?` (clients take the
    // first `@` onwards as the host, so the host part runs from the last `@` before the path
    // or query that follows the first `@`).
    let (credentials, after) = match rest.find('@') {
        Some(first) => {
            let authority_end = rest[first..]
                .find(['/', '?'])
                .map_or(rest.len(), |i| first + i);
            let last = rest[..authority_end].rfind('@').unwrap_or(first);
            (Some(&rest[..last]), &rest[last + 1..])
        }
        None => (None, rest),
    };
    let mut out = match credentials {
        Some(credentials) => {
            let user = credentials.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@")
        }
        None => format!("{scheme}://"),
    };
    match after.split_once('?') {
        Some((host, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => p.to_owned(),
                })
                .collect();
            out.push_str(host);
            out.push('?');
            out.push_str(&params.join("&"));
        }
        None => out.push_str(after),
    }
    out
}

/// A SHA-256 digest from 64 hex digits (API keys are configured as their digests).
pub fn decode_digest(hex: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if hex.len() != 64 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests;
