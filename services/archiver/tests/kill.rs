//! The `instream-archiver` binary killed with -9 mid-stream and restarted: every offset of
//! every partition ends up in exactly one file — no gap, no overlap — and a clean SIGTERM
//! afterwards exits 0. Runs against a real Kafka-protocol broker (the embedded one, or
//! `INSTREAM_TEST_KAFKA`).

use instream_testkit::wait_for;
use std::path::{Path, PathBuf};
use std::time::Duration;

use instream_archive::{Archive, LocalArchive};
use instream_archiver::VerifyReport;
use instream_testkit::{free_port, process_config_toml, unique, ChildGuard, KafkaBroker};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

const BIN: &str = env!("CARGO_BIN_EXE_instream-archiver");
const RECORDS: usize = 20_000;
/// Every this many records one is not JSON: dead-lettered, its offset inside a file's range.
const GARBAGE_EVERY: usize = 2_500;
const PARTITIONS: i32 = 2;

/// One pipeline's topics filled with `RECORDS` records, and an archiver config for it.
struct Setup {
    pipeline: String,
    topic: String,
    dir: tempfile::TempDir,
    root: PathBuf,
    config: PathBuf,
    admin_port: u16,
    garbage: u64,
}

impl Setup {
    /// `spread_ms` is the event-time step between records: with `partition_by =
    /// "event_time"` a large step spreads each partition over several hour folders.
    async fn new(broker: &KafkaBroker, format: &str, partition_by: &str, spread_ms: i64) -> Setup {
        let pipeline = unique("kill");
        broker
            .create_pipeline_topics(&pipeline, PARTITIONS)
            .unwrap();
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap_servers())
            .set("linger.ms", "5")
            .create()
            .unwrap();
        let topic = format!("{pipeline}.raw");
        let mut deliveries = Vec::new();
        let mut garbage = 0;
        for i in 0..RECORDS {
            let envelope = if i % GARBAGE_EVERY == GARBAGE_EVERY / 2 {
                garbage += 1;
                "not json at all".to_owned()
            } else {
                serde_json::json!({
                    "event_id": format!("e{i}"), "pipeline": pipeline, "key": format!("k{}", i % 97),
                    "event_time": 1_714_564_800_000i64 + i as i64 * spread_ms, "ingest_time": 1_714_564_800_000i64,
                    "payload": {"n": i},
                })
                .to_string()
            };
            let key = format!("k{}", i % 97);
            deliveries.push(
                producer
                    .send_result(FutureRecord::to(&topic).key(&key).payload(&envelope))
                    .map_err(|(e, _)| e)
                    .unwrap(),
            );
        }
        for d in deliveries {
            d.await.unwrap().unwrap();
        }

        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("archive");
        let definitions = dir.path().join("definitions.toml");
        std::fs::write(
            &definitions,
            format!("[[pipelines]]\nname = \"{pipeline}\"\nkey_field = \"k\"\ntime_field = \"t\"\npartitions = {PARTITIONS}\narchive = {{ format = \"{format}\", partition_by = \"{partition_by}\" }}\n"),
        )
        .unwrap();
        let admin_port = free_port().unwrap();
        let config = dir.path().join("instream.toml");
        std::fs::write(
            &config,
            format!(
                r#"{process}
[archive]
backend = "local"
root = "{root}"
[archiver]
roll_max_records = 500
roll_max_age = "1s"
"#,
                process = process_config_toml(
                    admin_port,
                    &broker.bootstrap_servers(),
                    &definitions,
                    "1s",
                    65_536
                ),
                root = root.display(),
            ),
        )
        .unwrap();
        Setup {
            pipeline,
            topic,
            dir,
            root,
            config,
            admin_port,
            garbage,
        }
    }

    fn archive(&self) -> LocalArchive {
        LocalArchive::new(&self.root)
    }

    fn spawn(&self, failpoints: Option<&str>) -> ChildGuard {
        let mut command = std::process::Command::new(BIN);
        command
            .arg("--config")
            .arg(&self.config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(f) = failpoints {
            command.env("FAILPOINTS", f);
        }
        ChildGuard::new(command.spawn().unwrap())
    }

    async fn completed_files(&self) -> usize {
        self.archive().list(&self.pipeline).await.unwrap().len()
    }

    /// Waits until the archive reads back clean and holds every decodable record.
    async fn wait_for_everything(&self) -> VerifyReport {
        let expected = RECORDS as u64 - self.garbage;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let report = instream_archiver::verify(
                &self.archive(),
                &self.pipeline,
                &instream_core::Progress::silent(),
            )
            .await
            .unwrap();
            let covered: i64 = report.partitions.iter().map(|p| p.last_offset + 1).sum();
            if report.records >= expected && covered >= RECORDS as i64 {
                return report;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out with {} of {expected} records archived",
                report.records
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every offset of every partition in exactly one file; the garbage dead-lettered.
    fn assert_exact(&self, report: &VerifyReport) {
        assert!(report.is_clean(), "{report:#?}");
        assert_eq!(report.records, RECORDS as u64 - self.garbage, "{report:#?}");
        assert_eq!(report.partitions.len(), PARTITIONS as usize);
        let mut covered = 0;
        let mut without_record = 0;
        for p in &report.partitions {
            assert_eq!(p.first_offset, 0, "partition {} starts at 0", p.partition);
            assert_eq!(p.files_without_offsets, 0, "every file lists its offsets");
            covered += p.last_offset + 1;
            without_record += p.offsets_without_record;
        }
        assert_eq!(covered, RECORDS as i64, "every offset covered once");
        assert_eq!(without_record, self.garbage, "the garbage is dead-lettered");
    }
}

/// `_inprogress.` files below `dir`: writes under way (or cut short).
fn in_progress(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|e| {
            let path = e.path();
            if path.is_dir() {
                in_progress(&path)
            } else if e.file_name().to_string_lossy().starts_with("_inprogress.") {
                vec![path]
            } else {
                Vec::new()
            }
        })
        .collect()
}

/// A whole Parquet file ends with its footer's magic; a half-written one does not.
fn is_whole_parquet(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| b.len() > 8 && b.ends_with(b"PAR1"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_archives_every_offset_exactly_once() {
    let broker = KafkaBroker::start().unwrap();
    let setup = Setup::new(&broker, "json_lines", "ingest_time", 1).await;
    let mut first = setup.spawn(None);
    wait_for("the first files", Duration::from_secs(120), async || {
        setup.completed_files().await >= 4
    })
    .await;
    first.0.kill().unwrap(); // SIGKILL: no drain, no final commit
    first.wait_exit(Duration::from_secs(10)).unwrap();
    let before = setup.completed_files().await;
    assert!(
        before < RECORDS / 500,
        "the kill must come mid-stream ({before} files already)"
    );

    let mut second = setup.spawn(None);
    let report = setup.wait_for_everything().await;
    setup.assert_exact(&report);
    let (topic, admin_port) = (&setup.topic, setup.admin_port);

    // The consumer reports its lag and assignment per partition.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = reqwest::get(format!("http://127.0.0.1:{admin_port}/metrics"))
            .await
            .and_then(|r| r.error_for_status());
        let text = match metrics {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let lag = format!("instream_consumer_lag{{group=\"instream-archiver\",topic=\"{topic}\"");
        if text.contains(&lag) && text.contains("instream_assigned_partitions") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no lag metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    second.terminate().unwrap();
    let status = second.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "{status}");
    drop(setup.dir);
}

/// Killed with -9 while a file is half written, while it is complete but not yet renamed,
/// and right after the rename (before the commit): each time the restart removes what was
/// left, re-reads what was not committed, and the archive ends up exact. Parquet files laid
/// out by event time over about five hours, so files also roll at hour boundaries and each
/// partition spreads over several folders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_inside_a_roll_leaves_no_gap_and_no_overlap() {
    let broker = KafkaBroker::start().unwrap();
    for point in [
        "archive-put-mid-write",
        "archive-put-before-rename",
        "archive-put-after-rename",
    ] {
        let setup = Setup::new(&broker, "parquet", "event_time", 1_000).await;
        // Three files pass, the fourth stops at the fail point until the kill.
        let mut first = setup.spawn(Some(&format!("{point}=3*off->pause")));
        let root = setup.root.clone();
        wait_for(
            &format!("the archiver to stop at {point}"),
            Duration::from_secs(120),
            async || {
                let files = setup.completed_files().await;
                let partial = in_progress(&root);
                match point {
                    "archive-put-after-rename" => files >= 4,
                    // Paused before the rename: the temporary file is complete.
                    "archive-put-before-rename" => {
                        files >= 3 && partial.iter().any(|p| is_whole_parquet(p))
                    }
                    _ => files >= 3 && !partial.is_empty(),
                }
            },
        )
        .await;
        first.0.kill().unwrap();
        first.wait_exit(Duration::from_secs(10)).unwrap();
        let partial = in_progress(&root);
        match point {
            "archive-put-mid-write" => assert!(
                !partial.is_empty() && partial.iter().all(|p| !is_whole_parquet(p)),
                "{point}: the kill leaves a half-written file: {partial:?}"
            ),
            "archive-put-before-rename" => assert!(
                partial.iter().any(|p| is_whole_parquet(p)),
                "{point}: the kill leaves a complete file not yet renamed"
            ),
            _ => {}
        }

        let mut second = setup.spawn(None);
        let report = setup.wait_for_everything().await;
        setup.assert_exact(&report);
        assert!(in_progress(&root).is_empty(), "{point}: leftovers removed");
        assert!(
            report.records_per_hour.len() >= 5,
            "spread over hours: {:?}",
            report.records_per_hour
        );
        second.terminate().unwrap();
        let status = second.wait_exit(Duration::from_secs(20)).unwrap();
        assert!(status.success(), "{point}: {status}");
    }
}
