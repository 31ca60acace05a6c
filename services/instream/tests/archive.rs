//! `instream archive verify` on a local archive: a clean one passes (exit 0, counts per
//! partition and hour), a gap or an overlap fails (exit 1, named in the output).

use bytes::Bytes;
use instream_archive::{Archive, LocalArchive};
use instream_archiver::{file_name, FileWriter};
use instream_pipeline::ArchiveFormat;

async fn put(
    archive: &LocalArchive,
    format: ArchiveFormat,
    hour: &str,
    offsets: std::ops::RangeInclusive<i64>,
) {
    let mut w = FileWriter::new(format, &[], 1).unwrap();
    for o in offsets.clone() {
        let raw = format!(
            r#"{{"event_id":"e{o}","pipeline":"p","key":"k","event_time":0,"ingest_time":0,"payload":{{}}}}"#
        );
        let event = instream_event::decode(raw.as_bytes()).unwrap();
        w.append(o, raw.as_bytes(), &event).unwrap();
    }
    let path = format!(
        "orders/dt=2024-05-01/hour={hour}/{}",
        file_name(format, 0, *offsets.start(), *offsets.end())
    );
    archive
        .put(&path, Bytes::from(w.finish().unwrap()))
        .await
        .unwrap();
}

fn verify(root: &std::path::Path, output: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_instream"))
        .args([
            "archive",
            "verify",
            "--pipeline",
            "orders",
            "--output",
            output,
        ])
        .env("INSTREAM__ARCHIVE__BACKEND", "local")
        .env("INSTREAM__ARCHIVE__ROOT", root)
        .env("INSTREAM__TELEMETRY__LOG_LEVEL", "error")
        .output()
        .unwrap()
}

#[tokio::test]
async fn verify_reports_counts_gaps_and_overlaps() {
    let dir = tempfile::tempdir().unwrap();
    let archive = LocalArchive::new(dir.path());
    put(&archive, ArchiveFormat::JsonLines, "10", 0..=9).await;
    put(&archive, ArchiveFormat::Parquet, "11", 10..=14).await;

    let clean = verify(dir.path(), "json");
    assert!(
        clean.status.success(),
        "{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&clean.stdout).unwrap();
    assert_eq!(report["files"], 2);
    assert_eq!(report["records"], 15);
    assert_eq!(report["partitions"][0]["last_offset"], 14);
    assert_eq!(report["records_per_hour"]["2024-05-01T10"], 10);
    assert_eq!(report["records_per_hour"]["2024-05-01T11"], 5);
    let table = verify(dir.path(), "table");
    assert!(table.status.success());
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(
        text.contains("2 files, 15 records: no gap, no overlap"),
        "{text}"
    );

    put(&archive, ArchiveFormat::JsonLines, "11", 14..=20).await; // overlaps at 14
    put(&archive, ArchiveFormat::JsonLines, "12", 25..=30).await; // 21..=24 missing
    let broken = verify(dir.path(), "table");
    assert_eq!(broken.status.code(), Some(1));
    let text = String::from_utf8(broken.stdout).unwrap();
    assert!(text.contains("21-24") && text.contains("14-14"), "{text}");
    assert!(text.contains("NOT CLEAN"), "{text}");
    let stderr = String::from_utf8(broken.stderr).unwrap();
    assert!(stderr.contains("gaps, overlaps or bad files"), "{stderr}");
}
