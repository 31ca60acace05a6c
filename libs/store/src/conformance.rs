//! The behaviour every [`AggregateStore`] must have. Run on the embedded store in CI and on a
//! real ScyllaDB when `INSTREAM_TEST_SCYLLA` is set.

use crate::{
    AggregateQuery, AggregateStore, Checkpoint, CheckpointKey, LedgerRow, WindowAggregate,
};

fn window(pipeline: &str, key: &str, start: i64, count: i64) -> WindowAggregate {
    WindowAggregate {
        pipeline: pipeline.into(),
        aggregation: "per_minute".into(),
        group_key: key.into(),
        window_start: start,
        window_end: start + 60_000,
        definition_version: 1,
        count,
        values: serde_json::json!({"sum_price": count * 10, "quantiles_price": {"p50": 1.5}})
            .as_object()
            .cloned()
            .unwrap_or_default(),
        is_final: false,
    }
}

fn query(pipeline: &str, key: &str, from: i64, to: i64, limit: usize) -> AggregateQuery {
    AggregateQuery {
        pipeline: pipeline.into(),
        aggregation: "per_minute".into(),
        group_key: key.into(),
        from,
        to,
        limit,
    }
}

/// Panics on the first broken expectation. `pipeline` keeps runs on a shared store apart.
pub async fn run(store: &dyn AggregateStore, pipeline: &str) {
    store.ping().await.expect("ping");
    let t0 = 1_700_000_040_000;
    let rows: Vec<_> = (0..5)
        .map(|i| window(pipeline, "a", t0 + i * 60_000, i + 1))
        .chain([window(pipeline, "b", t0, 100)])
        .collect();
    store.upsert(&rows).await.expect("upsert");

    let got = store
        .query(&query(pipeline, "a", t0, t0 + 5 * 60_000, 100))
        .await
        .expect("query");
    assert_eq!(got, rows[..5].to_vec(), "all of a's windows, oldest first");

    let got = store
        .query(&query(pipeline, "a", t0 + 60_000, t0 + 3 * 60_000, 100))
        .await
        .unwrap();
    assert_eq!(got, rows[1..3].to_vec(), "from inclusive, to exclusive");

    let got = store
        .query(&query(pipeline, "a", t0, t0 + 5 * 60_000, 2))
        .await
        .unwrap();
    assert_eq!(got.len(), 2, "limit");

    // Upserts replace whole windows: writing a window twice keeps the last value.
    let mut again = rows[0].clone();
    again.count = 42;
    store.upsert(&[again.clone()]).await.unwrap();
    store.upsert(&[again.clone()]).await.unwrap();
    let got = store
        .query(&query(pipeline, "a", t0, t0 + 1, 10))
        .await
        .unwrap();
    assert_eq!(got, vec![again.clone()]);

    // A window written once more as final says so; one written open again does not.
    let mut fin = again.clone();
    fin.is_final = true;
    store.upsert(&[fin.clone()]).await.unwrap();
    let got = store
        .query(&query(pipeline, "a", t0, t0 + 1, 10))
        .await
        .unwrap();
    assert_eq!(got, vec![fin], "the final flag is kept");
    store.upsert(&[again.clone()]).await.unwrap();
    let got = store
        .query(&query(pipeline, "a", t0, t0 + 1, 10))
        .await
        .unwrap();
    assert_eq!(got, vec![again], "and replaced like every value");

    let got = store
        .query(&query(pipeline, "b", t0, t0 + 5 * 60_000, 10))
        .await
        .unwrap();
    assert_eq!(got, vec![rows[5].clone()], "groups are separate");

    let got = store
        .query(&query(pipeline, "nobody", t0, t0 + 5 * 60_000, 10))
        .await
        .unwrap();
    assert!(got.is_empty());

    // Every group of one aggregation in a range of starts, and nothing of another one (named
    // so that it sorts right after: the same name with a suffix).
    let mut other = rows[5].clone();
    other.aggregation = "per_minute_2".into();
    store.upsert(&[other]).await.unwrap();
    let mut got = store
        .windows_between(pipeline, "per_minute", t0, t0 + 2 * 60_000)
        .await
        .unwrap();
    got.sort_by(|a, b| (&a.group_key, a.window_start).cmp(&(&b.group_key, b.window_start)));
    let starts: Vec<(&str, i64)> = got
        .iter()
        .map(|w| (w.group_key.as_str(), w.window_start))
        .collect();
    assert_eq!(starts, [("a", t0), ("a", t0 + 60_000), ("b", t0)]);
    assert!(got.iter().all(|w| w.aggregation == "per_minute"));

    checkpoints(store, pipeline).await;
    ledger(store, pipeline).await;
}

fn ledger_row(pipeline: &str, hour: i64, since: i64, aggregation: &str, n: i64) -> LedgerRow {
    LedgerRow {
        pipeline: pipeline.into(),
        hour,
        source: format!("{pipeline}.enriched:0"),
        since,
        aggregation: aggregation.into(),
        counts: [("counted".to_owned(), n), ("too_late".to_owned(), 1)].into(),
    }
}

async fn ledger(store: &dyn AggregateStore, pipeline: &str) {
    let h = 1_700_002_800_000; // an hour's start
    let hour = 3_600_000;
    assert_eq!(
        store.load_ledger(pipeline, h, h + hour).await.unwrap(),
        vec![]
    );
    let rows = vec![
        ledger_row(pipeline, h, 0, "", 5),
        ledger_row(pipeline, h, 0, "per_minute", 4),
        ledger_row(pipeline, h, 90, "per_minute", 2),
        ledger_row(pipeline, h + hour, 50, "per_minute", 7),
        ledger_row(pipeline, h + 2 * hour, 80, "per_minute", 9),
    ];
    store.save_ledger(&rows).await.unwrap();
    // Written again with a new count: replaced, not added.
    let again = ledger_row(pipeline, h, 0, "per_minute", 6);
    store
        .save_ledger(std::slice::from_ref(&again))
        .await
        .unwrap();
    let mut got = store.load_ledger(pipeline, h, h + 2 * hour).await.unwrap();
    got.sort_by(|a, b| (a.hour, a.since, &a.aggregation).cmp(&(b.hour, b.since, &b.aggregation)));
    assert_eq!(
        got,
        vec![rows[0].clone(), again, rows[2].clone(), rows[3].clone()],
        "the hours of the range, rows of one hour apart by since and aggregation"
    );
    assert_eq!(
        store
            .load_ledger(&format!("{pipeline}-other"), h, h + 3 * hour)
            .await
            .unwrap(),
        vec![],
        "pipelines are separate"
    );
}

fn checkpoint_key(pipeline: &str, partition: i32) -> CheckpointKey {
    CheckpointKey {
        group: format!("{pipeline}-group"),
        topic: format!("{pipeline}.enriched"),
        partition,
    }
}

async fn checkpoints(store: &dyn AggregateStore, pipeline: &str) {
    let key = checkpoint_key(pipeline, 0);
    assert_eq!(store.load_checkpoint(&key).await.unwrap(), None, "none yet");
    let first = Checkpoint {
        key: key.clone(),
        next_offset: 10,
        state: vec![1, 2, 3],
    };
    let other = Checkpoint {
        key: checkpoint_key(pipeline, 1),
        next_offset: 7,
        state: vec![],
    };
    store
        .save_checkpoints(&[first.clone(), other.clone()])
        .await
        .unwrap();
    assert_eq!(store.load_checkpoint(&key).await.unwrap(), Some(first));
    // A later checkpoint replaces the earlier one whole.
    let second = Checkpoint {
        key: key.clone(),
        next_offset: 25,
        state: vec![9; 100_000],
    };
    store
        .save_checkpoints(std::slice::from_ref(&second))
        .await
        .unwrap();
    assert_eq!(store.load_checkpoint(&key).await.unwrap(), Some(second));
    assert_eq!(
        store.load_checkpoint(&other.key).await.unwrap(),
        Some(other),
        "partitions are separate"
    );
}

/// For stores that outlive their process: what [`run`] wrote is still there.
pub async fn run_after_reopen(store: &dyn AggregateStore, pipeline: &str) {
    let got = store
        .query(&query(
            pipeline,
            "b",
            1_700_000_040_000,
            1_800_000_000_000,
            10,
        ))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].count, 100);
    let cp = store
        .load_checkpoint(&checkpoint_key(pipeline, 0))
        .await
        .unwrap()
        .expect("the checkpoint survived");
    assert_eq!(cp.next_offset, 25);
}
