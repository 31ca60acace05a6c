//! instream-archive: the file store under the archiver.
//!
//! [`Archive::put`] makes a file appear whole or not at all: it is written under a temporary
//! name (`_inprogress.` prefix) and renamed on completion, so readers never see a partial file
//! and a crash leaves only leftovers that [`Archive::remove_leftovers`] deletes. Two
//! implementations, chosen by `archive.backend`: [`HdfsArchive`] (on `hdfs-native`) and
//! [`LocalArchive`] (a directory). [`conformance`] is the suite both must pass.

pub mod conformance;
mod hdfs;
mod local;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use instream_config::{ArchiveBackend, ArchiveConfig};

pub use hdfs::HdfsArchive;
pub use local::LocalArchive;

/// Files whose name starts with this are being written (or were, before a crash).
pub const IN_PROGRESS_PREFIX: &str = "_inprogress.";

/// `(partition, first offset, last offset)` from an archive file's name,
/// `part-<partition>-<first>-<last>.<extension>` (any extension; the archiver checks its own).
pub fn file_offsets(path: &str) -> Option<(i32, i64, i64)> {
    let name = path.rsplit('/').next()?;
    let (stem, _extension) = name.strip_prefix("part-")?.split_once('.')?;
    let mut parts = stem.splitn(3, '-');
    Some((
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    ))
}

/// A completed file, by its path relative to the archive root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedFile {
    pub path: String,
    pub size: u64,
    /// When the file was written (completed), in milliseconds since the epoch: what retention
    /// judges by, since an event-time layout can hold old folders written just now.
    pub modified_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive path `{0}` is not a relative path of `/`-separated names")]
    BadPath(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("archive I/O on `{path}`: {message}")]
    Io { path: String, message: String },
}

#[async_trait]
pub trait Archive: Send + Sync {
    /// Writes `data` at `path` (relative to the root) atomically; parents are created.
    async fn put(&self, path: &str, data: Bytes) -> Result<(), ArchiveError>;
    /// Completed files below `prefix` (recursive), sorted by path.
    async fn list(&self, prefix: &str) -> Result<Vec<ArchivedFile>, ArchiveError>;
    async fn get(&self, path: &str) -> Result<Bytes, ArchiveError>;
    /// Deletes one completed file (retention). A file already gone is not an error.
    async fn delete(&self, path: &str) -> Result<(), ArchiveError>;
    /// Deletes in-progress files below `prefix` whose own name (after the in-progress
    /// prefix) starts with `name_prefix`, left by a crash; returns how many. The name prefix
    /// scopes it to what the caller owns (one partition), so another writer's file in
    /// progress is left alone.
    async fn remove_leftovers(
        &self,
        prefix: &str,
        name_prefix: &str,
    ) -> Result<usize, ArchiveError>;
    /// Succeeds when the archive is reachable (readiness).
    async fn ping(&self) -> Result<(), ArchiveError>;
}

/// Builds the archive `config` names.
pub fn build(config: &ArchiveConfig) -> Result<Arc<dyn Archive>, ArchiveError> {
    match config.backend {
        ArchiveBackend::Local => Ok(Arc::new(LocalArchive::new(&config.root))),
        ArchiveBackend::Hdfs => Ok(Arc::new(HdfsArchive::connect(config)?)),
    }
}

/// Checks a relative path: `/`-separated, no empty, `.` or `..` segments.
pub(crate) fn check_path(path: &str) -> Result<(), ArchiveError> {
    let ok = !path.starts_with('/')
        && path
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..");
    if ok {
        Ok(())
    } else {
        Err(ArchiveError::BadPath(path.to_owned()))
    }
}

/// `dir/name` -> `dir/_inprogress.name`.
pub(crate) fn in_progress_name(path: &str) -> String {
    match path.rsplit_once('/') {
        Some((dir, name)) => format!("{dir}/{IN_PROGRESS_PREFIX}{name}"),
        None => format!("{IN_PROGRESS_PREFIX}{path}"),
    }
}

/// The completed files among everything found, sorted by path.
pub(crate) fn completed(found: Vec<ArchivedFile>) -> Vec<ArchivedFile> {
    let mut files: Vec<ArchivedFile> = found
        .into_iter()
        .filter(|f| !is_in_progress(&f.path))
        .collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    files
}

/// An in-progress file whose own name starts with `name_prefix`.
pub(crate) fn is_leftover_of(path: &str, name_prefix: &str) -> bool {
    path.rsplit('/')
        .next()
        .and_then(|name| name.strip_prefix(IN_PROGRESS_PREFIX))
        .is_some_and(|name| name.starts_with(name_prefix))
}

pub(crate) fn is_in_progress(path: &str) -> bool {
    path.rsplit('/')
        .next()
        .is_some_and(|name| name.starts_with(IN_PROGRESS_PREFIX))
}

#[cfg(test)]
mod tests {
    #[test]
    fn file_names_give_partition_and_offsets() {
        assert_eq!(
            super::file_offsets("p/dt=2024-05-01/hour=10/part-3-100-199.jsonl.zst"),
            Some((3, 100, 199))
        );
        assert_eq!(
            super::file_offsets("part-3-100-199.parquet"),
            Some((3, 100, 199))
        );
        assert_eq!(
            super::file_offsets("_inprogress.part-3-100-199.parquet"),
            None
        );
        assert_eq!(super::file_offsets("part-3-100.parquet"), None);
        assert_eq!(super::file_offsets("notes.txt"), None);
    }
}
