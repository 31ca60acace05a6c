//! Archive retention: files written longer ago than `archiver.retention` are deleted, by one
//! archiver instance at a time — the leader of the `archive-retention` election (ZooKeeper, or
//! in-process in standalone mode). Every instance campaigns; a standby takes over when the
//! leader dies or withdraws.

use std::sync::Arc;
use std::time::Duration;

use instream_archive::{Archive, ArchiveError};
use instream_coord::Leadership;
use instream_pipeline::Catalog;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The election every archiver joins.
pub const RETENTION_DUTY: &str = "archive-retention";

/// Deletes the files of `pipelines` written before `written_before_ms`. Stops as soon as
/// `leadership` is lost, so a deposed leader never deletes beside its successor. Returns how
/// many files it deleted.
pub async fn retention_pass(
    archive: &dyn Archive,
    pipelines: &[String],
    written_before_ms: i64,
    leadership: &Leadership,
) -> Result<usize, ArchiveError> {
    let mut deleted = 0;
    for pipeline in pipelines {
        let expired: Vec<_> = archive
            .list(pipeline)
            .await?
            .into_iter()
            .filter(|f| f.modified_ms < written_before_ms)
            .collect();
        for file in expired {
            if !leadership.is_leader() {
                return Ok(deleted);
            }
            archive.delete(&file.path).await?;
            deleted += 1;
            metrics::counter!("instream_archive_retention_deleted_files_total", "pipeline" => pipeline.clone())
                .increment(1);
            metrics::counter!("instream_archive_retention_deleted_bytes_total", "pipeline" => pipeline.clone())
                .increment(file.size);
        }
    }
    Ok(deleted)
}

/// While leading, runs a retention pass every `interval`; until `shutdown`.
pub async fn run_retention(
    archive: Arc<dyn Archive>,
    catalog: watch::Receiver<Arc<Catalog>>,
    mut leadership: Leadership,
    retention: Duration,
    interval: Duration,
    shutdown: CancellationToken,
) -> Result<(), instream_coord::CoordError> {
    loop {
        // An election that ended under it stops the service, naming this task.
        let term = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            term = leadership.acquired() => term?,
        };
        tracing::info!(term, "leading archive retention");
        while leadership.is_leader() {
            let pipelines: Vec<String> = catalog.borrow().iter().map(|d| d.name.clone()).collect();
            let cutoff = instream_event::now_millis() - retention.as_millis() as i64;
            match retention_pass(archive.as_ref(), &pipelines, cutoff, &leadership).await {
                Ok(0) => {}
                Ok(deleted) => tracing::info!(deleted, "archive retention deleted expired files"),
                // The next pass tries again; nothing is lost by waiting.
                Err(error) => tracing::warn!(%error, "archive retention pass failed"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = leadership.lost() => {}
                _ = tokio::time::sleep(interval) => {}
            }
        }
        tracing::info!(term, "no longer leading archive retention");
    }
}
