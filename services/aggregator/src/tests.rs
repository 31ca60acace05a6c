//! The flush's behaviour when the store fails part-way.

use super::*;
use async_trait::async_trait;
use instream_store::{AggregateQuery, LedgerRow, StoreError, WindowAggregate};

/// A store whose checkpoint writes fail, as during an outage that begins mid-flush (a
/// fault no real server can be made to show on cue).
struct CheckpointsDown;

#[async_trait]
impl AggregateStore for CheckpointsDown {
    async fn upsert(&self, _: &[WindowAggregate]) -> Result<(), StoreError> {
        Ok(())
    }
    async fn delete(&self, _: &[WindowAggregate]) -> Result<(), StoreError> {
        Ok(())
    }
    async fn query(&self, _: &AggregateQuery) -> Result<Vec<WindowAggregate>, StoreError> {
        Ok(Vec::new())
    }
    async fn windows_between(
        &self,
        _: &str,
        _: &str,
        _: i64,
        _: i64,
    ) -> Result<Vec<WindowAggregate>, StoreError> {
        Ok(Vec::new())
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
    async fn save_checkpoints(&self, _: &[Checkpoint]) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }
    async fn load_checkpoint(&self, _: &CheckpointKey) -> Result<Option<Checkpoint>, StoreError> {
        Ok(None)
    }
    async fn save_ledger(&self, _: &[LedgerRow]) -> Result<(), StoreError> {
        Ok(())
    }
    async fn load_ledger(&self, _: &str, _: i64, _: i64) -> Result<Vec<LedgerRow>, StoreError> {
        Ok(Vec::new())
    }
}

#[tokio::test]
async fn a_flush_cut_short_by_shutdown_makes_nothing_handled_and_keeps_the_checkpoint_due() {
    let def = instream_pipeline::parse_document(
        "[[pipelines]]\nname = \"p\"\nkey_field = \"k\"\ntime_field = \"t\"\n\
         [[pipelines.aggregations]]\nname = \"m\"\nwindow = { kind = \"tumbling\", size = \"1m\" }\n",
    )
    .unwrap()
    .pipelines
    .remove(0);
    let catalog = Catalog::new([def.clone()]);
    let event = instream_event::Event {
        event_id: "e1".into(),
        pipeline: "p".into(),
        key: "k".into(),
        event_time: 0,
        ingest_time: 0,
        headers: Default::default(),
        payload: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
        enrichment: None,
    };
    let mut state = PartitionState::default();
    state.apply(0, &event, None, &def, Duration::from_secs(600));
    let mut partitions = Partitions {
        group: "g".into(),
        horizon: Duration::from_secs(600),
        states: [(("p.enriched".to_owned(), 0), state)]
            .into_iter()
            .collect(),
        restored_generation: None,
        resumed: Vec::new(),
        enriched_in_transactions: false,
        early: true,
        result_marks: Default::default(),
    };
    let config = instream_core::config::KafkaConfig::default();
    let consumer =
        instream_kafka::consumer(&config, SERVICE.as_str(), "g", &["p.enriched"]).unwrap();
    let ready = instream_core::Health::default().register("aggregator.store");
    let record = Record {
        topic: "p.enriched".into(),
        partition: 0,
        offset: 0,
        key: None,
        payload: instream_event::encode(&event),
        headers: Vec::new(),
        generation: 0,
    };
    let mut pending: Pending = vec![(record, Some(0))];
    let stop = CancellationToken::new();
    stop.cancel();
    let producer = instream_kafka::producer(&config, SERVICE.as_str()).unwrap();
    let sinks = flush::Sinks {
        store: &CheckpointsDown,
        ready: &ready,
        producer: &producer,
        kafka: &config,
        catalog: &catalog,
        stop: &stop,
    };
    let durable = flush::flush(
        &sinks,
        instream_kafka::Input::new(&consumer),
        &mut partitions,
        &mut notify::Notifier::detached(),
        &mut pending,
    )
    .await
    .unwrap();
    assert!(!durable, "nothing may be committed");
    assert_eq!(pending.len(), 1, "the record stays unhandled");
    let state = partitions.states.values().next().unwrap();
    assert!(state.snapshot().is_some(), "the checkpoint is still due");
    assert!(!ready.is_ready(), "readiness says the store is away");
}
