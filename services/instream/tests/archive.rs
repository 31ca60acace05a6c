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

/// `archive replay`: the archived events accepted in the range go to a topic of the user's,
/// keys kept and each marked with where it was archived from; a pipeline's own topic is
/// refused.
#[tokio::test]
async fn replay_reproduces_the_events_of_a_range_to_a_topic_of_your_own() {
    use rdkafka::message::{Headers, Message};
    // 2024-05-01T12:00:00Z.
    const T0: i64 = 1_714_564_800_000;
    let broker = KafkaBroker::start().unwrap();
    let pipeline = unique("replay");
    let backfill = unique("backfill");
    broker.create_topic(&backfill, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let definitions = dir.path().join("definitions.toml");
    std::fs::write(
        &definitions,
        format!("[[pipelines]]\nname = \"{pipeline}\"\nkey_field = \"k\"\ntime_field = \"t\"\n"),
    )
    .unwrap();
    // Forty events a minute apart: twenty before 12:20, twenty from then on.
    let archive = LocalArchive::new(dir.path());
    let mut w = FileWriter::new(ArchiveFormat::JsonLines, &[], 1).unwrap();
    for i in 0..40i64 {
        let raw = format!(
            r#"{{"event_id":"e{i}","pipeline":"{pipeline}","key":"k{}","event_time":{t},"ingest_time":{t},"payload":{{}}}}"#,
            i % 3,
            t = T0 + i * 60_000
        );
        let event = instream_event::decode(raw.as_bytes()).unwrap();
        w.append(100 + i, raw.as_bytes(), &event).unwrap();
    }
    let path = format!(
        "{pipeline}/dt=2024-05-01/hour=12/{}",
        file_name(ArchiveFormat::JsonLines, 0, 100, 139)
    );
    archive
        .put(&path, Bytes::from(w.finish().unwrap()))
        .await
        .unwrap();
    let replay = |topic: &str, execute: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_instream"));
        command
            .args([
                "archive",
                "replay",
                "--pipeline",
                &pipeline,
                "--topic",
                topic,
            ])
            .args([
                "--from",
                "2024-05-01T12:20:00Z",
                "--to",
                "2024-05-01T13:00:00Z",
            ])
            .args(["--output", "json"])
            .env("INSTREAM__ARCHIVE__BACKEND", "local")
            .env("INSTREAM__ARCHIVE__ROOT", dir.path())
            .env("INSTREAM__DEFINITIONS__SOURCE", "file")
            .env("INSTREAM__DEFINITIONS__PATH", &definitions)
            .env(
                "INSTREAM__KAFKA__BOOTSTRAP_SERVERS",
                broker.bootstrap_servers(),
            )
            .env("INSTREAM__TELEMETRY__LOG_LEVEL", "error");
        if execute {
            command.arg("--execute");
        }
        command.output().unwrap()
    };
    let refused = replay(&format!("{pipeline}.raw"), true);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("would count the replayed events"), "{why}");

    let dry = replay(&backfill, false);
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(
        (
            summary["events_in_range"].as_u64(),
            summary["executed"].as_bool()
        ),
        (Some(20), Some(false))
    );

    let done = replay(&backfill, true);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&backfill]).unwrap();
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while got.len() < 20 && std::time::Instant::now() < deadline {
        if let Some(m) = consumer.poll(std::time::Duration::from_millis(200)) {
            let m = m.unwrap();
            let event = instream_event::decode(m.payload().unwrap()).unwrap();
            assert_eq!(m.key(), Some(event.key.as_bytes()), "keyed as archived");
            let from = m
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "instream.replayed.from"))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned());
            got.push((event.event_id, from));
        }
    }
    let expected: Vec<(String, Option<String>)> = (20..40)
        .map(|i| {
            (
                format!("e{i}"),
                Some(format!("{pipeline}.raw:0:{}", 100 + i)),
            )
        })
        .collect();
    got.sort_by_key(|(id, _)| id[1..].parse::<i64>().unwrap());
    assert_eq!(got, expected);
}
