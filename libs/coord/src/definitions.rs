use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::select_all;
use futures::FutureExt;
use instream_core::config::ZooKeeperConfig;
use instream_pipeline::{
    parse_definition, Catalog, DefinitionError, DefinitionSource, PipelineDefinition,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use zookeeper_client as zk;

use crate::session::{connect, persistent, CoordError, PIPELINES};

/// Pipeline definitions stored in ZooKeeper, watched: a stored change reaches every
/// subscriber within moments. A definition that fails validation is reported (log and
/// `instream_definition_rejected_total`) and the last good version of that pipeline stays.
pub struct ZkDefinitionSource {
    cfg: ZooKeeperConfig,
}

impl ZkDefinitionSource {
    pub fn new(cfg: ZooKeeperConfig) -> Self {
        Self { cfg }
    }
}

/// Validates and stores a definition. A stored definition may only be replaced by a higher
/// version, so that results always name the version they were computed under.
pub async fn publish_definition(
    cfg: &ZooKeeperConfig,
    definition: &PipelineDefinition,
) -> Result<(), CoordError> {
    definition.validate()?;
    let client = connect(cfg).await?;
    let path = format!("{PIPELINES}/{}", definition.name);
    let data = serde_json::to_vec(definition)
        .map_err(|e| CoordError::Definition(DefinitionError::Parse(format!("serialising: {e}"))))?;
    match client.get_data(&path).await {
        Ok((old, stat)) => {
            if let Ok(old) = parse_definition(&old) {
                if old.version >= definition.version {
                    return Err(CoordError::Definition(DefinitionError::Invalid {
                        pipeline: definition.name.clone(),
                        problems: vec![format!(
                            "version: {} is not above the stored version {}",
                            definition.version, old.version
                        )],
                    }));
                }
            }
            client
                .set_data(&path, &data, Some(stat.version))
                .await
                .map_err(CoordError::op("set", &path))?;
        }
        Err(zk::Error::NoNode) => {
            client
                .create(&path, &data, &persistent(cfg))
                .await
                .map_err(CoordError::op("create", &path))?;
        }
        Err(e) => return Err(CoordError::op("get", &path)(e)),
    }
    tracing::info!(pipeline = %definition.name, version = definition.version, "definition stored");
    Ok(())
}

/// Reads every definition and arms watches on the folder and each node; returns the catalog
/// and a future that resolves when any of them changes.
async fn load(
    client: &zk::Client,
    folder: &str,
    last_good: &mut BTreeMap<String, PipelineDefinition>,
    rejected: &mut BTreeMap<String, i64>,
) -> Result<(Catalog, impl std::future::Future<Output = ()>), CoordError> {
    let (names, _, children_watch) = client
        .get_and_watch_children(folder)
        .await
        .map_err(CoordError::op("list", folder))?;
    let mut watches = vec![children_watch.changed().map(|_| ()).boxed()];
    let mut current = BTreeMap::new();
    for name in names {
        let path = format!("{folder}/{name}");
        let (data, stat, watch) = match client.get_and_watch_data(&path).await {
            Ok(found) => found,
            Err(zk::Error::NoNode) => continue, // deleted between list and get
            Err(e) => return Err(CoordError::op("get", &path)(e)),
        };
        watches.push(watch.changed().map(|_| ()).boxed());
        match parse_definition(&data) {
            Ok(def) if def.name == name => {
                metrics::gauge!("instream_definition_invalid", "pipeline" => name.clone()).set(0.0);
                rejected.remove(&name);
                current.insert(name, def);
            }
            outcome => {
                let error = match outcome {
                    Ok(def) => format!("node `{name}` holds pipeline `{}`", def.name),
                    Err(e) => e.to_string(),
                };
                metrics::gauge!("instream_definition_invalid", "pipeline" => name.clone()).set(1.0);
                // Counted once per bad write, not on every reload that meets it again.
                if rejected.insert(name.clone(), stat.mzxid) != Some(stat.mzxid) {
                    metrics::counter!("instream_definition_rejected_total", "pipeline" => name.clone())
                        .increment(1);
                }
                match last_good.get(&name) {
                    Some(good) => {
                        tracing::error!(pipeline = %name, %error, kept_version = good.version, "invalid definition ignored; keeping the last good version");
                        current.insert(name, good.clone());
                    }
                    None => {
                        tracing::error!(pipeline = %name, %error, "invalid definition ignored")
                    }
                }
            }
        }
    }
    *last_good = current.clone();
    let changed = async move {
        select_all(watches).await;
    };
    Ok((Catalog::new(current.into_values()), changed))
}

#[async_trait]
impl DefinitionSource for ZkDefinitionSource {
    async fn subscribe(
        &self,
        shutdown: CancellationToken,
    ) -> Result<watch::Receiver<Arc<Catalog>>, DefinitionError> {
        let backend = |e: CoordError| DefinitionError::Backend(e.to_string());
        let folder = PIPELINES.to_owned();
        let client = connect(&self.cfg).await.map_err(backend)?;
        let mut last_good = BTreeMap::new();
        let mut rejected = BTreeMap::new();
        let (catalog, mut changed) = load(&client, &folder, &mut last_good, &mut rejected)
            .await
            .map_err(backend)?;
        let (tx, rx) = watch::channel(Arc::new(catalog));
        let cfg = self.cfg.clone();
        instream_core::spawn_watched("definition watch", async move {
            let mut client = client;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = changed => {}
                }
                // Reload until it works; a lost session means a new client.
                loop {
                    match load(&client, &folder, &mut last_good, &mut rejected).await {
                        Ok((catalog, next)) => {
                            changed = next;
                            tx.send_if_modified(|old| {
                                if **old == catalog {
                                    false
                                } else {
                                    tracing::info!(
                                        pipelines = catalog.len(),
                                        "pipeline definitions reloaded"
                                    );
                                    *old = Arc::new(catalog);
                                    true
                                }
                            });
                            break;
                        }
                        Err(error) => {
                            tracing::warn!(%error, "reloading definitions failed; retrying");
                            if shutdown
                                .run_until_cancelled(tokio::time::sleep(Duration::from_secs(1)))
                                .await
                                .is_none()
                            {
                                return;
                            }
                            if let Ok(fresh) = connect(&cfg).await {
                                client = fresh;
                            }
                        }
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// One stored definition as the CLI shows it: the definition, or why it does not parse.
#[derive(Debug)]
pub struct StoredDefinition {
    pub name: String,
    pub definition: Result<PipelineDefinition, String>,
    /// When it was last stored, in milliseconds since the epoch.
    pub modified_ms: i64,
}

/// Every stored definition, by name.
pub async fn stored_definitions(
    cfg: &ZooKeeperConfig,
) -> Result<Vec<StoredDefinition>, CoordError> {
    let client = connect(cfg).await?;
    let mut names = client
        .list_children(PIPELINES)
        .await
        .map_err(CoordError::op("list", PIPELINES))?;
    names.sort();
    let mut stored = Vec::with_capacity(names.len());
    for name in names {
        let path = format!("{PIPELINES}/{name}");
        let (data, stat) = match client.get_data(&path).await {
            Ok(found) => found,
            Err(zk::Error::NoNode) => continue,
            Err(e) => return Err(CoordError::op("get", &path)(e)),
        };
        stored.push(StoredDefinition {
            name,
            definition: parse_definition(&data).map_err(|e| e.to_string()),
            modified_ms: stat.mtime,
        });
    }
    Ok(stored)
}
