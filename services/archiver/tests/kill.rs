//! The `instream-archiver` binary killed with -9 mid-stream and restarted: every offset of
//! every partition ends up in exactly one file — no gap, no overlap — and a clean SIGTERM
//! afterwards exits 0. Runs against a real Kafka-protocol broker (the embedded one, or
//! `INSTREAM_TEST_KAFKA`).

use std::collections::BTreeMap;
use std::time::Duration;

use instream_archive::{Archive, LocalArchive};
use instream_testkit::{free_port, process_config_toml, unique, ChildGuard, KafkaBroker};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

const BIN: &str = env!("CARGO_BIN_EXE_instream-archiver");
const RECORDS: usize = 20_000;
const PARTITIONS: i32 = 2;

fn spawn(config: &std::path::Path) -> ChildGuard {
    instream_testkit::spawn_service(BIN, config).unwrap()
}

/// Per partition, the (first, last, lines) of every completed file.
async fn files(archive: &LocalArchive, pipeline: &str) -> BTreeMap<i32, Vec<(i64, i64, i64)>> {
    let mut out: BTreeMap<i32, Vec<(i64, i64, i64)>> = BTreeMap::new();
    for f in archive.list(pipeline).await.unwrap() {
        let (partition, first, last) = instream_archiver::parse_file_name(&f.path).unwrap();
        let bytes = archive.get(&f.path).await.unwrap();
        let text = zstd_lines(&bytes);
        out.entry(partition).or_default().push((first, last, text));
    }
    for ranges in out.values_mut() {
        ranges.sort();
    }
    out
}

fn zstd_lines(bytes: &[u8]) -> i64 {
    let text = zstd::decode_all(bytes).unwrap();
    text.iter().filter(|&&b| b == b'\n').count() as i64
}

async fn wait_for_files(
    archive: &LocalArchive,
    pipeline: &str,
    what: &str,
    done: impl Fn(&BTreeMap<i32, Vec<(i64, i64, i64)>>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if done(&files(archive, pipeline).await) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_archives_every_offset_exactly_once() {
    let broker = KafkaBroker::start().unwrap();
    let pipeline = unique("kill");
    for t in ["raw", "enriched", "dlq"] {
        broker
            .create_topic(&format!("{pipeline}.{t}"), PARTITIONS)
            .unwrap();
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let topic = format!("{pipeline}.raw");
    let mut deliveries = Vec::new();
    for i in 0..RECORDS {
        let envelope = serde_json::json!({
            "event_id": format!("e{i}"), "pipeline": pipeline, "key": format!("k{}", i % 97),
            "event_time": 1_714_564_800_000i64 + i as i64, "ingest_time": 1_714_564_800_000i64,
            "payload": {"n": i},
        })
        .to_string();
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
        format!("[[pipelines]]\nname = \"{pipeline}\"\nkey_field = \"k\"\ntime_field = \"t\"\npartitions = {PARTITIONS}\n"),
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
    let archive = LocalArchive::new(&root);

    let mut first = spawn(&config);
    wait_for_files(&archive, &pipeline, "the first files", |f| {
        f.values().map(Vec::len).sum::<usize>() >= 4
    })
    .await;
    first.0.kill().unwrap(); // SIGKILL: no drain, no final commit
    first.wait_exit(Duration::from_secs(10)).unwrap();
    let before: usize = files(&archive, &pipeline)
        .await
        .values()
        .map(Vec::len)
        .sum();
    assert!(
        before < RECORDS / 500,
        "the kill must come mid-stream ({before} files already)"
    );

    let mut second = spawn(&config);
    wait_for_files(&archive, &pipeline, "every record", |f| {
        f.values().flatten().map(|(_, _, n)| n).sum::<i64>() >= RECORDS as i64
    })
    .await;
    let all = files(&archive, &pipeline).await;
    let mut total = 0;
    for (partition, ranges) in &all {
        let mut next = 0;
        for (first, last, lines) in ranges {
            assert_eq!(
                *first, next,
                "partition {partition}: gap or overlap at {first}"
            );
            assert_eq!(
                *lines,
                last - first + 1,
                "partition {partition}: file {first}-{last}"
            );
            next = last + 1;
            total += lines;
        }
    }
    assert_eq!(total, RECORDS as i64, "every offset exactly once");
    assert_eq!(all.len(), PARTITIONS as usize);

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
}
