//! Archive retention as a singleton duty on a real ZooKeeper: two archivers campaign, only the
//! leader deletes files written longer ago than the retention (files written recently stay,
//! whatever hour folder they are in), and when the leader withdraws the standby takes the
//! duty over.

use instream_testkit::wait_for;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use instream_archive::{Archive, LocalArchive};
use instream_core::config::ZooKeeperConfig;
use instream_pipeline::{parse_document, Catalog};
use instream_testkit::{unique, ZooKeeperServer};
use tokio_util::sync::CancellationToken;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// One archiver's view of the shared archive, counting the files it deleted.
struct Counting {
    inner: Arc<LocalArchive>,
    deleted: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl Archive for Counting {
    async fn put(&self, path: &str, data: Bytes) -> Result<(), instream_archive::ArchiveError> {
        self.inner.put(path, data).await
    }
    async fn list(
        &self,
        prefix: &str,
    ) -> Result<Vec<instream_archive::ArchivedFile>, instream_archive::ArchiveError> {
        self.inner.list(prefix).await
    }
    async fn get(&self, path: &str) -> Result<Bytes, instream_archive::ArchiveError> {
        self.inner.get(path).await
    }
    async fn delete(&self, path: &str) -> Result<(), instream_archive::ArchiveError> {
        self.deleted
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.delete(path).await
    }
    async fn remove_leftovers(
        &self,
        prefix: &str,
        name_prefix: &str,
    ) -> Result<usize, instream_archive::ArchiveError> {
        self.inner.remove_leftovers(prefix, name_prefix).await
    }
    async fn ping(&self) -> Result<(), instream_archive::ArchiveError> {
        self.inner.ping().await
    }
}

fn counting(archive: &Arc<LocalArchive>) -> Arc<Counting> {
    Arc::new(Counting {
        inner: archive.clone(),
        deleted: Default::default(),
    })
}

fn deleted(archive: &Counting) -> usize {
    archive.deleted.load(std::sync::atomic::Ordering::SeqCst)
}

async fn write(archive: &LocalArchive, path: &str, age: Duration) {
    archive.put(path, Bytes::from_static(b"x")).await.unwrap();
    std::fs::File::options()
        .write(true)
        .open(archive.root().join(path))
        .unwrap()
        .set_modified(SystemTime::now() - age)
        .unwrap();
}

async fn paths(archive: &LocalArchive) -> Vec<String> {
    archive
        .list("orders")
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.path)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_elected_archiver_deletes_expired_files_and_a_standby_takes_over() {
    let server = ZooKeeperServer::start().unwrap();
    let zk = ZooKeeperConfig {
        connect: server.connect_string(),
        root: format!("/{}", unique("retention")),
        session_timeout: Duration::from_secs(4),
        auth: None,
        auth_file: None,
        tls: None,
    };
    let dir = tempfile::tempdir().unwrap();
    let archive = Arc::new(LocalArchive::new(dir.path()));
    // An old event-time folder written just now stays; files written 40 days ago go.
    write(
        &archive,
        "orders/dt=2020-01-01/hour=00/part-0-0-9.jsonl.zst",
        Duration::ZERO,
    )
    .await;
    write(
        &archive,
        "orders/dt=2026-10-01/hour=00/part-0-10-19.jsonl.zst",
        40 * DAY,
    )
    .await;
    write(
        &archive,
        "orders/dt=2026-10-02/hour=05/part-1-0-9.jsonl.zst",
        40 * DAY,
    )
    .await;
    write(
        &archive,
        "orders/dt=2026-11-20/hour=05/part-1-10-19.jsonl.zst",
        5 * DAY,
    )
    .await;

    let catalog = Catalog::new(
        parse_document("[[pipelines]]\nname = \"orders\"\nkey_field = \"k\"\ntime_field = \"t\"\n")
            .unwrap()
            .pipelines,
    );
    let (_tx, catalog) = tokio::sync::watch::channel(Arc::new(catalog));
    let first = instream_coord::campaign(&zk, instream_archiver::RETENTION_DUTY, "a")
        .await
        .unwrap();
    let first_watch = first.watch();
    let first_stop = CancellationToken::new();
    let (first_archive, second_archive) = (counting(&archive), counting(&archive));
    let first_task = tokio::spawn(instream_archiver::run_retention(
        first_archive.clone(),
        catalog.clone(),
        first,
        30 * DAY,
        Duration::from_millis(100),
        first_stop.clone(),
    ));
    wait_for(
        "the first archiver to lead",
        Duration::from_secs(20),
        || {
            let leading = first_watch.borrow().is_some();
            async move { leading }
        },
    )
    .await;
    let second = instream_coord::campaign(&zk, instream_archiver::RETENTION_DUTY, "b")
        .await
        .unwrap();
    let second_watch = second.watch();
    let second_stop = CancellationToken::new();
    let second_task = tokio::spawn(instream_archiver::run_retention(
        second_archive.clone(),
        catalog.clone(),
        second,
        30 * DAY,
        Duration::from_millis(100),
        second_stop.clone(),
    ));

    wait_for(
        "the expired files to go",
        Duration::from_secs(20),
        || async { paths(&archive).await.len() == 2 },
    )
    .await;
    assert_eq!(
        paths(&archive).await,
        [
            "orders/dt=2020-01-01/hour=00/part-0-0-9.jsonl.zst",
            "orders/dt=2026-11-20/hour=05/part-1-10-19.jsonl.zst"
        ]
    );
    assert!(second_watch.borrow().is_none(), "only one leads");
    assert_eq!(deleted(&first_archive), 2, "the leader deleted both");
    assert_eq!(deleted(&second_archive), 0, "the standby deleted nothing");

    // The leader stops (its election node goes with it): the standby takes the duty and
    // deletes what expires from then on.
    first_stop.cancel();
    first_task.await.unwrap().unwrap();
    wait_for("the standby to lead", Duration::from_secs(20), || {
        let leading = second_watch.borrow().is_some();
        async move { leading }
    })
    .await;
    write(
        &archive,
        "orders/dt=2026-10-03/hour=01/part-2-0-9.jsonl.zst",
        31 * DAY,
    )
    .await;
    wait_for(
        "the standby to delete the newly expired file",
        Duration::from_secs(20),
        || async { paths(&archive).await.len() == 2 },
    )
    .await;
    assert_eq!(deleted(&second_archive), 1, "the new leader deleted it");
    assert_eq!(deleted(&first_archive), 2, "the old one did nothing more");
    second_stop.cancel();
    second_task.await.unwrap().unwrap();
}
