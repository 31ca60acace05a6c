use instream_core::config::ZooKeeperConfig;
use zookeeper_client as zk;

use crate::session::{connect, CoordError};

/// A live registration; the ephemeral node goes when this is dropped or the process dies.
pub struct Registration {
    _client: zk::Client,
    pub path: String,
}

/// Registers a running instance as `services/<service>/<instance>` with `info` (JSON: host,
/// ports, version). The node is ephemeral: ZooKeeper removes it when the session ends.
pub async fn register_instance(
    cfg: &ZooKeeperConfig,
    service: &str,
    instance: &str,
    info: &serde_json::Value,
) -> Result<Registration, CoordError> {
    let client = connect(cfg).await?;
    let folder = format!("{}/services/{service}", cfg.root.trim_end_matches('/'));
    let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    client
        .mkdir(&folder, &persistent)
        .await
        .map_err(CoordError::op("mkdir", &folder))?;
    let path = format!("{folder}/{instance}");
    let data = info.to_string();
    let ephemeral = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
    client
        .create(&path, data.as_bytes(), &ephemeral)
        .await
        .map_err(CoordError::op("create", &path))?;
    Ok(Registration {
        _client: client,
        path,
    })
}
