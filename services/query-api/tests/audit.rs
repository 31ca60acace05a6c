//! query-api's periodic audit, on the test broker: the replica leading the `audit` election
//! (standalone's in-process coordinator here) checks the settled hours of every pipeline and
//! sets `instream_audit_unbalanced_records{pipeline,stage}` — the raw record that no enriched
//! record or dead letter answers for is named, a balanced pipeline shows 0.

use std::sync::Arc;
use std::time::Duration;

use instream_core::config::{Config, DefinitionSourceKind};
use instream_core::Health;
use instream_query_api::QueryApi;
use instream_store::EmbeddedStore;
use instream_testkit::{unique, wait_for, KafkaBroker};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

fn envelope(pipeline: &str, id: &str, ingest_time: i64) -> String {
    format!(
        r#"{{"event_id":"{id}","pipeline":"{pipeline}","key":"k","event_time":{ingest_time},"ingest_time":{ingest_time},"payload":{{}}}}"#
    )
}

/// `raw` raw records two hours ago, the first `enriched` of them enriched.
async fn fill(broker: &KafkaBroker, pipeline: &str, raw: i64, enriched: i64) {
    broker.create_pipeline_topics(pipeline, 1).unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .create()
        .unwrap();
    let then = instream_event::now_millis() - 2 * 3_600_000;
    for i in 0..raw {
        let body = envelope(pipeline, &format!("e{i}"), then + i);
        producer
            .send(
                FutureRecord::to(&format!("{pipeline}.raw"))
                    .key("k")
                    .payload(&body),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        if i < enriched {
            let origin = OwnedHeaders::new()
                .insert(Header {
                    key: "instream.origin.partition",
                    value: Some("0"),
                })
                .insert(Header {
                    key: "instream.origin.offset",
                    value: Some(&i.to_string()),
                });
            producer
                .send(
                    FutureRecord::to(&format!("{pipeline}.enriched"))
                        .key("k")
                        .payload(&body)
                        .headers(origin),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_audit_names_unbalanced_records_per_pipeline_and_stage() {
    let metrics = instream_core::telemetry::metrics_handle();
    let broker = KafkaBroker::start().unwrap();
    let (short, whole) = (unique("short"), unique("whole"));
    fill(&broker, &short, 3, 2).await;
    fill(&broker, &whole, 2, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let definitions = format!(
        "[[pipelines]]\nname = \"{short}\"\nkey_field = \"k\"\ntime_field = \"t\"\n\
         [[pipelines]]\nname = \"{whole}\"\nkey_field = \"k\"\ntime_field = \"t\"\n"
    );
    let path = dir.path().join("definitions.toml");
    std::fs::write(&path, &definitions).unwrap();
    let mut config = Config::default();
    config.definitions.source = DefinitionSourceKind::File;
    config.definitions.path = Some(path);
    config.standalone.data_dir = dir.path().to_path_buf();
    config.kafka.bootstrap_servers = broker.bootstrap_servers();
    config.query_api.listen = "127.0.0.1:0".parse().unwrap();
    config.query_api.allow_anonymous = true;
    config.query_api.audit_every = Duration::from_secs(10);
    config.query_api.audit_settle = Duration::ZERO;
    config.query_api.audit_archive = false;
    let parsed = instream_pipeline::parse_document(&definitions).unwrap();
    let (_keep, catalog) =
        tokio::sync::watch::channel(Arc::new(instream_pipeline::Catalog::new(parsed.pipelines)));
    let token = CancellationToken::new();
    let _stop = token.clone().drop_guard();
    let _api = QueryApi::start(
        &instream_coord::service_context(
            config,
            Health::default(),
            token.clone(),
            "127.0.0.1:0".parse().unwrap(),
        ),
        Arc::new(EmbeddedStore::default()),
        catalog,
    )
    .await
    .unwrap();
    let gauge = |pipeline: &str, stage: &str| {
        let text = metrics.render();
        let series = format!(
            "instream_audit_unbalanced_records{{pipeline=\"{pipeline}\",stage=\"{stage}\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&series).map(str::to_owned))
    };
    wait_for(
        "both pipelines audited",
        Duration::from_secs(60),
        || async { gauge(&short, "enricher").is_some() && gauge(&whole, "enricher").is_some() },
    )
    .await;
    assert_eq!(
        gauge(&short, "enricher").as_deref(),
        Some("1"),
        "the record not enriched"
    );
    assert_eq!(gauge(&whole, "enricher").as_deref(), Some("0"));
    assert_eq!(
        gauge(&short, "archiver"),
        None,
        "the archive was not checked"
    );
    assert_eq!(gauge(&short, "aggregator"), None, "nothing aggregates");
}
