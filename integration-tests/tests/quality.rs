//! Data-quality rules in a running enricher (real Redis, real ZooKeeper holding the
//! definitions, a Kafka-protocol broker): every rule kind with passing and failing events,
//! every action, the report's counts equal to the violations injected, and a hot reload that
//! adds rules mid-stream (no event judged by half a rule set) followed by an invalid version,
//! which the running enricher ignores.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use instream_coord::service_context;
use instream_core::config::{Config, ZooKeeperConfig};
use instream_core::Health;
use instream_kafka::client::{self, recv_batch};
use instream_pipeline::{parse_document, topics, PipelineDefinition};
use instream_quality::{Report, ViolationRecord};
use instream_testkit::{metric_sum, unique, KafkaBroker, RedisServer, ZooKeeperServer};
use rdkafka::producer::FutureRecord;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const PARTITIONS: i32 = 2;
const INGEST: i64 = 1_795_600_800_000;

struct Servers {
    zookeeper: ZooKeeperServer,
    redis: RedisServer,
    broker: KafkaBroker,
    root: String,
}

impl Servers {
    fn start() -> Servers {
        Servers {
            zookeeper: ZooKeeperServer::start().unwrap(),
            redis: RedisServer::start().unwrap(),
            broker: KafkaBroker::start().unwrap(),
            root: format!("/{}", unique("dq")),
        }
    }

    fn zookeeper(&self) -> ZooKeeperConfig {
        ZooKeeperConfig {
            connect: self.zookeeper.connect_string(),
            root: self.root.clone(),
            session_timeout: Duration::from_secs(4),
            auth: None,
            auth_file: None,
            tls: None,
        }
    }

    fn config(&self) -> Config {
        Config::from_toml(&format!(
            "{base}\n[zookeeper]\nconnect = \"{zk}\"\nroot = \"{root}\"\n[definitions]\nsource = \"zookeeper\"\n\
             [refdata]\nbackend = \"redis\"\nredis_url = \"{redis}\"\n[enricher]\nbatch_timeout = \"10ms\"\nquality_samples_per_minute = 2\n",
            base = instream_integration_tests::base_config_toml(&self.broker.bootstrap_servers()),
            zk = self.zookeeper.connect_string(),
            root = self.root,
            redis = self.redis.url(),
        ))
        .unwrap()
    }

    /// Starts an enricher in this process; cancel the token to stop it.
    fn enricher(&self) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let shutdown = CancellationToken::new();
        let ctx = service_context(
            self.config(),
            Health::default(),
            shutdown.clone(),
            "127.0.0.1:0".parse().unwrap(),
        );
        let task = tokio::spawn(async move { instream_enricher::run(ctx).await.unwrap() });
        (shutdown, task)
    }
}

fn definition(pipeline: &str, version: u64, quality: &str) -> PipelineDefinition {
    parse_document(&format!(
        r#"
[[pipelines]]
name = "{pipeline}"
version = {version}
key_field = "customer"
time_field = "ts"
partitions = {PARTITIONS}

[[pipelines.enrichments]]
name = "customer"
key_template = "customer:{{customer}}"
fields = {{ tier = "tier" }}
{quality}
"#
    ))
    .unwrap()
    .pipelines
    .remove(0)
}

/// An encoded raw event, as ingest writes it.
fn raw_event(pipeline: &str, id: usize, event_time: i64, payload: Value) -> Vec<u8> {
    let event = instream_event::Event {
        event_id: format!("{pipeline}-{id}"),
        pipeline: pipeline.to_owned(),
        key: payload["customer"].as_str().unwrap_or("none").to_owned(),
        event_time,
        ingest_time: INGEST,
        headers: BTreeMap::new(),
        payload: serde_json::value::RawValue::from_string(payload.to_string()).unwrap(),
        enrichment: None,
    };
    let mut buf = Vec::new();
    instream_event::encode_into(&event, &mut buf);
    buf
}

async fn produce(config: &Config, pipeline: &str, events: &[(String, Vec<u8>)]) {
    let producer = client::producer(&config.kafka, "test").unwrap();
    let topic = topics::raw(pipeline);
    let mut deliveries = Vec::new();
    for (key, bytes) in events {
        let record = FutureRecord::to(&topic)
            .key(key.as_bytes())
            .payload(bytes.as_slice());
        deliveries.push(client::send(&producer, record).await.unwrap());
    }
    for d in deliveries {
        client::delivered(d).await.unwrap();
    }
}

/// One record read back: its event id, its `_quality` tags, its `instream.quality` header.
#[derive(Debug)]
struct Out {
    id: String,
    partition: i32,
    tags: Option<Value>,
    header: Option<String>,
    code: Option<String>,
    reason: Option<String>,
}

/// Reads `topic` until `want` records arrived (60 s at most).
async fn read(config: &Config, topic: &str, want: usize) -> Vec<Out> {
    let consumer = client::consumer(
        &config.kafka,
        "test",
        &unique("reader"),
        &[topic.to_owned()],
    )
    .unwrap();
    let mut out = Vec::new();
    let mut batch = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while out.len() < want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{topic}: {} of {want} records",
            out.len()
        );
        recv_batch(&consumer, 500, Duration::from_millis(100), &mut batch)
            .await
            .unwrap();
        for r in batch.drain(..) {
            let header = |name: &str| {
                r.header(name)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            let event = instream_event::decode(&r.payload).unwrap();
            out.push(Out {
                id: event.event_id,
                partition: r.partition,
                tags: event
                    .enrichment
                    .as_ref()
                    .and_then(|e| e.get(instream_quality::TAG_FIELD).cloned()),
                header: header(instream_quality::TAG_HEADER),
                code: header(instream_kafka::headers::DLQ_CODE),
                reason: header(instream_kafka::headers::DLQ_REASON),
            });
        }
    }
    out
}

const RULES: &str = r#"
[[pipelines.quality]]
name = "has-amount"
check = { kind = "required", field = "payload.amount" }
[[pipelines.quality]]
name = "amount-number"
action = "count"
check = { kind = "type", field = "payload.amount", type = "number" }
[[pipelines.quality]]
name = "amount-range"
severity = "error"
action = "dead_letter"
check = { kind = "range", field = "payload.amount", min = 0, max = 1000 }
[[pipelines.quality]]
name = "currency"
check = { kind = "allowed", field = "payload.currency", values = ["EUR", "USD"] }
[[pipelines.quality]]
name = "sku"
action = "count"
check = { kind = "pattern", field = "payload.sku", regex = "^SKU-[0-9]+$" }
[[pipelines.quality]]
name = "delivered-after-ordered"
check = { kind = "compare", left = "payload.delivered", op = "gte", right = "payload.ordered" }
[[pipelines.quality]]
name = "known-customer"
check = { kind = "reference", enrichment = "customer" }
[[pipelines.quality]]
name = "fresh"
action = "count"
check = { kind = "freshness", max_age = "1h", max_ahead = "5m" }
[[pipelines.quality]]
name = "tier"
action = "count"
check = { kind = "pattern", field = "enrichment.tier", regex = "^(gold|silver)$" }
"#;

/// Event `i` of ten kinds: kind 0 is clean, each other kind breaks what it is built to
/// break. Returns the event and the rules it breaks.
fn injected(pipeline: &str, i: usize) -> ((String, Vec<u8>), Vec<&'static str>) {
    let mut payload = json!({
        "customer": (["c1", "c2"][i % 2]), "amount": 10, "currency": "EUR", "sku": "SKU-1",
        "ordered": "2026-11-25T10:00:00Z", "delivered": "2026-11-25T12:00:00+01:00",
    });
    let mut event_time = INGEST - 1_000;
    let broken: Vec<&str> = match i % 10 {
        0 => vec![],
        1 => {
            payload.as_object_mut().unwrap().remove("amount");
            vec!["has-amount"]
        }
        2 => {
            payload["amount"] = json!(5000);
            vec!["amount-range"]
        }
        3 => {
            payload["amount"] = json!("abc");
            vec!["amount-number", "amount-range"]
        }
        4 => {
            payload["currency"] = json!("JPY");
            vec!["currency"]
        }
        5 => {
            payload["sku"] = json!("bad");
            vec!["sku"]
        }
        6 => {
            // 10:30+01:00 is 09:30Z, before the order at 10:00Z (though its text sorts after).
            payload["delivered"] = json!("2026-11-25T10:30:00+01:00");
            vec!["delivered-after-ordered"]
        }
        7 => {
            payload["customer"] = json!("c9");
            vec!["known-customer"]
        }
        8 => {
            event_time = INGEST - 2 * 3_600_000;
            vec!["fresh"]
        }
        _ => {
            payload["customer"] = json!("c3");
            vec!["tier"]
        }
    };
    let key = payload["customer"].as_str().unwrap().to_owned();
    ((key, raw_event(pipeline, i, event_time, payload)), broken)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rule_kind_and_action_and_the_report_counts_exactly_what_was_injected() {
    // Metrics of the in-process enricher are rendered from this process's recorder.
    let metrics = instream_core::telemetry::metrics_handle();
    let servers = Servers::start();
    let pipeline = unique("dq");
    servers
        .broker
        .create_pipeline_topics(&pipeline, PARTITIONS)
        .unwrap();
    let mut redis = redis::Client::open(servers.redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for (customer, tier) in [("c1", "gold"), ("c2", "silver"), ("c3", "bronze")] {
        let _: () = redis::cmd("HSET")
            .arg(format!("customer:{customer}"))
            .arg("tier")
            .arg(tier)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    let def = definition(&pipeline, 1, RULES);
    instream_coord::publish_definition(&servers.zookeeper(), &def)
        .await
        .unwrap();
    let (shutdown, enricher) = servers.enricher();

    const N: usize = 300;
    let (events, broken): (Vec<_>, Vec<_>) = (0..N).map(|i| injected(&pipeline, i)).unzip();
    let config = servers.config();
    produce(&config, &pipeline, &events).await;

    let dead_lettered = |b: &Vec<&str>| b.contains(&"amount-range");
    let want_dead = broken.iter().filter(|b| dead_lettered(b)).count();
    let enriched = read(&config, &topics::enriched(&pipeline), N - want_dead).await;
    let dead = read(&config, &topics::dead_letter(&pipeline), want_dead).await;
    assert_eq!(enriched.len(), N - want_dead);
    assert_eq!(dead.len(), want_dead);

    // Tags: exactly the `tag` rules each event broke, in the field and the header.
    let tag_rules = [
        "has-amount",
        "currency",
        "delivered-after-ordered",
        "known-customer",
    ];
    for out in &enriched {
        let i: usize = out.id.rsplit('-').next().unwrap().parse().unwrap();
        let tags: Vec<&str> = broken[i]
            .iter()
            .copied()
            .filter(|r| tag_rules.contains(r))
            .collect();
        if tags.is_empty() {
            assert_eq!((&out.tags, &out.header), (&None, &None), "event {i}");
        } else {
            assert_eq!(out.tags, Some(json!(tags)), "event {i}");
            assert_eq!(
                out.header.as_deref(),
                Some(tags.join(",").as_str()),
                "event {i}"
            );
        }
    }
    // Dead letters: code `quality`, the rule and the offending value in the reason.
    for out in &dead {
        assert_eq!(out.code.as_deref(), Some("quality"));
        let reason = out.reason.as_deref().unwrap();
        assert!(
            reason.starts_with("quality rule `amount-range` (error): "),
            "{reason}"
        );
        assert!(
            reason.contains("5000") || reason.contains("\"abc\""),
            "{reason}"
        );
    }

    // The records: one per (event, rule) broken; the report counts each rule exactly.
    let mut expected: HashMap<&str, u64> = HashMap::new();
    for rules in &broken {
        for rule in rules {
            *expected.entry(rule).or_default() += 1;
        }
    }
    let total: u64 = expected.values().sum();
    let quality_topic = topics::quality(&pipeline);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let records: Vec<ViolationRecord> = loop {
        let payloads = instream_kafka::ops::scan_topic_since(
            &config.kafka,
            &quality_topic,
            0,
            false,
            Vec::new(),
            |all: &mut Vec<Vec<u8>>, _, payload| all.push(payload.to_vec()),
        )
        .await
        .unwrap()
        .0;
        if payloads.len() as u64 >= total {
            break payloads
                .iter()
                .map(|p| serde_json::from_slice(p).unwrap())
                .collect();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {total} violation records",
            payloads.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let report = Report::build(
        &pipeline,
        INGEST - 3_600_000,
        INGEST + 1,
        records.clone(),
        2,
    );
    for (rule, n) in &expected {
        assert_eq!(report.total(rule), *n, "rule {rule}: {:?}", report.rows);
    }
    assert_eq!(report.rows.iter().map(|r| r.violations).sum::<u64>(), total);
    // Samples: two per rule and minute (so at most four if the run crossed a minute), each
    // with the offending event's payload; every rule that was broken has some.
    for rule in expected.keys() {
        let sampled: Vec<&ViolationRecord> = records
            .iter()
            .filter(|r| r.rule == *rule && r.sample.is_some())
            .collect();
        assert!(
            (1..=4).contains(&sampled.len()),
            "{rule}: {} samples",
            sampled.len()
        );
        let i: usize = sampled[0]
            .event_id
            .rsplit('-')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            broken[i].contains(rule),
            "a sample of {rule} that did not break it"
        );
    }
    assert_eq!(report.samples.len(), expected.len());
    let range = records.iter().find(|r| r.rule == "amount-range").unwrap();
    assert_eq!(range.action.as_str(), "dead_letter");
    assert_eq!(range.severity.as_str(), "error");

    // Metrics: every event checked, violations by rule and action.
    let text = metrics.render();
    let label = format!("pipeline=\"{pipeline}\"");
    for (rule, n) in &expected {
        let filter = format!("{label},rule=\"{rule}\"");
        assert_eq!(
            metric_sum(&text, "instream_quality_checked_total", &filter).0,
            N as f64,
            "{rule}"
        );
        assert_eq!(
            metric_sum(&text, "instream_quality_violations_total", &filter).0,
            *n as f64,
            "{rule}"
        );
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), enricher)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_added_mid_stream_apply_whole_and_an_invalid_version_is_ignored() {
    let metrics = instream_core::telemetry::metrics_handle();
    let servers = Servers::start();
    let pipeline = unique("dqreload");
    servers
        .broker
        .create_pipeline_topics(&pipeline, PARTITIONS)
        .unwrap();
    let zk = servers.zookeeper();
    instream_coord::publish_definition(&zk, &definition(&pipeline, 1, ""))
        .await
        .unwrap();
    let (shutdown, enricher) = servers.enricher();
    let config = servers.config();
    let event = |i: usize| {
        let payload = json!({"customer": format!("c{}", i % 5), "amount": i});
        (
            format!("c{}", i % 5),
            raw_event(&pipeline, i, INGEST, payload),
        )
    };

    // Two rules every event breaks arrive together while events stream in.
    const N: usize = 3_000;
    let sender = {
        let (config, events): (Config, Vec<_>) = (config.clone(), (0..N).map(event).collect());
        let pipeline = pipeline.clone();
        tokio::spawn(async move {
            for chunk in events.chunks(100) {
                produce(&config, &pipeline, chunk).await;
            }
        })
    };
    let two_rules = r#"
[[pipelines.quality]]
name = "has-sku"
check = { kind = "required", field = "payload.sku" }
[[pipelines.quality]]
name = "has-currency"
check = { kind = "required", field = "payload.currency" }
"#;
    let early = read(&config, &topics::enriched(&pipeline), 200).await;
    assert!(early.iter().all(|o| o.tags.is_none()));
    instream_coord::publish_definition(&zk, &definition(&pipeline, 2, two_rules))
        .await
        .unwrap();
    sender.await.unwrap();
    let all = read(&config, &topics::enriched(&pipeline), N).await;
    let both = json!(["has-sku", "has-currency"]);
    let mut tagged_since: HashMap<i32, bool> = HashMap::new();
    let mut ids = HashSet::new();
    for out in &all {
        assert!(ids.insert(out.id.clone()), "{} twice", out.id);
        // Judged by the whole new rule set or by none of it; per partition, once tagged,
        // every later event is.
        match &out.tags {
            None => assert!(
                !tagged_since.get(&out.partition).copied().unwrap_or(false),
                "{} untagged after a tagged one",
                out.id
            ),
            Some(tags) => {
                assert_eq!(tags, &both, "{}", out.id);
                tagged_since.insert(out.partition, true);
            }
        }
    }
    assert!(
        all.iter().any(|o| o.tags.is_some()),
        "the new rules never applied"
    );
    assert!(all.iter().any(|o| o.tags.is_none()));

    // A version with a bad regex is refused when applied, naming the rule and the reason...
    let mut bad = definition(&pipeline, 3, two_rules);
    bad.quality.push(
        serde_json::from_value(json!({
            "name": "sku-format",
            "check": {"kind": "pattern", "field": "payload.sku", "regex": "([A-Z"}
        }))
        .unwrap(),
    );
    let err = instream_coord::publish_definition(&zk, &bad)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("quality[2] `sku-format`.check.regex: does not compile"),
        "{err}"
    );
    // ...and, written behind `apply`'s back, ignored by the running enricher, which keeps
    // checking with version 2.
    let client = zookeeper_client::Client::connect(&zk.connect)
        .await
        .unwrap();
    client
        .set_data(
            &format!("{}/pipelines/{pipeline}", zk.root),
            &serde_json::to_vec(&bad).unwrap(),
            None,
        )
        .await
        .unwrap();
    let invalid = format!("instream_definition_invalid{{pipeline=\"{pipeline}\"");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while metric_sum(&metrics.render(), &invalid, "").0 < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the enricher never met the invalid version"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let later: Vec<_> = (N..N + 200).map(event).collect();
    produce(&config, &pipeline, &later).await;
    let all = read(&config, &topics::enriched(&pipeline), N + 200).await;
    let last: Vec<&Out> = all
        .iter()
        .filter(|o| o.id.rsplit('-').next().unwrap().parse::<usize>().unwrap() >= N)
        .collect();
    assert_eq!(last.len(), 200);
    assert!(last.iter().all(|o| o.tags.as_ref() == Some(&both)));
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), enricher)
        .await
        .unwrap()
        .unwrap();
}
