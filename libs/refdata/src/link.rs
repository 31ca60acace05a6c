//! The connection to Redis in each deployment shape (`refdata.redis_mode`): one server (the
//! connection manager reconnects by itself), Sentinel (the master is resolved through the
//! sentinels, and again after a failure, so a failover is followed), or Cluster (each command
//! routed by its key's slot).

use std::sync::Mutex;

use instream_core::config::{RedisMode, RefDataConfig};
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{IntoConnectionInfo, Value};

use crate::RefDataError;

/// One command's answer: its value, or the error code the server gave for it alone (a
/// `WRONGTYPE` key, say).
pub(crate) type Reply = Result<Value, String>;

pub(crate) enum Link {
    Single(ConnectionManager),
    Sentinel {
        client: Box<tokio::sync::Mutex<SentinelClient>>,
        master: Mutex<Option<MultiplexedConnection>>,
    },
    Cluster(ClusterConnection),
}

fn unavailable(e: impl std::fmt::Display) -> RefDataError {
    RefDataError::Unavailable(e.to_string())
}

/// A Redis URL of `cfg` as connection settings, with `password` when the URL gives no
/// password of its own; the error names the key, never the URL (it may hold a password).
fn url_info(
    url: &str,
    key: &str,
    password: Option<&instream_core::config::Secret>,
) -> Result<redis::ConnectionInfo, RefDataError> {
    let info = url
        .into_connection_info()
        .map_err(|e| RefDataError::Unavailable(format!("{key}: {:?}", e.kind())))?;
    Ok(match password {
        Some(password) if info.redis_settings().password().is_none() => {
            let settings = info
                .redis_settings()
                .clone()
                .set_password(password.expose());
            info.set_redis_settings(settings)
        }
        _ => info,
    })
}

/// The CA of `refdata.tls_ca_file`, for TLS to servers whose authority the system store
/// lacks.
fn tls_certificates(cfg: &RefDataConfig) -> Result<Option<redis::TlsCertificates>, RefDataError> {
    let Some(path) = &cfg.tls_ca_file else {
        return Ok(None);
    };
    let pem = std::fs::read(path).map_err(|e| {
        RefDataError::Settings(format!("refdata.tls_ca_file {}: {e}", path.display()))
    })?;
    // Checked here: a file without a certificate would otherwise fail every connection
    // attempt, retried as an outage forever.
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(RefDataError::Settings(format!(
            "refdata.tls_ca_file {}: holds no PEM certificate",
            path.display()
        )));
    }
    Ok(Some(redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }))
}

/// A one-server client for `refdata.redis_url` (`rediss://`: TLS, trusting the configured CA
/// or the system store).
fn single_client(cfg: &RefDataConfig) -> Result<redis::Client, RefDataError> {
    let info = url_info(
        &cfg.redis_url,
        "refdata.redis_url",
        cfg.redis_password.as_ref(),
    )?;
    let client = match tls_certificates(cfg)? {
        Some(certs) => redis::Client::build_with_tls(info, certs),
        None => redis::Client::open(info),
    };
    client.map_err(|e| RefDataError::Unavailable(format!("refdata.redis_url: {:?}", e.kind())))
}

fn replies(values: Vec<Value>) -> Vec<Reply> {
    values
        .into_iter()
        .map(|v| match v {
            Value::ServerError(e) => Err(e.code().to_owned()),
            other => Ok(other),
        })
        .collect()
}

/// A Sentinel client for `refdata.redis_nodes` (the sentinels) and `refdata.sentinel_master`.
/// The data nodes take the user, password, database and protocol of `refdata.redis_url`,
/// and TLS when it is `rediss://`; the sentinels take the user and password of the first
/// sentinel URL (one deployment's sentinels share them) and TLS when their URLs are
/// `rediss://`. `refdata.tls_ca_file` is trusted by both.
fn sentinel_client(cfg: &RefDataConfig) -> Result<SentinelClient, RefDataError> {
    let data = url_info(
        &cfg.redis_url,
        "refdata.redis_url",
        cfg.redis_password.as_ref(),
    )?;
    let mut sentinels = Vec::new();
    for (i, url) in cfg.redis_nodes.iter().enumerate() {
        sentinels.push(url_info(
            url,
            &format!("refdata.redis_nodes[{i}]"),
            cfg.sentinel_password.as_ref(),
        )?);
    }
    let settings = |e: redis::RedisError| RefDataError::Settings(format!("sentinel: {e}"));
    let mut builder = SentinelClientBuilder::new(
        sentinels.iter().map(|s| s.addr().clone()),
        &cfg.sentinel_master,
        SentinelServerType::Master,
    )
    .map_err(settings)?;
    let node = data.redis_settings();
    builder = builder
        .set_client_to_redis_db(node.db())
        .set_client_to_redis_protocol(node.protocol());
    if let Some(user) = node.username() {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = node.password() {
        builder = builder.set_client_to_redis_password(password);
    }
    if let Some(first) = sentinels.first().map(|s| s.redis_settings()) {
        // One set of sentinel settings for all: differing ones would be dropped unseen.
        let same = sentinels.iter().all(|s| {
            let other = s.redis_settings();
            other.username() == first.username()
                && other.password() == first.password()
                && other.protocol() == first.protocol()
        });
        if !same {
            return Err(RefDataError::Settings(
                "refdata.redis_nodes: in sentinel mode every sentinel URL must give the same user, password and protocol".into(),
            ));
        }
        builder = builder.set_client_to_sentinel_protocol(first.protocol());
        if let Some(user) = first.username() {
            builder = builder.set_client_to_sentinel_username(user);
        }
        if let Some(password) = first.password() {
            builder = builder.set_client_to_sentinel_password(password);
        }
    }
    if cfg.redis_url.starts_with("rediss://") {
        builder = builder.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
    }
    if let Some(certs) = tls_certificates(cfg)? {
        // Certificates are refused for a sentinel reached in plain text (the configuration
        // refuses a mix of plain and TLS sentinels).
        let sentinels_tls = sentinels
            .iter()
            .all(|s| matches!(s.addr(), redis::ConnectionAddr::TcpTls { .. }));
        if sentinels_tls {
            builder = builder.set_client_to_sentinel_certificates(certs.clone());
        }
        builder = builder.set_client_to_redis_certificates(certs);
    }
    builder.build().map_err(settings)
}

impl Link {
    pub async fn open(cfg: &RefDataConfig) -> Result<Link, RefDataError> {
        // `rediss://` clients take rustls's process default.
        instream_core::install_tls_provider();
        match cfg.redis_mode {
            RedisMode::Standalone => {
                let client = single_client(cfg)?;
                // One plain connection first, dropped: the manager retries a refused login
                // or handshake until the timeout, so a wrong password would read "connect
                // timed out".
                tokio::time::timeout(cfg.timeout, client.get_multiplexed_async_connection())
                    .await
                    .map_err(|_| unavailable("connect timed out"))?
                    .map_err(unavailable)?;
                let manager = tokio::time::timeout(cfg.timeout, client.get_connection_manager())
                    .await
                    .map_err(|_| unavailable("connect timed out"))?
                    .map_err(unavailable)?;
                Ok(Link::Single(manager))
            }
            RedisMode::Sentinel => {
                let client = sentinel_client(cfg)?;
                let link = Link::Sentinel {
                    client: Box::new(tokio::sync::Mutex::new(client)),
                    master: Mutex::new(None),
                };
                tokio::time::timeout(cfg.timeout, link.sentinel_master())
                    .await
                    .map_err(|_| unavailable("resolving the master timed out"))??;
                Ok(link)
            }
            RedisMode::Cluster => {
                let mut nodes = Vec::new();
                for (i, url) in cfg.redis_nodes.iter().enumerate() {
                    nodes.push(url_info(
                        url,
                        &format!("refdata.redis_nodes[{i}]"),
                        cfg.redis_password.as_ref(),
                    )?);
                }
                let mut builder = redis::cluster::ClusterClientBuilder::new(nodes);
                if let Some(certs) = tls_certificates(cfg)? {
                    builder = builder.certs(certs);
                }
                let client = builder
                    .build()
                    .map_err(|e| RefDataError::Unavailable(format!("cluster: {:?}", e.kind())))?;
                let connection = tokio::time::timeout(cfg.timeout, client.get_async_connection())
                    .await
                    .map_err(|_| unavailable("connect timed out"))?
                    .map_err(unavailable)?;
                Ok(Link::Cluster(connection))
            }
        }
    }

    /// The master's connection, resolved through the sentinels when there is none.
    async fn sentinel_master(&self) -> Result<MultiplexedConnection, RefDataError> {
        let Link::Sentinel { client, master } = self else {
            return Err(unavailable("not a sentinel link"));
        };
        if let Some(c) = master.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(c);
        }
        let fresh = client
            .lock()
            .await
            .get_async_connection()
            .await
            .map_err(unavailable)?;
        *master.lock().unwrap_or_else(|p| p.into_inner()) = Some(fresh.clone());
        Ok(fresh)
    }

    /// Runs `commands` (each about one key) and answers each: one pipelined round trip on a
    /// server, concurrent commands routed by key on a cluster (the multiplexed connections
    /// pipeline them per node). `Err` when Redis could not be reached.
    pub async fn run(&self, commands: Vec<redis::Cmd>) -> Result<Vec<Reply>, RefDataError> {
        match self {
            Link::Single(manager) => {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for c in commands {
                    pipe.add_command(c);
                }
                let values: Vec<Value> = pipe
                    .query_async(&mut manager.clone())
                    .await
                    .map_err(unavailable)?;
                Ok(replies(values))
            }
            Link::Sentinel { master, .. } => {
                let mut connection = self.sentinel_master().await?;
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for c in commands {
                    pipe.add_command(c);
                }
                match pipe.query_async::<Vec<Value>>(&mut connection).await {
                    Ok(values) => {
                        let replies = replies(values);
                        // A former master now a replica: ask the sentinels again.
                        if replies
                            .iter()
                            .any(|r| matches!(r, Err(code) if code == "READONLY"))
                        {
                            *master.lock().unwrap_or_else(|p| p.into_inner()) = None;
                            return Err(unavailable("the master became a replica (failover)"));
                        }
                        Ok(replies)
                    }
                    Err(e) => {
                        *master.lock().unwrap_or_else(|p| p.into_inner()) = None;
                        Err(unavailable(e))
                    }
                }
            }
            Link::Cluster(connection) => {
                let answers = futures::future::join_all(commands.into_iter().map(|c| {
                    let mut connection = connection.clone();
                    async move { c.query_async::<Value>(&mut connection).await }
                }))
                .await;
                let mut out = Vec::with_capacity(answers.len());
                for answer in answers {
                    match answer {
                        Ok(v) => out.push(Ok(v)),
                        Err(e) if e.code() == Some("WRONGTYPE") => {
                            out.push(Err("WRONGTYPE".to_owned()))
                        }
                        Err(e) => return Err(unavailable(e)),
                    }
                }
                Ok(out)
            }
        }
    }

    /// Sentinel: drops the master's connection, so the next command asks the sentinels where
    /// the master is. Elsewhere nothing to do.
    pub fn forget_master(&self) {
        if let Link::Sentinel { master, .. } = self {
            *master.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// A client for pub/sub (one server only; elsewhere versions are followed by polling).
    pub fn pubsub_client(cfg: &RefDataConfig) -> Option<redis::Client> {
        instream_core::install_tls_provider();
        (cfg.redis_mode == RedisMode::Standalone)
            .then(|| single_client(cfg).ok())
            .flatten()
    }

    /// Sentinel: the master's connection, asked of the sentinels again first so that it is
    /// the master now (for `refdata load`; the lookups' cached connection is replaced by it
    /// too). Elsewhere `None`.
    pub async fn master(&self) -> Result<Option<MultiplexedConnection>, RefDataError> {
        if !matches!(self, Link::Sentinel { .. }) {
            return Ok(None);
        }
        self.forget_master();
        self.sentinel_master().await.map(Some)
    }

    /// The connection manager of a one-server link (for `refdata load`).
    pub fn single(&self) -> Option<ConnectionManager> {
        match self {
            Link::Single(m) => Some(m.clone()),
            _ => None,
        }
    }

    /// The connection of a cluster link (for `refdata load`).
    pub fn cluster(&self) -> Option<ClusterConnection> {
        match self {
            Link::Cluster(c) => Some(c.clone()),
            _ => None,
        }
    }
}
