use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use crate::{
    check_path, completed, in_progress_name, is_leftover_of, Archive, ArchiveError, ArchivedFile,
};

/// The archive as a local directory. Files are fsynced before the rename and the directory
/// after it, so a completed file survives a power cut.
pub struct LocalArchive {
    root: PathBuf,
}

impl LocalArchive {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every file below `prefix`, completed or not, by its path relative to the root.
    async fn walk(&self, prefix: &str) -> Result<Vec<ArchivedFile>, ArchiveError> {
        let root = self.root.clone();
        let dir = if prefix.is_empty() {
            root.clone()
        } else {
            check_path(prefix)?;
            root.join(prefix)
        };
        blocking(move || {
            let mut found = Vec::new();
            walk(&dir, &root, &mut found).map_err(io(&dir))?;
            Ok(found)
        })
        .await
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ArchiveError + '_ {
    move |e| ArchiveError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ArchiveError> + Send + 'static,
) -> Result<T, ArchiveError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ArchiveError::Io {
            path: String::new(),
            message: e.to_string(),
        })?
}

fn walk(dir: &Path, root: &Path, out: &mut Vec<ArchivedFile>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let meta = match entry.metadata() {
            Ok(m) => m,
            // Renamed or removed by a writer since the directory was read (an in-progress
            // file completing): not there any more, so not listed.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let path = entry.path();
        if meta.is_dir() {
            walk(&path, root, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            let modified_ms = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as i64);
            out.push(ArchivedFile {
                path: rel.to_string_lossy().replace('\\', "/"),
                size: meta.len(),
                modified_ms,
            });
        }
    }
    Ok(())
}

#[async_trait]
impl Archive for LocalArchive {
    async fn put(&self, path: &str, data: Bytes) -> Result<(), ArchiveError> {
        check_path(path)?;
        let target = self.root.join(path);
        let temp = self.root.join(in_progress_name(path));
        blocking(move || {
            let dir = target.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            let mut file = std::fs::File::create(&temp).map_err(io(&temp))?;
            let (head, tail) = data.split_at(data.len() / 2);
            file.write_all(head).map_err(io(&temp))?;
            fail::fail_point!("archive-put-mid-write");
            file.write_all(tail).map_err(io(&temp))?;
            file.sync_all().map_err(io(&temp))?;
            drop(file);
            fail::fail_point!("archive-put-before-rename");
            std::fs::rename(&temp, &target).map_err(io(&target))?;
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(dir))?;
            fail::fail_point!("archive-put-after-rename");
            Ok(())
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ArchivedFile>, ArchiveError> {
        Ok(completed(self.walk(prefix).await?))
    }

    async fn get(&self, path: &str) -> Result<Bytes, ArchiveError> {
        check_path(path)?;
        let full = self.root.join(path);
        blocking(move || std::fs::read(&full).map(Bytes::from).map_err(io(&full))).await
    }

    async fn remove_leftovers(
        &self,
        prefix: &str,
        name_prefix: &str,
    ) -> Result<usize, ArchiveError> {
        let leftovers: Vec<PathBuf> = self
            .walk(prefix)
            .await?
            .into_iter()
            .filter(|f| is_leftover_of(&f.path, name_prefix))
            .map(|f| self.root.join(f.path))
            .collect();
        let removed = leftovers.len();
        blocking(move || {
            for full in &leftovers {
                std::fs::remove_file(full).map_err(io(full))?;
            }
            Ok(removed)
        })
        .await
    }

    async fn delete(&self, path: &str) -> Result<(), ArchiveError> {
        check_path(path)?;
        let full = self.root.join(path);
        blocking(move || match std::fs::remove_file(&full) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&full)(e)),
            _ => Ok(()),
        })
        .await
    }

    async fn ping(&self) -> Result<(), ArchiveError> {
        let root = self.root.clone();
        blocking(move || std::fs::create_dir_all(&root).map_err(io(&root))).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        crate::conformance::run(&LocalArchive::new(dir.path()), "suite").await;
    }

    #[tokio::test]
    async fn listing_while_files_complete_never_fails() {
        let dir = tempfile::tempdir().unwrap();
        let archive = std::sync::Arc::new(LocalArchive::new(dir.path()));
        let writer = {
            let archive = archive.clone();
            tokio::spawn(async move {
                for i in 0..300 {
                    let path = format!("p/dt=2024-05-01/part-0-{i}-{i}.jsonl");
                    archive.put(&path, Bytes::from_static(b"x")).await.unwrap();
                }
            })
        };
        while !writer.is_finished() {
            archive
                .list("p")
                .await
                .expect("a listing during writes succeeds");
        }
        writer.await.unwrap();
        assert_eq!(archive.list("p").await.unwrap().len(), 300);
    }

    #[tokio::test]
    async fn leftovers_of_a_crash_are_hidden_then_removed() {
        let dir = tempfile::tempdir().unwrap();
        let archive = LocalArchive::new(dir.path());
        archive
            .put("p/a.jsonl", Bytes::from_static(b"x"))
            .await
            .unwrap();
        std::fs::write(dir.path().join("p/_inprogress.b.jsonl"), b"partial").unwrap();
        let listed: Vec<String> = archive
            .list("p")
            .await
            .unwrap()
            .into_iter()
            .map(|f| f.path)
            .collect();
        assert_eq!(listed, ["p/a.jsonl"]);
        std::fs::write(dir.path().join("p/_inprogress.c.jsonl"), b"another's").unwrap();
        assert_eq!(archive.remove_leftovers("p", "b.").await.unwrap(), 1);
        assert!(!dir.path().join("p/_inprogress.b.jsonl").exists());
        assert!(dir.path().join("p/_inprogress.c.jsonl").exists());
        assert_eq!(archive.remove_leftovers("p", "").await.unwrap(), 1);
    }
}
