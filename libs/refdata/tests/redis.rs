//! RedisRefStore against a real redis-server: one pipelined batch answers hashes, JSON
//! strings, missing keys and wrong-type keys one by one; a dead server is an error to retry.

use instream_core::config::RefDataConfig;
use instream_pipeline::RecordShape;
use instream_refdata::{Found, RedisRefStore, RefDataError, RefStore};
use instream_testkit::RedisServer;

fn config(url: String) -> RefDataConfig {
    RefDataConfig {
        redis_url: url,
        timeout: std::time::Duration::from_secs(2),
        ..RefDataConfig::default()
    }
}

async fn run(conn: &mut redis::aio::MultiplexedConnection, args: &[&str]) {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    let _: redis::Value = cmd.query_async(conn).await.unwrap();
}

#[tokio::test]
async fn a_batch_answers_each_key_on_its_own() {
    let server = RedisServer::start().unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    run(
        &mut conn,
        &["HSET", "customer:1", "tier", "gold", "region", "eu"],
    )
    .await;
    run(
        &mut conn,
        &["SET", "airport:OSL", r#"{"city":"Oslo","elevation":208}"#],
    )
    .await;
    run(&mut conn, &["SET", "airport:BAD", "not json"]).await;
    run(&mut conn, &["SET", "customer:str", "a string, not a hash"]).await;

    let store = RedisRefStore::connect(&config(server.url())).await.unwrap();
    store.ping().await.unwrap();
    let answers = store
        .lookup_many(&[
            ("customer:1".into(), RecordShape::Hash),
            ("customer:404".into(), RecordShape::Hash),
            ("airport:OSL".into(), RecordShape::Json),
            ("airport:BAD".into(), RecordShape::Json),
            ("customer:str".into(), RecordShape::Hash),
            ("airport:404".into(), RecordShape::Json),
        ])
        .await
        .unwrap();
    assert_eq!(answers.len(), 6);
    match &answers[0] {
        Found::Record(r) => {
            assert_eq!(r["tier"], "gold");
            assert_eq!(r["region"], "eu");
        }
        other => panic!("customer:1: {other:?}"),
    }
    assert_eq!(answers[1], Found::Missing);
    match &answers[2] {
        Found::Record(r) => assert_eq!(r["elevation"], 208),
        other => panic!("airport:OSL: {other:?}"),
    }
    assert!(
        matches!(answers[3], Found::Malformed(_)),
        "{:?}",
        answers[3]
    );
    assert!(
        matches!(answers[4], Found::Malformed(_)),
        "{:?}",
        answers[4]
    );
    assert_eq!(answers[5], Found::Missing);
}

#[tokio::test]
async fn a_stopped_server_is_an_error_to_retry_not_a_miss() {
    let server = RedisServer::start().unwrap();
    let store = RedisRefStore::connect(&config(server.url())).await.unwrap();
    drop(server);
    let err = store
        .lookup_many(&[("customer:1".into(), RecordShape::Hash)])
        .await
        .unwrap_err();
    assert!(matches!(err, RefDataError::Unavailable(_)), "{err}");
}
