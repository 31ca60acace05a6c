//! Loss detection in the services themselves: the enricher, the archiver and the aggregator
//! (each `instream run <service>`, as its own binary) stop after reading 2,000 records; then
//! more is written than the embedded broker keeps of a partition (5 MB), so it deletes what
//! they had not read; restarted, each counts exactly the offsets it can no longer read in
//! `instream_records_lost_total` and logs an ERROR naming the range. And the CLI's reader of
//! dead letters, asked to start where the partition no longer reaches, prints the skipped
//! range and exits non-zero. A real Kafka keeps what these tests need deleted, so with
//! `INSTREAM_TEST_KAFKA` they are skipped (they say so).

use std::time::{Duration, Instant};

use instream_testkit::{
    free_port, metric_sum, process_config_toml, unique, ChildGuard, KafkaBroker,
};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

const BIN: &str = env!("CARGO_BIN_EXE_instream");
const FIRST: usize = 2_000;
/// About 12 MB: more than twice what the embedded broker keeps of a partition.
const FLOOD: usize = 12_000;

/// `n` events of about 1 KB that do not compress, as envelopes on `topic`, numbered from
/// `from`.
async fn produce(bootstrap: &str, topic: &str, pipeline: &str, from: usize, n: usize) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut x = (from as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut pending = Vec::new();
    for i in from..from + n {
        let noise: String = (0..60)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                format!("{x:016x}")
            })
            .collect();
        let envelope = serde_json::json!({
            "event_id": format!("e{i}"), "pipeline": pipeline, "key": "k",
            "event_time": 1_714_564_800_000i64 + i as i64, "ingest_time": 1_714_564_800_000i64,
            "payload": {"k": "k", "n": i, "noise": noise},
        })
        .to_string();
        pending.push(
            producer
                .send_result(FutureRecord::to(topic).key("k").payload(&envelope))
                .map_err(|(e, _)| e)
                .unwrap(),
        );
        if pending.len() >= 2_000 {
            for d in pending.drain(..) {
                d.await.unwrap().unwrap();
            }
        }
    }
    for d in pending {
        d.await.unwrap().unwrap();
    }
}

struct Service {
    name: &'static str,
    config: std::path::PathBuf,
    admin: u16,
}

impl Service {
    fn spawn(&self) -> ChildGuard {
        instream_testkit::spawn_service_with(BIN, &["run", self.name], &self.config).unwrap()
    }

    async fn metric(&self, name: &str, filter: &str) -> f64 {
        let Ok(r) = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.admin)).await else {
            return -1.0;
        };
        metric_sum(&r.text().await.unwrap_or_default(), name, filter).0
    }
}

/// Waits until `group` has committed `topic`'s only partition up to its end.
async fn committed_to_end(kafka: &instream_core::config::KafkaConfig, group: &str, topic: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let lag = instream_kafka::ops::group_lag(kafka, group, topic)
            .await
            .unwrap();
        if lag.iter().all(|l| l.committed == Some(l.end)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{group} did not catch up on {topic}: {lag:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn stop(child: &mut ChildGuard) {
    child.terminate().unwrap();
    let status = child.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "{status}");
}

/// The ERROR line a service logged for the lost range `[from, to)` of `topic`.
fn logged_loss(child: &ChildGuard, topic: &str, from: i64, to: i64) {
    let log = std::fs::read_to_string(child.1.as_ref().unwrap()).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("records lost"))
        .unwrap_or_else(|| panic!("no loss logged: {log}"));
    let line: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(line["level"], "ERROR");
    assert_eq!(line["topic"], topic);
    assert_eq!(
        (line["from"].as_i64(), line["to"].as_i64()),
        (Some(from), Some(to))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_stage_counts_exactly_what_was_deleted_before_it_read_it() {
    let broker = KafkaBroker::start().unwrap();
    if !broker.is_embedded() {
        eprintln!("skipped: needs the embedded broker's size cap (INSTREAM_TEST_KAFKA is set)");
        return;
    }
    let bootstrap = broker.bootstrap_servers();
    let pipeline = unique("lossy");
    broker.create_pipeline_topics(&pipeline, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let definitions = dir.path().join("definitions.toml");
    std::fs::write(
        &definitions,
        format!(
            "[[pipelines]]\nname = \"{pipeline}\"\nkey_field = \"k\"\ntime_field = \"t\"\npartitions = 1\n\
             [[pipelines.aggregations]]\nname = \"per_minute\"\nwindow = {{ kind = \"tumbling\", size = \"1m\" }}\n"
        ),
    )
    .unwrap();
    let services: Vec<Service> = ["enricher", "archiver", "aggregator"]
        .into_iter()
        .map(|name| {
            let admin = free_port().unwrap();
            let config = dir.path().join(format!("{name}.toml"));
            std::fs::write(
                &config,
                format!(
                    "{}\n[telemetry]\nlog_format = \"json\"\n[enricher]\ndelivery = \"at_least_once\"\n\
                     [store]\nbackend = \"local\"\npath = \"{}\"\n[archive]\nbackend = \"local\"\nroot = \"{}\"\n\
                     [archiver]\nroll_max_age = \"1s\"\n[refdata]\nbackend = \"memory\"\n[aggregator]\nflush_interval = \"200ms\"\n",
                    process_config_toml(admin, &bootstrap, &definitions, "1s", 65_536),
                    dir.path().join("store.redb").display(),
                    dir.path().join("archive").display(),
                ),
            )
            .unwrap();
            Service { name, config, admin }
        })
        .collect();
    let kafka = instream_core::config::KafkaConfig {
        bootstrap_servers: bootstrap.clone(),
        ..Default::default()
    };
    let (raw, enriched, dlq) = (
        format!("{pipeline}.raw"),
        format!("{pipeline}.enriched"),
        format!("{pipeline}.dlq"),
    );

    // Each stage reads the first 2,000 records, commits them, and stops.
    produce(&bootstrap, &raw, &pipeline, 0, FIRST).await;
    let mut first: Vec<ChildGuard> = services.iter().map(Service::spawn).collect();
    committed_to_end(&kafka, "instream-enricher", &raw).await;
    committed_to_end(&kafka, "instream-archiver", &raw).await;
    committed_to_end(&kafka, "instream-aggregator", &enriched).await;
    for child in &mut first {
        stop(child);
    }

    // The broker deletes what they have not read.
    produce(&bootstrap, &raw, &pipeline, FIRST, FLOOD).await;
    produce(&bootstrap, &enriched, &pipeline, FIRST, FLOOD).await;
    produce(&bootstrap, &dlq, &pipeline, 0, FLOOD).await;
    let (raw_low, _) = instream_kafka::ops::watermarks(&kafka, &raw, 0)
        .await
        .unwrap();
    let (enriched_low, _) = instream_kafka::ops::watermarks(&kafka, &enriched, 0)
        .await
        .unwrap();
    let (dlq_low, _) = instream_kafka::ops::watermarks(&kafka, &dlq, 0)
        .await
        .unwrap();
    assert!(raw_low > FIRST as i64 && enriched_low > FIRST as i64 && dlq_low > 0);

    // The aggregator alone first (the enricher would write more into its input): from its
    // checkpoint at 2,000 to where the partition starts now.
    let aggregator = &services[2];
    let mut run = aggregator.spawn();
    committed_to_end(&kafka, "instream-aggregator", &enriched).await;
    let lost = aggregator
        .metric(
            "instream_records_lost_total",
            &format!("topic=\"{enriched}\""),
        )
        .await;
    assert_eq!(lost, (enriched_low - FIRST as i64) as f64, "aggregator");
    stop(&mut run);
    logged_loss(&run, &enriched, FIRST as i64, enriched_low);

    for service in &services[..2] {
        let mut run = service.spawn();
        committed_to_end(&kafka, &format!("instream-{}", service.name), &raw).await;
        let lost = service
            .metric("instream_records_lost_total", &format!("topic=\"{raw}\""))
            .await;
        assert_eq!(lost, (raw_low - FIRST as i64) as f64, "{}", service.name);
        stop(&mut run);
        logged_loss(&run, &raw, FIRST as i64, raw_low);
    }

    // The CLI asked to go on from offset 0 of the dead letters, which the partition no
    // longer holds: it says what it skipped and fails.
    let out = std::process::Command::new(BIN)
        .args([
            "dlq",
            "redrive",
            "--pipeline",
            &pipeline,
            "--from-offset",
            "0:0",
            "--config",
        ])
        .arg(&services[0].config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "skipped: {dlq}/0 offsets 0..{dlq_low} ({dlq_low} records)"
        )),
        "{stderr}"
    );
}
