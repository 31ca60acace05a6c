use instream_core::config::ZooKeeperConfig;
use zookeeper_client as zk;

#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("zookeeper at {connect}: {source}")]
    Connect { connect: String, source: zk::Error },
    #[error("zookeeper {op} {path}: {source}")]
    Op {
        op: &'static str,
        path: String,
        source: zk::Error,
    },
    /// A later leader claimed the duty's node: this instance must stop its duty.
    #[error("zookeeper {path}: claimed by a later leader than term {term}")]
    Fenced { path: String, term: u64 },
    #[error("zookeeper {path} holds something unreadable: {reason}")]
    Corrupt { path: String, reason: String },
    #[error(transparent)]
    Definition(#[from] instream_pipeline::DefinitionError),
    /// The task that took part in an election for this instance ended (it panicked).
    #[error("the election ended: its task is gone (see the `task panicked` line)")]
    ElectionEnded,
    /// The in-process coordinator's files (standalone mode).
    #[error("{path}: {reason}")]
    Local { path: String, reason: String },
    /// `zookeeper.tls` names a file that cannot be read or used.
    #[error("zookeeper.tls: {0}")]
    Tls(String),
}

impl CoordError {
    pub(crate) fn op(op: &'static str, path: &str) -> impl FnOnce(zk::Error) -> CoordError {
        let path = path.to_owned();
        move |source| CoordError::Op { op, path, source }
    }
}

/// The folders every instream deployment has below its root.
pub(crate) const PIPELINES: &str = "/pipelines";
pub(crate) const SERVICES: &str = "/services";
pub(crate) const ELECTIONS: &str = "/elections";

/// The ACLs of every znode instream creates: with `zookeeper.auth` only that identity may
/// touch them; without it, anyone may.
pub(crate) fn acls(cfg: &ZooKeeperConfig) -> zk::Acls<'static> {
    if cfg.auth.is_some() {
        zk::Acls::creator_all()
    } else {
        zk::Acls::anyone_all()
    }
}

pub(crate) fn persistent(cfg: &ZooKeeperConfig) -> zk::CreateOptions<'static> {
    zk::CreateMode::Persistent.with_acls(acls(cfg))
}

/// Connects with `zookeeper.auth` (if any), makes sure `zookeeper.root` and its folders
/// exist, and returns a client chrooted at the root: every path below is relative to it, so
/// two deployments on one ensemble cannot see each other's nodes.
pub async fn connect(cfg: &ZooKeeperConfig) -> Result<zk::Client, CoordError> {
    let mut connector = zk::Client::connector().with_session_timeout(cfg.session_timeout);
    if let Some(auth) = &cfg.auth {
        connector = connector.with_auth("digest", auth.expose().as_bytes());
    }
    let connected = match &cfg.tls {
        Some(tls) => {
            instream_core::install_tls_provider();
            connector
                .with_tls(tls_options(tls)?)
                .secure_connect(&cfg.connect)
                .await
        }
        None => connector.connect(&cfg.connect).await,
    };
    let client = match connected {
        Ok(client) => client,
        Err(source) => {
            if let Some(tls) = &cfg.tls {
                if let Some(reason) = crate::tls::handshake_failure(&cfg.connect, tls).await {
                    return Err(CoordError::Tls(format!(
                        "connecting to {}: {source}: {reason}",
                        cfg.connect
                    )));
                }
            }
            return Err(CoordError::Connect {
                connect: cfg.connect.clone(),
                source,
            });
        }
    };
    let root = cfg.root.trim_end_matches('/');
    if !root.is_empty() {
        client
            .mkdir(root, &persistent(cfg))
            .await
            .map_err(CoordError::op("mkdir", root))?;
    }
    let client = if root.is_empty() {
        client
    } else {
        client.chroot(root.to_owned()).map_err(|_| CoordError::Op {
            op: "chroot",
            path: root.to_owned(),
            source: zk::Error::BadArguments(&"invalid chroot path"),
        })?
    };
    for folder in [PIPELINES, SERVICES, ELECTIONS] {
        client
            .mkdir(folder, &persistent(cfg))
            .await
            .map_err(CoordError::op("mkdir", folder))?;
    }
    Ok(client)
}

/// The client's TLS settings from `zookeeper.tls`: the authority, and the client's own
/// certificate for mutual TLS.
fn tls_options(tls: &instream_core::config::ClientTls) -> Result<zk::TlsOptions, CoordError> {
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map_err(|e| CoordError::Tls(format!("{key}: reading {}: {e}", path.display())))
    };
    let ca_file = tls
        .ca_file
        .as_deref()
        .ok_or_else(|| CoordError::Tls("ca_file: required".into()))?;
    let mut options = zk::TlsOptions::new()
        .with_pem_ca(&read("ca_file", ca_file)?)
        .map_err(|e| CoordError::Tls(format!("ca_file: {}: {e}", ca_file.display())))?;
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        options = options
            .with_pem_identity(&read("cert_file", cert)?, &read("key_file", key)?)
            .map_err(|e| {
                CoordError::Tls(format!(
                    "cert_file and key_file: {} and {}: {e}",
                    cert.display(),
                    key.display()
                ))
            })?;
    }
    Ok(options)
}

/// Resolves when the client's session has ended for good (expired, closed or refused), the
/// point where ephemeral nodes and watches are gone and a new session must redo them.
pub(crate) async fn session_ended(client: &zk::Client) -> zk::SessionState {
    let mut states = client.state_watcher();
    let mut state = states.peek_state();
    loop {
        if state.is_terminated() {
            return state;
        }
        state = states.changed().await;
    }
}

/// `instream_zookeeper_sessions_lost_total{role}`: a session of `role` (registry, election)
/// ended, and what it held is being taken again.
pub(crate) fn count_session_lost(role: &'static str) {
    metrics::counter!("instream_zookeeper_sessions_lost_total", "role" => role).increment(1);
}

/// Pauses between attempts to take back what a lost session held (registration, candidacy).
pub(crate) const ZK_BACKOFF: instream_core::Backoff = instream_core::Backoff::new(
    std::time::Duration::from_millis(100),
    std::time::Duration::from_secs(5),
);
