//! `instream archive verify` on a local archive, with the archiver group's commits on the
//! embedded broker: a clean archive passes (exit 0, counts per partition and hour); offsets
//! committed but in no file, a gap and an overlap each fail it (exit 1, named in the output).

use bytes::Bytes;
use instream_archive::{Archive, LocalArchive};
use instream_archiver::{file_name, FileWriter};
use instream_pipeline::ArchiveFormat;
use instream_testkit::{unique, KafkaBroker};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

async fn put(
    archive: &LocalArchive,
    pipeline: &str,
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
        "{pipeline}/dt=2024-05-01/hour={hour}/{}",
        file_name(format, 0, *offsets.start(), *offsets.end())
    );
    archive
        .put(&path, Bytes::from(w.finish().unwrap()))
        .await
        .unwrap();
}

struct Verify<'a> {
    root: &'a std::path::Path,
    bootstrap: String,
    pipeline: &'a str,
}

impl Verify<'_> {
    fn run(&self, output: &str) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_instream"))
            .args(["archive", "verify", "--pipeline", self.pipeline])
            .args(["--output", output])
            .env("INSTREAM__ARCHIVE__BACKEND", "local")
            .env("INSTREAM__ARCHIVE__ROOT", self.root)
            .env("INSTREAM__KAFKA__BOOTSTRAP_SERVERS", &self.bootstrap)
            .env("INSTREAM__TELEMETRY__LOG_LEVEL", "error")
            .output()
            .unwrap()
    }

    /// The table of a failing run, after checking it failed with the one-line error.
    fn fails(&self) -> String {
        let out = self.run("table");
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.contains("gaps, overlaps or bad files"), "{stderr}");
        String::from_utf8(out.stdout).unwrap()
    }
}

fn commit(bootstrap: &str, topic: &str, next: i64) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "instream-archiver")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(next))
        .unwrap();
    consumer.commit(&tpl, CommitMode::Sync).unwrap();
}

#[tokio::test]
async fn verify_reports_counts_gaps_overlaps_and_unarchived_commits() {
    let broker = KafkaBroker::start().unwrap();
    let pipeline = unique("verify");
    let topic = format!("{pipeline}.raw");
    broker.create_topic(&topic, 1).unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .create()
        .unwrap();
    for i in 0..31 {
        producer
            .send(
                FutureRecord::to(&topic).key("k").payload(&format!("{i}")),
                std::time::Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let archive = LocalArchive::new(dir.path());
    let verify = Verify {
        root: dir.path(),
        bootstrap: broker.bootstrap_servers(),
        pipeline: &pipeline,
    };
    put(&archive, &pipeline, ArchiveFormat::JsonLines, "10", 0..=9).await;
    put(&archive, &pipeline, ArchiveFormat::Parquet, "11", 10..=14).await;
    commit(&verify.bootstrap, &topic, 15);

    let clean = verify.run("json");
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
    assert_eq!(report["committed_offsets_compared"], true);
    let table = verify.run("table");
    assert!(table.status.success());
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(
        text.contains("2 files, 15 records: no gap, no overlap"),
        "{text}"
    );

    // Committed further than the files go: the tail is missing.
    commit(&verify.bootstrap, &topic, 31);
    let text = verify.fails();
    assert!(
        text.contains("offsets 15-30 are committed by instream-archiver but in no file"),
        "{text}"
    );

    put(&archive, &pipeline, ArchiveFormat::JsonLines, "11", 14..=20).await; // 14 twice
    put(&archive, &pipeline, ArchiveFormat::JsonLines, "12", 25..=30).await; // 21..=24 missing
    let text = verify.fails();
    assert!(text.contains("21-24") && text.contains("14-14"), "{text}");
    assert!(text.contains("NOT CLEAN"), "{text}");
    assert!(
        !text.contains("committed by"),
        "the tail is archived now: {text}"
    );
}
