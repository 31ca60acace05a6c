use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::model::{Catalog, DefinitionsDocument, PipelineDefinition};

#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    #[error("pipeline `{pipeline}` is invalid:\n  - {}", .problems.join("\n  - "))]
    Invalid {
        pipeline: String,
        problems: Vec<String>,
    },
    #[error("pipeline definitions could not be parsed: {0}")]
    Parse(String),
    #[error("pipeline `{0}` is defined twice")]
    Duplicate(String),
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The coordination service failed; retried by the caller.
    #[error("definition store: {0}")]
    Backend(String),
}

/// Where pipeline definitions come from. `subscribe` returns the current catalog at once and
/// keeps sending newer valid ones until `shutdown`; an invalid update is reported and the last
/// good catalog stays in force.
#[async_trait]
pub trait DefinitionSource: Send + Sync {
    async fn subscribe(
        &self,
        shutdown: CancellationToken,
    ) -> Result<watch::Receiver<Arc<Catalog>>, DefinitionError>;
}

/// Parses a definitions document (TOML, or JSON when it starts with `{`) and validates every
/// pipeline in it. A key no table uses is refused, naming the pipeline and the key's path.
pub fn parse_document(text: &str) -> Result<DefinitionsDocument, DefinitionError> {
    let pipelines: Vec<PipelineDefinition> = if text.trim_start().starts_with('{') {
        let doc: RawDocument<serde_json::Value> =
            serde_json::from_str(text).map_err(|e| DefinitionError::Parse(e.to_string()))?;
        doc.pipelines
            .into_iter()
            .enumerate()
            .map(|(i, value)| {
                let name = name_of(value.get("name").and_then(|n| n.as_str()), i);
                typed(name, value)
            })
            .collect::<Result<_, _>>()?
    } else {
        let doc: RawDocument<toml::Value> =
            toml::from_str(text).map_err(|e| DefinitionError::Parse(e.to_string()))?;
        doc.pipelines
            .into_iter()
            .enumerate()
            .map(|(i, value)| {
                let name = name_of(value.get("name").and_then(|n| n.as_str()), i);
                typed(name, value)
            })
            .collect::<Result<_, _>>()?
    };
    let mut seen = std::collections::BTreeSet::new();
    for p in &pipelines {
        p.validate()?;
        if !seen.insert(p.name.as_str()) {
            return Err(DefinitionError::Duplicate(p.name.clone()));
        }
    }
    Ok(DefinitionsDocument { pipelines })
}

/// Parses and validates one pipeline given as JSON (how ZooKeeper stores it).
pub fn parse_definition(text: &[u8]) -> Result<PipelineDefinition, DefinitionError> {
    let value: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| DefinitionError::Parse(e.to_string()))?;
    let name = name_of(value.get("name").and_then(|n| n.as_str()), 0);
    let p = typed(name, value)?;
    p.validate()?;
    Ok(p)
}

/// A definitions document before its pipelines are typed one by one, so that an error can
/// name the pipeline it is in.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDocument<V> {
    #[serde(default = "Vec::new")]
    pipelines: Vec<V>,
}

fn name_of(name: Option<&str>, index: usize) -> String {
    name.map_or_else(|| format!("pipelines[{index}]"), str::to_owned)
}

/// Types one pipeline, naming the path of the key that failed (`aggregations[0].functions[1]`).
fn typed<'de, D: serde::Deserializer<'de>>(
    pipeline: String,
    value: D,
) -> Result<PipelineDefinition, DefinitionError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let reason = e.into_inner().to_string();
        DefinitionError::Invalid {
            pipeline,
            problems: vec![if path == "." {
                reason
            } else {
                format!("{path}: {reason}")
            }],
        }
    })
}

/// Definitions from a file, read once at start (change it with a restart, or use ZooKeeper).
pub struct FileSource {
    path: PathBuf,
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn load(&self) -> Result<Catalog, DefinitionError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| DefinitionError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(Catalog::new(parse_document(&text)?.pipelines))
    }
}

#[async_trait]
impl DefinitionSource for FileSource {
    async fn subscribe(
        &self,
        _shutdown: CancellationToken,
    ) -> Result<watch::Receiver<Arc<Catalog>>, DefinitionError> {
        let (_tx, rx) = watch::channel(Arc::new(self.load()?));
        Ok(rx)
    }
}
