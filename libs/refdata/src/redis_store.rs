use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::link::Link;
use crate::versions::{pointer_key, CHANGES_CHANNEL};
use instream_core::config::RefDataConfig;
use instream_pipeline::RecordShape;
use redis::aio::ConnectionManager;
use redis::Value;
use serde_json::Value as Json;

use crate::{Found, RefDataError, RefRecord, RefStore};

/// Reference data in Redis: hashes (HGETALL) or strings holding JSON (GET). A batch is one
/// pipelined round trip. The connection manager reconnects by itself after a failure.
/// Version pointers of tracked rules are followed by a background task: announcements on
/// [`CHANGES_CHANNEL`] take effect at once, and every `refdata.version_check_interval` the
/// pointers are read again in case an announcement was missed (pub/sub does not queue).
pub struct RedisRefStore {
    link: Arc<Link>,
    timeout: std::time::Duration,
    versions: Arc<Versions>,
    _stop: DropGuard,
}

type RuleId = (String, String);

#[derive(Default)]
struct Versions {
    /// Pipeline -> rule -> version: looked up by `&str`s on the hot path, no allocation.
    current: RwLock<HashMap<String, HashMap<String, u64>>>,
    tracked: Mutex<HashSet<RuleId>>,
}

impl Versions {
    fn set(&self, rule: &RuleId, version: Option<u64>) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        // Versions only go up: an older answer (a pointer read that raced an announcement)
        // must not move an enricher back.
        let old = current
            .get(&rule.0)
            .and_then(|rules| rules.get(&rule.1))
            .copied();
        let changed = match (version, old) {
            (Some(v), Some(old)) if v <= old => false,
            (Some(v), _) => {
                current
                    .entry(rule.0.clone())
                    .or_default()
                    .insert(rule.1.clone(), v);
                true
            }
            (None, _) => false,
        };
        if changed {
            tracing::info!(pipeline = %rule.0, rule = %rule.1, ?version, "reference data version switched");
            metrics::gauge!("instream_refdata_version", "pipeline" => rule.0.clone(), "rule" => rule.1.clone())
                .set(version.unwrap_or(0) as f64);
        }
    }

    fn tracked(&self) -> Vec<RuleId> {
        self.tracked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// Reads the pointers of `rules` (one MGET) into `versions`.
async fn refresh(
    link: &Link,
    timeout: std::time::Duration,
    versions: &Versions,
    rules: &[RuleId],
) -> Result<(), RefDataError> {
    if rules.is_empty() {
        return Ok(());
    }
    // One GET per pointer (a cluster spreads them over slots; elsewhere they are pipelined).
    let commands = rules
        .iter()
        .map(|(p, r)| {
            let mut c = redis::cmd("GET");
            c.arg(pointer_key(p, r));
            c
        })
        .collect();
    let found = tokio::time::timeout(timeout, link.run(commands))
        .await
        .map_err(|_| unavailable("reading version pointers timed out"))??;
    for (rule, reply) in rules.iter().zip(found) {
        let version = match reply {
            Ok(v) => redis::from_redis_value::<Option<u64>>(v).ok().flatten(),
            Err(_) => None,
        };
        versions.set(rule, version);
    }
    Ok(())
}

/// Follows announcements and re-reads the pointers every `interval`, until `stop`.
async fn follow_versions(
    client: Option<redis::Client>,
    link: Arc<Link>,
    timeout: std::time::Duration,
    interval: std::time::Duration,
    versions: Arc<Versions>,
    stop: CancellationToken,
) {
    use futures::StreamExt;
    let Some(client) = client else {
        // Sentinel and cluster: the pointers are read every `interval`.
        let mut ticks = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {
                    if let Err(error) = refresh(&link, timeout, &versions, &versions.tracked()).await {
                        tracing::warn!(%error, "reading version pointers failed");
                    }
                }
            }
        }
    };
    let mut pauses = instream_core::Backoff::new(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(5),
    )
    .pauses();
    loop {
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(CHANGES_CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let mut pubsub = match stop.run_until_cancelled(subscribed).await {
            None => return,
            Some(Ok(p)) => p,
            Some(Err(error)) => {
                let pause = pauses.next_pause();
                tracing::warn!(%error, retry_in = ?pause, "subscribing to reference data changes failed");
                if stop
                    .run_until_cancelled(tokio::time::sleep(pause))
                    .await
                    .is_none()
                {
                    return;
                }
                continue;
            }
        };
        pauses.reset();
        // Announcements sent while not subscribed are lost: read the pointers now.
        if let Err(error) = refresh(&link, timeout, &versions, &versions.tracked()).await {
            tracing::warn!(%error, "reading version pointers failed");
        }
        let mut ticks = tokio::time::interval(interval);
        let mut messages = pubsub.on_message();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                message = messages.next() => {
                    let Some(message) = message else { break };
                    let Ok(text) = message.get_payload::<String>() else { continue };
                    if let Some((pipeline, rule, version)) = crate::versions::parse_change(&text) {
                        let rule = (pipeline, rule);
                        if versions.tracked.lock().unwrap_or_else(|p| p.into_inner()).contains(&rule) {
                            versions.set(&rule, Some(version));
                        }
                    }
                }
                _ = ticks.tick() => {
                    if let Err(error) = refresh(&link, timeout, &versions, &versions.tracked()).await {
                        tracing::warn!(%error, "reading version pointers failed");
                    }
                }
            }
        }
        tracing::warn!("reference data change subscription ended; subscribing again");
    }
}

fn unavailable(e: impl std::fmt::Display) -> RefDataError {
    RefDataError::Unavailable(e.to_string())
}

impl RedisRefStore {
    pub async fn connect(cfg: &RefDataConfig) -> Result<Self, RefDataError> {
        // The URLs may hold a password: errors name the failure, never the URL.
        let link = Arc::new(Link::open(cfg).await?);
        let versions = Arc::new(Versions::default());
        let stop = CancellationToken::new();
        instream_core::spawn_watched(
            "refdata version follower",
            follow_versions(
                Link::pubsub_client(cfg),
                link.clone(),
                cfg.timeout,
                cfg.version_check_interval,
                versions.clone(),
                stop.clone(),
            ),
        );
        Ok(Self {
            link,
            timeout: cfg.timeout,
            versions,
            _stop: stop.drop_guard(),
        })
    }

    /// A connection for other work on the same server (loading reference data); `None` in
    /// sentinel and cluster modes (see [`Self::master_connection`], [`Self::cluster_connection`]).
    pub fn connection(&self) -> Option<ConnectionManager> {
        self.link.single()
    }

    /// Cluster mode: the cluster's connection (for `refdata load`); `None` in the other modes.
    pub fn cluster_connection(&self) -> Option<redis::cluster_async::ClusterConnection> {
        self.link.cluster()
    }

    /// Sentinel mode: a connection to the master the sentinels name now (for `refdata load`);
    /// `None` in the other modes.
    pub async fn master_connection(
        &self,
    ) -> Result<Option<redis::aio::MultiplexedConnection>, RefDataError> {
        self.link.master().await
    }
    /// Loads `path` as a new version of `rule` of `pipeline` (see [`crate::load::load_file`])
    /// through the connection this deployment takes writes on: the one server, the master the
    /// sentinels name now, or the cluster (each record to its slot's node).
    pub async fn load_file(
        &self,
        pipeline: &str,
        rule: &instream_pipeline::EnrichmentRule,
        key_fields: &[String],
        path: &std::path::Path,
        progress: &instream_core::Progress,
    ) -> Result<crate::load::LoadReport, crate::load::LoadError> {
        use crate::load::{load_file, load_file_to_cluster, LoadError};
        let timeout = self.timeout;
        if let Some(server) = self.connection() {
            return load_file(server, timeout, pipeline, rule, key_fields, path, progress).await;
        }
        let master = self.master_connection().await.map_err(|e| {
            LoadError::Redis(format!("finding the master through the sentinels: {e}"))
        })?;
        if let Some(master) = master {
            return load_file(master, timeout, pipeline, rule, key_fields, path, progress).await;
        }
        match self.cluster_connection() {
            Some(cluster) => {
                load_file_to_cluster(cluster, timeout, pipeline, rule, key_fields, path, progress)
                    .await
            }
            None => Err(LoadError::Spec(
                "this store's refdata.redis_mode has no connection to write to".into(),
            )),
        }
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// HGETALL's answer: RESP2 gives a flat array, RESP3 a map; empty means no such key.
fn hash_record(v: Value) -> Found {
    let pairs: Vec<(Value, Value)> = match v {
        Value::Array(items) => {
            let mut it = items.into_iter();
            let mut pairs = Vec::new();
            while let (Some(f), Some(v)) = (it.next(), it.next()) {
                pairs.push((f, v));
            }
            pairs
        }
        Value::Map(pairs) => pairs,
        Value::Nil => Vec::new(),
        Value::ServerError(e) => return Found::Malformed(format!("not a hash: {e:?}")),
        other => return Found::Malformed(format!("expected a hash, got {other:?}")),
    };
    if pairs.is_empty() {
        return Found::Missing;
    }
    let mut record = RefRecord::new();
    for (f, v) in pairs {
        if let (Some(f), Some(v)) = (text(&f), text(&v)) {
            record.insert(f, Json::String(v));
        }
    }
    Found::Record(record)
}

fn json_record(v: Value) -> Found {
    match v {
        Value::Nil => Found::Missing,
        Value::BulkString(bytes) => match serde_json::from_slice::<Json>(&bytes) {
            Ok(Json::Object(map)) => Found::Record(map),
            Ok(_) => Found::Malformed("holds JSON that is not an object".into()),
            Err(e) => Found::Malformed(format!("holds no JSON: {e}")),
        },
        Value::ServerError(e) => Found::Malformed(format!("not a string: {e:?}")),
        other => Found::Malformed(format!("expected a string, got {other:?}")),
    }
}

#[async_trait]
impl RefStore for RedisRefStore {
    async fn lookup_many(
        &self,
        lookups: &[(String, RecordShape)],
    ) -> Result<Vec<Found>, RefDataError> {
        if lookups.is_empty() {
            return Ok(Vec::new());
        }
        let commands = lookups
            .iter()
            .map(|(key, shape)| {
                let mut c = redis::cmd(match shape {
                    RecordShape::Hash => "HGETALL",
                    RecordShape::Json => "GET",
                });
                c.arg(key);
                c
            })
            .collect();
        let answers = match tokio::time::timeout(self.timeout, self.link.run(commands)).await {
            Ok(answers) => answers?,
            Err(_) => {
                // A master that hangs rather than refuses: ask the sentinels again next time.
                self.link.forget_master();
                return Err(unavailable("lookup timed out"));
            }
        };
        if answers.len() != lookups.len() {
            return Err(unavailable(format!(
                "{} answers for {} lookups",
                answers.len(),
                lookups.len()
            )));
        }
        // Only a wrong-type key is that key's problem; any other error reply (LOADING after a
        // restart, BUSY, NOAUTH…) is the server's, and the whole batch is retried.
        if let Some(Err(code)) = answers
            .iter()
            .find(|v| matches!(v, Err(code) if code != "WRONGTYPE"))
        {
            return Err(unavailable(format!("redis answered {code}")));
        }
        Ok(lookups
            .iter()
            .zip(answers)
            .map(|((_, shape), reply)| match reply {
                Err(code) => Found::Malformed(format!("is the wrong type ({code})")),
                Ok(v) => match shape {
                    RecordShape::Hash => hash_record(v),
                    RecordShape::Json => json_record(v),
                },
            })
            .collect())
    }

    async fn track(&self, rules: &[(String, String)]) -> Result<(), RefDataError> {
        let new: Vec<RuleId> = {
            let tracked = self
                .versions
                .tracked
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            rules
                .iter()
                .filter(|r| !tracked.contains(*r))
                .cloned()
                .collect()
        };
        // Tracked only once read: a failed read is tried again by the next call.
        refresh(&self.link, self.timeout, &self.versions, &new).await?;
        self.versions
            .tracked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(new);
        Ok(())
    }

    fn version(&self, pipeline: &str, rule: &str) -> Option<u64> {
        self.versions
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(pipeline)?
            .get(rule)
            .copied()
    }

    async fn ping(&self) -> Result<(), RefDataError> {
        let answers = tokio::time::timeout(self.timeout, self.link.run(vec![redis::cmd("PING")]))
            .await
            .map_err(|_| unavailable("ping timed out"))??;
        match answers.first() {
            Some(Ok(_)) => Ok(()),
            Some(Err(code)) => Err(unavailable(format!("redis answered {code}"))),
            None => Err(unavailable("no answer to PING")),
        }
    }
}
