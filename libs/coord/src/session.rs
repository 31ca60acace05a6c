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
    #[error(transparent)]
    Definition(#[from] instream_pipeline::DefinitionError),
}

impl CoordError {
    pub(crate) fn op(op: &'static str, path: &str) -> impl FnOnce(zk::Error) -> CoordError {
        let path = path.to_owned();
        move |source| CoordError::Op { op, path, source }
    }
}

/// Connects and makes sure the root and its folders exist.
pub async fn connect(cfg: &ZooKeeperConfig) -> Result<zk::Client, CoordError> {
    let client = zk::Client::connector()
        .with_session_timeout(cfg.session_timeout)
        .connect(&cfg.connect)
        .await
        .map_err(|source| CoordError::Connect {
            connect: cfg.connect.clone(),
            source,
        })?;
    let options = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    for folder in ["pipelines", "services"] {
        let path = format!("{}/{folder}", cfg.root.trim_end_matches('/'));
        client
            .mkdir(&path, &options)
            .await
            .map_err(CoordError::op("mkdir", &path))?;
    }
    Ok(client)
}
