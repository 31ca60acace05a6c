//! A running enricher (real Redis, definitions in a file, a Kafka-protocol broker) follows
//! `refdata load`: events enriched after a load carry the new version's fields, with no
//! restart and no event skipped.

use std::collections::BTreeMap;
use std::time::Duration;

use instream_coord::service_context;
use instream_core::config::Config;
use instream_core::Health;
use instream_kafka::client::{self, recv_batch};
use instream_pipeline::{parse_document, topics};
use instream_testkit::{unique, KafkaBroker, RedisServer};
use rdkafka::producer::FutureRecord;
use tokio_util::sync::CancellationToken;

fn raw_event(pipeline: &str, i: usize) -> Vec<u8> {
    let event = instream_event::Event {
        event_id: format!("e{i}"),
        pipeline: pipeline.to_owned(),
        key: "c1".into(),
        event_time: 1_714_564_800_000 + i as i64,
        ingest_time: instream_event::now_millis(),
        headers: BTreeMap::new(),
        payload: serde_json::value::RawValue::from_string(format!(
            "{{\"customer_id\":\"c1\",\"ts\":{},\"n\":{i}}}",
            1_714_564_800_000 + i as i64
        ))
        .unwrap(),
        enrichment: None,
    };
    let mut buf = Vec::new();
    instream_event::encode_into(&event, &mut buf);
    buf
}

/// Creates the pipeline's topics (one partition) and the config of an enricher reading its
/// definitions from `definitions`, with `refdata_extra` added to its `[refdata]` section.
fn enricher_config(
    broker: &KafkaBroker,
    pipeline: &str,
    definitions: &std::path::Path,
    redis_url: &str,
    refdata_extra: &str,
) -> Config {
    for topic in [
        topics::raw(pipeline),
        topics::enriched(pipeline),
        topics::dead_letter(pipeline),
    ] {
        broker.create_topic(&topic, 1).unwrap();
    }
    Config::from_toml(&format!(
        "{base}\n[definitions]\nsource = \"file\"\npath = \"{defs}\"\n[refdata]\nbackend = \"redis\"\nredis_url = \"{redis_url}\"\n{refdata_extra}\n",
        base = instream_integration_tests::base_config_toml(&broker.bootstrap_servers()),
        defs = definitions.display(),
    ))
    .unwrap()
}

/// Reads enriched events until `want` distinct ones arrived: event number -> tier.
async fn read_until(consumer: &client::Consumer, tiers: &mut BTreeMap<i64, String>, want: usize) {
    let mut batch = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tiers.len() < want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "enriched events missing"
        );
        recv_batch(consumer, 100, Duration::from_millis(100), &mut batch)
            .await
            .unwrap();
        for record in batch.drain(..) {
            let event = instream_event::decode(&record.payload).unwrap();
            let tier = event.enrichment.unwrap()["tier"]
                .as_str()
                .unwrap()
                .to_owned();
            tiers.insert(event.event_time - 1_714_564_800_000, tier);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_enricher_follows_a_refdata_load() {
    let redis = RedisServer::start().unwrap();
    let broker = KafkaBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pipeline = unique("refv");
    let definitions = dir.path().join("definitions.toml");
    let text = format!(
        r#"
[[pipelines]]
name = "{pipeline}"
key_field = "customer_id"
time_field = "ts"
partitions = 1

[[pipelines.enrichments]]
name = "customer"
key_template = "customer:{{customer_id}}"
fields = {{ tier = "tier" }}
"#
    );
    std::fs::write(&definitions, &text).unwrap();
    let def = parse_document(&text).unwrap().pipelines.remove(0);
    let config = enricher_config(
        &broker,
        &pipeline,
        &definitions,
        &redis.url(),
        "version_check_interval = \"60s\"",
    );

    let load = |version_tier: &'static str| {
        let (dir, def, redis_url) = (dir.path().to_owned(), def.clone(), redis.url());
        let pipeline = pipeline.clone();
        async move {
            let file = dir.join(format!("{version_tier}.jsonl"));
            std::fs::write(
                &file,
                format!("{{\"id\":\"c1\",\"tier\":\"{version_tier}\"}}\n"),
            )
            .unwrap();
            let store =
                instream_refdata::RedisRefStore::connect(&instream_core::config::RefDataConfig {
                    redis_url,
                    ..Default::default()
                })
                .await
                .unwrap();
            instream_refdata::load::load_file(
                store.connection().unwrap(),
                Duration::from_secs(2),
                &pipeline,
                &def.enrichments[0],
                &["id".to_owned()],
                &file,
                &instream_core::Progress::silent(),
            )
            .await
            .unwrap()
        }
    };
    assert_eq!(load("gold").await.version, 1);

    let shutdown = CancellationToken::new();
    let enricher = tokio::spawn(instream_enricher::run(service_context(
        config.clone(),
        Health::default(),
        shutdown.clone(),
        "127.0.0.1:0".parse().unwrap(),
    )));
    let producer = client::producer(&config.kafka, "test").unwrap();
    let send = |from: usize, to: usize| {
        let (producer, topic, pipeline) =
            (producer.clone(), topics::raw(&pipeline), pipeline.clone());
        async move {
            for i in from..to {
                let payload = raw_event(&pipeline, i);
                let record = FutureRecord::to(&topic)
                    .key(b"c1".as_slice())
                    .payload(payload.as_slice());
                client::delivered(client::send(&producer, record).await.unwrap())
                    .await
                    .unwrap();
            }
        }
    };
    let consumer = client::consumer(
        &config.kafka,
        "test",
        &unique("reader"),
        &[topics::enriched(&pipeline)],
    )
    .unwrap();
    let mut tiers: BTreeMap<i64, String> = BTreeMap::new();
    send(0, 10).await;
    read_until(&consumer, &mut tiers, 10).await;
    assert!(tiers.values().all(|t| t == "gold"), "{tiers:?}");

    // A new version: within moments, newly enriched events carry it.
    assert_eq!(load("platinum").await.version, 2);
    let switched = std::time::Instant::now();
    let mut sent = 10;
    loop {
        send(sent, sent + 5).await;
        sent += 5;
        read_until(&consumer, &mut tiers, sent).await;
        if tiers.values().last().is_some_and(|t| t == "platinum") {
            break;
        }
        assert!(
            switched.elapsed() < Duration::from_secs(5),
            "the enricher did not follow: {tiers:?}"
        );
    }
    // Every event was enriched once, old version strictly before new.
    assert_eq!(tiers.len(), sent);
    let first_new = tiers
        .iter()
        .find(|(_, t)| *t == "platinum")
        .map(|(i, _)| *i)
        .unwrap();
    assert!(
        tiers.iter().all(|(i, t)| (*i < first_new) == (t == "gold")),
        "{tiers:?}"
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), enricher)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

fn raw_event_for(pipeline: &str, i: usize, customer: &str) -> Vec<u8> {
    let event = instream_event::Event {
        event_id: format!("r{i}"),
        pipeline: pipeline.to_owned(),
        key: customer.to_owned(),
        event_time: 1_714_564_800_000 + i as i64,
        ingest_time: instream_event::now_millis(),
        headers: BTreeMap::new(),
        payload: serde_json::value::RawValue::from_string(format!(
            "{{\"customer_id\":\"{customer}\",\"ts\":{}}}",
            1_714_564_800_000 + i as i64
        ))
        .unwrap(),
        enrichment: None,
    };
    let mut buf = Vec::new();
    instream_event::encode_into(&event, &mut buf);
    buf
}

/// `HGETALL` calls Redis has answered so far.
async fn hgetall_calls(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_hgetall:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Under `on_miss = "retry"`, a record written while the enricher is retrying is found and
/// used (the negative cache does not hide it); one that never comes is dead-lettered after
/// the last attempt, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_rule_finds_a_record_that_arrives_late_and_dead_letters_one_that_never_does() {
    let redis = RedisServer::start().unwrap();
    let broker = KafkaBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pipeline = unique("retry");
    let definitions = dir.path().join("definitions.toml");
    std::fs::write(
        &definitions,
        format!(
            r#"
[[pipelines]]
name = "{pipeline}"
key_field = "customer_id"
time_field = "ts"
partitions = 1

[[pipelines.enrichments]]
name = "customer"
key_template = "customer:{{customer_id}}"
on_miss = "retry"
retry_attempts = 4
retry_backoff = "250ms"
"#
        ),
    )
    .unwrap();
    let config = enricher_config(&broker, &pipeline, &definitions, &redis.url(), "");
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let enricher = tokio::spawn(instream_enricher::run(service_context(
        config.clone(),
        Health::default(),
        shutdown.clone(),
        "127.0.0.1:0".parse().unwrap(),
    )));
    let producer = client::producer(&config.kafka, "test").unwrap();
    let raw_topic = topics::raw(&pipeline);
    let before = hgetall_calls(&mut conn).await;
    let payload = raw_event_for(&pipeline, 0, "late");
    let record = FutureRecord::to(&raw_topic)
        .key(b"late".as_slice())
        .payload(payload.as_slice());
    client::delivered(client::send(&producer, record).await.unwrap())
        .await
        .unwrap();
    // The first lookup and one retry have missed: now the record arrives.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while hgetall_calls(&mut conn).await < before + 2 {
        assert!(tokio::time::Instant::now() < deadline, "no retry seen");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _: () = redis::cmd("HSET")
        .arg("customer:late")
        .arg("tier")
        .arg("gold")
        .query_async(&mut conn)
        .await
        .unwrap();
    let consumer = client::consumer(
        &config.kafka,
        "test",
        &unique("reader"),
        &[topics::enriched(&pipeline)],
    )
    .unwrap();
    let mut tiers = BTreeMap::new();
    read_until(&consumer, &mut tiers, 1).await;
    assert_eq!(tiers[&0], "gold");

    // A record that never comes: dead-lettered once the attempts are spent.
    let payload = raw_event_for(&pipeline, 1, "never");
    let record = FutureRecord::to(&raw_topic)
        .key(b"never".as_slice())
        .payload(payload.as_slice());
    client::delivered(client::send(&producer, record).await.unwrap())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let letters = loop {
        let letters = instream_kafka::ops::read_dead_letters(
            &config.kafka,
            &topics::dead_letter(&pipeline),
            Default::default(),
            None,
            false,
        )
        .await
        .unwrap()
        .0;
        if !letters.is_empty() {
            break letters;
        }
        assert!(tokio::time::Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].code, "enrich_miss");
    assert!(
        letters[0].reason.contains("after 4 retries"),
        "{}",
        letters[0].reason
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), enricher)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// Redis goes away mid-stream (a proxy between the enricher and Redis is cut): `/readyz`
/// turns false, no event is skipped or passed on unenriched, and when Redis is back every
/// event comes out enriched and readiness returns, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_redis_holds_events_back_and_loses_none() {
    let redis = RedisServer::start().unwrap();
    let proxy =
        instream_testkit::TcpProxy::start(format!("127.0.0.1:{}", redis.port()).parse().unwrap())
            .unwrap();
    let broker = KafkaBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pipeline = unique("outage");
    let definitions = dir.path().join("definitions.toml");
    std::fs::write(
        &definitions,
        format!(
            "[[pipelines]]\nname = \"{pipeline}\"\nkey_field = \"customer_id\"\ntime_field = \"ts\"\npartitions = 1\n\n[[pipelines.enrichments]]\nname = \"customer\"\nkey_template = \"customer:{{customer_id}}\"\n"
        ),
    )
    .unwrap();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // Each event names its own customer, so the local cache cannot answer for Redis.
    for i in 0..200 {
        let _: () = redis::cmd("HSET")
            .arg(format!("customer:u{i}"))
            .arg("tier")
            .arg("gold")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let config = enricher_config(
        &broker,
        &pipeline,
        &definitions,
        &format!("redis://{}", proxy.addr()),
        "timeout = \"500ms\"",
    );
    let health = Health::default();
    let shutdown = CancellationToken::new();
    let enricher = tokio::spawn(instream_enricher::run(service_context(
        config.clone(),
        health.clone(),
        shutdown.clone(),
        "127.0.0.1:0".parse().unwrap(),
    )));
    let producer = client::producer(&config.kafka, "test").unwrap();
    let raw_topic = topics::raw(&pipeline);
    let send = |from: usize, to: usize| {
        let (producer, topic, pipeline) = (producer.clone(), raw_topic.clone(), pipeline.clone());
        async move {
            for i in from..to {
                let customer = format!("u{i}");
                let payload = raw_event_for(&pipeline, i, &customer);
                let record = FutureRecord::to(&topic)
                    .key(customer.as_bytes())
                    .payload(payload.as_slice());
                client::delivered(client::send(&producer, record).await.unwrap())
                    .await
                    .unwrap();
            }
        }
    };
    let consumer = client::consumer(
        &config.kafka,
        "test",
        &unique("reader"),
        &[topics::enriched(&pipeline)],
    )
    .unwrap();
    let mut tiers = BTreeMap::new();
    send(0, 100).await;
    read_until(&consumer, &mut tiers, 100).await;
    assert!(health.is_ready());

    proxy.cut();
    send(100, 200).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while health.is_ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "readiness stayed true"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let not_ready = health
        .report()
        .into_iter()
        .find(|c| c.name == "enricher.refdata")
        .unwrap();
    assert!(!not_ready.ready, "{not_ready:?}");

    proxy.restore();
    read_until(&consumer, &mut tiers, 200).await;
    assert!(
        tiers.values().all(|t| t == "gold"),
        "every event enriched, none passed on as missed"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !health.is_ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "readiness did not return"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let letters = instream_kafka::ops::read_dead_letters(
        &config.kafka,
        &topics::dead_letter(&pipeline),
        Default::default(),
        None,
        false,
    )
    .await
    .unwrap()
    .0;
    assert!(
        letters.is_empty(),
        "nothing dead-lettered: {}",
        letters.len()
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), enricher)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
