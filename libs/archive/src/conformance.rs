//! The behaviour every [`Archive`] must have. Run on the local archive in CI and on a real
//! HDFS when `INSTREAM_TEST_HDFS` is set.

use bytes::Bytes;

use crate::{Archive, ArchiveError};

/// Panics on the first broken expectation. Everything happens below `prefix`.
pub async fn run(archive: &dyn Archive, prefix: &str) {
    archive.ping().await.expect("ping");
    assert!(
        archive.list(prefix).await.unwrap().is_empty(),
        "starts empty"
    );

    let a = format!("{prefix}/dt=2024-05-01/hour=12/part-0-0-9.jsonl.zst");
    let b = format!("{prefix}/dt=2024-05-01/hour=13/part-0-10-19.jsonl.zst");
    archive.put(&a, Bytes::from_static(b"first")).await.unwrap();
    archive
        .put(&b, Bytes::from_static(b"second file"))
        .await
        .unwrap();

    let files = archive.list(prefix).await.unwrap();
    let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, [a.as_str(), b.as_str()], "sorted, recursive");
    assert_eq!(files[1].size, 11);
    assert_eq!(archive.get(&a).await.unwrap(), Bytes::from_static(b"first"));
    assert_eq!(archive.remove_leftovers(prefix, "").await.unwrap(), 0);
    // The write time is the server's clock: within a generous minute of ours.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    assert!(
        (files[0].modified_ms - now).abs() < 60_000,
        "written just now: {} vs {now}",
        files[0].modified_ms
    );

    // Retention deletes one file; deleting it again is not an error.
    archive.delete(&a).await.unwrap();
    archive.delete(&a).await.unwrap();
    let left: Vec<String> = archive
        .list(prefix)
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.path)
        .collect();
    assert_eq!(left, std::slice::from_ref(&b));

    for bad in ["/abs", "a//b", "a/../b", ""] {
        assert!(
            matches!(
                archive.put(bad, Bytes::new()).await,
                Err(ArchiveError::BadPath(_))
            ),
            "`{bad}` must be refused"
        );
    }
}
