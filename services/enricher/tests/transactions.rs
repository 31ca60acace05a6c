//! The `instream-enricher` binary in transactional delivery while the embedded broker fails
//! requests or is down: batches whose writes time out are aborted and done again, commits
//! and aborts the broker does not finish are called again, a refusal no retry mends stops
//! it naming the refusal, a shutdown is not held up by a waiting commit, and a broker down
//! at start is waited for. Real Redis. The embedded broker neither stores transactional
//! offsets nor hides aborted batches, so exactly-once itself is `kill.rs`'s to show on a
//! real Kafka; with `INSTREAM_TEST_KAFKA` these tests return at once (they need the embedded
//! broker's failure injection).

mod common;

use std::time::Duration;

use common::*;
use instream_testkit::metric_sum;

/// The same in transactional delivery, the broker refusing (not authorized) to add the
/// enriched topic's partitions to the transaction, from the first batch on: no record gets
/// an error of its own (they are purged with the transaction), yet the enricher stops naming
/// the refusal instead of doing the batch again forever; restarted once the broker accepts,
/// it writes every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_refused_for_good_stops_the_enricher_and_a_restart_loses_none() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    if skipped_without_the_embedded_broker() {
        return;
    }
    let s = scenario("transactional", "").await;
    s.broker
        .fail_requests(
            RDKafkaApiKey::AddPartitionsToTxn,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 3],
        )
        .unwrap();
    let child = spawn(&s.config);
    stops_naming_the_refusal_and_restarts(&s, child, RDKafkaApiKey::AddPartitionsToTxn).await;
}

/// Transactional delivery with the broker failing every write with an error it retries
/// (too few replicas in sync) for longer than the transaction timeout, from the first batch
/// on: the batch's writes time out in its transaction, which is aborted and the batch done
/// again, as often as it takes. The broker also fails the ends of transactions for a while
/// (coordinator loading): a commit or abort not finished in time is called again. The
/// enricher stays up, and once the broker takes writes again every event comes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_failing_past_the_transaction_timeout_abort_the_batch_and_do_it_again() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    if skipped_without_the_embedded_broker() {
        return;
    }
    // The error counts below outlast the 2 s timeouts only with librdkafka's retry pauses
    // (100 ms doubling to 1 s): pinned here rather than left to its defaults.
    let s = scenario(
        "transactional",
        "transaction_timeout = \"2s\"\n[kafka.producer]\n\"retry.backoff.ms\" = \"100\"\n\"retry.backoff.max.ms\" = \"1000\"\n",
    )
    .await;
    // Set before the enricher starts (the raw records are written already), so that its
    // first batches meet them whatever its speed.
    s.broker
        .fail_requests(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 40],
        )
        .unwrap();
    s.broker
        .fail_requests(
            RDKafkaApiKey::EndTxn,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 12],
        )
        .unwrap();
    let mut child = spawn(&s.config);
    let log = child.1.clone().unwrap();
    wait_for_log(
        &mut child,
        &["aborting its transaction and doing it again"],
        "a batch aborted to be done again",
    )
    .await;
    let repeated = check_output(&s, child).await;
    let text = std::fs::read_to_string(&log).unwrap();
    let (redone, called_again) = (
        text.matches("doing it again").count(),
        text.matches("calling it again").count(),
    );
    eprintln!(
        "{}: {redone} batches done again, {called_again} transactional calls repeated, {repeated} repeated copies",
        s.delivery
    );
    assert!(
        called_again > 0,
        "a commit or abort the broker did not finish in time is called again"
    );
}

/// Shutdown while the broker does not finish a transaction's commit (its coordinator keeps
/// answering "loading"): the enricher stops within seconds, not after the transaction
/// timeout, saying it left the transaction to the broker; nothing of the batch was counted
/// as committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_a_commit_waits_for_the_broker_leaves_the_transaction_to_it() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    if skipped_without_the_embedded_broker() {
        return;
    }
    let s = scenario("transactional", "transaction_timeout = \"60s\"\n").await;
    s.broker
        .fail_requests(
            RDKafkaApiKey::EndTxn,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 500],
        )
        .unwrap();
    let mut child = spawn(&s.config);
    let log = child.1.clone().unwrap();
    // The first transaction's end: its commit, or an abort (a rebalance at the start).
    wait_for_log(
        &mut child,
        &[
            "commit_transaction did not complete",
            "abort_transaction did not complete",
        ],
        "a transaction's end waiting for the broker",
    )
    .await;
    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", s.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (committed, _) = metric_sum(
        &metrics,
        "instream_enrich_transactions_total",
        "outcome=\"committed\"",
    );
    assert_eq!(committed, 0.0, "no transaction could end");
    let asked = std::time::Instant::now();
    child.terminate().unwrap();
    let status = child.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "{status}");
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "stopped {took:?} after being asked, not at the 60 s transaction timeout"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("left to the broker") && !text.contains("drained and committed"),
        "says the transaction was left open: {text}"
    );
    s.broker
        .clear_request_errors(RDKafkaApiKey::EndTxn)
        .unwrap();
}

/// Transactional delivery started while the broker is down: the enricher waits for it to
/// register its transactional id (as its consumer waits to join), rather than exiting; once
/// the broker is up, every event comes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactional_enricher_started_while_the_broker_is_down_waits_for_it() {
    if skipped_without_the_embedded_broker() {
        return;
    }
    let s = scenario("transactional", "").await;
    s.broker.set_up(false).unwrap();
    let mut child = spawn(&s.config);
    wait_for_log(
        &mut child,
        &["init_transactions did not complete"],
        "the enricher waiting for the broker to register its id",
    )
    .await;
    assert!(
        !child.exited(),
        "the enricher exited while the broker was down"
    );
    let readyz = reqwest::get(format!("http://127.0.0.1:{}/readyz", s.admin))
        .await
        .unwrap();
    assert_eq!(
        readyz.status(),
        503,
        "not ready while waiting for the broker"
    );
    s.broker.set_up(true).unwrap();
    let repeated = check_output(&s, child).await;
    eprintln!("{}: {repeated} repeated copies", s.delivery);
}
