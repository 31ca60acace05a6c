use std::time::Duration;

use instream_core::config::ZooKeeperConfig;
use serde_json::Value;

use crate::InstanceInfo;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
use zookeeper_client as zk;

use crate::session::{connect, session_ended, CoordError, SERVICES, ZK_BACKOFF};

/// A live registration. The node is ephemeral: it goes when this is dropped, when the process
/// dies (after the session timeout), and it comes back by itself after a session expiry.
pub struct Registration {
    info: watch::Sender<InstanceInfo>,
    path: String,
    _stop: DropGuard,
}

impl Registration {
    pub(crate) fn new(
        info: watch::Sender<InstanceInfo>,
        path: String,
        stop: CancellationToken,
    ) -> Self {
        Self {
            info,
            path,
            _stop: stop.drop_guard(),
        }
    }

    /// The registry path of this instance (below the root).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Changes what the registry says about this instance (its assigned partitions, say).
    pub fn update(&self, change: impl FnOnce(&mut InstanceInfo)) {
        self.info.send_modify(change);
    }

    /// What the registry says about this instance now.
    pub fn info(&self) -> InstanceInfo {
        self.info.borrow().clone()
    }
}

/// Creates `path` as this session's ephemeral node, replacing a node left by an earlier
/// session of this instance (it goes with that session anyway).
async fn create_node(
    client: &zk::Client,
    cfg: &ZooKeeperConfig,
    path: &str,
    data: &[u8],
) -> Result<(), CoordError> {
    let folder = path.rsplit_once('/').map_or(SERVICES, |(f, _)| f);
    client
        .mkdir(folder, &crate::session::persistent(cfg))
        .await
        .map_err(CoordError::op("mkdir", folder))?;
    let ephemeral = zk::CreateMode::Ephemeral.with_acls(crate::session::acls(cfg));
    loop {
        match client.create(path, data, &ephemeral).await {
            Ok(_) => return Ok(()),
            Err(zk::Error::NodeExists) => match client.check_stat(path).await {
                Ok(Some(stat)) if stat.ephemeral_owner == client.session_id().0 => return Ok(()),
                Ok(Some(stat)) => match client.delete(path, Some(stat.version)).await {
                    Ok(()) | Err(zk::Error::NoNode | zk::Error::BadVersion) => {}
                    Err(e) => return Err(CoordError::op("delete", path)(e)),
                },
                Ok(None) => {}
                Err(e) => return Err(CoordError::op("stat", path)(e)),
            },
            Err(e) => return Err(CoordError::op("create", path)(e)),
        }
    }
}

/// Registers a running instance as `services/<service>/<instance>` with `info` (JSON: host,
/// ports, version, partitions…). The first registration's failure is returned; later ones
/// (after a session expiry) are retried in the background until they work.
pub async fn register_instance(
    cfg: &ZooKeeperConfig,
    service: &str,
    instance: &str,
    info: InstanceInfo,
) -> Result<Registration, CoordError> {
    let client = connect(cfg).await?;
    let path = format!("{SERVICES}/{service}/{instance}");
    create_node(&client, cfg, &path, info.to_json().as_bytes()).await?;
    let (tx, rx) = watch::channel(info);
    let stop = CancellationToken::new();
    instream_core::spawn_watched(
        "registry",
        keep_registered(cfg.clone(), client, path.clone(), rx, stop.clone()),
    );
    Ok(Registration::new(tx, path, stop))
}

async fn keep_registered(
    cfg: ZooKeeperConfig,
    mut client: zk::Client,
    path: String,
    mut info: watch::Receiver<InstanceInfo>,
    stop: CancellationToken,
) {
    // An update that failed (a connection lost for a moment) is written again until it lands.
    let mut dirty = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                // Gone at once rather than after the session timeout.
                let _ = client.delete(&path, None).await;
                return;
            }
            changed = info.changed() => {
                if changed.is_err() {
                    return;
                }
                dirty = true;
            }
            _ = tokio::time::sleep(Duration::from_secs(1)), if dirty => {}
            state = session_ended(&client) => {
                crate::session::count_session_lost("registry");
                tracing::warn!(?state, %path, "zookeeper session ended; registering again");
                let mut pauses = ZK_BACKOFF.pauses();
                loop {
                    let attempt = async {
                        let fresh = connect(&cfg).await?;
                        let data = info.borrow_and_update().to_json();
                        create_node(&fresh, &cfg, &path, data.as_bytes()).await?;
                        Ok::<_, CoordError>(fresh)
                    };
                    match stop.run_until_cancelled(attempt).await {
                        None => return,
                        Some(Ok(fresh)) => {
                            client = fresh;
                            dirty = false;
                            tracing::info!(%path, "registered again");
                            break;
                        }
                        Some(Err(error)) => {
                            let pause = pauses.next_pause();
                            tracing::warn!(%error, retry_in = ?pause, "registering again failed");
                            if stop.run_until_cancelled(tokio::time::sleep(pause)).await.is_none() {
                                return;
                            }
                        }
                    }
                }
                continue;
            }
        }
        if dirty {
            let data = info.borrow_and_update().to_json();
            match client.set_data(&path, data.as_bytes(), None).await {
                Ok(_) => dirty = false,
                Err(error) => {
                    tracing::warn!(%error, %path, "updating the registry node failed; retrying")
                }
            }
        }
    }
}

/// One registered instance, as `instream status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Instance {
    pub service: String,
    pub instance: String,
    /// As stored: read as JSON, so that instances of another version are listed too.
    pub info: Value,
}

impl Instance {
    /// The stored info as this version knows it (fields it does not know are left out,
    /// missing ones empty).
    pub fn typed(&self) -> InstanceInfo {
        serde_json::from_value(self.info.clone()).unwrap_or_default()
    }
}

/// Every registered instance.
pub async fn instances(cfg: &ZooKeeperConfig) -> Result<Vec<Instance>, CoordError> {
    let client = connect(cfg).await?;
    let mut found = Vec::new();
    let mut services = client
        .list_children(SERVICES)
        .await
        .map_err(CoordError::op("list", SERVICES))?;
    services.sort();
    for service in services {
        let folder = format!("{SERVICES}/{service}");
        let mut names = match client.list_children(&folder).await {
            Ok(names) => names,
            Err(zk::Error::NoNode) => continue,
            Err(e) => return Err(CoordError::op("list", &folder)(e)),
        };
        names.sort();
        for instance in names {
            let path = format!("{folder}/{instance}");
            let info = match client.get_data(&path).await {
                Ok((data, _)) => serde_json::from_slice(&data).unwrap_or(Value::Null),
                Err(zk::Error::NoNode) => continue,
                Err(e) => return Err(CoordError::op("get", &path)(e)),
            };
            found.push(Instance {
                service: service.clone(),
                instance,
                info,
            });
        }
    }
    Ok(found)
}
